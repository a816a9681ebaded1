"""OpenAI request bodies -> typed requests, or a :class:`RequestError` that names the bad field.

Pure: no model, no HTTP. The server answers a RequestError with status 400 and OpenAI's error shape
(``{"error": {"message", "type", "param", "code"}}``), ``param`` being the field.

Fields align does not know are ignored, as vLLM ignores them (clients send vendor extras such as
``return_tokens_as_token_ids``); fields that would change the answer in a way align cannot honour
(penalties, ``logit_bias``, tools, ``echo``...) are refused rather than silently dropped.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from align.generate.config import SamplingParams

MAX_N = 128
MAX_TOP_LOGPROBS = 20
# Penalties align does not apply: accepted only at the value that changes nothing.
NEUTRAL_PENALTIES = {"presence_penalty": 0.0, "frequency_penalty": 0.0, "repetition_penalty": 1.0}


class RequestError(Exception):
    """A request the server will not run: answered with ``status`` and OpenAI's error shape."""

    def __init__(self, message: str, param: str | None = None, status: int = 400):
        super().__init__(message)
        self.param = param
        self.status = status


@dataclass
class CompletionRequest:
    """One validated ``/v1/chat/completions`` (``messages``) or ``/v1/completions`` (``prompts``) request."""

    kind: Literal["chat", "completion"]
    model: str | None
    messages: list[dict[str, str]] | None = None
    prompts: list[str] | None = None
    n: int = 1
    max_tokens: int | None = None  # None: the server's default
    sampling: SamplingParams = field(default_factory=lambda: SamplingParams(temperature=1.0, top_p=1.0, top_k=0))
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    logprobs: int | None = None  # None: off; k: the chosen token's log-prob and k alternatives
    stream: bool = False
    include_usage: bool = False  # stream_options.include_usage: a last chunk with the token counts


def parse_chat(body: Any) -> CompletionRequest:
    body = _object(body)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' must be a non-empty list", "messages")
    plain = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str) or "content" not in message:
            raise RequestError(f"messages[{i}]: each message needs a 'role' (string) and 'content'", "messages")
        plain.append({"role": message["role"], "content": _message_text(message["content"], i)})
    logprobs = _boolean(body, "logprobs", False)
    top = _number(body, "top_logprobs", None, int, 0, MAX_TOP_LOGPROBS)
    if top is not None and not logprobs:
        raise RequestError("'top_logprobs' needs 'logprobs': true", "top_logprobs")
    request = CompletionRequest("chat", _model(body), messages=plain, logprobs=(top or 0) if logprobs else None)
    _common(body, request, "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens")
    for name in ("tools", "functions"):
        if body.get(name):
            raise RequestError(f"'{name}' is not supported by align's server (no tool calling)", name)
    response_format = body.get("response_format")
    if response_format is not None and (not isinstance(response_format, dict) or response_format.get("type") != "text"):
        raise RequestError("'response_format' other than {\"type\": \"text\"} is not supported by align's server",
                           "response_format")
    return request


def parse_completion(body: Any) -> CompletionRequest:
    body = _object(body)
    prompt = body.get("prompt")
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) and p for p in prompts):
        raise RequestError("'prompt' must be a non-empty string or list of strings", "prompt")
    request = CompletionRequest("completion", _model(body), prompts=prompts,
                                logprobs=_number(body, "logprobs", None, int, 0, MAX_TOP_LOGPROBS))
    _common(body, request, "max_tokens")
    if body.get("echo"):
        raise RequestError("'echo' is not supported by align's server", "echo")
    if body.get("suffix"):
        raise RequestError("'suffix' is not supported by align's server", "suffix")
    best_of = _number(body, "best_of", None, int, 1, MAX_N)
    if best_of is not None and best_of != request.n:
        raise RequestError("'best_of' other than n is not supported by align's server", "best_of")
    return request


def _common(body: dict[str, Any], request: CompletionRequest, max_tokens_name: str) -> None:
    """The fields both endpoints share."""
    temperature = _number(body, "temperature", 1.0, float, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, float, 0.0, 1.0)
    if top_p == 0.0:
        raise RequestError("'top_p' must be greater than 0", "top_p")
    top_k = _number(body, "top_k", 0, int, -1, None)  # not OpenAI's; vLLM and SGLang take it, -1 = off
    request.sampling = SamplingParams(temperature=temperature, top_p=top_p, top_k=max(top_k, 0))
    request.n = _number(body, "n", 1, int, 1, MAX_N)
    request.max_tokens = _number(body, max_tokens_name, None, int, 1, None)
    request.seed = _number(body, "seed", None, int)
    request.stop = _stop_list(body)
    request.stream = _boolean(body, "stream", False)
    options = body.get("stream_options")
    if options is not None:
        if not isinstance(options, dict):
            raise RequestError("'stream_options' must be an object", "stream_options")
        if not request.stream:
            raise RequestError("'stream_options' is only allowed with 'stream': true", "stream_options")
        request.include_usage = _boolean(options, "include_usage", False, "stream_options.include_usage")
    for name, neutral in NEUTRAL_PENALTIES.items():
        if _number(body, name, neutral, float) != neutral:
            raise RequestError(f"'{name}' is not supported by align's server (send {neutral} or leave it out)", name)
    if body.get("logit_bias"):
        raise RequestError("'logit_bias' is not supported by align's server", "logit_bias")


def _object(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    return body


def _model(body: dict[str, Any]) -> str | None:
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise RequestError(f"'model' must be a string, got {model!r}", "model")
    return model


def _number(body: dict[str, Any], name: str, default: Any, kind: type, low: float | None = None,
            high: float | None = None, label: str | None = None) -> Any:
    value = body.get(name)
    label = label or name
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not isinstance(value, int)):
        raise RequestError(f"'{label}' must be a {'number' if kind is float else 'whole number'}, got {value!r}",
                           label)
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise RequestError(f"'{label}' must be {bounds}, got {value!r}", label)
    return kind(value)


def _boolean(body: dict[str, Any], name: str, default: bool, label: str | None = None) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise RequestError(f"'{label or name}' must be true or false, got {value!r}", label or name)
    return value


def _stop_list(body: dict[str, Any]) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise RequestError("'stop' must be a string or a list of strings", "stop")
    return [s for s in stop if s]


def _message_text(content: Any, index: int) -> str:
    """OpenAI content: a string, or a list of parts of which the text ones are kept."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) for p in content):
        if any(p.get("type") not in ("text", None) for p in content):
            raise RequestError(f"messages[{index}].content: only text parts are supported by align's server",
                               "messages")
        return "".join(str(p.get("text", "")) for p in content)
    raise RequestError(f"messages[{index}].content must be a string or a list of text parts", "messages")
