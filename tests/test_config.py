"""Typed configs: YAML line numbers, did-you-mean, overrides."""

from __future__ import annotations

from pathlib import Path

import pytest

from align.config import StrictConfig, load_config, text_or_file
from align.errors import ConfigError


class Lora(StrictConfig):
    r: int = 8
    alpha: int = 16


class Example(StrictConfig):
    model: str
    beta: float = 0.1
    max_steps: int = 10
    lora: Lora | None = None


def test_yaml_then_overrides(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("model: m\nbeta: 0.2\nlora:\n  r: 4\n")
    config = load_config(Example, path, ["max_steps=3", "lora.alpha=32"])
    assert (config.model, config.beta, config.max_steps, config.lora.r, config.lora.alpha) == ("m", 0.2, 3, 4, 32)


def test_unknown_key_names_line_and_closest_key(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("model: m\n\nmax_step: 5\n")
    with pytest.raises(ConfigError, match=r"c\.yaml:3: unknown key 'max_step' \(did you mean 'max_steps'\?\)"):
        load_config(Example, path)


def test_nested_unknown_key_and_wrong_type(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("model: m\nbeta: lots\nlora:\n  rank: 4\n")
    with pytest.raises(ConfigError) as info:
        load_config(Example, path)
    message = str(info.value)
    assert "c.yaml:2: field 'beta'" in message and "'lots'" in message
    assert "c.yaml:4: unknown key 'lora.rank'" in message


def test_bad_override_is_named() -> None:
    with pytest.raises(ConfigError, match=r"override 'bta=1': unknown key 'bta' \(did you mean 'beta'\?\)"):
        load_config(Example, None, ["bta=1"], defaults={"model": "m"})
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(Example, None, ["beta"], defaults={"model": "m"})


def test_missing_and_invalid_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(Example, tmp_path / "nope.yaml")
    path = tmp_path / "c.yaml"
    path.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(Example, path)
    path.write_text("beta: 1\n")
    with pytest.raises(ConfigError, match="'model' is required"):
        load_config(Example, path)


def test_exponent_without_a_dot_is_a_number(tmp_path: Path) -> None:
    """YAML 1.1 reads 5e-6 as a string; a learning rate typed that way must still be a number."""

    class Rates(StrictConfig):
        learning_rate: float
        steps: int = 1

    assert load_config(Rates, None, ["learning_rate=5e-6", "steps=3"]).learning_rate == 5e-6
    path = tmp_path / "c.yaml"
    path.write_text("learning_rate: 5e-6\n")
    assert load_config(Rates, path).learning_rate == 5e-6


def test_yes_no_stay_words_in_overrides() -> None:
    class Saving(StrictConfig):
        save_strategy: str = "steps"
        flag: bool = False

    config = load_config(Saving, None, ["save_strategy=no", "flag=true"])
    assert config.save_strategy == "no" and config.flag is True


def test_text_or_file_reads_at_paths_and_names_the_file_it_cannot_use(tmp_path: Path) -> None:
    sys_prompt = tmp_path / "sys.txt"
    sys_prompt.write_text("  Be brief.\n")
    assert text_or_file(f"@{sys_prompt}", "system prompt") == "Be brief."
    assert text_or_file("Be brief.", "system prompt") == "Be brief."
    assert text_or_file("", "system prompt") is None and text_or_file(None, "system prompt") is None
    with pytest.raises(ValueError, match=f"^rubric file {tmp_path / 'nope.txt'} does not exist$"):
        text_or_file(f"@{tmp_path / 'nope.txt'}", "rubric")
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(ValueError, match="system prompt file .*empty.txt is empty"):
        text_or_file(f"@{tmp_path / 'empty.txt'}", "system prompt")


def test_every_at_file_setting_reads_through_the_one_reader(tmp_path: Path) -> None:
    from align.cli.options import text_or_file_option
    from align.generate.config import GenerateConfig

    missing = tmp_path / "missing.md"
    for flag, what in (("--guidelines", "guidelines"), ("--rubric", "rubric")):
        with pytest.raises(ConfigError, match=f"{flag} @{missing}: {what} file {missing} does not exist"):
            text_or_file_option(f"@{missing}", flag, what)
    with pytest.raises(ValueError, match=f"system prompt file {missing} does not exist"):
        GenerateConfig(prompts=tmp_path / "p.jsonl", output=tmp_path / "c.jsonl", system_prompt=f"@{missing}")
