"""Batches for distillation: the same completion after two different prompts (the student's and the teacher's).

Prompts are left padded and completions right padded, so in every row the completion starts at the
same column: the logits that predict it are one slice of the last ``C + 1`` positions, for the
student and the teacher alike, whatever their prompts' lengths. Position ids are counted from the
first real token, so padding does not shift them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from align.train.distill.losses import ABSENT


@dataclass
class DistillCollator:
    """Rows from :func:`align.train.distill.data.encode_examples` -> tensors (see :func:`collate`)."""

    pad_token_id: int
    max_length: int | None = None

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        return collate(rows, self.pad_token_id)

    def with_completions(self, batch: dict[str, torch.Tensor], completions: list[list[int]]) -> dict[str, torch.Tensor]:
        """The batch again with new completions (generated during training), on the batch's device."""
        rows = []
        for i, completion in enumerate(completions):
            student = batch["prompts"][i][batch["prompt_attention_mask"][i].bool()].tolist()
            teacher = batch["teacher_prompts"][i][batch["teacher_prompt_attention_mask"][i].bool()].tolist()
            room = None if self.max_length is None else max(1, self.max_length - max(len(student), len(teacher)))
            rows.append({"prompt_ids": student, "teacher_prompt_ids": teacher, "completion_ids": completion[:room]})
        device = batch["prompts"].device
        return {k: v.to(device) for k, v in collate(rows, self.pad_token_id).items()}


def _left(seqs: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
            mask[i, width - len(s):] = 1
    return ids, mask


def _right(seqs: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, :len(s)] = 1
    return ids, mask


def _sequence(prompts: torch.Tensor, prompt_mask: torch.Tensor, completions: torch.Tensor,
              completion_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    ids = torch.cat([prompts, completions], dim=1)
    mask = torch.cat([prompt_mask, completion_mask], dim=1)
    return ids, mask, (mask.cumsum(dim=1) - 1).clamp(min=0)


def collate(rows: list[dict[str, Any]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Tensors for a batch of ``B`` rows (``Ps``/``Pt`` the longest student/teacher prompt, ``C`` completion):

    - ``prompts``, ``prompt_attention_mask`` ``[B, Ps]`` and ``teacher_prompts``,
      ``teacher_prompt_attention_mask`` ``[B, Pt]``: left padded, for generation;
    - with completions: ``input_ids``, ``attention_mask``, ``position_ids`` ``[B, Ps + C]`` (student),
      ``teacher_input_ids``, ``teacher_attention_mask``, ``teacher_position_ids`` ``[B, Pt + C]``,
      ``completion_ids``, ``completion_mask`` ``[B, C]``;
    - with stored teacher log-probs: ``topk_ids``, ``topk_logprobs`` ``[B, C, K]`` (absent slots: id 0,
      log-prob ``ABSENT``).
    """
    prompts, prompt_mask = _left([r["prompt_ids"] for r in rows], pad_token_id)
    teacher_prompts, teacher_mask = _left([r["teacher_prompt_ids"] for r in rows], pad_token_id)
    batch = {"prompts": prompts, "prompt_attention_mask": prompt_mask,
             "teacher_prompts": teacher_prompts, "teacher_prompt_attention_mask": teacher_mask}
    completions = [list(r.get("completion_ids") or []) for r in rows]
    if not any(completions):
        return batch
    completion_ids, completion_mask = _right(completions, pad_token_id)
    batch["completion_ids"], batch["completion_mask"] = completion_ids, completion_mask
    for prefix, p, m in (("", prompts, prompt_mask), ("teacher_", teacher_prompts, teacher_mask)):
        ids, mask, positions = _sequence(p, m, completion_ids, completion_mask)
        batch[f"{prefix}input_ids"], batch[f"{prefix}attention_mask"] = ids, mask
        batch[f"{prefix}position_ids"] = positions
    if all(r.get("topk_ids") for r in rows if r.get("completion_ids")):
        width = max(len(alts) for r in rows for alts in r.get("topk_ids") or [[]])
        topk_ids = torch.zeros((len(rows), completion_ids.shape[1], width), dtype=torch.long)
        topk_logprobs = torch.full((len(rows), completion_ids.shape[1], width), ABSENT, dtype=torch.float32)
        for i, r in enumerate(rows):
            for t, (ids, logprobs) in enumerate(zip(r.get("topk_ids") or [], r.get("topk_logprobs") or [])):
                topk_ids[i, t, :len(ids)] = torch.tensor(ids, dtype=torch.long)
                topk_logprobs[i, t, :len(ids)] = torch.tensor(logprobs, dtype=torch.float32)
        batch["topk_ids"], batch["topk_logprobs"] = topk_ids, topk_logprobs
    return batch
