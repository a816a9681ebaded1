"""`align pipeline run`: a stage interrupted in training finishes on rerun without redoing earlier stages; the
stages chain the files each one says it wrote (a full fine-tune's weights, not an adapter)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from align.data.io import sha256_of
from align.models import resolve_model
from align.pipeline import Manifest, load_pipeline_config, run_pipeline

REPO = Path(__file__).resolve().parent.parent


def _config(tmp_path: Path, tiny_model_dir: Path, **train: object) -> Path:
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
                  "per_device_train_batch_size": 2, "max_length": 96, "ref_cache_dir": str(tmp_path / "cache"),
                  **train},
        "eval": {"prompts": str(prompts), "judge": str(rules), "max_new_tokens": 12},
    }
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def kill_when_written(cmd: list[str], env: dict[str, str], marker: Path) -> None:
    """Run ``cmd`` and SIGKILL it as soon as ``marker`` exists (e.g. a training checkpoint)."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not marker.exists():
        assert proc.poll() is None, f"the pipeline ended before {marker} was written"
        assert time.time() < deadline
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


@pytest.mark.reliability
def test_pipeline_killed_in_training_resumes_without_redoing_earlier_stages(tiny_model_dir: Path,
                                                                            tmp_path: Path) -> None:
    config = _config(tmp_path, tiny_model_dir)
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    cmd = [sys.executable, "-m", "align", "pipeline", "run", str(config)]
    kill_when_written(cmd, env, run / "train" / "checkpoints" / "checkpoint-4" / "trainer_state.json")
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


@pytest.mark.parametrize("method", ["dpo", "kto"])
def test_a_full_fine_tune_pipeline_evaluates_the_fine_tuned_model(method: str, tiny_model_dir: Path,
                                                                   tmp_path: Path) -> None:
    # lora: null is a full fine-tune: the run writes model/, no adapter/, and eval must score those weights.
    config = load_pipeline_config(_config(tmp_path, tiny_model_dir, method=method, lora=None, max_steps=2,
                                          save_steps=10))
    run = tmp_path / "run"
    first = run_pipeline(config)
    assert first.ran == ["generate", "label", "pairs", "train", "eval"]
    weights = run / "train" / "model"
    assert (weights / "config.json").exists() and not (run / "train" / "adapter").exists()
    assert sha256_of(weights / "model.safetensors") != sha256_of(tiny_model_dir / "model.safetensors")
    stages = json.loads((run / "manifest.json").read_text())["stages"]
    trained_on = run / ("pairs.jsonl" if method == "dpo" else "unpaired.jsonl")
    assert stages["train"]["inputs"]["data"] == sha256_of(trained_on)
    assert stages["train"]["outputs"]["weights"] == str(weights)
    assert stages["eval"]["inputs"]["weights"] == sha256_of(weights)
    # Eval's outputs are the ones its result named, answers included; the pipeline builds none of these paths.
    assert stages["eval"]["outputs"] == {"metrics": str(run / "eval" / "metrics.json"),
                                         "report": str(run / "eval" / "report.md"),
                                         "per_prompt": str(run / "eval" / "per_prompt.jsonl"),
                                         "answers_model": str(run / "eval" / "responses_model.jsonl"),
                                         "answers_reference": str(run / "eval" / "responses_reference.jsonl")}
    assert first.report == stages["eval"]["outputs"]["report"]
    scored = resolve_model(first.eval_metrics["model"])
    assert (scored.kind, Path(scored.path), scored.adapter) == ("local", weights, None)

    # Rerunning eval alone (train skipped as up to date) still finds the weights, through the manifest.
    again = run_pipeline(config, from_stage="eval")
    assert again.ran == ["eval"] and again.skipped == ["generate", "label", "pairs", "train"]
    assert resolve_model(again.eval_metrics["model"]).path == str(weights)


def test_each_stage_reads_the_file_the_stage_before_named_not_a_path_the_pipeline_builds(
        tiny_model_dir: Path, tmp_path: Path) -> None:
    config = load_pipeline_config(_config(tmp_path, tiny_model_dir, max_steps=2, save_steps=10))
    run = tmp_path / "run"
    run_pipeline(config)
    # The generate stage's candidates now live elsewhere, and its manifest entry says so.
    moved = tmp_path / "elsewhere" / "candidates.jsonl"
    moved.parent.mkdir()
    (run / "candidates.jsonl").rename(moved)
    manifest = json.loads((run / "manifest.json").read_text())
    manifest["stages"]["generate"]["outputs"]["candidates"] = str(moved)
    (run / "manifest.json").write_text(json.dumps(manifest))

    again = run_pipeline(config, from_stage="label")
    assert again.skipped == ["generate"] and again.ran == ["label", "pairs", "train", "eval"]
    assert not (run / "candidates.jsonl").exists()
    stages = json.loads((run / "manifest.json").read_text())["stages"]
    assert stages["label"]["inputs"]["candidates"] == sha256_of(moved)
    judged = {json.loads(line)["prompt_id"] for line in (run / "judgements.jsonl").read_text().splitlines()}
    assert judged == {json.loads(line)["prompt_id"] for line in moved.read_text().splitlines()}


def test_a_manifest_from_before_named_outputs_still_chains_its_stages(tmp_path: Path) -> None:
    # Run dirs written when outputs were a list carry on: nothing is redone for want of a name.
    stages = {"pairs": {"status": "done", "outputs": [str(tmp_path / "pairs.jsonl"), str(tmp_path / "unpaired.jsonl")]},
              "train": {"status": "done", "outputs": [str(tmp_path / "train" / "model")]},
              "eval": {"status": "done", "outputs": [str(tmp_path / "eval" / "metrics.json"),
                                                     str(tmp_path / "eval" / "report.md")]}}
    (tmp_path / "manifest.json").write_text(json.dumps({"stages": stages}))
    manifest = Manifest(tmp_path)
    assert manifest.output("pairs", "unpaired") == tmp_path / "unpaired.jsonl"
    assert manifest.output("train", "weights") == tmp_path / "train" / "model"
    assert manifest.output("train", "run_dir") == tmp_path / "train"
    assert manifest.output("eval", "metrics") == tmp_path / "eval" / "metrics.json"
