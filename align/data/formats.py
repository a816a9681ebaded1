"""Converters from preference data people already have into TRL's shapes.

Supported inputs (``--format`` names; :func:`explain_format` says which one a row looks like and why):

* ``hh-rlhf``: Anthropic's transcripts, ``{"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ...",
  "rejected": ...}``, as released (gzip JSONL). The prompt is the longest
  common prefix of whole turns (TRL's ``extract_prompt``); ``chosen``/``rejected``
  are what follows. Usually that is the final assistant turn alone; when the
  transcripts diverge earlier, the tails hold several turns (see
  :class:`ConvertOptions.early_divergence`).
* ``ultrafeedback``: openbmb/UltraFeedback as published: ``instruction`` and four
  ``completions``, each with a ``response`` and per-aspect GPT-4 ratings in
  ``annotations`` (helpfulness, honesty, instruction_following, truthfulness,
  each ``{"Rating": "1".."5" or "N/A", ...}``). The pair is the best and the
  worst completion by the mean of the numeric aspect ratings (the
  ``fine-grained_score`` HuggingFaceH4/ultrafeedback_binarized ranks by), or by
  the critique's ``overall_score`` with ``rank_by="overall"``.
* ``ultrafeedback-binarized``: a text ``prompt`` with ``chosen``/``rejected`` message
  lists that repeat it (HuggingFaceH4/ultrafeedback_binarized with
  ``score_chosen``/``score_rejected``; distilabel's ``FormatTextGenerationDPO`` and
  Argilla's binarized sets have the same shape with ``chosen_rating``/``chosen-rating``).
* ``distilabel``: a distilabel pipeline's columns before formatting: ``instruction``
  (or ``messages``), ``generations`` and ``ratings``; best and worst rated, as
  ``FormatTextGenerationDPO`` picks them.
* ``openai``: OpenAI's preference fine-tuning JSONL (``input.messages``,
  ``preferred_output``, ``non_preferred_output``). OpenAI's chat fine-tuning rows
  (``messages``) are TRL's conversational language-modeling shape and go
  through ``trl``.
* ``sharegpt`` (LLaMA-Factory): ``conversations`` + ``chosen``/``rejected`` for
  pairs, ``messages`` (or ``conversations``) + ``label`` for KTO rows. Turns use
  ``from``/``value`` (human, gpt, system) or ``role``/``content``.
* ``trl``: TRL's own shapes, standard or conversational, explicit or implicit
  prompt (``chosen``/``rejected`` holding the whole conversation, as most hub
  preference sets do); ``messages`` rows (conversational language modeling,
  OpenAI's chat fine-tuning format) become SFT's prompt/completion, the last turn
  the completion.

Each converter turns one input row into output rows (dicts in TRL's shape) or
raises :class:`FieldError` naming the offending field, or :class:`SkipRow` for a
row that is well-formed but holds no pair (identical answers, no preference).
"""

from __future__ import annotations

import hashlib
import math
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from align.data.records import PreferencePair, SFTExample, UnpairedExample, content_hash, to_plain

FORMATS = ("hh-rlhf", "ultrafeedback", "ultrafeedback-binarized", "distilabel", "openai", "sharegpt", "trl")
EARLY_DIVERGENCE = ("pairs", "skip")
RANK_BY = ("mean", "overall")


class FieldError(ValueError):
    """A row that cannot be converted, and the field responsible."""

    def __init__(self, field: str | None, message: str):
        super().__init__(message)
        self.field = field
        self.message = message


# Why a well-formed row gives no pair; `align data convert` counts them by reason.
SKIP_REASONS = {
    "identical": "chosen and rejected are identical",
    "diverged-early": "chosen and rejected diverge before the final assistant turn (--early-divergence skip)",
    "no-shared-turn": "chosen and rejected differ from the first turn, so there is no shared prompt",
    "no-preference": "every rated completion has the same score",
    "too-few-rated": "fewer than two completions have a response and a rating",
}


class SkipRow(FieldError):
    """A row that is well-formed but holds no pair. ``align data convert`` skips and counts it by ``reason``;
    anything else that reads converters (training) sees a :class:`FieldError`."""

    def __init__(self, reason: str, field: str | None = None):
        super().__init__(field, f"{SKIP_REASONS[reason]}: no pair (align data convert skips and counts such rows)")
        self.reason = reason


