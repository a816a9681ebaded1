"""Typed records for every stage of the loop, in TRL's data shapes.

Preference data follows TRL's names exactly (``prompt``/``chosen``/``rejected``
for pairs, ``prompt``/``completion``/``label`` for unpaired KTO rows, ``prompt``/``completion``
for SFT), in either
the *standard* form (plain strings) or the *conversational* form (lists of
``{"role", "content"}`` messages), so files move freely between align and TRL.

Our own stage records (prompts, candidates, judgements) add provenance: ids,
a prompt hash, who produced what with which settings, and when.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

Role = Literal["system", "user", "assistant", "tool"]


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Role
    content: str


Conversation = list[Message]
# A prompt or completion is either plain text or a list of chat messages.
Text = Union[str, Conversation]


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def to_plain(value: Any) -> Any:
    """Messages -> plain dicts, leaving strings alone (for hashing and writing)."""
    if isinstance(value, BaseModel):
        return value.model_dump(exclude_none=True)
    if isinstance(value, list):
        return [to_plain(v) for v in value]
    return value


def content_hash(value: Any, length: int = 16) -> str:
    """A stable short hash of any JSON-able value (key order does not matter)."""
    canonical = json.dumps(to_plain(value), sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:length]


def is_conversational(value: Any) -> bool:
    return isinstance(value, list)


def text_of(value: Text) -> str:
    """The text a person reads: the string itself, or the messages' contents joined."""
    if isinstance(value, str):
        return value
    return "\n".join(m.content if isinstance(m, Message) else m["content"] for m in value)


def _check_text(value: Text, field: str, *, last_role: str | None = None) -> Text:
    if isinstance(value, str):
        if not value.strip():
            raise ValueError("must not be empty")
        return value
    if not value:
        raise ValueError("must not be an empty list of messages")
    for i, message in enumerate(value):
        if not message.content.strip():
            raise ValueError(f"message {i} ({message.role}) has empty content")
    if last_role and value[-1].role != last_role:
        raise ValueError(f"last message must have role '{last_role}', got '{value[-1].role}'")
    return value


class _Record(BaseModel):
    # Users' extra columns travel with their records instead of being dropped.
    model_config = ConfigDict(extra="allow", validate_assignment=False)

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_none=True)


class PromptRecord(_Record):
    """One prompt for the teacher. ``id`` defaults to a hash of the prompt."""

    prompt: Text
    id: str | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: Text) -> Text:
        return _check_text(v, "prompt", last_role="user")

    @model_validator(mode="after")
    def _default_id(self) -> "PromptRecord":
        if self.id is None:
            self.id = content_hash(self.prompt)
        return self


class Candidate(BaseModel):
    """One teacher response to one prompt, with how it was produced."""

    model_config = ConfigDict(extra="allow")

    id: str
    text: str
    finish_reason: str | None = None  # "stop" | "length" | backend-specific
    num_tokens: int | None = None
    sampling: dict[str, Any] = Field(default_factory=dict)
    empty: bool = False
    duplicate_of: str | None = None  # id of an earlier identical candidate
    logprobs: list[dict[str, Any]] | None = None  # per token, only on request
    reasoning: str | None = None  # the teacher's reasoning, when its API returns it apart from the answer


class CandidateSet(_Record):
    """A prompt and the N candidates the teacher wrote for it (one JSONL line)."""

    prompt_id: str
    prompt: Text
    prompt_hash: str
    responses: list[Candidate]
    teacher: dict[str, Any] = Field(default_factory=dict)
    created_at: str = Field(default_factory=utc_now)


