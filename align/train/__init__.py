"""DPO and KTO on TRL with an explicit reference, a reference log-prob cache, pre-flight checks and resume.

Python API::

    import align.train
    result = align.train.dpo(model="bundled:smollm2-135m-instruct", data="pairs.jsonl",
                             output_dir="runs/dpo", max_steps=8)
    result = align.train.kto("configs/kto.yaml", max_steps=8)   # a YAML file plus overrides
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from align.train.config import TrainConfig


def load_train_config(method: str, config: str | Path | dict[str, Any] | TrainConfig | None = None,
                      overrides: list[str] | tuple[str, ...] = (), **settings: Any) -> TrainConfig:
    """A validated TrainConfig: a YAML path, a dict or a TrainConfig, then keyword ``settings``, then
    ``key=value`` overrides. ``method`` always wins over a method named in the file."""
    from align.config import load_config

    if isinstance(config, TrainConfig):
        config = {**config.model_dump(), **(config.model_extra or {})}
    path = None if config is None or isinstance(config, dict) else Path(config)
    defaults = config if isinstance(config, dict) else None
    return load_config(TrainConfig, path, overrides, defaults=defaults, updates={**settings, "method": method})


def dpo(config: str | Path | dict[str, Any] | TrainConfig | None = None, *, resume: bool = False, **settings: Any):
    from align.train.run import train

    return train(load_train_config("dpo", config, **settings), resume=resume)


def kto(config: str | Path | dict[str, Any] | TrainConfig | None = None, *, resume: bool = False, **settings: Any):
    from align.train.run import train

    return train(load_train_config("kto", config, **settings), resume=resume)
