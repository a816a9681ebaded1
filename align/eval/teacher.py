"""`align eval --teacher`: the student's KL to a teacher and agreement with it, in eval's report.

The metrics themselves belong to distillation (:mod:`align.train.distill.heldout`, which also logs
them before and after a distillation run); this module loads the two models for eval, writes the
per-prompt answers and the report section.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from align.train.distill.heldout import compare_with_teacher, teacher_answers


def teacher_metrics(config: Any, out: Path) -> dict[str, Any]:
    """`align eval`'s teacher section: models from ``config.model`` / ``config.teacher``, prompts from
    ``config.prompts``; per-prompt answers go to ``teacher_answers.jsonl`` in ``out``."""
    import json

    from align.config import text_or_file
    from align.data.io import atomic_path
    from align.errors import ConfigError
    from align.generate.stage import read_prompts
    from align.models import load_model, load_tokenizer
    from align.train.distill.tokens import check_same_logit_width, check_same_vocabulary

    tokenizer = load_tokenizer(config.model)
    check_same_vocabulary(tokenizer, load_tokenizer(config.teacher), student_name=config.model,
                          teacher_name=config.teacher)
    records = read_prompts(config.prompts)
    try:
        system_prompt = text_or_file(config.teacher_system_prompt, "system prompt")
    except ValueError as exc:
        raise ConfigError(f"teacher_system_prompt: {exc}") from None
    teacher = load_model(config.teacher, merge_adapter=True)
    student = load_model(config.model, merge_adapter=True)
    check_same_logit_width(student, teacher, student_name=config.model, teacher_name=config.teacher)
    answers = teacher_answers(teacher, tokenizer, [r.prompt for r in records], system_prompt=system_prompt,
                              max_new_tokens=config.max_new_tokens, batch_size=config.batch_size)
    metrics, per_prompt = compare_with_teacher(student, teacher, tokenizer, answers,
                                               max_new_tokens=config.max_new_tokens, batch_size=config.batch_size)
    metrics.update(teacher=config.teacher, system_prompt=system_prompt)
    with atomic_path(out / "teacher_answers.jsonl") as tmp:
        tmp.write_text("".join(json.dumps({"prompt_id": r.id, **p}) + "\n" for r, p in zip(records, per_prompt)))
    return metrics


def add_to_report(report: Path, metrics: dict[str, Any]) -> None:
    """Append the teacher section to an eval report.md."""
    from align.data.io import atomic_path

    def fmt(value: Any, digits: int = 3) -> str:
        return "n/a" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)

    m = metrics
    prompted = "with its system prompt" if m.get("system_prompt") else "without a system prompt"
    lines = [
        "", f"## Distillation: the student against the teacher {m['teacher']}", "",
        f"{m['prompts']} held-out prompts; the teacher ({prompted}) and the student answer greedily "
        f"(up to {m['max_new_tokens']} tokens); the KL is computed on the teacher's answers "
        f"({m['tokens']} tokens), exactly over the vocabulary.", "",
        "| metric | value |", "|---|---|",
        f"| KL(teacher \\|\\| student) per token | **{fmt(m['kl_per_token'], 4)}** |",
        f"| KL(student \\|\\| teacher) per token | {fmt(m['reverse_kl_per_token'], 4)} |",
        f"| KL(teacher \\|\\| student) per answer | {fmt(m['kl_per_sequence'])} |",
        f"| student's top token = teacher's greedy token | {fmt(m['token_agreement'])} |",
        f"| greedy answers identical | {fmt(m['exact_match'])} |",
        f"| mean answer length, tokens (teacher / student) | {fmt(m['mean_length_teacher'], 1)} / "
        f"{fmt(m['mean_length_student'], 1)} |", "",
        "Per-prompt answers and KL: teacher_answers.jsonl.", "",
    ]
    text = report.read_text(encoding="utf-8") if report.exists() else ""
    with atomic_path(report) as tmp:
        tmp.write_text(text + "\n".join(lines))
