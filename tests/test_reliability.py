"""The reliability catalogue's kill tests for the stages that had none: `align label judge` and `align eval`,
each SIGKILLed part-way through its output by a real process, then rerun: the file and the result equal an
uninterrupted run's, with no row lost, doubled or torn. (The other stages' cases live beside their stage's tests;
every case carries the ``reliability`` mark and the README's table lists them all.)"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from align.models import build_tiny_model
from tests.test_generate_cli import run_env
from tests.test_label_judge import write_candidates

pytestmark = pytest.mark.reliability


def _align(*args: object) -> list[str]:
    return [sys.executable, "-m", "align", *map(str, args)]


def kill_after_lines(cmd: list[str], path: Path, lines: int) -> int:
    """Run ``cmd``, SIGKILL it once ``path`` holds ``lines`` whole lines; return how many it held then."""
    process = subprocess.Popen(cmd, env=run_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 180
    while process.poll() is None and time.monotonic() < deadline:
        if path.exists() and path.read_bytes().count(b"\n") >= lines:
            break
        time.sleep(0.01)
    assert process.poll() is None, f"{cmd[3:5]} finished before it could be killed; give it more work"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    return path.read_bytes().count(b"\n")


def rows(path: Path) -> list[dict]:
    raw = path.read_text(encoding="utf-8")
    assert raw.endswith("\n")  # no torn last line
    return [json.loads(line) for line in raw.splitlines()]


def test_label_judge_killed_part_way_then_rerun_equals_an_uninterrupted_run(tiny_model_dir: Path,
                                                                           tmp_path: Path) -> None:
    answers = ["Paris.", "It is Paris, the capital.", "Lyon, I think.", "Marseille!"]
    candidates = write_candidates(tmp_path / "c.jsonl", {f"p{i:03d}": (f"Question {i}: where is the capital?",
                                                                       answers[i % 2:] + answers[:i % 2])
                                                         for i in range(60)})
    common = ["label", "judge", candidates, "--model", tiny_model_dir, "--batch-size", "4", "--no-progress"]
    subprocess.run(_align(*common, "-o", tmp_path / "full.jsonl"), env=run_env(), check=True, capture_output=True)
    full = rows(tmp_path / "full.jsonl")
    assert len(full) == 60 * 6  # every two of four answers

    killed = tmp_path / "killed.jsonl"
    at_kill = kill_after_lines(_align(*common, "-o", killed), killed, 32)
    assert 32 <= at_kill < len(full)
    rerun = subprocess.run(_align(*common, "-o", killed), env=run_env(), capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert f"({at_kill} already there, skipped)" in rerun.stdout, rerun.stdout

    again = rows(killed)
    assert [r["id"] for r in again] == [r["id"] for r in full]  # the candidates' order, once each
    for ours, theirs in zip(again, full):
        assert ours["label"] == theirs["label"], ours["id"]
        assert ours["confidence"] == pytest.approx(theirs["confidence"], abs=1e-5), ours["id"]


def test_eval_killed_while_answering_then_rerun_gives_the_uninterrupted_metrics(tiny_model_dir: Path,
                                                                               tmp_path: Path) -> None:
    student = build_tiny_model(tmp_path / "student", seed=1)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"q{i:02d}", "prompt": f"Tell me about topic {i}."}) + "\n"
                               for i in range(16)))
    rules = tmp_path / "rules.yaml"
    rules.write_text("rules:\n  - name: short\n    max_chars: 60\n")
    common = ["eval", "--model", student, "--reference", tiny_model_dir, "--prompts", prompts, "--judge", rules,
              "max_new_tokens=16", "batch_size=2"]
    done = subprocess.run(_align(*common, "-o", tmp_path / "full"), env=run_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr

    out = tmp_path / "killed"
    at_kill = kill_after_lines(_align(*common, "-o", out), out / "responses_model.jsonl", 4)
    assert 4 <= at_kill < 16
    rerun = subprocess.run(_align(*common, "-o", out), env=run_env(), capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr

    for name in ("responses_model.jsonl", "responses_reference.jsonl"):
        answered = {r["prompt_id"]: r["responses"][0]["text"] for r in rows(out / name)}
        assert len(rows(out / name)) == len(answered) == 16, name
        assert answered == {r["prompt_id"]: r["responses"][0]["text"] for r in rows(tmp_path / "full" / name)}
    metrics, expected = (json.loads((folder / "metrics.json").read_text()) for folder in (out, tmp_path / "full"))
    for key in ("win_rate", "wins", "ties", "losses", "score_diff", "mean_length_model", "mean_length_reference"):
        assert metrics[key] == expected[key], key
    assert metrics["kl_per_token"] == pytest.approx(expected["kl_per_token"], abs=1e-6)
