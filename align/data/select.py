"""Judgements -> SFT rows (TRL's ``prompt``/``completion``): per prompt, the teacher's best answers by the labelers'
scores (best-of-N, or rejection sampling with ``min_score``).

**Which answers.** Scores come from :func:`align.data.pairs.group_scores` (one score per response, the same as
pair building uses). Per prompt the answers are ranked by score, highest first; equal scores (within
``align.data.pairs.TIE_EPSILON``) keep the order the teacher wrote them in, as pair building breaks ties. An
answer is never kept when it failed a hard rule (*filtered*), scores below ``min_score``, is empty once its
reasoning is taken out, or left its reasoning unfinished (``<think>`` never closed: the answer was cut off).
With ``top_k`` > 1, an answer that near-duplicates one already kept is skipped (the same Jaccard test as pair
building), so the same answer is not learnt twice.

**Reasoning.** A teacher's reasoning is either stored apart from its answer (``reasoning`` on the candidate and
judged response, from an OpenAI-compatible ``reasoning_content``) or written inline as ``<think>...</think>``
before the answer; inline reasoning is split out here. ``reasoning="drop"`` (default) keeps the answer alone;
``"keep"`` puts ``<think>REASONING</think>\\n`` before it, so the student learns to reason first.

Every row carries its provenance: ``prompt_id``, ``prompt_hash``, ``completion_id``, ``score``, ``rank`` (1 =
best) and the ``judges``' names.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from align.data.io import write_records
from align.data.pairs import (TIE_EPSILON, PromptGroup, ScoredResponse, completion_messages, group_scores,
                              near_duplicates, prompt_messages)
from align.data.records import SFTExample
from align.data.validate import load_records
from align.errors import ConfigError, DataError

ReasoningMode = Literal["keep", "drop"]

_THINK_OPEN, _THINK_CLOSE = "<think>", "</think>"
_LEADING_OPEN = re.compile(r"^\s*<think>")


@dataclass(frozen=True)
class SplitAnswer:
    """A response's answer and its reasoning (None: none given); ``unfinished``: ``<think>`` never closed."""

    answer: str
    reasoning: str | None = None
    unfinished: bool = False


def split_reasoning(text: str, stored: str | None = None) -> SplitAnswer:
    """The answer apart from the reasoning: ``stored`` (given apart by the API) wins over inline ``<think>``.

    Inline forms: ``<think>R</think>A``, and ``R</think>A`` (templates that open the think block in the prompt,
    as DeepSeek-R1's does). Text without ``</think>`` after a leading ``<think>`` is unfinished.
    """
    opened = bool(_LEADING_OPEN.match(text))
    close = text.find(_THINK_CLOSE)
    if close < 0 or (not opened and _THINK_OPEN in text[:close]):
        if opened:
            return SplitAnswer("", stored, unfinished=True)
        return SplitAnswer(text.strip(), stored.strip() if stored else None)
    inline = _LEADING_OPEN.sub("", text[:close], count=1).strip()
    reasoning = stored if stored else inline
    return SplitAnswer(text[close + len(_THINK_CLOSE):].strip(), reasoning.strip() if reasoning else None)


def sft_completion(split: SplitAnswer, reasoning: ReasoningMode) -> str:
    """The text the student learns: the answer, after ``<think>REASONING</think>\\n`` when keeping reasoning."""
    if reasoning == "keep" and split.reasoning:
        return f"{_THINK_OPEN}{split.reasoning}{_THINK_CLOSE}\n{split.answer}"
    return split.answer


@dataclass
class SelectCounts:
    filtered: int = 0             # failed a hard rule
    below_min_score: int = 0
    unfinished_reasoning: int = 0  # <think> never closed
    empty_answer: int = 0          # nothing left once the reasoning is out
    near_duplicates: int = 0       # the same answer as one already kept (top_k > 1)
    tied_at_top: int = 0           # prompts whose best score is shared: the first-written answer is kept


