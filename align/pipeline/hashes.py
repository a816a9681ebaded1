"""What decides whether a stage reruns: the hash of its settings and the SHA-256 of its inputs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from align.data.io import sha256_of
from align.data.records import content_hash
from align.errors import ConfigError
from align.pipeline.config import LabelSection, PairSettings, PipelineConfig
from align.pipeline.links import _train_links


# The label settings the pipeline hashed before it took the label stage's settings type whole. They stay in the
# settings hash as they were; the others enter it only when set away from their defaults (speed-only ones never),
# so a run dir labeled before them keeps its label stage instead of relabeling once.
_LABEL_SETTINGS_HASHED_FIRST = frozenset({"rules", "judge_model", "judge_base_url", "judge_api_key_env", "mode",
                                          "argilla"})


def stage_settings_hash(config: PipelineConfig, stage: str) -> str:
    """The hash of a stage's settings (and the seed) in the manifest: a change reruns the stage. A train link's
    (``train/<n>-<method>``) covers its own settings and those of the links before it, so a changed link reruns
    every link after it too."""
    settings: Any
    if isinstance(config.train, list) and stage.startswith("train/"):
        index = {link.key: link.index for link in _train_links(config)}[stage]
        settings = config.train[:index]
    else:
        settings = {"generate": config.generate, "label": _label_settings_hashed(config.label),
                    "pairs": _pairs_settings_hashed(config.pairs), "select": config.select.model_dump(mode="json"),
                    "train": config.train, "eval": config.eval,
                    "export": config.export.model_dump(mode="json")}[stage]
    return content_hash({"settings": settings, "seed": config.seed}, 32)


def _label_settings_hashed(label: LabelSection) -> dict[str, Any]:
    settings, defaults = label.model_dump(mode="json"), LabelSection().model_dump(mode="json")
    return {name: value for name, value in settings.items() if name not in LabelSection.SPEED_ONLY
            and (name in _LABEL_SETTINGS_HASHED_FIRST or value != defaults[name])}


def _pairs_settings_hashed(pairs: PairSettings) -> dict[str, Any]:
    settings = pairs.model_dump(mode="json")
    # The per-prompt cap (default 4 since the 8-candidate default; None before) changes only what all-pairs
    # writes: hashed as None for the other strategies, so their run dirs keep their pairs stage.
    if settings["strategy"] != "all-pairs":
        settings["max_pairs_per_prompt"] = None
    return settings


def _hash_input(path: Path, stage: str) -> str:
    if not path.exists():
        raise ConfigError(f"stage {stage}: input {path} does not exist")
    return sha256_of(path)
