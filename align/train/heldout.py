"""KTO's held-out reward accuracy, which TRL's KTOTrainer does not log.

KTO rows are unpaired (a completion and a desirable/undesirable label), so the
accuracy is taken over all (desirable, undesirable) pairs of held-out rows: the
share whose implicit rewards ``beta * (log pi(y|x) - log pi_ref(y|x))`` put the
desirable row above the undesirable one, ties counting half. That is the ROC
AUC of the reward as a desirable-vs-undesirable score. Before training the
policy equals the reference, every reward is 0 and the accuracy is exactly 0.5.
(TRL's DPO ``rewards/accuracies`` counts chosen > rejected strictly, so it is 0
before training, when all rewards tie.)
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from typing import Any


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
            completion_labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
            with torch.no_grad():
                out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                            labels=completion_labels, fused_lm_head=True, use_cache=False)
                # prompt-learning PEFT prepends virtual tokens: keep the real positions, as TRL does
                logps = out.log_probs[:, -(batch["input_ids"].size(1) - 1):].sum(-1)
                if "ref_logps" in batch:
                    ref_logps = batch["ref_logps"]
                else:
                    ref_logps = trainer.compute_ref_log_probs(trainer.ref_model or model, batch)[0]
            reward = trainer.beta * (logps - ref_logps.to(logps.device))
            label = torch.as_tensor(batch["label"], dtype=torch.bool, device=reward.device)
            reward, label = trainer.accelerator.gather_for_metrics((reward.float(), label))
            rewards += reward.tolist()
            labels += label.tolist()
    finally:
        model.train(was_training)
    return rewards, labels
