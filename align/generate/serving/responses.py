"""OpenAI's response shapes, whole and as stream chunks, and one choice's text as its tokens arrive.

:class:`ChoiceText` is the one place a choice's text is made. Streamed, it hands out only text that can
no longer change: a token that ends mid-character (``"\\ufffd"``) or text that could be the start of a
stop string waits for the next token. Finished, its text is the transformers teacher's own
(``TransformersEngine.completion``: end-of-turn token dropped, cut before a stop string), and the last
delta is whatever of it was not yet sent; so streamed deltas always add up to the non-streamed answer.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from align.generate.decode import RowOutput, StopStrings
from align.generate.serving.scheduler import Token


class ChoiceText:
    """The tokens, log-probs and text of one choice, with what of them a stream has already sent."""

    def __init__(self, engine: Any, stop: list[str]):
        self.engine = engine
        self.stopper = StopStrings(engine.tokenizer, stop) if stop else None
        self.stop = [s for s in stop if s]
        self.token_ids: list[int] = []
        self.entries: list[dict[str, Any]] = []
        self.finish_reason: str | None = None
        self.text = ""  # the final text, once finished
        self.sent = ""
        self.sent_entries = 0

    def add(self, token: Token) -> None:
        self.token_ids.append(token.token_id)
        if token.logprob is not None:
            self.entries.append(token.logprob)

    def finish(self, reason: str) -> None:
        self.finish_reason = reason
        self.text = self.engine.completion(RowOutput(list(self.token_ids), reason), self.stopper).text
        if reason == "stop" and self.token_ids and self.token_ids[-1] in self.engine.eos_token_ids and \
                len(self.entries) == len(self.token_ids):
            self.entries = self.entries[:-1]  # the end-of-turn token is not part of the text

    def pending(self) -> tuple[str, list[dict[str, Any]]]:
        """Text and log-prob entries not yet sent: what is settled so far, or everything once finished."""
        if self.finish_reason is None:
            text = self._settled()
            if not text.startswith(self.sent) or len(text) == len(self.sent):
                return "", []  # nothing new (or a decode that changed earlier text: wait for the end)
        else:
            text = self.text
        delta = text[len(self.sent):]
        entries = self.entries[self.sent_entries:]
        self.sent, self.sent_entries = self.sent + delta, len(self.entries)
        return delta, entries

    def _settled(self) -> str:
        text = self.engine.tokenizer.decode(self.token_ids, skip_special_tokens=True)
        text = text.rstrip("\ufffd")  # a character split across tokens: wait for the rest of it
        for length in range(min(len(text), max((len(s) for s in self.stop), default=0)), 0, -1):
            if any(s.startswith(text[-length:]) for s in self.stop):
                return text[:-length]  # may be the start of a stop string: hold it back
        return text


# ----------------------------------------------------------------------------- log-probs


def token_text(engine: Any, token_id: int) -> str:
    return engine.tokenizer.decode([token_id])


def chat_logprobs(engine: Any, entries: list[dict[str, Any]]) -> dict[str, Any]:
    """Chat's ``logprobs``: ``{"content": [{"token", "token_id", "logprob", "bytes", "top_logprobs"}]}``
    (``token_id`` is align's addition, read by align's client; vLLM sends ids another way)."""

    def item(token_id: int, logprob: float) -> dict[str, Any]:
        token = token_text(engine, token_id)
        return {"token": token, "token_id": token_id, "logprob": logprob, "bytes": list(token.encode("utf-8"))}

    content = []
    for entry in entries:
        out = item(entry["token_id"], entry["logprob"])
        out["top_logprobs"] = [item(t["token_id"], t["logprob"]) for t in entry.get("top_logprobs", [])]
        content.append(out)
    return {"content": content}


def completion_logprobs(engine: Any, entries: list[dict[str, Any]], offset: int = 0) -> dict[str, Any]:
    """The completions endpoint's (legacy) ``logprobs``; ``text_offset`` counts from ``offset``."""
    tokens = [token_text(engine, e["token_id"]) for e in entries]
    offsets = []
    for token in tokens:
        offsets.append(offset)
        offset += len(token)
    return {"tokens": tokens, "token_ids": [e["token_id"] for e in entries],
            "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [{token_text(engine, t["token_id"]): t["logprob"] for t in e.get("top_logprobs", [])}
                             for e in entries],
            "text_offset": offsets}


# ----------------------------------------------------------------------------- whole responses and chunks


class ResponseWriter:
    """Builds one request's response body or stream chunks (same id and creation time throughout)."""

    def __init__(self, engine: Any, kind: str, model: str, logprobs: bool, include_usage: bool = False):
        self.engine = engine
        self.kind = kind
        self.model = model
        self.logprobs = logprobs
        self.include_usage = include_usage
        self.id = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self._offsets: dict[int, int] = {}  # completions: text_offset reached per choice

    def _logprobs(self, index: int, entries: list[dict[str, Any]]) -> dict[str, Any] | None:
        if not self.logprobs:
            return None
        if self.kind == "chat":
            return chat_logprobs(self.engine, entries)
        block = completion_logprobs(self.engine, entries, self._offsets.get(index, 0))
        self._offsets[index] = self._offsets.get(index, 0) + sum(len(t) for t in block["tokens"])
        return block

    def response(self, choices: list[ChoiceText], prompt_tokens: int) -> dict[str, Any]:
        out = []
        for i, choice in enumerate(choices):
            body: dict[str, Any] = {"index": i, "finish_reason": choice.finish_reason,
                                    "logprobs": self._logprobs(i, choice.entries)}
            if self.kind == "chat":
                body["message"] = {"role": "assistant", "content": choice.text}
            else:
                body["text"] = choice.text
            out.append(body)
        return {"id": self.id, "object": "chat.completion" if self.kind == "chat" else "text_completion",
                "created": self.created, "model": self.model, "choices": out,
                "usage": usage(prompt_tokens, choices)}

    def chunk(self, index: int, text: str | None, entries: list[dict[str, Any]], finish_reason: str | None = None,
              role: bool = False) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": index}
        if self.kind == "chat":
            delta: dict[str, Any] = {"role": "assistant"} if role else {}
            if text is not None:
                delta["content"] = text
            choice["delta"] = delta
        else:
            choice["text"] = text or ""
        choice["logprobs"] = self._logprobs(index, entries) if entries else None
        choice["finish_reason"] = finish_reason
        return self._chunk([choice])

    def usage_chunk(self, prompt_tokens: int, choices: list[ChoiceText]) -> dict[str, Any]:
        body = self._chunk([])
        body["usage"] = usage(prompt_tokens, choices)
        return body

    def _chunk(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        body = {"id": self.id, "object": "chat.completion.chunk" if self.kind == "chat" else "text_completion",
                "created": self.created, "model": self.model, "choices": choices}
        if self.include_usage:
            body["usage"] = None
        return body


def usage(prompt_tokens: int, choices: list[ChoiceText]) -> dict[str, int]:
    """Completion tokens count every generated token, the end-of-turn one included (as the teacher counts)."""
    completion_tokens = sum(len(c.token_ids) for c in choices)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def error_body(message: str, status: int, param: str | None = None) -> dict[str, Any]:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}
