"""Converters from preference data people already have into TRL's shapes.

Supported inputs:

* ``hh-rlhf``: Anthropic's transcripts, ``{"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ...",
  "rejected": ...}``. The two transcripts share every turn but the last
  assistant turn: that shared conversation becomes the prompt, and the final
  assistant turns become ``chosen``/``rejected``.
* ``sharegpt`` (LLaMA-Factory): ``conversations`` + ``chosen``/``rejected`` for
  pairs, ``messages`` (or ``conversations``) + ``label`` for KTO rows. Turns use
  ``from``/``value`` (human, gpt, system) or ``role``/``content``.
* ``trl``: TRL's own shapes, standard or conversational, explicit or implicit
  prompt (``chosen``/``rejected`` holding the whole conversation); ``messages`` rows
  (conversational language modeling) become SFT's prompt/completion, the last turn the completion.

Each converter turns one input row into output rows (dicts in TRL's shape) or
raises :class:`FieldError` naming the offending field.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from align.data.records import PreferencePair, SFTExample, UnpairedExample, content_hash, to_plain

FORMATS = ("hh-rlhf", "sharegpt", "trl")


class FieldError(ValueError):
    """A row that cannot be converted, and the field responsible."""

    def __init__(self, field: str | None, message: str):
        super().__init__(message)
        self.field = field
        self.message = message


def _require(row: dict[str, Any], key: str, kind: type | tuple[type, ...], what: str) -> Any:
    if key not in row:
        raise FieldError(key, "missing")
    value = row[key]
    if not isinstance(value, kind):
        raise FieldError(key, f"must be {what}, got {type(value).__name__}")
    return value


# ----------------------------------------------------------------------------- HH-RLHF

_HH_TURN = re.compile(r"\n\n(Human|Assistant):")
_HH_ROLES = {"Human": "user", "Assistant": "assistant"}


def parse_hh_transcript(text: str, field: str) -> list[dict[str, str]]:
    """``"\\n\\nHuman: hi\\n\\nAssistant: hello"`` -> chat messages."""
    if not isinstance(text, str):
        raise FieldError(field, f"must be a transcript string, got {type(text).__name__}")
    marks = list(_HH_TURN.finditer(text))
    if not marks:
        raise FieldError(field, "no '\\n\\nHuman:' / '\\n\\nAssistant:' turns found")
    if text[: marks[0].start()].strip():
        raise FieldError(field, "text before the first '\\n\\nHuman:' turn")
    messages = []
    for mark, nxt in zip(marks, marks[1:] + [None]):
        content = text[mark.end(): nxt.start() if nxt else len(text)].strip()
        messages.append({"role": _HH_ROLES[mark.group(1)], "content": content})
    return messages


def convert_hh_rlhf(row: dict[str, Any]) -> list[dict[str, Any]]:
    chosen = parse_hh_transcript(_require(row, "chosen", str, "a transcript string"), "chosen")
    rejected = parse_hh_transcript(_require(row, "rejected", str, "a transcript string"), "rejected")
    for field, conv in (("chosen", chosen), ("rejected", rejected)):
        if conv[-1]["role"] != "assistant":
            raise FieldError(field, "transcript does not end with an Assistant turn")
    prompt, chosen_turn, rejected_turn = _split_shared_prefix(chosen, rejected)
    return [{"prompt": prompt, "chosen": chosen_turn, "rejected": rejected_turn}]


def _split_shared_prefix(chosen: list[dict], rejected: list[dict]) -> tuple[list, list, list]:
    """Shared conversation -> prompt; the differing final assistant turn -> completions."""
    if chosen[:-1] != rejected[:-1]:
        turn = next(i for i, (a, b) in enumerate(zip(chosen, rejected)) if a != b) \
            if any(a != b for a, b in zip(chosen, rejected)) else min(len(chosen), len(rejected)) - 1
        raise FieldError("rejected", f"conversation differs from chosen before the final assistant turn (at turn {turn + 1})")
    prompt = chosen[:-1]
    if not prompt or prompt[-1]["role"] != "user":
        raise FieldError("chosen", "no user turn before the final assistant turn")
    return prompt, [chosen[-1]], [rejected[-1]]


# ----------------------------------------------------------------------------- ShareGPT / LLaMA-Factory

_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "system": "system", "observation": "tool", "tool": "tool", "function_call": "assistant"}


def _sharegpt_message(turn: Any, field: str) -> dict[str, str]:
    if not isinstance(turn, dict):
        raise FieldError(field, f"must be a turn object, got {type(turn).__name__}")
    if "from" in turn or "value" in turn:
        role_key, text_key = "from", "value"
    else:
        role_key, text_key = "role", "content"
    role = turn.get(role_key)
    if role not in _SHAREGPT_ROLES:
        raise FieldError(f"{field}.{role_key}", f"unknown role {role!r} (expected one of {sorted(_SHAREGPT_ROLES)})")
    text = turn.get(text_key)
    if not isinstance(text, str):
        raise FieldError(f"{field}.{text_key}", "missing" if text is None else f"must be a string, got {type(text).__name__}")
    return {"role": _SHAREGPT_ROLES[role], "content": text}


def _sharegpt_conversation(row: dict[str, Any], key: str) -> list[dict[str, str]]:
    turns = _require(row, key, list, "a list of turns")
    messages = [_sharegpt_message(t, f"{key}[{i}]") for i, t in enumerate(turns)]
    if not messages:
        raise FieldError(key, "must not be empty")
    return messages


def convert_sharegpt(row: dict[str, Any]) -> list[dict[str, Any]]:
    if "chosen" in row or "rejected" in row:
        prompt = _sharegpt_conversation(row, "conversations" if "conversations" in row else "messages")
        if prompt[-1]["role"] != "user":
            raise FieldError("conversations", f"must end with a user turn, ends with '{prompt[-1]['role']}'")
        completions = {}
        for key in ("chosen", "rejected"):
            value = _require(row, key, (dict, str), "a turn object")
            completions[key] = [{"role": "assistant", "content": value}] if isinstance(value, str) \
                else [_sharegpt_message(value, key)]
        return [{"prompt": prompt, **completions}]
    if "label" in row:
        key = "messages" if "messages" in row else "conversations"
        conversation = _sharegpt_conversation(row, key)
        label = row["label"]
        if not isinstance(label, bool):
            raise FieldError("label", f"must be true or false, got {label!r}")
        prompt, completion = split_conversation(conversation, key)
        return [{"prompt": prompt, "completion": completion, "label": label}]
    raise FieldError("chosen", "missing: a ShareGPT row needs 'chosen'/'rejected' (pairs) or 'label' (KTO)")


# ----------------------------------------------------------------------------- TRL


def split_conversation(messages: list[Any], field: str) -> tuple[list[Any], list[Any]]:
    """A conversation -> (prompt: every turn before the last, completion: the last turn, an assistant's)."""
    last = messages[-1] if messages else None
    if len(messages) < 2 or not isinstance(last, dict) or last.get("role") != "assistant":
        raise FieldError(field, "must end with an assistant turn after at least one user turn")
    return messages[:-1], [last]


def convert_trl(row: dict[str, Any]) -> list[dict[str, Any]]:
    if "messages" in row and "label" not in row:
        # TRL's conversational language-modeling shape; the last assistant turn becomes the completion, so SFT's
        # loss covers it alone (earlier turns are context).
        prompt, completion = split_conversation(_require(row, "messages", list, "a list of messages"), "messages")
        extra = {k: v for k, v in row.items() if k != "messages"}
        return [{**extra, "prompt": prompt, "completion": completion}]
    if "chosen" in row and "rejected" in row:
        if "prompt" in row:
            return [dict(row)]
        chosen, rejected = row["chosen"], row["rejected"]
        if isinstance(chosen, list) and isinstance(rejected, list):  # implicit prompt
            prompt, c, r = _split_shared_prefix(chosen, rejected)
            extra = {k: v for k, v in row.items() if k not in ("chosen", "rejected")}
            return [{**extra, "prompt": prompt, "chosen": c, "rejected": r}]
        raise FieldError("prompt", "missing (a text-form pair needs an explicit prompt)")
    if "completion" in row and ("label" in row or "prompt" in row):
        return [dict(row)]
    expected = "expected prompt/chosen/rejected, prompt/completion(/label) or messages"
    if "prompt" in row:
        raise FieldError("chosen", f"missing: {expected}")
    raise FieldError("prompt", f"missing: {expected}")


CONVERTERS: dict[str, Callable[[dict[str, Any]], list[dict[str, Any]]]] = {
    "hh-rlhf": convert_hh_rlhf,
    "sharegpt": convert_sharegpt,
    "trl": convert_trl,
}


def detect_format(row: Any) -> str | None:
    """Guess a row's format from its keys and value types; None when nothing fits."""
    if not isinstance(row, dict):
        return None
    if "conversations" in row or ("messages" in row and "label" in row):
        return "sharegpt"
    chosen = row.get("chosen")
    if isinstance(chosen, str) and "prompt" not in row and _HH_TURN.search(chosen):
        return "hh-rlhf"
    if isinstance(chosen, dict):
        return "sharegpt"
    if ("chosen" in row and "rejected" in row) or {"prompt", "completion"} <= set(row) or "messages" in row:
        return "trl"
    return None


def trl_kind(row: dict[str, Any]) -> str:
    """The kind of a row already in TRL's shape: pairs, unpaired (KTO) or sft (prompt/completion, no label)."""
    return "pairs" if "chosen" in row else "unpaired" if "label" in row else "sft"


def pairs_to_unpaired(pairs: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Each pair gives a desirable (chosen) and an undesirable (rejected) KTO row.

    A completion that appears under the same prompt more than once is kept the
    first time only, so a chosen answer reused across pairs is not overweighted.
    """
    seen: set[str] = set()
    for pair in pairs:
        for key, label in (("chosen", True), ("rejected", False)):
            row = {"prompt": pair["prompt"], "completion": pair[key], "label": label}
            fingerprint = content_hash([to_plain(pair["prompt"]), to_plain(pair[key])])
            if fingerprint in seen:
                continue
            seen.add(fingerprint)
            yield row


OUTPUT_TYPES = {"pairs": PreferencePair, "unpaired": UnpairedExample, "sft": SFTExample}
