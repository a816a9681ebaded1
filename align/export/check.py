"""What quantising cost, measured on the run's own prompts: the quantised model against the float one as
distillation's held-out check measures a student against its teacher (:mod:`align.train.distill.heldout`): per-token
KL(float || quantised) over the float model's greedy answers, next-token agreement, and the quantised model's own
greedy answer to the first prompt, to read."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

ANSWER_TOKENS = 64


def quantisation_check(float_model: Any, quantised_model: Any, tokenizer: Any, prompts: Sequence[Any]
                       ) -> dict[str, Any]:
    from align.train.distill.heldout import compare_with_teacher, teacher_answers

    answers = teacher_answers(float_model, tokenizer, prompts, system_prompt=None, max_new_tokens=ANSWER_TOKENS,
                              name="the float model")
    metrics, per_prompt = compare_with_teacher(quantised_model, float_model, tokenizer, answers,
                                               max_new_tokens=ANSWER_TOKENS, name="the quantised model")
    kl, agreement = metrics["kl_per_token"], metrics["token_agreement"]
    return {
        "prompts": metrics["prompts"], "tokens": metrics["tokens"],
        "kl_per_token": None if kl is None else float(f"{kl:.3g}"),
        "next_token_agreement": None if agreement is None else round(agreement, 4),
        "identical_answers": round(metrics["exact_match"], 4),
        "smoke": {"prompt": prompts[0], "answer": per_prompt[0]["student_answer"]},
    }


__all__ = ["quantisation_check"]
