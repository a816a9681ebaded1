"""Held-out reward accuracy that reads 0.5 before training, for DPO and KTO.

Before training the policy equals the reference and every implicit reward
``beta * (log pi(y|x) - log pi_ref(y|x))`` is 0 up to float noise (the
reference log-probs come from differently padded batches). TRL's DPO
``rewards/accuracies`` counts chosen > rejected strictly, so its value before
training is whatever that noise says (anything from 0 to 1), and TRL's KTO logs
no accuracy at all. Here a difference within a small tolerance is a tie and
counts half, so "before" is 0.5 and "after" is comparable to it:

- DPO: the share of held-out pairs whose chosen reward is above the rejected one.
- KTO: rows are unpaired (a completion and a desirable/undesirable label), so the
  share of all (desirable, undesirable) pairs of held-out rows that the rewards put
  in order: the ROC AUC of the reward as a desirable-vs-undesirable score.
"""

from __future__ import annotations

import bisect
import math
import statistics
from collections.abc import Sequence
from typing import Any


# A log-prob gap under 1e-3 nats is a tie: policy and reference see differently padded batches, and on
# 256-token dpo_en_demo pairs that noise passed 1e-4 nats for 1 pair in 32. Training's held-out accuracy
# and `align eval`'s implicit-reward accuracy both use it, so one run reads the same in both places.
TIE_TOLERANCE_NATS = 1e-3


def reward_tie_tolerance(beta: float) -> float:
    """The tie tolerance on implicit rewards (beta * log-ratio): ``TIE_TOLERANCE_NATS`` of log-prob, scaled by beta."""
    return beta * TIE_TOLERANCE_NATS


def pairwise_accuracy(rewards: Sequence[float], desirable: Sequence[bool], tie_tolerance: float = 0.0) -> float | None:
    """Share of (desirable, undesirable) pairs with reward_d > reward_u, ties (|difference| <= tolerance) half.

    rewards [N], desirable [N]; None when one of the two classes is empty. O(N log N) with a sorted
    list of the undesirable rewards. A small tolerance keeps float noise from breaking ties: the
    reference log-probs are computed on differently padded batches than the policy's.
    """
    if len(rewards) != len(desirable):
        raise ValueError(f"{len(rewards)} rewards but {len(desirable)} labels")
    good = [r for r, d in zip(rewards, desirable) if d]
    bad = sorted(r for r, d in zip(rewards, desirable) if not d)
    if not good or not bad:
        return None
    score = 0.0
    for r in good:
        below = bisect.bisect_left(bad, r - tie_tolerance)  # undesirable rows clearly under this one
        tied = bisect.bisect_right(bad, r + tie_tolerance) - below
        score += below + tied / 2
    return score / (len(good) * len(bad))


def margin_accuracy(margins: Sequence[float], tie_tolerance: float = 0.0) -> float | None:
    """Share of pairs with margin > tolerance, ties (|margin| <= tolerance) half; None for no pairs."""
    if not margins:
        return None
    return sum(1.0 if m > tie_tolerance else 0.5 if m >= -tie_tolerance else 0.0 for m in margins) / len(margins)


def standard_errors_above_zero(values: Sequence[float]) -> float | None:
    """The mean of ``values`` in standard errors (a one-sample t statistic); None under 2 values or no spread."""
    if len(values) < 2:
        return None
    spread = statistics.stdev(values)
    return statistics.fmean(values) / (spread / math.sqrt(len(values))) if spread > 0 else None


def margin_in_standard_errors(margins: Sequence[float], prompts: Sequence[str]) -> float | None:
    """The held-out DPO margin in standard errors across prompts: each prompt's mean margin is one value, as a
    prompt's pairs share answers and are not independent draws (counting them as such overstates the figure)."""
    by_prompt: dict[str, list[float]] = {}
    for margin, prompt in zip(margins, prompts, strict=True):
        by_prompt.setdefault(prompt, []).append(margin)
    return standard_errors_above_zero([sum(m) / len(m) for m in by_prompt.values()])


def reward_gap_in_standard_errors(rewards: Sequence[float], desirable: Sequence[bool],
                                  prompts: Sequence[str]) -> float | None:
    """KTO's held-out margin (mean desirable minus mean undesirable reward) in standard errors across prompts:
    each prompt with rows of both kinds gives its own gap, so a prompt's rows count once and what a prompt
    does to every answer (a longer prompt, an easier topic) cancels out."""
    by_prompt: dict[str, tuple[list[float], list[float]]] = {}
    for reward, good, prompt in zip(rewards, desirable, prompts, strict=True):
        by_prompt.setdefault(prompt, ([], []))[0 if good else 1].append(reward)
    return standard_errors_above_zero([sum(g) / len(g) - sum(b) / len(b) for g, b in by_prompt.values() if g and b])


