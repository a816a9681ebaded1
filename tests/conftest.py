"""Shared fixtures. Unit tests use a tiny random model with the real tokenizer; tests
marked ``slow`` use the real bundled SmolLM2-135M-Instruct."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer random Llama with SmolLM2's tokenizer and chat template (a normal model folder)."""
    from align.models import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-model") / "model")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "dpo_en_demo.json").exists():
        pytest.fail(f"third-party test data not found at {SHARED_DATA} (the repo expects ../shared/data beside it)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def bundled_model() -> str:
    """The real bundled model's spec; converting it the first time takes ~40 s."""
    from align.models import DEFAULT_MODEL, resolve_model

    resolve_model(DEFAULT_MODEL)
    return DEFAULT_MODEL


def pytest_configure(config: pytest.Config) -> None:
    if os.environ.get("PYTEST_XDIST_WORKER"):
        # `make test` runs two workers on two cores: one torch thread each, for the worker and the processes it
        # starts (two torch jobs of two threads each on two cores ran 10-25x slower than of one).
        os.environ["OMP_NUM_THREADS"] = "1"
        import torch

        torch.set_num_threads(1)
    # Keep wandb off the network and out of the user's account in tests.
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """The reliability catalogue's count (README, Reliability): every case asserts that no row was lost,
    doubled or torn, so a case that passed lost no data."""
    outcomes = {outcome: sum(1 for report in terminalreporter.stats.get(outcome, [])
                             if "reliability" in report.keywords and (report.when == "call" or outcome == "skipped"))
                for outcome in ("passed", "failed", "skipped")}
    if any(outcomes.values()):
        lost = "none" if not outcomes["failed"] else f"unknown in {outcomes['failed']} failed case(s): see above"
        terminalreporter.write_line(f"reliability catalogue: {sum(outcomes.values())} cases run, "
                                    f"{outcomes['passed']} passed, {outcomes['failed']} failed, "
                                    f"{outcomes['skipped']} skipped; data lost: {lost}")
