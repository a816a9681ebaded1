"""Knowledge distillation: the student learns the teacher's token distributions (TRL's GKD underneath).

From a teacher model (dense: full distributions, on the data's completions, the teacher's own answers
or the student's samples, mixed by ``lmbda``), or from the top-k log-probs ``align generate --logprobs K``
stored (sparse: no teacher in memory). See :mod:`align.train.distill.losses` for the math.

Python API::

    import align.train.distill
    result = align.train.distill.distill("configs/distill.yaml", max_steps=8)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

# GKD lives in trl.experimental, which warns on every import; align pins its TRL version and knows.
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")


def load_distill_config(config: str | Path | dict[str, Any] | None = None, overrides: list[str] | tuple[str, ...] = (),
                        **settings: Any) -> Any:
    """A validated config: :class:`DistillConfig`, or with ``method: dpo`` a DPO run with a KD term
    (:class:`align.train.distill.preference.PreferenceDistillConfig`).

    Sources, lowest first: a YAML path or a dict, keyword ``settings``, ``key=value`` overrides."""
    from align.config import load_config, parse_override, read_yaml
    from align.train.distill.config import DistillConfig
    from align.train.distill.preference import PreferenceDistillConfig

    path = None if config is None or isinstance(config, dict) else Path(config)
    defaults = config if isinstance(config, dict) else None
    method = (defaults or {}).get("method") or (read_yaml(path)[0].get("method") if path else None)
    method = settings.get("method") or method
    for text in overrides:
        keys, value = parse_override(text)
        if keys == ["method"]:
            method = value
    model = PreferenceDistillConfig if method in ("dpo", "kto") else DistillConfig
    return load_config(model, path, overrides, defaults=defaults, updates=settings)


def distill(config: str | Path | dict[str, Any] | None = None, *, resume: bool = False, **settings: Any) -> Any:
    """Run a distillation (or DPO + KD) run from a YAML path, a dict, and/or keyword settings."""
    from align.train.distill.preference import PreferenceDistillConfig, train_with_distillation
    from align.train.distill.run import distill as run_distill

    loaded = load_distill_config(config, **settings)
    if isinstance(loaded, PreferenceDistillConfig):
        return train_with_distillation(loaded, resume=resume)
    return run_distill(loaded, resume=resume)
