"""`align generate` as a user runs it: options, YAML, overrides, errors, and a real SIGKILL half-way."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from align.cli import app


def write_prompts(path: Path, count: int) -> Path:
    topics = ["rain", "tides", "bread", "stars", "rust", "bees", "maps", "ink", "salt", "wind"]
    rows = [{"id": f"q{i:03d}", "prompt": f"Question {i}: why does {topics[i % len(topics)]} " + "matter " * (i % 5)}
            for i in range(count)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def align_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "align", "generate", *args]


def run_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def test_cli_options_yaml_and_overrides(tiny_model_dir: Path, tmp_path: Path) -> None:
    prompts = write_prompts(tmp_path / "p.jsonl", 3)
    (tmp_path / "constitution.txt").write_text("Answer in one sentence.")
    (tmp_path / "gen.yaml").write_text(f"model: {tiny_model_dir}\nnum_candidates: 2\nmax_new_tokens: 4\n"
                                       "temperature: 0.3\nprogress: false\n")
    out = tmp_path / "c.jsonl"
    result = CliRunner().invoke(app, [
        "generate", "--config", str(tmp_path / "gen.yaml"), "--prompts", str(prompts), "-o", str(out),
        "--temperature", "0.9", "--top-p", "1.0", "--seed", "5", "--system-prompt", f"@{tmp_path / 'constitution.txt'}",
        "greedy_first=false", "mix=[{top_k: 3}]",
    ])
    assert result.exit_code == 0, result.output
    assert "wrote 6 candidates for 3 prompts" in result.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 3
    first, second = rows[0]["responses"]
    assert first["sampling"] == {"do_sample": True, "temperature": 0.9, "top_p": 1.0, "max_new_tokens": 4,
                                 "seed": first["sampling"]["seed"], "top_k": 3}
    assert second["sampling"]["temperature"] == 0.9 and "top_k" not in second["sampling"]
    assert rows[0]["teacher"]["system_prompt"] == "Answer in one sentence."

    again = CliRunner().invoke(app, ["generate", "--config", str(tmp_path / "gen.yaml"), "--prompts", str(prompts),
                                     "-o", str(out), "--temperature", "0.9", "--top-p", "1.0", "--seed", "5",
                                     "--system-prompt", f"@{tmp_path / 'constitution.txt'}",
                                     "greedy_first=false", "mix=[{top_k: 3}]"])
    assert again.exit_code == 0 and "nothing to do" in again.output


def test_cli_errors_exit_non_zero_and_name_the_place(tiny_model_dir: Path, tmp_path: Path) -> None:
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"id": "a", "prompt": "fine"}\n{"id": "b", "prompt": ""}\n')
    out = tmp_path / "c.jsonl"
    out.write_text("precious\n")
    bad = subprocess.run(align_command("--model", str(tiny_model_dir), "--prompts", str(prompts), "-o", str(out)),
                         capture_output=True, text=True, env=run_env())
    assert bad.returncode != 0
    assert f"{prompts}:2: field 'prompt': must not be empty" in bad.stderr
    assert out.read_text() == "precious\n"
    typo = subprocess.run(align_command("--prompts", str(prompts), "-o", str(out), "temprature=0.5"),
                          capture_output=True, text=True, env=run_env())
    assert typo.returncode != 0 and "did you mean 'temperature'" in typo.stderr


@pytest.mark.reliability
def test_sigkill_half_way_then_rerun_equals_an_uninterrupted_run(tiny_model_dir: Path, tmp_path: Path) -> None:
    prompts = write_prompts(tmp_path / "p.jsonl", 20)
    # batch_size=4 with 4 candidates: one prompt per batch, so a line is appended every few hundred ms.
    common = ["--model", str(tiny_model_dir), "--prompts", str(prompts), "--num-candidates", "4",
              "--max-new-tokens", "16", "--batch-size", "4", "--top-p", "1.0"]
    full = tmp_path / "full.jsonl"
    subprocess.run(align_command(*common, "-o", str(full)), check=True, capture_output=True, env=run_env())

    out = tmp_path / "killed.jsonl"
    process = subprocess.Popen(align_command(*common, "-o", str(out)), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, env=run_env())
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if out.exists() and out.read_bytes().count(b"\n") >= 5:
            break
        time.sleep(0.02)
    assert process.poll() is None, "the run finished before it could be killed; give it more work"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    lines_at_kill = out.read_bytes().count(b"\n")
    assert 5 <= lines_at_kill < 20

    rerun = subprocess.run(align_command(*common, "-o", str(out)), capture_output=True, text=True, env=run_env())
    assert rerun.returncode == 0, rerun.stderr
    assert "resumed" in rerun.stdout

    raw = out.read_text(encoding="utf-8")
    assert raw.endswith("\n")
    rows = [json.loads(line) for line in raw.splitlines()]  # every line valid JSON
    ids = [r["prompt_id"] for r in rows]
    reference = [json.loads(line) for line in full.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == len(reference) == 20
    assert len(set(ids)) == len(ids)
    texts = lambda rs: {r["prompt_id"]: [c["text"] for c in r["responses"]] for r in rs}  # noqa: E731
    assert texts(rows) == texts(reference)


@pytest.mark.parametrize("flag", ["--help"])
def test_help_lists_the_options(flag: str) -> None:
    result = CliRunner().invoke(app, ["generate", flag])
    assert result.exit_code == 0
    for option in ("--model", "--prompts", "--num-candidates", "--output", "--temperature", "--top-p",
                   "--max-new-tokens", "--seed", "--system-prompt", "--backend", "--batch-size", "--config"):
        assert option in result.output
