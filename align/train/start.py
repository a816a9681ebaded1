"""Where a training run starts, and what its weights say about it.

A run's ``model`` may be another run (a chain: SFT then DPO). Training loads it merged (an adapter folded into its
base), so the student and, for DPO/KTO, the reference both start from the earlier run's weights. A LoRA run trained
on those weights must then say so in its adapter: peft records the loaded model's path as the new adapter's
``base_model_name_or_path``, and for a merged adapter that path is the *original* base, so the new adapter would
load later without the earlier run's training. :func:`name_adapter_base` records the earlier run's adapter folder
instead, and :func:`align.models.resolve_model` follows such a chain of adapters down to a plain model
(``ModelSource.base_adapters``), which :func:`align.models.load_model` merges in order before the newest adapter.

Why a chain of adapters rather than training the earlier adapter further (one adapter on the original base):

- the reference stays exact and free. With a peft model TRL's reference is the model with the adapter switched
  off; here that is the earlier run's weights (merged when loaded), which is what a DPO/KTO link after SFT must be
  anchored to. Training the earlier adapter further would make "switched off" the original base, and the right
  reference would need a second copy of the model in memory;
- it works whatever the new run's LoRA settings (rank, alpha, target modules) and the earlier one's;
- each run's adapter holds its own training only: the earlier run stays as it was (eval scores it on its own).

The cost: a chain loads through align (``load_model``, ``align eval``, ``align export --merge``); tools that
read ``base_model_name_or_path`` as a plain model (vLLM's LoRA, peft's AutoPeftModel) need ``align export --merge``
first. Nothing is written but the new adapter: no merged copy of the earlier run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from align.models import ModelSource


def name_adapter_base(model: Any, start: ModelSource) -> None:
    """Record ``start``'s newest adapter as the base of the adapter(s) ``model`` trains, when ``start`` is an
    adapter (``model``: the trainer's peft model; nothing happens for a full fine-tune or a plain start).

    Set on the live peft config, so the final weights and every checkpoint say it. The path is absolute (a relative
    one would mean another folder from another working directory), like the original base's usually is."""
    from peft import PeftModel

    if start.adapter is None or not isinstance(model, PeftModel):
        return
    base = str(Path(start.adapter).resolve())
    for config in model.peft_config.values():
        config.base_model_name_or_path = base


def started_from(start: ModelSource) -> dict[str, Any]:
    """What a run started from, for run.json: the spec as given, the plain model under it and the adapters merged
    into that model, oldest first (empty for a plain model)."""
    return {"model": start.spec, "base": start.path, "adapters": list(start.adapters)}


__all__ = ["name_adapter_base", "started_from"]