@dataclass
class ConvertOptions:
    """How converters treat what published sets do in more than one way.

    ``early_divergence``: chosen/rejected conversations that differ before the
    final assistant turn become pairs whose prompt is the shared turns and whose
    completions are the diverging multi-turn tails (``"pairs"``, TRL's
    ``extract_prompt``), or are skipped (``"skip"``).
    ``rank_by``: UltraFeedback's score: ``"mean"`` of the aspect ratings or the critique's ``"overall"`` score.
    ``events``: what happened to the row just converted (e.g. ``"diverged-early"``); the caller reads and clears it.
    """

    early_divergence: str = "pairs"
    rank_by: str = "mean"
    events: Counter = field(default_factory=Counter)


Converter = Callable[..., list[dict[str, Any]]]


def _require(row: dict[str, Any], key: str, kind: type | tuple[type, ...], what: str) -> Any:
    if key not in row:
        raise FieldError(key, "missing")
    value = row[key]
    if not isinstance(value, kind):
        raise FieldError(key, f"must be {what}, got {type(value).__name__}")
    return value


# ----------------------------------------------------------------------------- shared prompt, diverging tails


def split_at_divergence(chosen: list[Any], rejected: list[Any]) -> tuple[list[Any], list[Any], list[Any]]:
    """TRL's ``extract_prompt`` on whole turns: (longest common prefix, chosen's rest, rejected's rest).

    As in TRL, when one conversation is a prefix of the other (or they are
    equal) the last shared turn goes to the completions, so neither is empty.
    Both conversations must be non-empty.
    """
    n = min(len(chosen), len(rejected))
    idx = next((i for i in range(n) if chosen[i] != rejected[i]), n - 1)
    return chosen[:idx], chosen[idx:], rejected[idx:]


def pair_from_conversations(chosen: list[Any], rejected: list[Any],
                            options: ConvertOptions) -> tuple[list[Any], list[Any], list[Any]]:
    """Two whole conversations -> (prompt, chosen tail, rejected tail), or :class:`SkipRow`.

    Normally the tails are the final assistant turns. When the conversations
    diverge earlier, the tails hold every turn from the first difference on
    (``options.early_divergence == "pairs"``) or the row is skipped; either way
    ``options.events["diverged-early"]`` counts it. The prompt may come back
    empty only when both tails are single turns (completions given alone).
    """
    if to_plain(chosen) == to_plain(rejected):
        raise SkipRow("identical", "rejected")
    prompt, chosen_tail, rejected_tail = split_at_divergence(chosen, rejected)
    if len(chosen_tail) > 1 or len(rejected_tail) > 1:
        options.events["diverged-early"] += 1
        if options.early_divergence == "skip":
            raise SkipRow("diverged-early", "rejected")
        if not prompt:
            raise SkipRow("no-shared-turn", "rejected")
    return prompt, chosen_tail, rejected_tail


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


def convert_hh_rlhf(row: dict[str, Any], options: ConvertOptions | None = None) -> list[dict[str, Any]]:
    options = options or ConvertOptions()
    chosen = parse_hh_transcript(_require(row, "chosen", str, "a transcript string"), "chosen")
    rejected = parse_hh_transcript(_require(row, "rejected", str, "a transcript string"), "rejected")
    for key, conv in (("chosen", chosen), ("rejected", rejected)):
        if conv[-1]["role"] != "assistant":
            raise FieldError(key, "transcript does not end with an Assistant turn")
    prompt, chosen_tail, rejected_tail = pair_from_conversations(chosen, rejected, options)
    if not prompt:
        raise FieldError("chosen", "no user turn before the final assistant turn")
    extra = {k: v for k, v in row.items() if k not in ("chosen", "rejected")}
    return [{**extra, "prompt": prompt, "chosen": chosen_tail, "rejected": rejected_tail}]


# ----------------------------------------------------------------------------- rated candidates -> best/worst


def best_and_worst(scores: list[float]) -> tuple[int, int] | None:
    """Indices of the highest and the lowest score (the first of equals, as distilabel's
    ``FormatTextGenerationDPO`` picks), or None when all scores are equal (no preference)."""
    if len(scores) < 2:
        return None
    best = max(range(len(scores)), key=lambda i: scores[i])
    worst = min(range(len(scores)), key=lambda i: scores[i])
    return None if scores[best] == scores[worst] else (best, worst)


