"""align.train.recorder: every recipe's run dir reads alike, and a resumed run keeps its first 'before'."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import align.train
import align.train.distill
from align.data.io import write_records
from align.train.recorder import RunRecorder

# What the recorder writes for every recipe (README, "The run dir").
RECORDED = ("config.yaml", "data.json", "trl_args.json", "metrics.jsonl", "curves.png", "run.json",
            "model/config.json", "model/tokenizer_config.json")
RUN_JSON = {"run_dir", "steps", "final_loss", "eval_before", "eval_after", "weights", "plot", "seconds", "method",
            "versions"}


def test_a_resumed_run_reads_its_eval_before_back_instead_of_measuring_again(tmp_path: Path) -> None:
    first = RunRecorder(tmp_path / "run", resume=False, report_to=[])
    assert first.eval_before(lambda: {"rewards/accuracies": 0.5}) == {"rewards/accuracies": 0.5}

    def measured_again() -> dict:
        raise AssertionError("a resumed run measured 'before' on a student that had already trained")

    first.release()  # the first run's process ended (killed): its lock on the run dir went with it
    resumed = RunRecorder(tmp_path / "run", resume=True, report_to=[])
    assert resumed.eval_before(measured_again) == {"rewards/accuracies": 0.5}


def test_dpo_and_distillation_run_dirs_are_laid_out_alike(tiny_model_dir: Path, tmp_path: Path) -> None:
    pairs = tmp_path / "pairs.jsonl"
    write_records(pairs, [{"prompt": f"Name a colour (#{i}).", "chosen": "Blue.", "rejected": "I cannot say, sorry."}
                          for i in range(4)])
    prompts = tmp_path / "prompts.jsonl"
    write_records(prompts, [{"id": f"q{i}", "prompt": f"Why is {t} interesting?"} for i, t in enumerate("abcd")])
    common = {"model": str(tiny_model_dir), "max_steps": 2, "per_device_train_batch_size": 2, "max_length": 64,
              "lora": False}
    dpo = align.train.dpo(**common, data=str(pairs), output_dir=str(tmp_path / "dpo"), eval_split=0,
                          ref_cache=False)
    distill = align.train.distill.distill(**common, data=str(prompts), output_dir=str(tmp_path / "distill"),
                                          teacher=str(tiny_model_dir), max_new_tokens=4)
    for result, method in ((dpo, "dpo"), (distill, "distill")):
        run = Path(result.run_dir)
        for name in RECORDED:
            assert (run / name).exists(), f"{method}: {name}"
        recorded = json.loads((run / "run.json").read_text())
        assert RUN_JSON <= set(recorded), f"{method}: run.json lacks {RUN_JSON - set(recorded)}"
        assert recorded["method"] == method and recorded["steps"] == 2
        assert recorded["weights"] == str(run / "model") and recorded["plot"] == str(run / "curves.png")
        assert set(recorded["versions"]) == {"torch", "transformers", "trl"}
        assert recorded["final_loss"] == pytest.approx(
            [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)][-1]["loss"])
