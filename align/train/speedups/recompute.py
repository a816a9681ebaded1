"""Selective activation recompute: keep each decoder layer's matmul and attention outputs, redo the cheap rest.

Without gradient checkpointing a decoder layer keeps about 20 values per
token and hidden unit for the backward pass; most are outputs of cheap
element-wise steps (RMSNorm, RoPE, the grouped-query key/value copies, SiLU and
the gate product). TRL's default, full gradient checkpointing, keeps only the
layer input and redoes the whole layer, matmuls included (about a third more
compute). Here each layer runs under PyTorch's selective checkpointing
(``torch.utils.checkpoint.create_selective_checkpoint_contexts``): the outputs
of matmuls with a wide inner dimension and of attention are kept, everything
else is recomputed layer by layer in the backward pass. Same math, same
numbers; less memory for a few element-wise passes.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import torch

log = logging.getLogger(__name__)

# Matmuls whose inner dimension is at least this wide are worth keeping; narrower ones (a LoRA adapter's rank-r
# up-projection) cost less to redo than to store.
MIN_KEPT_INNER_DIM = 64

_ATTENTION_OPS = tuple(
    getattr(torch.ops.aten, name).default for name in (
        "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
        "_flash_attention_forward", "_efficient_attention_forward")
    if hasattr(torch.ops.aten, name))
_MATMUL_OPS = (torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default,
               torch.ops.aten.baddbmm.default)


def keep_output(op: Any, args: tuple[Any, ...]) -> bool:
    """Whether an op's output is kept for the backward pass (True) or recomputed from what is kept (False)."""
    if op in _ATTENTION_OPS:
        return True
    if op in _MATMUL_OPS:
        left = args[1] if op in (torch.ops.aten.addmm.default, torch.ops.aten.baddbmm.default) else args[0]
        return left.shape[-1] >= MIN_KEPT_INNER_DIM
    return False


def _policy(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> Any:
    from torch.utils.checkpoint import CheckpointPolicy

    return CheckpointPolicy.MUST_SAVE if keep_output(op, args) else CheckpointPolicy.PREFER_RECOMPUTE


def _context() -> Any:
    from torch.utils.checkpoint import create_selective_checkpoint_contexts

    return create_selective_checkpoint_contexts(_policy)


def decoder_layers(model: Any) -> list[Any]:
    """The model's repeated blocks (transformers marks them as GradientCheckpointingLayer)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def enable_selective_recompute(model: Any) -> int:
    """Run each decoder layer of ``model`` under selective checkpointing when it trains; returns how many.

    A layer whose own (full) gradient checkpointing is switched on, e.g. by ``gradient_checkpointing=True``,
    keeps that instead; forwards without gradients (reference, evaluation) run as before.
    """
    from torch.utils.checkpoint import checkpoint

    layers = decoder_layers(model)
    for layer in layers:
        if getattr(layer, "align_selective_recompute", False):
            continue
        forward = layer.forward

        def selective(*args: Any, _forward: Any = forward, _layer: Any = layer, **kwargs: Any) -> Any:
            if _layer.gradient_checkpointing or not (_layer.training and torch.is_grad_enabled()):
                return _forward(*args, **kwargs)
            # A KV cache written in the forward would be written again by the recompute (as HF's checkpointing);
            # transformers 5 passes it as `cache`, older versions as `past_key_values`
            for name in ("cache", "past_key_values", "past_key_value", "layer_past"):
                if kwargs.get(name) is not None:
                    kwargs[name] = None
            if kwargs.get("use_cache"):
                kwargs["use_cache"] = False
            return checkpoint(functools.partial(_forward, **kwargs), *args, use_reentrant=False, context_fn=_context)

        layer.forward = selective
        layer.align_selective_recompute = True
    return len(layers)


class SelectiveRecomputeMixin:
    """Mixed into a DPO/KTO trainer: :func:`enable_selective_recompute` on its model, unless full gradient
    checkpointing is on."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[call-arg]
        trainer: Any = self
        if trainer.args.gradient_checkpointing:
            log.info("selective recompute off: full gradient checkpointing is on")
            return
        layers = enable_selective_recompute(trainer.model)
        log.info("selective recompute: %d decoder layers keep matmul/attention outputs only", layers)