def _number(value: Any, field: str, what: str) -> float | None:
    """A rating as published: a number or a numeric string; None for "N/A"/null (not rated)."""
    if value is None or (isinstance(value, str) and value.strip().upper() in ("N/A", "NA", "")):
        return None
    if isinstance(value, bool):
        raise FieldError(field, f"must be {what}, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise FieldError(field, f"must be {what}, got {value!r}") from None
    return None if math.isnan(number) else number


def ultrafeedback_score(completion: dict[str, Any], field: str, rank_by: str = "mean") -> float | None:
    """One UltraFeedback completion's score, None when it has none.

    ``mean``: the mean of its numeric aspect ratings, "N/A" left out, which is
    how the release computes ``fine-grained_score`` (OpenBMB's
    fix_overall_score_issue.py) and what HuggingFaceH4/ultrafeedback_binarized
    ranks by since its December 2023 fix; a completion without ``annotations``
    falls back on its ``fine-grained_score``. ``overall``: the critique's 1-10
    ``overall_score`` (the binarized set's first recipe).
    """
    if rank_by == "overall":
        if "overall_score" not in completion:
            raise FieldError(f"{field}.overall_score", "missing (--rank-by mean ranks by the aspect ratings instead)")
        return _number(completion["overall_score"], f"{field}.overall_score", "a number")
    annotations = completion.get("annotations")
    if annotations is None:
        return _number(completion.get("fine-grained_score"), f"{field}.fine-grained_score", "a number")
    if not isinstance(annotations, dict):
        raise FieldError(f"{field}.annotations", f"must be an object of aspects, got {type(annotations).__name__}")
    ratings = []
    for aspect, annotation in annotations.items():
        if not isinstance(annotation, dict) or "Rating" not in annotation:
            raise FieldError(f"{field}.annotations.{aspect}", "must be an object with a 'Rating'")
        rating = _number(annotation["Rating"], f"{field}.annotations.{aspect}.Rating", "a number or 'N/A'")
        if rating is not None:
            ratings.append(rating)
    return sum(ratings) / len(ratings) if ratings else None


def _rated_pair(responses: list[str | None], scores: list[float | None]) -> tuple[int, int, float, float]:
    """Best and worst of the candidates that have a non-empty response and a score, or :class:`SkipRow`."""
    usable = [i for i, (r, s) in enumerate(zip(responses, scores))
              if isinstance(r, str) and r.strip() and s is not None]
    if len(usable) < 2:
        raise SkipRow("too-few-rated")
    picked = best_and_worst([scores[i] for i in usable])  # type: ignore[misc]
    if picked is None:
        raise SkipRow("no-preference")
    best, worst = usable[picked[0]], usable[picked[1]]
    if responses[best] == responses[worst]:
        raise SkipRow("identical")
    return best, worst, scores[best], scores[worst]  # type: ignore[return-value]


def _prompt_id(text: str) -> str:
    # HuggingFaceH4/ultrafeedback_binarized's and distilabel's prompt_id: the SHA-256 of the prompt text.
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def convert_ultrafeedback(row: dict[str, Any], options: ConvertOptions | None = None) -> list[dict[str, Any]]:
    """openbmb/UltraFeedback -> one conversational pair: the best and the worst rated completion.

    The per-completion ``custom_system_prompt`` (each completion was written
    under its own principle) is left out of the shared prompt, as the binarized
    set does. The chosen/rejected models and scores travel as extra columns.
    """
    options = options or ConvertOptions()
    instruction = _require(row, "instruction", str, "a string")
    if not instruction.strip():
        raise FieldError("instruction", "must not be empty")
    completions = _require(row, "completions", list, "a list of completions")
    responses, scores, models = [], [], []
    for i, completion in enumerate(completions):
        where = f"completions[{i}]"
        if not isinstance(completion, dict):
            raise FieldError(where, f"must be an object with a 'response', got {type(completion).__name__}")
        response = completion.get("response")
        if response is not None and not isinstance(response, str):
            raise FieldError(f"{where}.response", f"must be a string, got {type(response).__name__}")
        responses.append(response)
        scores.append(ultrafeedback_score(completion, where, options.rank_by))
        models.append(completion.get("model"))
    prompt = [{"role": "user", "content": instruction}]
    best, worst, score_chosen, score_rejected = _rated_pair(responses, scores)
    out = {"prompt": prompt,
           "chosen": [{"role": "assistant", "content": responses[best]}],
           "rejected": [{"role": "assistant", "content": responses[worst]}],
           "prompt_id": _prompt_id(instruction), "score_chosen": score_chosen, "score_rejected": score_rejected,
           "chosen_model": models[best], "rejected_model": models[worst]}
    if "source" in row:
        out["source"] = row["source"]
    return [out]


def convert_distilabel(row: dict[str, Any], options: ConvertOptions | None = None) -> list[dict[str, Any]]:
    """A distilabel pipeline's rated generations -> the best and the worst, as ``FormatTextGenerationDPO``
    (``instruction``, optional ``system_prompt``) or ``FormatChatGenerationDPO`` (``messages``) would pick them."""
    if "messages" in row:
        prompt = _messages(_require(row, "messages", list, "a list of messages"), "messages")
        if prompt[-1]["role"] != "user":
            raise FieldError("messages", f"must end with a user turn, ends with '{prompt[-1]['role']}'")
        prompt_text = next(m["content"] for m in prompt if m["role"] == "user")
    else:
        prompt_text = _require(row, "instruction", str, "a string")
        prompt = [{"role": "user", "content": prompt_text}]
        system = row.get("system_prompt")
        if isinstance(system, str) and system:
            prompt.insert(0, {"role": "system", "content": system})
    generations = _require(row, "generations", list, "a list of generated texts")
    ratings = _require(row, "ratings", list, "a list of ratings")
    if len(ratings) != len(generations):
        raise FieldError("ratings", f"has {len(ratings)} ratings for {len(generations)} generations")
    for i, text in enumerate(generations):
        if text is not None and not isinstance(text, str):
            raise FieldError(f"generations[{i}]", f"must be a string, got {type(text).__name__}")
    scores = [_number(r, f"ratings[{i}]", "a number") for i, r in enumerate(ratings)]
    models = row.get("generation_models")
    models = models if isinstance(models, list) and len(models) == len(generations) else None
    best, worst, chosen_rating, rejected_rating = _rated_pair(generations, scores)
    out = {"prompt": prompt,
           "chosen": [{"role": "assistant", "content": generations[best]}],
           "rejected": [{"role": "assistant", "content": generations[worst]}],
           "prompt_id": _prompt_id(prompt_text), "chosen_rating": chosen_rating, "rejected_rating": rejected_rating}
    if models:
        out.update(chosen_model=models[best], rejected_model=models[worst])
    return [out]


# ----------------------------------------------------------------------------- chat messages (TRL, OpenAI)

# OpenAI's "developer" role is its newer name for the system message; chat templates know "system".
_MESSAGE_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}


