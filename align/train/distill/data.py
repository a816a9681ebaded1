"""Distillation data: prompts, or completions to score (the teacher's candidates, pairs, prompt/completion rows).

Each input row becomes one or more :class:`DistillExample`. A prompt alone is answered during
training (by the teacher, or by the student on-policy). A completion from ``align generate
--logprobs K`` keeps its exact token ids and the teacher's top-k log-probs, so the student can be
taught without loading the teacher (sparse top-k KD).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from align.data.io import Malformed, iter_rows, sha256_of
from align.data.records import (CandidateSet, PreferencePair, PromptRecord, UnpairedExample, detect_kind, text_of,
                                to_plain)
from align.data.validate import parse_row
from align.errors import DataError, Location, Problem
from align.train.distill.tokens import chat_prompt_ids, text_completion_ids

log = logging.getLogger(__name__)

MAX_PROBLEMS = 20


@dataclass
class DistillExample:
    prompt: Any  # text or chat messages (plain dicts)
    location: Location
    completion: str | None = None  # text, when the row brings an answer
    completion_ids: list[int] | None = None  # exact ids, when the teacher's log-probs were stored
    topk_ids: list[list[int]] | None = None  # per completion token: the teacher's alternatives (and its pick)
    topk_logprobs: list[list[float]] | None = None


@dataclass
class DistillData:
    examples: list[DistillExample]
    kind: str  # prompts | candidates | pairs | completions
    path: str
    file_sha256: str
    system_prompt: str | None = None  # the teacher's, as recorded by align generate
    teacher: str | None = None  # the model that wrote the candidates
    stats: dict[str, int] = field(default_factory=dict)

    @property
    def has_completions(self) -> bool:
        return all(e.completion is not None or e.completion_ids is not None for e in self.examples)

    @property
    def has_logprobs(self) -> bool:
        return all(e.topk_ids is not None for e in self.examples)


def load_distill_data(path: str | Path) -> DistillData:
    """Every example of a file, or a :class:`DataError` naming each bad line and field."""
    examples: list[DistillExample] = []
    problems: list[Problem] = []
    kinds: set[str] = set()
    system_prompts: set[str | None] = set()
    teachers: set[str | None] = set()
    skipped = {"empty": 0, "duplicate": 0, "undesirable": 0}
    for location, row in iter_rows(path, yield_malformed=True):
        try:
            kind, found = _examples(row, location, skipped)
        except DataError as exc:
            problems.extend(exc.problems)
            if len(problems) >= MAX_PROBLEMS:
                break
            continue
        if kind == "candidates":
            teacher = row.get("teacher") or {}
            system_prompts.add(teacher.get("system_prompt"))
            teachers.add(teacher.get("model"))
        if kinds and kind not in kinds:
            problems.append(Problem(location, None, f"row holds {kind} but earlier rows held {next(iter(kinds))}; "
                                                    "one kind of row per file"))
            continue
        kinds.add(kind)
        examples.extend(found)
    if problems:
        raise DataError(problems[:MAX_PROBLEMS])
    if not examples:
        raise DataError.at(path, "no examples: expected prompts ({\"prompt\"}), candidates from `align generate`, "
                                 "pairs or prompt/completion rows")
    if len(system_prompts) > 1 or len(teachers) > 1:
        raise DataError.at(path, "candidates from more than one teacher or system prompt; distil from one at a time")
    data = DistillData(examples, kinds.pop(), str(path), sha256_of(path),
                       system_prompt=next(iter(system_prompts), None), teacher=next(iter(teachers), None),
                       stats={k: v for k, v in skipped.items() if v})
    if data.stats:
        log.info("%s: skipped %s", path, ", ".join(f"{v} {k}" for k, v in data.stats.items()))
    return data


def _examples(row: Any, location: Location, skipped: dict[str, int]) -> tuple[str, list[DistillExample]]:
    if isinstance(row, Malformed):
        raise DataError(Problem(location, None, str(row)))
    if not isinstance(row, dict):
        raise DataError(Problem(location, None, f"expected a JSON object, got {type(row).__name__}"))
    kind = detect_kind(row)
    if kind is None and {"prompt", "completion"} <= set(row):
        kind = "completions"  # TRL's prompt-completion shape (SFT data) without a label
    if kind == "prompts":
        record = parse_row(PromptRecord, row, location)
        return kind, [DistillExample(to_plain(record.prompt), location)]
    if kind == "candidates":
        return kind, _candidate_examples(parse_row(CandidateSet, row, location), location, skipped)
    if kind == "pairs":
        pair = parse_row(PreferencePair, row, location)
        return kind, [DistillExample(to_plain(pair.prompt), location, completion=text_of(pair.chosen))]
    if kind in ("unpaired", "completions"):
        if kind == "unpaired":
            record = parse_row(UnpairedExample, row, location)
            if not record.label:
                skipped["undesirable"] += 1
                return "completions", []
            prompt, completion = record.prompt, record.completion
        else:
            prompt, completion = row["prompt"], row["completion"]
            if not _is_text(prompt) or not _is_text(completion):
                raise DataError(Problem(location, "completion", "prompt and completion must be text or chat messages"))
        return "completions", [DistillExample(to_plain(prompt), location, completion=text_of(completion))]
    expected = "prompts, candidates from `align generate`, pairs or prompt/completion rows"
    raise DataError(Problem(location, None,
                            f"rows with keys {sorted(row)} are not distillation data: expected {expected}"))


def _is_text(value: Any) -> bool:
    return isinstance(value, str) or (isinstance(value, list) and all(isinstance(m, dict) and "content" in m
                                                                        for m in value))


def _candidate_examples(record: CandidateSet, location: Location, skipped: dict[str, int]) -> list[DistillExample]:
    examples = []
    for index, response in enumerate(record.responses):
        if response.empty:
            skipped["empty"] += 1
            continue
        if response.duplicate_of is not None:
            skipped["duplicate"] += 1  # the same tokens twice would only weigh that answer double
            continue
        example = DistillExample(to_plain(record.prompt), location, completion=response.text)
        if response.logprobs:
            example.completion_ids, example.topk_ids, example.topk_logprobs = _stored_logprobs(
                response.logprobs, location, f"responses.{index}.logprobs")
        examples.append(example)
    return examples


def _stored_logprobs(entries: list[dict[str, Any]], location: Location, where: str
                     ) -> tuple[list[int], list[list[int]], list[list[float]]]:
    """(completion ids, per-token alternative ids, their log-probs); the written token is always among them."""
    ids, alt_ids, alt_logprobs = [], [], []
    for position, entry in enumerate(entries):
        if "token_id" not in entry or any("token_id" not in alt for alt in entry.get("top_logprobs") or []):
            raise DataError(Problem(location, f"{where}.{position}", "log-probs without token ids: sparse distillation "
                                    "needs them (with vLLM's server pass extra_body: {return_tokens_as_token_ids: "
                                    "true} to align generate)"))
        token = int(entry["token_id"])
        pairs = {int(alt["token_id"]): float(alt["logprob"]) for alt in entry.get("top_logprobs") or []}
        pairs.setdefault(token, float(entry["logprob"]))
        ids.append(token)
        alt_ids.append(list(pairs))
        alt_logprobs.append(list(pairs.values()))
    return ids, alt_ids, alt_logprobs


def check_stored_tokens(data: DistillData, tokenizer: Any, *, checked: int = 32) -> None:
    """Stored token ids must be the student's: they must exist in its vocabulary and decode to the stored text.

    A file written by a teacher with another tokenizer fails here, at its line, instead of
    teaching the student a scramble of unrelated ids.
    """
    size = len(tokenizer)
    for example in [e for e in data.examples if e.completion_ids is not None][:checked]:
        assert example.completion_ids is not None and example.topk_ids is not None
        largest = max(max(example.completion_ids), max(max(ids) for ids in example.topk_ids))
        if largest >= size:
            raise DataError(Problem(example.location, "responses.logprobs", f"token id {largest} is outside the "
                                    f"student's vocabulary of {size}: the teacher used another tokenizer"))
        decoded = tokenizer.decode(example.completion_ids, skip_special_tokens=True).strip()
        text = (example.completion or "").strip()
        if not decoded.startswith(text):
            raise DataError(Problem(example.location, "responses.logprobs",
                                    f"the stored token ids decode to {decoded[:60]!r} with the student's tokenizer "
                                    f"but the text is {text[:60]!r}: the teacher used another vocabulary, and sparse "
                                    "distillation needs identical ones"))


def encode_examples(examples: list[DistillExample], tokenizer: Any, *, teacher_system_prompt: str | None,
                    max_length: int | None) -> tuple[list[dict[str, Any]], int]:
    """Rows for the trainer's dataset, and how many were dropped because their prompt alone fills ``max_length``.

    ``prompt_ids`` is what the student sees, ``teacher_prompt_ids`` the teacher (its system prompt
    first); the completion is shared, cut so that the longer of the two sequences fits ``max_length``.
    """
    rows, dropped = [], 0
    for example in examples:
        student = chat_prompt_ids(tokenizer, example.prompt)
        teacher = chat_prompt_ids(tokenizer, example.prompt, teacher_system_prompt)
        completion = example.completion_ids
        if completion is None and example.completion is not None:
            completion = text_completion_ids(tokenizer, example.completion)
        room = None if max_length is None else max_length - max(len(student), len(teacher))
        if room is not None and room < 1:
            dropped += 1
            continue
        completion = (completion or [])[:room]
        keep = len(completion)
        rows.append({"prompt_ids": student, "teacher_prompt_ids": teacher, "completion_ids": completion,
                     "topk_ids": (example.topk_ids or [])[:keep],
                     "topk_logprobs": (example.topk_logprobs or [])[:keep]})
    return rows, dropped
