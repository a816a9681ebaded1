"""Sequence log-probabilities of given completions under a model (for KL and implicit rewards)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def completion_logprobs(model: Any, prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], *,
                        batch_size: int = 8) -> list[tuple[float, int]]:
    """``(sum of log p(completion token | prefix), number of completion tokens)`` for each pair of id lists.

    Sequences are sorted by length and right-padded per batch, so little work
    goes into padding; results come back in the input order.
    """
    import torch

    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]) + len(completions[i]))
    results: list[tuple[float, int]] = [(0.0, 0)] * len(prompts)
    model.eval()
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            rows = [list(prompts[i]) + list(completions[i]) for i in chunk]
            width = max(len(r) for r in rows)
            ids = torch.zeros(len(rows), width, dtype=torch.long)
            mask = torch.zeros(len(rows), width, dtype=torch.long)
            for r, row in enumerate(rows):
                ids[r, :len(row)] = torch.tensor(row)
                mask[r, :len(row)] = 1
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
            logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None].to(device))[..., 0]
            for r, i in enumerate(chunk):
                p, c = len(prompts[i]), len(completions[i])
                results[i] = (float(logp[r, p - 1:p - 1 + c].sum()), c)
    return results
