"""`align eval --model URL`: a student served over an OpenAI-compatible API (here `align serve` on 127.0.0.1 over the
tiny model, real HTTP) scored against the same weights loaded locally: what a quantised, served export is compared
with. Same weights, so the served student must say the same greedy answers and sit at zero KL."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from align.generate.serving.http import Server
from tests.clihelp import run_align
from tests.test_serve import served  # noqa: F401  (a module fixture: align serve over the tiny model, named "tiny")

REPO = Path(__file__).resolve().parent.parent
RULES = REPO / "configs" / "rules" / "concise.yaml"


@pytest.fixture(scope="module")
def prompts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first 8 of the quickstart's held-out questions."""
    path = tmp_path_factory.mktemp("prompts") / "heldout.jsonl"
    lines = (REPO / "datasets" / "prompts" / "concise_heldout.jsonl").read_text().splitlines()[:8]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_a_served_student_with_the_same_weights_answers_alike_at_zero_kl(
        served: Server, tiny_model_dir: Path, prompts: Path, tmp_path: Path,  # noqa: F811
        capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "greedy"
    code, stdout, err = run_align(capsys, "eval", "--model", served.base_url, "--reference", tiny_model_dir,
                                  "--prompts", prompts, "--judge", RULES, "--greedy", "-o", out, "max_new_tokens=12")
    assert code == 0, err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["model"] == served.base_url and metrics["prompts"] == 8
    assert metrics["identical_answers"] == 1.0 and metrics["ties"] == 8
    assert abs(metrics["kl_per_token"]) < 1e-3  # the server's own log-probs against a local forward pass
    assert "identical answers: 1.000" in stdout
    row = json.loads((out / "responses_model.jsonl").read_text().splitlines()[0])
    assert row["teacher"]["backend"] == "openai" and row["teacher"]["model"] == "tiny"


def test_sampled_answers_of_a_served_student_are_scored_on_its_own_tokens(
        served: Server, tiny_model_dir: Path, prompts: Path, tmp_path: Path) -> None:  # noqa: F811
    from align.eval import EvalConfig, run_eval

    metrics = run_eval(EvalConfig(model=served.base_url, model_name="tiny", reference=str(tiny_model_dir),
                                  prompts=prompts, judge=RULES, output_dir=tmp_path / "sampled",
                                  samples_per_prompt=2, max_new_tokens=12)).metrics
    assert metrics["kl_caveat"] is None  # sampled at temperature 1: an unbiased estimate
    assert abs(metrics["kl_per_token"]) < 1e-3 and metrics["wins"] + metrics["ties"] + metrics["losses"] == 16


def test_what_needs_the_served_students_weights_is_refused_up_front(served: Server, prompts: Path,  # noqa: F811
                                                                     tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_align(capsys, "eval", "--model", served.base_url, "--reference", "r", "--prompts", prompts,
                             "--judge", RULES, "--pairs", tmp_path / "pairs.jsonl", "-o", tmp_path / "x")
    assert code != 0 and "pairs (implicit rewards) and teacher (KL to a teacher) need its weights" in err
    assert not (tmp_path / "x").exists()  # refused before anything ran
