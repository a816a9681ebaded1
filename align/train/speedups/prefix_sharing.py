"""Shared-prompt forward passes for DPO: each pair's prompt is computed once, not twice.

TRL feeds DPO a batch of ``2B`` rows, ``[prompt + chosen]`` then ``[prompt + rejected]``,
so every prompt token goes through the model twice (and every activation is
stored twice for the backward pass). Here each pair becomes one sequence::

    prompt . chosen . last-prompt-token . rejected

with a block attention mask (the rejected part sees the prompt, not the chosen
answer) and position ids that restart the rejected part right after the prompt.
The last prompt token is repeated because its hidden state predicts the first
token of *both* answers, and a position carries one label. The result is
scattered back into TRL's ``[2B, L-1]`` per-token layout, so TRL's loss code runs
unchanged and the math is the same up to float rounding (see the tests, which
compare losses and gradients against the unshared forward).

Idea: "Accelerating Direct Preference Optimization with Prefix Sharing",
Wang et al. 2024, https://arxiv.org/abs/2410.20305.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from align.models import accepts_block_masks

log = logging.getLogger(__name__)

IGNORE = -100


@dataclass
class PackedPairs:
    input_ids: torch.Tensor  # [B, Lp]
    attention_mask: torch.Tensor  # [B, 1, Lp, Lp] additive
    position_ids: torch.Tensor  # [B, Lp]
    shift_labels: torch.Tensor  # [B, Lp]: the token each position predicts, or -100
    # where each packed per-token value goes in TRL's [2B, L-1] layout
    source: tuple[torch.Tensor, torch.Tensor]  # (packed row, packed position)
    target: tuple[torch.Tensor, torch.Tensor]  # (TRL row, TRL position)
    trl_shape: tuple[int, int]


def pack_pairs(input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
               dtype: torch.dtype) -> PackedPairs | None:
    """Pack TRL's DPO batch; None when rows are not prompt-sharing pairs (then run it unshared)."""
    rows, length = input_ids.shape
    if rows % 2 or attention_mask is None or attention_mask.dim() != 2:
        return None
    pairs = rows // 2
    lengths = attention_mask.sum(dim=1).tolist()
    is_completion = labels != IGNORE
    starts = torch.where(is_completion.any(dim=1), is_completion.float().argmax(dim=1),
                         torch.tensor(lengths, device=labels.device)).tolist()
    sequences, positions, allowed, label_rows = [], [], [], []
    src_rows, src_cols, dst_rows, dst_cols = [], [], [], []
    for i in range(pairs):
        j = i + pairs
        p = starts[i]
        if p != starts[j] or p < 1 or not torch.equal(input_ids[i, :p], input_ids[j, :p]):
            return None
        prompt = input_ids[i, :p]
        chosen = input_ids[i, p:lengths[i]]
        rejected = input_ids[j, p:lengths[j]]
        c, r = len(chosen), len(rejected)
        dup = p + c  # index of the repeated last prompt token
        total = dup + 1 + r
        sequences.append(torch.cat([prompt, chosen, prompt[-1:], rejected]))
        positions.append(torch.cat([torch.arange(p + c), torch.tensor([p - 1]), torch.arange(p, p + r)]))
        mask = torch.zeros(total, total, dtype=torch.bool)
        mask[:dup, :dup] = torch.tril(torch.ones(dup, dup, dtype=torch.bool))
        mask[dup:, : p - 1] = True
        mask[dup:, dup:] = torch.tril(torch.ones(r + 1, r + 1, dtype=torch.bool))
        allowed.append(mask)
        shift = torch.full((total,), IGNORE, dtype=torch.long)
        shift[p - 1: p - 1 + c] = chosen
        shift[dup: dup + r] = rejected
        label_rows.append(shift)
        # TRL's position t holds log p(token t+1): the chosen answer's k-th token sits at p-1+k in both layouts
        src_rows += [i] * (c + r)
        src_cols += list(range(p - 1, p - 1 + c)) + list(range(dup, dup + r))
        dst_rows += [i] * c + [j] * r
        dst_cols += list(range(p - 1, p - 1 + c)) + list(range(p - 1, p - 1 + r))

    width = max(len(s) for s in sequences)
    device = input_ids.device
    packed_ids = torch.zeros(pairs, width, dtype=input_ids.dtype)
    packed_pos = torch.zeros(pairs, width, dtype=torch.long)
    packed_labels = torch.full((pairs, width), IGNORE, dtype=torch.long)
    # Padding positions attend to themselves only, so no softmax row is empty (that would give NaN).
    packed_allowed = torch.eye(width, dtype=torch.bool).repeat(pairs, 1, 1)
    for i, seq in enumerate(sequences):
        n = len(seq)
        packed_ids[i, :n] = seq
        packed_pos[i, :n] = positions[i]
        packed_labels[i, :n] = label_rows[i]
        packed_allowed[i, :n, :n] = allowed[i]
    additive = torch.zeros(pairs, 1, width, width, dtype=dtype)
    additive.masked_fill_(~packed_allowed[:, None], torch.finfo(dtype).min)

    def index(values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=device)

    return PackedPairs(
        input_ids=packed_ids.to(device), attention_mask=additive.to(device), position_ids=packed_pos.to(device),
        shift_labels=packed_labels.to(device), source=(index(src_rows), index(src_cols)),
        target=(index(dst_rows), index(dst_cols)), trl_shape=(rows, length - 1),
    )


def unpack(values: torch.Tensor, packed: PackedPairs) -> torch.Tensor:
    """A packed per-token tensor [B, Lp] -> TRL's [2B, L-1] layout (zeros elsewhere, as the fused head gives)."""
    out = values.new_zeros(packed.trl_shape)
    return out.index_put(packed.target, values[packed.source])


_PER_TOKEN_FIELDS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1", "label_mask")


def enable_prefix_sharing(model: Any) -> None:
    """Wrap a model already patched with TRL's fused LM head so DPO batches share their prompts."""
    fused_forward = model.forward
    dtype = next(model.parameters()).dtype

    def forward(*args: Any, fused_lm_head: bool = False, labels: Any = None, **kwargs: Any) -> Any:
        if fused_lm_head and labels is not None and not args and "input_ids" in kwargs:
            packed = pack_pairs(kwargs["input_ids"], kwargs.get("attention_mask"), labels, dtype)
            if packed is not None:
                rest = {k: v for k, v in kwargs.items() if k not in ("input_ids", "attention_mask", "position_ids")}
                out = fused_forward(input_ids=packed.input_ids, attention_mask=packed.attention_mask,
                                    position_ids=packed.position_ids, shift_labels=packed.shift_labels,
                                    fused_lm_head=True, **rest)
                for name in _PER_TOKEN_FIELDS:
                    value = getattr(out, name, None)
                    if value is not None:
                        setattr(out, name, unpack(value, packed))
                return out
        return fused_forward(*args, fused_lm_head=fused_lm_head, labels=labels, **kwargs)

    model.forward = forward
    model.align_prefix_sharing = True


class PrefixSharingMixin:
    """Turns on shared-prompt forwards (:func:`enable_prefix_sharing`) once TRL has patched the models."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[call-arg]
        trainer: Any = self
        policy = trainer.model.get_base_model() if hasattr(trainer.model, "get_base_model") else trainer.model
        for model in (policy, trainer.ref_model):
            if model is not None and accepts_block_masks(model):
                enable_prefix_sharing(model)
            elif model is not None:
                log.info("prefix sharing off: %s attention does not take block masks",
                         model.config._attn_implementation)