def mean_of_batch_means(values: Sequence[float], batch_size: int,
                        keep: Sequence[bool] | None = None) -> float | None:
    """A figure as TRL's DPO and KTO trainers log it over an evaluation: each batch's mean (over the rows ``keep``
    marks, all by default; batches with none are left out), averaged over the batches in order. None when no row
    counts."""
    keep = [True] * len(values) if keep is None else keep
    means = []
    for start in range(0, len(values), batch_size):
        kept = [v for v, k in zip(values[start:start + batch_size], keep[start:start + batch_size]) if k]
        if kept:
            means.append(sum(kept) / len(kept))
    return sum(means) / len(means) if means else None


def figures_at_reference(method: str, reference_logps: dict[str, Sequence[float]], batch_size: int, *,
                         desirable: Sequence[bool] | None = None, estimates_kl: bool = False) -> dict[str, float]:
    """The held-out figures of a policy that is its reference (before the first step of a DPO/KTO run whose
    reference is its starting weights), known without an evaluation pass: every implicit reward is 0, so every
    pair ties (accuracy 0.5, margin 0) and the answers' log-probs are the reference's own.

    ``reference_logps``: DPO's ``ref_chosen_logps``/``ref_rejected_logps`` or KTO's ``ref_logps`` over the
    held-out rows in evaluation order (KTO: with ``desirable``, each row's label); ``batch_size``: the evaluation
    batch (TRL averages its figures over batches). Left out are what only a pass can tell: the loss, entropy and
    logits, and a figure TRL logs for neither of a KTO set's classes."""
    ties = {"rewards/margins": 0.0, "rewards/accuracies": 0.5}
    if method == "dpo":
        chosen, rejected = reference_logps["ref_chosen_logps"], reference_logps["ref_rejected_logps"]
        if not chosen:
            return {}
        return {"rewards/chosen": 0.0, "rewards/rejected": 0.0, **ties,
                "logps/chosen": mean_of_batch_means(chosen, batch_size),
                "logps/rejected": mean_of_batch_means(rejected, batch_size)}
    logps, labels = reference_logps["ref_logps"], list(desirable or [])
    figures: dict[str, float] = {"kl": 0.0} if estimates_kl else {}
    for side, wanted in (("chosen", True), ("rejected", False)):
        mean = mean_of_batch_means(logps, batch_size, [bool(label) == wanted for label in labels])
        if mean is not None:
            figures.update({f"rewards/{side}": 0.0, f"logps/{side}": mean})
    if "logps/chosen" in figures and "logps/rejected" in figures:
        figures.update(ties)
    return figures


def dpo_margin(beta: float, chosen: Any, rejected: Any, ref_chosen: Any, ref_rejected: Any) -> Any:
    """The implicit reward margin beta * ((log pi - log ref)(chosen) - (log pi - log ref)(rejected)), per pair."""
    return beta * ((chosen - ref_chosen.to(chosen.device)) - (rejected - ref_rejected.to(chosen.device)))


def kto_reward(beta: float, logps: Any, ref_logps: Any) -> Any:
    """The implicit reward beta * (log pi - log ref) of each row's completion."""
    return beta * (logps - ref_logps.to(logps.device))


def _completion_logps(model: Any, batch: dict[str, Any]) -> Any:
    """Summed completion log-probs per row, from the same fused-head forward TRL's losses use."""
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels,
                fused_lm_head=True, use_cache=False)
    # prompt-learning PEFT prepends virtual tokens: keep the real positions, as TRL does
    return out.log_probs[:, -(batch["input_ids"].size(1) - 1):].sum(-1)


class HeldoutRewardsMixin:
    """Mixed into TRL's DPO/KTO trainers: keeps each evaluated example's implicit reward from TRL's own eval forward.

    With precomputed reference log-probs (align's default) an evaluation step is policy forwards only; a
    forward hook reads the completion forward's per-token log-probs (the last forward of a step: KTO runs its
    KL forward first), so the accuracy costs no second pass over the held-out rows. Collected are DPO
    margins, or KTO (reward, desirable) rows. ``align_eval_rewards`` is None when a step could not be read
    this way (the reference computed on the fly, or LD-DPO's weighted log-probs); a pass of its own follows.
    """

    align_method: str = "dpo"
    align_eval_rewards: list[Any] | None = None
    align_eval_prompts: list[str] | None = None  # the eval rows' prompts, in order (set by align.train.run)

    def _compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool) -> Any:
        trainer: Any = self
        collecting = self.align_eval_rewards is not None and not trainer.model.training
        ref_column = "ref_chosen_logps" if self.align_method == "dpo" else "ref_logps"
        if collecting and (ref_column not in inputs or getattr(trainer, "ld_alpha", None) is not None):
            self.align_eval_rewards, collecting = None, False  # not readable here: a pass of its own follows
        if not collecting:
            return super()._compute_loss(model, inputs, return_outputs)  # type: ignore[misc]
        captured: list[Any] = []
        handle = model.register_forward_hook(lambda _module, _args, out: captured.append(out.log_probs.detach()))
        try:
            result = super()._compute_loss(model, inputs, return_outputs)  # type: ignore[misc]
        finally:
            handle.remove()
        seq_len = inputs["input_ids"].size(1) - 1
        logps = captured[-1][:, -seq_len:].sum(-1)
        if self.align_method == "dpo":
            chosen, rejected = logps.chunk(2, dim=0)
            margin = dpo_margin(trainer.beta, chosen, rejected, inputs["ref_chosen_logps"], inputs["ref_rejected_logps"])
            self.align_eval_rewards += trainer.accelerator.gather_for_metrics(margin.float()).tolist()
        else:
            reward = kto_reward(trainer.beta, logps, inputs["ref_logps"])
            label = _as_bool_tensor(inputs["label"], reward.device)
            reward, label = trainer.accelerator.gather_for_metrics((reward.float(), label))
            self.align_eval_rewards += list(zip(reward.tolist(), label.tolist()))
        return result


