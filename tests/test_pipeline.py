"""`align pipeline run`: a stage interrupted in training finishes on rerun without redoing earlier stages."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent


def _config(tmp_path: Path, tiny_model_dir: Path) -> Path:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"p{i}", "prompt": f"Say something about topic {i}."}) + "\n"
                               for i in range(12)))
    rules = tmp_path / "rules.yaml"
    rules.write_text("rules:\n  - name: short\n    max_chars: 40\n  - name: few_words\n    max_words: 6\n")
    config = {
        "run_dir": str(tmp_path / "run"),
        "generate": {"model": str(tiny_model_dir), "prompts": str(prompts), "num_candidates": 4,
                     "max_new_tokens": 16, "progress": False},
        "label": {"rules": str(rules)},
        "pairs": {"strategy": "best-worst"},
        "train": {"method": "dpo", "model": str(tiny_model_dir), "max_steps": 10, "save_steps": 2,
                  "per_device_train_batch_size": 2, "max_length": 96, "ref_cache_dir": str(tmp_path / "cache")},
        "eval": {"prompts": str(prompts), "judge": str(rules), "max_new_tokens": 12},
    }
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_pipeline_killed_in_training_resumes_without_redoing_earlier_stages(tiny_model_dir: Path,
                                                                            tmp_path: Path) -> None:
    config = _config(tmp_path, tiny_model_dir)
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    cmd = [sys.executable, "-m", "align", "pipeline", "run", str(config)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint = run / "train" / "checkpoints" / "checkpoint-4" / "trainer_state.json"
    deadline = time.time() + 300
    while not checkpoint.exists():
        assert proc.poll() is None, "the pipeline ended before training could be interrupted"
        assert time.time() < deadline
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = json.loads((run / "manifest.json").read_text())["stages"]
    assert [before[s]["status"] for s in ("generate", "label", "pairs", "train")] == ["done", "done", "done", "running"]
    candidates_mtime = (run / "candidates.jsonl").stat().st_mtime_ns
    judgements_mtime = (run / "judgements.jsonl").stat().st_mtime_ns

    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    after = json.loads((run / "manifest.json").read_text())["stages"]
    for stage in ("generate", "label", "pairs"):
        assert after[stage] == before[stage], f"{stage} was redone"
    assert (run / "candidates.jsonl").stat().st_mtime_ns == candidates_mtime
    assert (run / "judgements.jsonl").stat().st_mtime_ns == judgements_mtime
    assert after["train"]["status"] == after["eval"]["status"] == "done"
    assert after["train"]["summary"]["steps"] == 10
    assert "skipped (up to date): generate, label, pairs" in done.stdout
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    assert 0.0 <= metrics["win_rate"] <= 1.0

    # A third run has nothing left to do.
    again = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert again.returncode == 0 and "stages run: none" in again.stdout
