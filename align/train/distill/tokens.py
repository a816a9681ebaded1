"""Token ids for distillation: chat prompts as the teacher and the student see them, and vocabulary checks.

Token-level distillation compares two distributions position by position, so teacher and student must
speak the same token ids. A teacher with another vocabulary is refused (aligning two tokenizations is
a research problem of its own: see TRL's GOLD trainer); distil it on text instead, by training the
student on the teacher's candidates with SFT or DPO.
"""

from __future__ import annotations

from typing import Any

from align.errors import ConfigError
from align.generate.plan import teacher_messages
# eos_token_ids lives in the model layer; re-exported because align.train.distill.heldout imports it from here.
from align.models import eos_token_ids, prompt_token_ids

__all__ = ["chat_prompt_ids", "check_same_logit_width", "check_same_vocabulary", "eos_token_ids",
           "text_completion_ids"]


def chat_prompt_ids(tokenizer: Any, prompt: Any, system_prompt: str | None = None) -> list[int]:
    """The prompt's token ids up to where the answer starts, ``system_prompt`` first when given.

    Rendered by align.models.prompt_token_ids, as ``align generate`` renders it, so a teacher's stored
    log-probs and a teacher re-run here condition on the very same ids.
    """
    return prompt_token_ids(tokenizer, teacher_messages(prompt, system_prompt))


def text_completion_ids(tokenizer: Any, text: str) -> list[int]:
    """A completion given as text, as the model would have written it: its tokens, then end-of-turn."""
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return ids + [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else ids


def check_same_vocabulary(student: Any, teacher: Any, *, student_name: str, teacher_name: str) -> None:
    """Refuse a teacher whose token ids mean something else than the student's (compares the tokenizers)."""
    mine, theirs = student.get_vocab(), teacher.get_vocab()
    if mine != theirs:
        differing = sorted(set(mine.items()) ^ set(theirs.items()), key=lambda kv: kv[1])[:3]
        raise ConfigError(
            f"teacher {teacher_name!r} and student {student_name!r} have different vocabularies "
            f"({len(theirs)} vs {len(mine)} tokens; e.g. {', '.join(f'{t!r}={i}' for t, i in differing)}). "
            "Token-level distillation compares distributions over the same token ids, so it needs identical "
            "vocabularies: use a teacher of the student's family, or distil on text instead "
            "(align generate with the teacher, then align train dpo/kto on its candidates).")


def check_same_logit_width(student: Any, teacher: Any, *, student_name: str, teacher_name: str) -> None:
    """Same tokenizer but differently padded embeddings still gives logits of different widths."""
    width = [m.config.get_text_config().vocab_size for m in (student, teacher)]
    if width[0] != width[1]:
        raise ConfigError(f"student {student_name!r} has {width[0]} output logits but teacher {teacher_name!r} "
                          f"has {width[1]} (differently padded embeddings): token-level distillation needs the "
                          "same logit width; resize one with resize_token_embeddings")
