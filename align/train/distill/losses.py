"""Distillation losses over next-token distributions: generalized JSD, dense and sparse top-k.

Shapes: ``B`` rows, ``T`` completion positions, ``V`` vocabulary, ``K`` stored teacher alternatives.
Every function returns per-position values (``[B, T]``); the caller masks and averages them
(:func:`masked_mean`), so padding never enters a loss.

- Generalized JSD: GKD, Agarwal et al. 2024, Eq. 1, https://arxiv.org/abs/2306.13649 --
  ``beta`` 0 is forward KL(teacher || student), 1 is reverse KL(student || teacher), in between
  the divergence to the mixture, exactly as TRL's ``GKDTrainer.generalized_jsd_loss``.
- Temperature: Hinton et al. 2015, https://arxiv.org/abs/1503.02531 -- both distributions are
  softened by the same ``temperature`` (no T^2 rescaling, as in TRL).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F

# Log-probability of a slot that is not there (padding, an absent tail). Finite on purpose: -inf turns
# 0 * (-inf) into NaN in the KL terms and their gradients; exp(-1e4) is exactly 0 in fp32/bf16 alike.
ABSENT = -1e4
# A tail mass below this is treated as absent: it is fp32 rounding of 1 - sum(top-k), not signal, and
# tempering would blow it up (1e-7 at temperature 2 is 3e-4).
MIN_TAIL = 1e-6

SparseTail = Literal["bucket", "renormalize"]


def generalized_jsd(student_logp: torch.Tensor, teacher_logp: torch.Tensor, beta: float) -> torch.Tensor:
    """Generalized Jensen-Shannon divergence between two categorical distributions given as log-probs.

    ``student_logp``, ``teacher_logp``: ``[..., N]`` log-probabilities over the same N categories.
    Returns ``[...]``: ``beta * KL(T || M) + (1 - beta) * KL(S || M)`` with ``M = beta*T + (1-beta)*S``;
    ``beta=0`` is KL(T || S) and ``beta=1`` is KL(S || T) (the limits, scaled, as in GKD and TRL).
    """
    if beta == 0.0:
        return F.kl_div(student_logp, teacher_logp, reduction="none", log_target=True).sum(-1)
    if beta == 1.0:
        return F.kl_div(teacher_logp, student_logp, reduction="none", log_target=True).sum(-1)
    mixture = torch.logsumexp(torch.stack([student_logp + math.log1p(-beta), teacher_logp + math.log(beta)]), dim=0)
    kl_teacher = F.kl_div(mixture, teacher_logp, reduction="none", log_target=True).sum(-1)
    kl_student = F.kl_div(mixture, student_logp, reduction="none", log_target=True).sum(-1)
    return beta * kl_teacher + (1.0 - beta) * kl_student


def dense_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, beta: float,
                     temperature: float = 1.0) -> torch.Tensor:
    """Generalized JSD between full next-token distributions.

    ``student_logits``, ``teacher_logits``: ``[B, T, V]`` (same vocabulary). Returns ``[B, T]``.
    Computed in fp32 at least whatever the model dtype: the KL of two bf16 softmaxes is mostly rounding.
    """
    student_logp = F.log_softmax(_wide(student_logits) / temperature, dim=-1)
    teacher_logp = F.log_softmax(_wide(teacher_logits) / temperature, dim=-1)
    return generalized_jsd(student_logp, teacher_logp, beta)


def _wide(x: torch.Tensor) -> torch.Tensor:
    """fp32 at least (fp64 stays fp64, for exact tests)."""
    return x if x.dtype == torch.float64 else x.float()


def sparse_topk_divergence(student_logits: torch.Tensor, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor, *,
                           beta: float, temperature: float = 1.0, tail: SparseTail = "bucket") -> torch.Tensor:
    """Generalized JSD against a teacher known only by its top-k log-probs at each position.

    ``student_logits``: ``[B, T, V]``. ``topk_ids``: ``[B, T, K]`` token ids (any value in absent slots).
    ``topk_logprobs``: ``[B, T, K]`` the teacher's log-probs of those ids under its full distribution at
    temperature 1 (what ``align generate --logprobs K`` stores); absent slots hold ``ABSENT`` or less
    (or -inf). Returns ``[B, T]``.

    The student's full-vocabulary log-probs are gathered at the teacher's ids, and both sides become a
    distribution over a few categories:

    - ``tail="bucket"`` (default): the K ids plus one bucket for everything else, holding
      ``1 - sum(top-k mass)`` of each side. The student is taught how much mass to leave outside the
      teacher's top-k, not only how to share it inside.
    - ``tail="renormalize"``: the K ids alone, each side renormalised over them; the tail is ignored
      (the student may put any mass outside the top-k without cost).

    Temperature divides the categories' log-masses before renormalising. Over the K ids this is exact
    (a softmax restricted to a subset and renormalised does not depend on the full normaliser); the
    bucket is tempered as one pseudo-token, an approximation, since its tokens' own logits are unknown.
    When the K ids cover the whole vocabulary both treatments equal :func:`dense_divergence`.
    """
    present = topk_logprobs > ABSENT / 2
    student_full = F.log_softmax(_wide(student_logits), dim=-1)
    student_logp = student_full.gather(-1, topk_ids.clamp(min=0).long()).masked_fill(~present, ABSENT)
    teacher_logp = topk_logprobs.to(student_full.dtype).clamp(min=ABSENT).masked_fill(~present, ABSENT)
    if tail == "bucket":
        student_logp = torch.cat([student_logp, _log_rest(student_logp)[..., None]], dim=-1)
        teacher_logp = torch.cat([teacher_logp, _log_rest(teacher_logp)[..., None]], dim=-1)
    elif tail != "renormalize":
        raise ValueError(f"tail must be 'bucket' or 'renormalize', got {tail!r}")
    student_logp = F.log_softmax(student_logp / temperature, dim=-1)
    teacher_logp = F.log_softmax(teacher_logp / temperature, dim=-1)
    return generalized_jsd(student_logp, teacher_logp, beta)


def _log_rest(logp: torch.Tensor) -> torch.Tensor:
    """log(1 - sum(exp(logp))) over the last dim: the log-mass outside the given categories (ABSENT if tiny)."""
    rest = -torch.expm1(torch.logsumexp(logp, dim=-1).clamp(max=0.0))
    # clamp before log: the branch torch.where does not pick still gets a gradient, which must stay finite
    return torch.where(rest > MIN_TAIL, rest.clamp(min=MIN_TAIL).log(), torch.full_like(rest, ABSENT))


def token_cross_entropy(student_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Hard-label cross-entropy per position (temperature 1). ``[B, T, V]``, ``[B, T]`` -> ``[B, T]``."""
    logp = F.log_softmax(_wide(student_logits), dim=-1)
    return -logp.gather(-1, labels.clamp(min=0).long()[..., None]).squeeze(-1)


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` where ``mask`` is set (``[B, T]`` each); 0 for an empty mask, still differentiable."""
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1)


def distillation_loss(divergence: torch.Tensor, cross_entropy: torch.Tensor | None, mask: torch.Tensor,
                      alpha: float) -> torch.Tensor:
    """``(1 - alpha) * divergence + alpha * cross-entropy``, each averaged over the masked tokens."""
    loss = masked_mean(divergence, mask)
    if alpha and cross_entropy is not None:
        loss = (1.0 - alpha) * loss + alpha * masked_mean(cross_entropy, mask)
    return loss