class JudgeInfo(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: Literal["rules", "llm", "human"]
    name: str
    model: str | None = None


class JudgedResponse(BaseModel):
    model_config = ConfigDict(extra="allow")

    id: str
    text: str
    reasoning: str | None = None  # carried from the candidate, for `align data select`


class Judgement(_Record):
    """A verdict on one response (pointwise) or on two (pairwise, A vs B).

    Pointwise: ``score`` is the judge's score, ``label`` optionally "good"/"bad".
    Pairwise: ``score`` is P(A is better), ``label`` one of "a", "b", "tie",
    "both_bad". ``details`` keeps what produced the verdict (per-rule scores,
    both presentation orders, raw judge text).
    """

    id: str
    prompt_id: str
    prompt: Text
    kind: Literal["pointwise", "pairwise"]
    responses: list[JudgedResponse]
    judge: JudgeInfo
    score: float | None = None
    label: str | None = None
    confidence: float | None = None
    rationale: str | None = None
    details: dict[str, Any] = Field(default_factory=dict)
    annotator: str | None = None
    created_at: str = Field(default_factory=utc_now)

    @model_validator(mode="after")
    def _arity(self) -> "Judgement":
        expected = 1 if self.kind == "pointwise" else 2
        if len(self.responses) != expected:
            raise ValueError(f"a {self.kind} judgement needs {expected} response(s), got {len(self.responses)}")
        return self


class PreferencePair(_Record):
    """TRL's preference shape: ``prompt``, ``chosen``, ``rejected`` (standard or conversational)."""

    prompt: Text
    chosen: Text
    rejected: Text

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: Text) -> Text:
        return _check_text(v, "prompt")

    @field_validator("chosen", "rejected")
    @classmethod
    def _completion(cls, v: Text) -> Text:
        return _check_text(v, "completion", last_role="assistant")

    @field_validator("rejected")
    @classmethod
    def _differs(cls, v: Text, info: ValidationInfo) -> Text:
        # Field validators run in declaration order, so a valid chosen is already in info.data.
        if "chosen" in info.data and to_plain(info.data["chosen"]) == to_plain(v):
            raise ValueError("identical to chosen: the pair teaches nothing")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> "PreferencePair":
        forms = {is_conversational(self.prompt), is_conversational(self.chosen), is_conversational(self.rejected)}
        if len(forms) > 1:
            raise ValueError("prompt, chosen and rejected must all be text or all be message lists")
        return self


class SFTExample(_Record):
    """TRL's prompt-completion shape, as SFT reads it: ``prompt``, ``completion`` (the answer to learn)."""

    prompt: Text
    completion: Text

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: Text) -> Text:
        return _check_text(v, "prompt")

    @field_validator("completion")
    @classmethod
    def _completion(cls, v: Text) -> Text:
        return _check_text(v, "completion", last_role="assistant")

    @model_validator(mode="after")
    def _consistent(self) -> "SFTExample":
        if is_conversational(self.prompt) != is_conversational(self.completion):
            raise ValueError("prompt and completion must both be text or both be message lists")
        return self


class UnpairedExample(SFTExample):
    """TRL's unpaired (KTO) shape: ``prompt``, ``completion``, ``label`` (True = desirable)."""

    label: bool

    @field_validator("label", mode="before")
    @classmethod
    def _strict_bool(cls, v: Any) -> Any:
        # pydantic would accept "yes"/1; a label column of strings is usually a mistake.
        if not isinstance(v, bool):
            raise ValueError(f"must be true or false, got {type(v).__name__} {v!r}")
        return v


RECORD_TYPES: dict[str, type[_Record]] = {
    "prompts": PromptRecord,
    "candidates": CandidateSet,
    "judgements": Judgement,
    "pairs": PreferencePair,
    "unpaired": UnpairedExample,
    "sft": SFTExample,
}


def detect_kind(row: dict[str, Any]) -> str | None:
    """Which record type a row looks like, from its keys alone."""
    keys = set(row)
    if {"chosen", "rejected"} <= keys and "prompt" in keys:
        return "pairs"
    if {"completion", "label"} <= keys:
        return "unpaired"
    if {"prompt", "completion"} <= keys:
        return "sft"
    # Judgements may carry a prompt_hash too (provenance), so test for them before candidates.
    if {"judge", "kind", "responses"} <= keys:
        return "judgements"
    if {"responses", "prompt_hash"} <= keys:
        return "candidates"
    if "prompt" in keys and not keys & {"chosen", "rejected", "completion"}:
        return "prompts"
    return None
