"""TRL users at home: `--key value` as well as `key=value`, TRL's script names (model_name_or_path, dataset_name,
use_peft, lora_r, ...) as align's, and a TRL-style recipe YAML that trains through `align train dpo --config`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from align.config import override_texts
from align.errors import ConfigError
from align.train import load_train_config
from align.train.trl_names import from_trl_names
from tests.clihelp import run_align
from tests.test_train import pairs_file  # noqa: F401  (a module fixture)


def test_trl_command_line_forms_read_as_overrides() -> None:
    assert override_texts(["--beta", "0.1", "--max-steps=8", "max_length=96", "--gradient_checkpointing",
                           "--use_peft", "seed=3", "--learning_rate", "-1e-4", "--bf16"]) == [
        "beta=0.1", "max_steps=8", "max_length=96", "gradient_checkpointing=true", "use_peft=true", "seed=3",
        "learning_rate=-1e-4", "bf16=true"]
    with pytest.raises(ConfigError, match="'---beta'"):
        override_texts(["---beta", "1"])


def test_gkd_names_become_a_distillation_config() -> None:
    from align.train.distill.config import DistillConfig

    config = DistillConfig(**{"model_name_or_path": "student", "teacher_model_name_or_path": "teacher",
                              "dataset_name": "prompts.jsonl", "lora_r": 8, "output_dir": "o", "lmbda": 0.5})
    assert (config.model, config.teacher, config.data, config.lora.r) == ("student", "teacher", "prompts.jsonl", 8)
    assert config.trl_overrides == {"lmbda": 0.5}


def test_trl_script_names_become_aligns() -> None:
    config = load_train_config("dpo", {
        "model_name_or_path": "bundled:smollm2-135m-instruct", "dataset_name": "owner/prefs",
        "dataset_train_split": "train_prefs", "dataset_test_split": "test_prefs", "use_peft": True, "lora_r": 8,
        "lora_alpha": 16, "lora_target_modules": ["q_proj", "v_proj"], "dtype": "float32",
        "attn_implementation": "eager", "output_dir": "runs/x", "beta": 0.2})
    assert (config.model, config.data, config.split) == ("bundled:smollm2-135m-instruct", "owner/prefs", "train_prefs")
    assert (config.eval_data, config.eval_data_split) == ("owner/prefs", "test_prefs")  # TRL evaluates on it
    assert (config.lora.r, config.lora.lora_alpha, config.lora.target_modules) == (8, 16, ["q_proj", "v_proj"])
    assert config.trl_overrides == {"beta": 0.2, "model_init_kwargs": {"dtype": "float32",
                                                                       "attn_implementation": "eager"}}
    full = load_train_config("dpo", {"data": "p.jsonl", "output_dir": "o", "use_peft": False})
    assert full.lora is None  # TRL's use_peft: false is a full fine-tune
    assert load_train_config("dpo", {"data": "p.jsonl", "output_dir": "o"}).lora is not None  # align's default


@pytest.mark.parametrize(("settings", "message"), [
    ({"model": "a", "model_name_or_path": "b"}, "'model_name_or_path' .* and 'model' .* are both set"),
    ({"use_peft": False, "lora_r": 8}, "full fine-tune, but LoRA settings are given \\(r\\)"),
    ({"load_in_8bit": True}, "'load_in_8bit'.*load_in_4bit"),
    ({"dataset_config": "en"}, "'dataset_config'.*save_to_disk"),
    ({"lora": {"r": 4}, "lora_r": 8}, "'r' is set twice"),
])
def test_conflicting_or_unknown_trl_names_are_clear_errors(settings: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        from_trl_names(settings)


def test_a_recipe_error_points_at_its_line(tmp_path: Path) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("model_name_or_path: a\ndataset_name: p.jsonl\nuse_peft: false\nlora_r: 8\noutput_dir: o\n")
    with pytest.raises(ConfigError, match=f"{recipe}:3: 'use_peft' is false"):
        load_train_config("dpo", recipe)


def test_a_trl_recipe_trains_with_trl_style_overrides(tiny_model_dir: Path, pairs_file: Path,  # noqa: F811
                                                      tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({  # the shape of TRL's examples/cli_configs and its script arguments
        "model_name_or_path": str(tiny_model_dir), "dataset_name": str(pairs_file), "learning_rate": 1.0e-4,
        "lr_scheduler_type": "cosine", "per_device_train_batch_size": 2, "gradient_accumulation_steps": 1,
        "logging_steps": 1, "report_to": "none", "use_peft": True, "lora_r": 4, "lora_alpha": 8,
        "lora_target_modules": ["q_proj", "v_proj"], "dtype": "float32", "max_length": 96}))
    code, out, err = run_align(capsys, "train", "dpo", "--config", recipe, "--output_dir", tmp_path / "run",
                               "--max_steps", "2", "--beta=0.2", "--save_strategy", "no", "eval_split=0")
    assert code == 0, err
    assert "DPO finished: 2 steps" in out
    adapter = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert (adapter["r"], adapter["lora_alpha"], sorted(adapter["target_modules"])) == (4, 8, ["q_proj", "v_proj"])
    trl_args = json.loads((tmp_path / "run" / "trl_args.json").read_text())
    assert (trl_args["beta"], trl_args["max_steps"], trl_args["lr_scheduler_type"]) == (0.2, 2, "cosine")
    assert trl_args["model_init_kwargs"] == {"dtype": "float32"}
