"""Every config the project ships loads and validates (no model is loaded)."""

from __future__ import annotations

from pathlib import Path

import pytest

from align.errors import ConfigError
from align.pipeline import check_sections, load_pipeline_config
from align.train import load_train_config

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("pipeline-*.yaml")) + ["quickstart.yaml"])
def test_pipeline_configs_validate(name: str) -> None:
    config = load_pipeline_config(CONFIGS / name)
    check_sections(config)
    if config.label.rules:
        from align.label.rules import load_rules

        load_rules(config.label.rules)


@pytest.mark.parametrize("method", ["dpo", "kto", "sft", "orpo", "simpo"])
def test_train_configs_validate(method: str) -> None:
    config = load_train_config(method, CONFIGS / f"{method}.yaml")
    assert config.method == method and config.lora is not None


def test_a_typo_in_a_pipeline_section_fails_up_front(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text((CONFIGS / "quickstart.yaml").read_text().replace("learning_rate:", "learnin_rate:"))
    with pytest.raises(ConfigError, match="section 'train': .*unknown key 'learnin_rate'.*did you mean 'learning_rate'"):
        check_sections(load_pipeline_config(path))