def evaluate_with_accuracy(trainer: Any, tie_tolerance: float,
                           prompts: Sequence[str] | None = None) -> tuple[dict[str, float], float | None, float | None]:
    """TRL's ``evaluate()`` metrics, the held-out reward accuracy (ties half) and, given the eval rows' prompts
    (in the eval dataset's order), the held-out margin in standard errors across prompts (DPO: the mean margin;
    KTO: mean desirable minus mean undesirable reward), read from the same forwards.

    The margin uses every example's size, not only its sign as the accuracy does, so it tells a real held-out gain
    from chance on fewer prompts (align.train.diagnosis uses both)."""
    trainer.align_eval_rewards = []
    metrics = trainer.evaluate()
    collected = trainer.align_eval_rewards
    trainer.align_eval_rewards = None
    if trainer.align_method == "dpo":
        margins = collected if collected is not None else dpo_heldout_margins(trainer)
        return (metrics, margin_accuracy(margins, tie_tolerance=tie_tolerance),
                margin_in_standard_errors(margins, prompts) if _one_each(prompts, margins) else None)
    rewards, labels = ([r for r, _ in collected], [d for _, d in collected]) if collected is not None \
        else kto_heldout_rewards(trainer)
    return (metrics, pairwise_accuracy(rewards, labels, tie_tolerance=tie_tolerance),
            reward_gap_in_standard_errors(rewards, labels, prompts) if _one_each(prompts, rewards) else None)


def _one_each(prompts: Sequence[str] | None, values: Sequence[Any]) -> bool:
    """Whether there is a prompt for each evaluated example (else the figure is left out, not misattributed)."""
    return prompts is not None and len(prompts) == len(values)


def _as_bool_tensor(values: Any, device: Any) -> Any:
    import torch

    return torch.as_tensor(values, dtype=torch.bool, device=device)


def dpo_heldout_margins(trainer: Any) -> list[float]:
    """Implicit reward margins (chosen - rejected) of every pair of a DPOTrainer's eval dataset.

    Rows are ``[chosen; rejected]`` halves of each batch, as TRL collates them; the reference's log-probs
    come from the precomputed columns or TRL's ``compute_ref_log_probs``. With ``ld_alpha`` (LD-DPO's
    down-weighted tails) the log-probs are not plain sums, so there is no margin here: empty list.
    """
    import torch

    if getattr(trainer, "ld_alpha", None) is not None:
        return []
    model = trainer.model
    was_training = model.training
    model.eval()
    margins: list[float] = []
    try:
        for batch in trainer.get_eval_dataloader():
            batch = trainer._prepare_inputs(batch)
            with torch.no_grad():
                chosen, rejected = _completion_logps(model, batch).chunk(2, dim=0)
                if "ref_chosen_logps" in batch:
                    ref_chosen, ref_rejected = batch["ref_chosen_logps"], batch["ref_rejected_logps"]
                else:
                    ref_chosen, ref_rejected = trainer.compute_ref_log_probs(trainer.ref_model or model, batch)
            margin = dpo_margin(trainer.beta, chosen, rejected, ref_chosen, ref_rejected)
            margins += trainer.accelerator.gather_for_metrics(margin.float()).tolist()
    finally:
        model.train(was_training)
    return margins


def kto_heldout_rewards(trainer: Any) -> tuple[list[float], list[bool]]:
    """Implicit rewards and labels of every row of a KTOTrainer's eval dataset (all processes gathered).

    The policy's completion log-probs come from the same fused-head forward TRL's loss uses; the
    reference's from the precomputed ``ref_logps`` column, or TRL's ``compute_ref_log_probs``.
    """
    import torch

    model = trainer.model
    was_training = model.training
    model.eval()
    rewards: list[float] = []
    labels: list[bool] = []
    try:
        for batch in trainer.get_eval_dataloader():
            batch = trainer._prepare_inputs(batch)
            with torch.no_grad():
                logps = _completion_logps(model, batch)
                if "ref_logps" in batch:
                    ref_logps = batch["ref_logps"]
                else:
                    ref_logps = trainer.compute_ref_log_probs(trainer.ref_model or model, batch)[0]
            reward = kto_reward(trainer.beta, logps, ref_logps)
            label = _as_bool_tensor(batch["label"], reward.device)
            reward, label = trainer.accelerator.gather_for_metrics((reward.float(), label))
            rewards += reward.tolist()
            labels += label.tolist()
    finally:
        model.train(was_training)
    return rewards, labels