def _message_text(content: Any, field: str) -> str:
    """A message's content: a string, or OpenAI's list of content parts when they are all text."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind != "text" or not isinstance(part.get("text"), str):
                raise FieldError(f"{field}[{j}]", f"content part of type {kind!r} is not supported (text only); "
                                                  "--skip-invalid drops such rows")
            texts.append(part["text"])
        return "\n".join(texts)
    raise FieldError(field, "missing" if content is None else f"must be a string, got {type(content).__name__}")


def _messages(value: list[Any], field: str) -> list[dict[str, Any]]:
    """Chat messages (TRL's/OpenAI's ``role``/``content``) checked, with OpenAI's variants normalised; a
    message's extra keys (``name``, OpenAI's ``weight``) are kept."""
    if not value:
        raise FieldError(field, "must not be empty")
    out = []
    for i, message in enumerate(value):
        where = f"{field}[{i}]"
        if not isinstance(message, dict):
            raise FieldError(where, f"must be a message object, got {type(message).__name__}")
        role = message.get("role")
        if role not in _MESSAGE_ROLES:
            raise FieldError(f"{where}.role", f"unknown role {role!r} (expected one of {sorted(_MESSAGE_ROLES)})")
        if message.get("content") is None and message.get("tool_calls"):
            raise FieldError(f"{where}.tool_calls", "tool calls are not supported; --skip-invalid drops such rows")
        text = _message_text(message.get("content"), f"{where}.content")
        out.append({**message, "role": _MESSAGE_ROLES[role], "content": text})
    return out


def split_conversation(messages: list[Any], field: str) -> tuple[list[Any], list[Any]]:
    """A conversation -> (prompt: every turn before the last, completion: the last turn, an assistant's)."""
    last = messages[-1] if messages else None
    if len(messages) < 2 or not isinstance(last, dict) or last.get("role") != "assistant":
        raise FieldError(field, "must end with an assistant turn after at least one user turn")
    return messages[:-1], [last]


def convert_openai(row: dict[str, Any], options: ConvertOptions | None = None) -> list[dict[str, Any]]:
    """OpenAI's preference fine-tuning rows -> pairs; its chat fine-tuning rows (``messages``) -> SFT rows."""
    if "messages" in row and "input" not in row:
        return convert_trl(row, options)
    given = _require(row, "input", dict, "an object with 'messages'")
    if "messages" not in given:
        raise FieldError("input.messages", "missing")
    if not isinstance(given["messages"], list):
        raise FieldError("input.messages", f"must be a list of messages, got {type(given['messages']).__name__}")
    prompt = _messages(given["messages"], "input.messages")
    out: dict[str, Any] = {"prompt": prompt}
    for source, key in (("preferred_output", "chosen"), ("non_preferred_output", "rejected")):
        out[key] = _messages(_require(row, source, list, "a list of messages"), source)
    if given.get("tools"):
        out["tools"] = given["tools"]  # TRL's DPO passes a `tools` column to the chat template
    return [out]


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


def convert_sharegpt(row: dict[str, Any], options: ConvertOptions | None = None) -> list[dict[str, Any]]:
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


# ----------------------------------------------------------------------------- TRL (and the hub's conversational pairs)


def _pair_with_text_prompt(prompt_text: str, chosen: list[Any], rejected: list[Any],
                           options: ConvertOptions) -> dict[str, list[Any]]:
    """A text prompt with conversations that repeat it (UltraFeedback binarized) -> a conversational pair."""
    prompt, chosen_tail, rejected_tail = pair_from_conversations(chosen, rejected, options)
    if not prompt:  # the lists hold the completions alone
        prompt = [{"role": "user", "content": prompt_text}]
    elif not any(m.get("role") == "user" and m.get("content") == prompt_text for m in prompt):
        raise FieldError("prompt", "is not a user turn of the conversation chosen and rejected share; "
                                   "give the prompt as a list of messages, or leave it out (implicit prompt)")
    return {"prompt": prompt, "chosen": chosen_tail, "rejected": rejected_tail}


def convert_ultrafeedback_binarized(row: dict[str, Any], options: ConvertOptions | None = None) -> list[dict[str, Any]]:
    options = options or ConvertOptions()
    prompt_text = _require(row, "prompt", str, "a string")
    chosen = _messages(_require(row, "chosen", list, "a list of messages"), "chosen")
    rejected = _messages(_require(row, "rejected", list, "a list of messages"), "rejected")
    pair = _pair_with_text_prompt(prompt_text, chosen, rejected, options)
    # `messages` is a copy of `chosen` in the binarized set (for SFT); beside a pair it would only confuse readers.
    extra = {k: v for k, v in row.items() if k not in ("prompt", "chosen", "rejected")
             and not (k == "messages" and v == row["chosen"])}
    score_chosen, score_rejected = row.get("score_chosen"), row.get("score_rejected")
    if isinstance(score_chosen, (int, float)) and score_chosen == score_rejected:
        options.events["tied-scores"] += 1
    return [{**extra, **pair}]


def convert_trl(row: dict[str, Any], options: ConvertOptions | None = None) -> list[dict[str, Any]]:
    options = options or ConvertOptions()
    if "chosen" in row and "rejected" in row:
        chosen, rejected = row["chosen"], row["rejected"]
        extra = {k: v for k, v in row.items() if k not in ("prompt", "chosen", "rejected")}
        if "prompt" in row:
            prompt = row["prompt"]
            if isinstance(prompt, str) and isinstance(chosen, list) and isinstance(rejected, list):
                return convert_ultrafeedback_binarized(row, options)
            if (isinstance(prompt, list) and prompt and isinstance(chosen, list) and isinstance(rejected, list)
                    and len(chosen) > len(prompt) and len(rejected) > len(prompt)
                    and chosen[:len(prompt)] == prompt == rejected[:len(prompt)]):
                chosen, rejected = chosen[len(prompt):], rejected[len(prompt):]  # completions that repeat the prompt
            return [{**extra, "prompt": prompt, "chosen": chosen, "rejected": rejected}]
        if isinstance(chosen, list) and isinstance(rejected, list):  # implicit prompt
            prompt, chosen_tail, rejected_tail = pair_from_conversations(chosen, rejected, options)
            return [{**extra, "prompt": prompt, "chosen": chosen_tail, "rejected": rejected_tail}]
        raise FieldError("prompt", "missing (a text-form pair needs an explicit prompt)")
    if "messages" in row and "label" not in row:
        # TRL's conversational language-modeling shape (and OpenAI's chat fine-tuning rows); the last assistant
        # turn becomes the completion, so SFT's loss covers it alone (earlier turns are context).
        messages = _messages(_require(row, "messages", list, "a list of messages"), "messages")
        prompt, completion = split_conversation(messages, "messages")
        extra = {k: v for k, v in row.items() if k != "messages"}
        return [{**extra, "prompt": prompt, "completion": completion}]
    if "completion" in row and ("label" in row or "prompt" in row):
        return [dict(row)]
    expected = "expected prompt/chosen/rejected, prompt/completion(/label) or messages"
    if "prompt" in row:
        raise FieldError("chosen", f"missing: {expected}")
    raise FieldError("prompt", f"missing: {expected}")


CONVERTERS: dict[str, Converter] = {
    "hh-rlhf": convert_hh_rlhf,
    "ultrafeedback": convert_ultrafeedback,
    "ultrafeedback-binarized": convert_ultrafeedback_binarized,
    "distilabel": convert_distilabel,
    "openai": convert_openai,
    "sharegpt": convert_sharegpt,
    "trl": convert_trl,
}


# ----------------------------------------------------------------------------- detection


def explain_format(row: Any) -> tuple[str, str] | None:
    """A row's format and why (the keys and value types that decided it); None when nothing fits.

    Rules, first match wins: ``instruction`` + ``completions`` -> ultrafeedback;
    ``generations`` + ``ratings`` -> distilabel; ``input`` + ``preferred_output`` ->
    openai; ``conversations``, or ``messages`` + ``label``, or a ``chosen`` turn
    object -> sharegpt; ``chosen`` a "\\n\\nHuman:" transcript with no ``prompt`` ->
    hh-rlhf; a text ``prompt`` with message-list ``chosen``/``rejected`` ->
    ultrafeedback-binarized; any other ``chosen``/``rejected``, ``messages`` or
    ``prompt``/``completion`` -> trl.
    """
    if not isinstance(row, dict):
        return None
    chosen = row.get("chosen")
    if isinstance(row.get("completions"), list) and "instruction" in row:
        return "ultrafeedback", "'instruction' with a list of 'completions' (openbmb/UltraFeedback, rated per aspect)"
    if isinstance(row.get("generations"), list) and "ratings" in row:
        return "distilabel", "'generations' with 'ratings' (a distilabel pipeline's rated generations)"
    if isinstance(row.get("input"), dict) and "preferred_output" in row:
        return "openai", "'input' with 'preferred_output'/'non_preferred_output' (OpenAI preference fine-tuning)"
    if "conversations" in row:
        return "sharegpt", "a 'conversations' column (ShareGPT / LLaMA-Factory)"
    if "messages" in row and "label" in row:
        return "sharegpt", "'messages' with a 'label' (LLaMA-Factory's KTO rows)"
    if isinstance(chosen, str) and "prompt" not in row and _HH_TURN.search(chosen):
        return "hh-rlhf", "'chosen' is a '\\n\\nHuman: ... \\n\\nAssistant: ...' transcript and there is no 'prompt'"
    if isinstance(chosen, dict):
        return "sharegpt", "'chosen' is a single turn object (ShareGPT / LLaMA-Factory)"
    if isinstance(row.get("prompt"), str) and isinstance(chosen, list) and isinstance(row.get("rejected"), list):
        scores = [k for k in ("score_chosen", "chosen_rating", "chosen-rating") if k in row]
        return "ultrafeedback-binarized", ("a text 'prompt' with 'chosen'/'rejected' message lists"
                                           + (f" and '{scores[0]}'" if scores else "")
                                           + " (HuggingFaceH4/ultrafeedback_binarized; distilabel's and Argilla's "
                                             "binarized sets)")
    if "chosen" in row and "rejected" in row:
        if "prompt" in row:
            return "trl", "'prompt', 'chosen' and 'rejected' (TRL's preference shape, explicit prompt)"
        return "trl", "'chosen' and 'rejected' with no 'prompt' (TRL's implicit prompt: the shared turns)"
    if {"prompt", "completion"} <= set(row):
        return "trl", "'prompt' and 'completion' (TRL's prompt-completion shape)"
    if "messages" in row:
        return "trl", "'messages' chat rows (TRL's conversational language modeling; OpenAI's chat fine-tuning)"
    return None


def detect_format(row: Any) -> str | None:
    """Guess a row's format from its keys and value types; None when nothing fits."""
    found = explain_format(row)
    return found[0] if found else None


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
