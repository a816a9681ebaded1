"""Training on TRL: DPO and KTO (an explicit reference, a reference log-prob cache), SFT, and the reference-free
ORPO and SimPO; pre-flight checks, one run dir and resume for all.

Python API::

    import align.train
    result = align.train.dpo(model="bundled:smollm2-135m-instruct", data="pairs.jsonl",
                             output_dir="runs/dpo", max_steps=8)
    result = align.train.kto("configs/kto.yaml", max_steps=8)   # a YAML file plus overrides
    result = align.train.sft(data="sft.jsonl", output_dir="runs/sft", max_steps=8)   # `align data select` rows
    result = align.train.orpo(data="pairs.jsonl", output_dir="runs/orpo")             # also simpo
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


def _method(method: str):
    def run(config: str | Path | dict[str, Any] | TrainConfig | None = None, *, resume: bool = False,
            **settings: Any):
        from align.train.run import train

        return train(load_train_config(method, config, **settings), resume=resume)

    run.__name__ = run.__qualname__ = method
    run.__doc__ = (f"{method.upper()} on TRL: ``config`` (a YAML path, dict or TrainConfig), then keyword settings "
                   "(any align key or TRL config name); returns align.train.run.TrainResult.")
    return run


dpo = _method("dpo")
kto = _method("kto")
sft = _method("sft")
orpo = _method("orpo")
simpo = _method("simpo")
