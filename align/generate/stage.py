"""The generate stage: prompts file in, one CandidateSet line per prompt out, resumable.

Each finished prompt is appended at once (one ``write`` per line), so a run
killed at any moment loses at most the prompts in flight; run again, it reads
what is there, skips those prompt ids and carries on. Rows record a hash of the
settings that shaped them, and a rerun with different settings refuses to add
to the same file rather than silently mixing two teachers.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from align.data.io import JsonlAppender, iter_rows, sort_finished_jsonl
from align.data.records import Candidate, CandidateSet, PromptRecord, content_hash
from align.data.validate import parse_row
from align.errors import AlignError, ConfigError, DataError, Location, Problem
from align.generate.backends import Completion, make_backend
from align.generate.config import GenerateConfig
from align.generate.plan import PromptJob, build_job, settings_hash

log = logging.getLogger(__name__)

MAX_PROBLEMS = 20


@dataclass
class GenerateResult:
    output: Path
    prompts: int  # in the prompts file
    already_done: int  # found in the output from an earlier run
    generated: int  # prompts answered by this run
    candidates: int  # written by this run
    duplicates: int
    empty: int
    tokens: int
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


def read_prompts(path: str | Path) -> list[PromptRecord]:
    """Every prompt of a file, or a :class:`DataError` naming each bad line and field (ids must be unique)."""
    records: list[PromptRecord] = []
    problems: list[Problem] = []
    first_line: dict[str, Location] = {}
    for location, row in iter_rows(path, yield_malformed=True):
        try:
            record = parse_row(PromptRecord, row, location)
        except DataError as exc:
            problems.extend(exc.problems)
            continue
        assert record.id is not None
        if record.id in first_line:
            problems.append(Problem(location, "id", f"duplicate prompt id {record.id!r} "
                                                    f"(first at {first_line[record.id]}); ids must be unique"))
            continue
        first_line[record.id] = location
        records.append(record)
    if problems:
        raise DataError(problems[:MAX_PROBLEMS])
    if not records:
        raise DataError.at(path, "no prompts: expected JSON lines like {\"id\": \"q1\", \"prompt\": \"...\"}")
    return records


def done_prompt_ids(output: Path, expected_hash: str) -> set[str]:
    """Prompt ids already in ``output``, after checking they were made with the same settings."""
    if not output.exists():
        return set()
    done: set[str] = set()
    for location, row in iter_rows(output, tolerate_torn_tail=True):
        if not isinstance(row, dict) or "prompt_id" not in row:
            raise DataError(Problem(location, "prompt_id", "missing: this does not look like a candidates file"))
        found = (row.get("teacher") or {}).get("settings_hash")
        if found != expected_hash:
            raise AlignError(f"{location}: this output was written with different settings (model, sampling, "
                             "system prompt, number of candidates or log-probs); write to a new --output, "
                             "or pass --overwrite to start it again")
        done.add(row["prompt_id"])
    return done


def sampling_record(job: PromptJob, index: int, max_new_tokens: int) -> dict[str, Any]:
    spec = job.candidates[index]
    if spec.sampling.greedy:
        return {"do_sample": False, "temperature": 0.0, "max_new_tokens": max_new_tokens}
    record: dict[str, Any] = {"do_sample": True, "temperature": spec.sampling.temperature,
                              "top_p": spec.sampling.top_p, "max_new_tokens": max_new_tokens, "seed": spec.seed}
    if spec.sampling.top_k:
        record["top_k"] = spec.sampling.top_k
    return record


def build_candidates(job: PromptJob, completions: list[Completion], max_new_tokens: int) -> list[Candidate]:
    """Candidates with ids, sampling, and empty / duplicate flags (duplicates point at the first copy)."""
    first_with_text: dict[str, str] = {}
    candidates = []
    for spec, completion in zip(job.candidates, completions):
        key = completion.text.strip()
        candidate = Candidate(
            id=spec.id, text=completion.text, finish_reason=completion.finish_reason,
            num_tokens=completion.num_tokens, sampling=sampling_record(job, spec.index, max_new_tokens),
            empty=not key, logprobs=completion.logprobs, reasoning=completion.reasoning,
        )
        if key:
            if key in first_with_text:
                candidate.duplicate_of = first_with_text[key]
            else:
                first_with_text[key] = spec.id
        candidates.append(candidate)
    return candidates


def check_output_path(output: Path) -> None:
    if not output.name.lower().endswith((".jsonl", ".ndjson")):
        raise ConfigError(f"output {output}: candidates are appended line by line, so use a .jsonl file")
    if output.is_dir():
        raise ConfigError(f"output {output} is a folder; give a .jsonl file path")


def run_generate(config: GenerateConfig) -> GenerateResult:
    """Generate ``num_candidates`` responses for every prompt not yet in ``config.output``."""
    from tqdm.auto import tqdm

    output = Path(config.output)
    check_output_path(output)
    records = read_prompts(config.prompts)[: config.max_prompts]  # all input checked before the output is touched
    expected = settings_hash(config)
    if config.overwrite:
        output.unlink(missing_ok=True)
    done = done_prompt_ids(output, expected)
    todo = [build_job(r, config) for r in records if r.id not in done]
    result = GenerateResult(output, len(records), len(records) - len(todo), 0, 0, 0, 0, 0, 0.0)
    if not todo:
        _in_prompt_order(output, records)
        return result

    teacher: dict[str, Any] = {"model": config.model, "backend": config.backend, "settings_hash": expected}
    if config.system_prompt:
        teacher["system_prompt"] = config.system_prompt
        teacher["system_prompt_hash"] = content_hash(config.system_prompt)
    if config.base_url:
        teacher["base_url"] = config.base_url

    backend = make_backend(config)
    teacher.update(backend.describe())
    start = time.perf_counter()  # generation time, not model loading
    bar = tqdm(total=len(records), initial=result.already_done, unit="prompt", desc="generate",
               disable=not config.progress, dynamic_ncols=True)
    live = _LiveRate(bar)
    appender: JsonlAppender | None = None  # opened on the first result: a failed start leaves no empty file
    try:
        for job, completions in backend.run(todo, on_tokens=live.add):
            candidates = build_candidates(job, completions, config.max_new_tokens)
            appender = appender or JsonlAppender(output)
            appender.append(CandidateSet(prompt_id=job.prompt_id, prompt=job.record.prompt,
                                         prompt_hash=content_hash(job.record.prompt), responses=candidates,
                                         teacher=teacher))
            result.generated += 1
            result.candidates += len(candidates)
            result.duplicates += sum(c.duplicate_of is not None for c in candidates)
            result.empty += sum(c.empty for c in candidates)
            result.tokens += sum(c.num_tokens or 0 for c in candidates)
            bar.update(1)
    finally:
        if appender is not None:
            appender.close()
        bar.close()
        backend.close()
    result.seconds = time.perf_counter() - start
    _in_prompt_order(output, records)
    return result


def _in_prompt_order(output: Path, records: list[PromptRecord]) -> None:
    """A finished file in the prompts' order: rows are appended as prompts finish (batches end out of order, a
    resumed run adds its prompts last); rows of prompts not in this run's list keep their place after them."""
    place = {record.id: i for i, record in enumerate(records)}
    sort_finished_jsonl(output, lambda row: place.get(row.get("prompt_id"), len(place)))


class _LiveRate:
    """Shows generated tokens per second on the progress bar while a batch is still running."""

    def __init__(self, bar: Any):
        self.bar = bar
        self.tokens = 0
        self.start = time.perf_counter()
        self.shown = 0.0

    def add(self, tokens: int) -> None:
        self.tokens += tokens
        now = time.perf_counter()
        if now - self.shown >= 0.5:
            self.shown = now
            self.bar.set_postfix_str(f"{self.tokens / (now - self.start):.1f} tok/s")
