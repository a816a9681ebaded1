"""What to generate: one job per prompt, one row per candidate, with deterministic ids and seeds.

A candidate's id and seed depend only on (run seed, prompt id, candidate index), never on
batch order, so a resumed run asks for exactly what an uninterrupted one would have.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from align.data.records import PromptRecord, content_hash, to_plain
from align.generate.config import GenerateConfig, SamplingParams


@dataclass(frozen=True)
class CandidateSpec:
    index: int
    id: str
    sampling: SamplingParams
    seed: int


@dataclass(frozen=True)
class PromptJob:
    prompt_id: str
    record: PromptRecord
    messages: list[dict[str, str]]  # what the teacher sees: system prompt + the prompt as chat messages
    candidates: tuple[CandidateSpec, ...]


def candidate_id(prompt_id: str, index: int) -> str:
    return f"{prompt_id}-c{index}"


def derive_seed(*parts: Any) -> int:
    """A 63-bit seed from any values (stable across processes, unlike ``hash``)."""
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def teacher_messages(prompt: Any, system_prompt: str | None) -> list[dict[str, str]]:
    """The prompt as chat messages, the teacher's system prompt first.

    A prompt that brings its own system message keeps it, after the teacher's: it is part of the task.
    """
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else to_plain(prompt)
    messages = [{"role": m["role"], "content": m["content"]} for m in messages]
    if not system_prompt:
        return messages
    if messages[0]["role"] == "system":
        return [{"role": "system", "content": system_prompt + "\n\n" + messages[0]["content"]}] + messages[1:]
    return [{"role": "system", "content": system_prompt}] + messages


def build_job(record: PromptRecord, config: GenerateConfig) -> PromptJob:
    assert record.id is not None
    specs = tuple(
        CandidateSpec(i, candidate_id(record.id, i), config.sampling_for(i), derive_seed(config.seed, record.id, i))
        for i in range(config.num_candidates)
    )
    return PromptJob(record.id, record, teacher_messages(record.prompt, config.system_prompt), specs)


def settings_hash(config: GenerateConfig) -> str:
    """Hash of every setting that changes what is written (not paths, speed knobs or the API key)."""
    return content_hash({
        "model": config.model, "backend": config.backend, "base_url": config.base_url,
        "num_candidates": config.num_candidates, "max_new_tokens": config.max_new_tokens, "seed": config.seed,
        "sampling": [config.sampling_for(i).model_dump() for i in range(config.num_candidates)],
        "system_prompt": config.system_prompt, "logprobs": config.logprobs, "extra_body": config.extra_body,
    })
