"""How close is the student to its teacher? Per-token KL and agreement on held-out prompts.

Distillation logs these before and after training; `align eval --teacher` reports them
(:mod:`align.eval.teacher` is its adapter).

The teacher answers every held-out prompt greedily (with its system prompt, if any); the student
answers greedily too (without it). Then, on the teacher's answers (fixed, so before/after numbers
compare like with like):

* ``kl_per_token``: KL(teacher || student) of the next-token distributions, exact over the whole
  vocabulary, averaged over the answer tokens (the forward KL that token-level KD minimises);
* ``reverse_kl_per_token``: KL(student || teacher), the mode-seeking direction;
* ``token_agreement``: how often the student's most likely next token is the teacher's greedy one;

and on the two free-running greedy answers, ``exact_match``: how often they are the same tokens.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)


@dataclass
class TeacherAnswers:
    """The teacher's greedy answers to held-out prompts, with both sides' prompt ids (computed once per run)."""

    prompt_ids: list[list[int]]  # as the student sees each prompt
    teacher_prompt_ids: list[list[int]]  # as the teacher sees it (system prompt first)
    completions: list[list[int]]  # the teacher's greedy answers, end-of-turn included when it stopped


def greedy_answers(model: Any, prompt_ids: Sequence[Sequence[int]], tokenizer: Any, *, max_new_tokens: int,
                   batch_size: int = 16) -> list[list[int]]:
    """Greedy completions with align's batched decoder, in the input order."""
    import torch

    from align.generate.config import SamplingParams
    from align.generate.decode import RowRequest, generate_rows
    from align.train.distill.tokens import eos_token_ids

    was_training = model.training
    model.eval()
    try:
        rows = [RowRequest(i, SamplingParams(temperature=0.0), seed=0) for i in range(len(prompt_ids))]
        with torch.inference_mode():
            outputs = generate_rows(model, prompt_ids, rows, max_new_tokens=max_new_tokens,
                                    eos_token_ids=eos_token_ids(model, tokenizer),
                                    pad_token_id=tokenizer.pad_token_id, batch_size=batch_size)
    finally:
        model.train(was_training)
    return [out.token_ids for out in outputs]


def teacher_answers(teacher: Any, tokenizer: Any, prompts: Sequence[Any], *, system_prompt: str | None,
                    max_new_tokens: int, batch_size: int = 16, name: str = "the teacher") -> TeacherAnswers:
    from align.train.distill.tokens import chat_prompt_ids

    student_ids = [chat_prompt_ids(tokenizer, p) for p in prompts]
    teacher_ids = [chat_prompt_ids(tokenizer, p, system_prompt) for p in prompts]
    log.info("%s answers %d held-out prompts (greedy, up to %d tokens)", name, len(prompts), max_new_tokens)
    completions = greedy_answers(teacher, teacher_ids, tokenizer, max_new_tokens=max_new_tokens, batch_size=batch_size)
    return TeacherAnswers(student_ids, teacher_ids, completions)


def teacher_forced_stats(student: Any, teacher: Any, answers: TeacherAnswers, *, pad_token_id: int,
                         batch_size: int = 8) -> list[dict[str, float]]:
    """Per prompt, summed over the teacher's answer tokens: ``kl``, ``reverse_kl``, ``agree``; and ``tokens``."""
    import torch

    from align.train.distill.collate import collate
    from align.train.distill.losses import dense_divergence

    stats: list[dict[str, float]] = []
    modes = (student.training, teacher.training)
    student.eval()
    teacher.eval()
    device = next(student.parameters()).device
    try:
        with torch.inference_mode():
            for start in range(0, len(answers.completions), batch_size):
                rows = [{"prompt_ids": answers.prompt_ids[i], "teacher_prompt_ids": answers.teacher_prompt_ids[i],
                         "completion_ids": answers.completions[i]}
                        for i in range(start, min(start + batch_size, len(answers.completions)))]
                batch = {k: v.to(device) for k, v in collate(rows, pad_token_id).items()}
                width = batch["completion_ids"].shape[1]
                logits = {}
                for name, model, prefix in (("student", student, ""), ("teacher", teacher, "teacher_")):
                    logits[name] = model(input_ids=batch[f"{prefix}input_ids"],
                                         attention_mask=batch[f"{prefix}attention_mask"],
                                         position_ids=batch[f"{prefix}position_ids"],
                                         logits_to_keep=width + 1, use_cache=False).logits[:, :-1]
                mask = batch["completion_mask"].float()
                forward = dense_divergence(logits["student"], logits["teacher"], beta=0.0) * mask
                reverse = dense_divergence(logits["student"], logits["teacher"], beta=1.0) * mask
                agree = (logits["student"].argmax(-1) == batch["completion_ids"]).float() * mask
                for r in range(len(rows)):
                    stats.append({"kl": float(forward[r].sum()), "reverse_kl": float(reverse[r].sum()),
                                  "agree": float(agree[r].sum()), "tokens": float(mask[r].sum())})
    finally:
        student.train(modes[0])
        teacher.train(modes[1])
    return stats


def compare_with_teacher(student: Any, teacher: Any, tokenizer: Any, answers: TeacherAnswers, *,
                         max_new_tokens: int, batch_size: int = 16, name: str = "the student"
                         ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(metrics, per-prompt rows) of the student against the teacher's answers (see the module docstring)."""
    log.info("%s answers %d held-out prompts (greedy)", name, len(answers.prompt_ids))
    student_answers = greedy_answers(student, answers.prompt_ids, tokenizer, max_new_tokens=max_new_tokens,
                                     batch_size=batch_size)
    stats = teacher_forced_stats(student, teacher, answers, pad_token_id=tokenizer.pad_token_id)
    tokens = sum(s["tokens"] for s in stats)
    per_prompt = []
    for i, s in enumerate(stats):
        per_prompt.append({"kl_per_token": s["kl"] / s["tokens"] if s["tokens"] else None,
                           "token_agreement": s["agree"] / s["tokens"] if s["tokens"] else None,
                           "exact_match": student_answers[i] == answers.completions[i],
                           "teacher_answer": tokenizer.decode(answers.completions[i], skip_special_tokens=True),
                           "student_answer": tokenizer.decode(student_answers[i], skip_special_tokens=True)})
    n = len(stats)
    metrics = {
        "prompts": n, "tokens": int(tokens),
        "kl_per_token": sum(s["kl"] for s in stats) / tokens if tokens else None,
        "reverse_kl_per_token": sum(s["reverse_kl"] for s in stats) / tokens if tokens else None,
        "kl_per_sequence": sum(s["kl"] for s in stats) / n if n else None,
        "token_agreement": sum(s["agree"] for s in stats) / tokens if tokens else None,
        "exact_match": sum(p["exact_match"] for p in per_prompt) / n if n else None,
        "mean_length_teacher": sum(len(c) for c in answers.completions) / n if n else None,
        "mean_length_student": sum(len(c) for c in student_answers) / n if n else None,
        "max_new_tokens": max_new_tokens,
    }
    return metrics, per_prompt