def select_best(responses: list[ScoredResponse], *, top_k: int = 1, min_score: float | None = None,
                near_duplicate: float = 0.9, counts: SelectCounts | None = None
                ) -> list[tuple[ScoredResponse, SplitAnswer]]:
    """Up to ``top_k`` answers of one prompt, best first (see the module docstring)."""
    counts = counts if counts is not None else SelectCounts()
    ranked = sorted(responses, key=lambda r: (-r.score, r.position))
    usable = [r for r in ranked if not r.filtered]
    counts.filtered += len(ranked) - len(usable)
    if len(usable) > top_k and abs(usable[top_k - 1].score - usable[top_k].score) <= TIE_EPSILON:
        counts.tied_at_top += 1
    kept: list[tuple[ScoredResponse, SplitAnswer]] = []
    for response in usable:
        if len(kept) == top_k:
            break
        if min_score is not None and response.score < min_score:
            counts.below_min_score += 1
            continue
        split = split_reasoning(response.text, response.reasoning)
        if split.unfinished:
            counts.unfinished_reasoning += 1
        elif not split.answer:
            counts.empty_answer += 1
        elif any(near_duplicates(split.answer, other.answer, near_duplicate) for _, other in kept):
            counts.near_duplicates += 1
        else:
            kept.append((response, split))
    return kept


def sft_row(group: PromptGroup, response: ScoredResponse, split: SplitAnswer, rank: int,
            reasoning: ReasoningMode) -> dict:
    row = {"prompt": prompt_messages(group.prompt), "completion": completion_messages(sft_completion(split, reasoning)),
           "prompt_id": group.prompt_id, "prompt_hash": group.prompt_hash, "completion_id": response.id,
           "score": round(response.score, 6), "rank": rank, "judges": group.judges}
    return SFTExample.model_validate({k: v for k, v in row.items() if v is not None}).to_json()


@dataclass
class SelectResult:
    output: str
    prompts: int = 0
    rows: int = 0
    prompts_without_answer: int = 0
    with_reasoning: int = 0  # kept answers that came with the teacher's reasoning
    reasoning: str = "drop"
    counts: SelectCounts = field(default_factory=SelectCounts)

    def lines(self) -> list[str]:
        c = self.counts
        kept = {"keep": "in the completion", "drop": "left out"}[self.reasoning]
        return [f"wrote {self.rows} SFT rows from {self.prompts} prompts to {self.output}",
                f"  prompts without an answer: {self.prompts_without_answer}; skipped: {c.filtered} failing a hard "
                f"rule, {c.below_min_score} below the minimum score, {c.near_duplicates} near-duplicate, "
                f"{c.unfinished_reasoning} with unfinished reasoning, {c.empty_answer} empty answers",
                f"  prompts whose best score is tied: {c.tied_at_top} (the first-written answer is kept)",
                f"  answers with the teacher's reasoning: {self.with_reasoning} ({kept})"]


def select_sft(judgements_path: str | Path, output: str | Path, *, top_k: int = 1, min_score: float | None = None,
               near_duplicate: float = 0.9, judge: str | None = None,
               reasoning: ReasoningMode = "drop") -> SelectResult:
    """Read judgements, write SFT rows (atomically)."""
    if top_k < 1:
        raise ConfigError(f"--top-k must be at least 1, got {top_k}")
    if not 0 < near_duplicate <= 1:
        raise ConfigError(f"--near-duplicate must be in (0, 1], got {near_duplicate}")
    if reasoning not in ("keep", "drop"):
        raise ConfigError(f"--reasoning must be keep or drop, got {reasoning!r}")
    groups = group_scores(load_records(judgements_path, "judgements"), judge)
    if not groups:
        raise DataError.at(judgements_path, "no scored judgements to select answers from")
    result = SelectResult(str(output), prompts=len(groups), reasoning=reasoning)
    rows = []
    for group in groups:
        kept = select_best(group.responses, top_k=top_k, min_score=min_score, near_duplicate=near_duplicate,
                           counts=result.counts)
        result.prompts_without_answer += not kept
        result.with_reasoning += sum(split.reasoning is not None for _, split in kept)
        rows += [sft_row(group, response, split, rank, reasoning) for rank, (response, split) in enumerate(kept, 1)]
    result.rows = write_records(output, rows)
    return result
