"""ORPO and SimPO (TRL's experimental ORPO and CPO trainers) through align: run dir, no reference anywhere, held-out
reward accuracy, and the same steps as TRL's own trainer on the same batches."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import align.train
from align.data.io import iter_rows, write_records
from align.errors import ConfigError
from tests.test_train import _pairs


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "pairs.jsonl"
    write_records(path, _pairs(24))
    return path


def _settings(model: Path, data: Path, out: Path, cache: Path, **extra) -> dict:
    return {"model": str(model), "data": str(data), "output_dir": str(out), "ref_cache_dir": str(cache),
            "max_steps": 4, "per_device_train_batch_size": 2, "max_length": 96, "save_steps": 2, **extra}


@pytest.mark.parametrize("method", ["orpo", "simpo"])
def test_reference_free_run_dir_and_held_out_reward_accuracy(method: str, tiny_model_dir: Path, pairs_file: Path,
                                                            tmp_path: Path) -> None:
    cache = tmp_path / "ref-cache"
    result = getattr(align.train, method)(**_settings(tiny_model_dir, pairs_file, tmp_path / method, cache,
                                                      eval_split=0.25))
    run = Path(result.run_dir)
    for name in ("config.yaml", "data.json", "trl_args.json", "preflight.txt", "metrics.jsonl", "run.json",
                 "diagnosis.json", "eval_before.json", "adapter/adapter_config.json"):
        assert (run / name).exists(), name
    assert result.method == method and result.steps == 4
    assert result.reference == f"none ({method.upper()} uses no reference model)" and result.ref_cache is None
    assert not cache.exists() or not any(cache.rglob("*"))  # nothing of a reference computed or cached
    args = json.loads((run / "trl_args.json").read_text())
    assert "precompute_ref_log_probs" not in args
    if method == "simpo":
        assert (args["loss_type"], args["cpo_alpha"], args["beta"], args["simpo_gamma"]) == ("simpo", 0.0, 2.0, 1.0)
    for figures in (result.eval_before, result.eval_after):
        assert 0.0 <= figures["rewards/accuracies"] <= 1.0 and "rewards/margins" in figures
    last_step = [m for _, m in iter_rows(run / "metrics.jsonl") if "loss" in m][-1]
    assert "rewards/accuracies" in last_step and "logps/chosen" in last_step


@pytest.mark.parametrize("method", ["orpo", "simpo"])
def test_steps_equal_trls_own_trainer_on_the_same_batches(method: str, tiny_model_dir: Path, tmp_path: Path) -> None:
    import torch
    import transformers
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from align.train.config import trl_config_class, trl_trainer_class

    rows = _pairs(4)
    data = tmp_path / "pairs.jsonl"
    write_records(data, rows)
    settings = {"max_steps": 2, "per_device_train_batch_size": 4, "max_length": 96, "learning_rate": 1e-3,
                "seed": 0, "lora": False, "eval_split": 0}
    ours = getattr(align.train, method)(model=str(tiny_model_dir), data=str(data), output_dir=str(tmp_path / "align"),
                                        **settings)
    align_losses = [m["loss"] for _, m in iter_rows(Path(ours.run_dir) / "metrics.jsonl") if "loss" in m]

    simpo = {"loss_type": "simpo", "cpo_alpha": 0.0, "beta": 2.0, "simpo_gamma": 1.0} if method == "simpo" else {}
    args = trl_config_class(method)(output_dir=str(tmp_path / "trl"), use_cpu=True, bf16=False, report_to=[],
                                    max_steps=2, per_device_train_batch_size=4, max_length=96, learning_rate=1e-3,
                                    gradient_checkpointing=False, logging_steps=1, save_strategy="no", seed=0,
                                    **simpo)
    transformers.set_seed(0)
    trainer = trl_trainer_class(method)(model=AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32),
                                        args=args, processing_class=AutoTokenizer.from_pretrained(tiny_model_dir),
                                        train_dataset=Dataset.from_list(rows))
    trainer.train()
    trl_losses = [m["loss"] for m in trainer.state.log_history if "loss" in m]
    assert len(align_losses) == len(trl_losses) == 2
    assert align_losses == pytest.approx(trl_losses, abs=1e-5)
    assert align_losses[1] != pytest.approx(align_losses[0], abs=1e-4)  # the first step moved the model


def test_a_reference_for_orpo_or_simpo_is_an_error(tmp_path: Path, pairs_file: Path) -> None:
    for method in ("orpo", "simpo"):
        with pytest.raises(ConfigError, match=f"{method.upper()} uses no reference model"):
            getattr(align.train, method)(data=str(pairs_file), output_dir=str(tmp_path / "x"), reference="base-2")
    with pytest.raises(ConfigError, match="loss_type"):
        align.train.simpo(data=str(pairs_file), output_dir=str(tmp_path / "x"), loss_type="sigmoid")
    assert not (tmp_path / "x").exists()
