"""The pipeline's optional export stage: quantised copies of the student after eval, each served once by align's
server; skipped when up to date, carried on where a stopped one left off. (Its benchmarks are align eval --tasks,
tested in test_eval_retention.py.)"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from align.errors import ConfigError
from align.pipeline import load_pipeline_config, run_pipeline
from tests.test_pipeline import _config


def _with_export(path: Path, **export: object) -> Path:
    config = yaml.safe_load(path.read_text())
    config["export"] = export
    config["train"].update(max_steps=2, save_steps=10)
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.reliability
def test_export_quantises_and_serves_the_student_then_resumes_from_what_is_whole(
        tiny_model_dir: Path, tmp_path: Path) -> None:
    path = _with_export(_config(tmp_path, tiny_model_dir), quantize=["q8_0", "q4_1"])
    config = load_pipeline_config(path)
    first = run_pipeline(config)
    assert first.ran == ["generate", "label", "pairs", "train", "eval", "export"]
    run = tmp_path / "run"
    stage = json.loads((run / "manifest.json").read_text())["stages"]["export"]
    assert stage["outputs"]["q4_1"] == str(run / "export" / "q4_1")
    for fmt in ("q8_0", "q4_1"):
        assert (run / "export" / fmt / f"model-{fmt}.gguf").exists()
        summary = stage["summary"][fmt]
        assert summary["kl_per_token"] >= 0 and summary["serve_check"]["prompt"] == "Say something about topic 0."
        assert isinstance(summary["serve_check"]["answer"], str)
        # calibrated on the run's own training data (the pairs the train stage read)
        report = json.loads((run / "export" / fmt / "export.json").read_text())
        assert report["calibration"]["from"] == str(run / "pairs.jsonl")

    again = run_pipeline(config)
    assert again.ran == [] and "export" in again.skipped

    # Stopped after its first export: the rerun keeps that one (written whole) and makes the other.
    q8 = (run / "export" / "q8_0" / "model-q8_0.gguf").stat().st_mtime_ns
    shutil.rmtree(run / "export" / "q4_1")
    manifest = json.loads((run / "manifest.json").read_text())
    manifest["stages"]["export"]["status"] = "running"
    (run / "manifest.json").write_text(json.dumps(manifest))
    resumed = run_pipeline(config)
    assert resumed.ran == ["export"]
    assert (run / "export" / "q8_0" / "model-q8_0.gguf").stat().st_mtime_ns == q8
    assert (run / "export" / "q4_1" / "model-q4_1.gguf").exists()


def test_a_bad_export_section_fails_before_generation(tiny_model_dir: Path, tmp_path: Path) -> None:
    for export, message in (({"quantize": ["q2"]}, "unknown format"),
                            ({"quantize": ["fp8"]}, "needs a CUDA GPU"),
                            ({"quantize": ["q8_0"], "tasks": ["missing.yaml"]}, "no such task file")):
        path = _with_export(_config(tmp_path, tiny_model_dir), **export)
        with pytest.raises(ConfigError, match=f"section 'export': .*{message}"):
            run_pipeline(load_pipeline_config(path))
        assert not (tmp_path / "run" / "candidates.jsonl").exists()
