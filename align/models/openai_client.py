"""One client for OpenAI-compatible chat completions (vLLM, SGLang, Ollama, hosted APIs, align's own server),
used by the HTTP teacher backend and the HTTP judge alike.

The rules, the same for every caller:

- URL: ``base_url`` with or without ``/v1``. A URL with no path (``http://host:8000``) gets ``/v1``; one with
  a path (``http://host:8000/v1``, ``https://host/openai/v1``, ``https://host/v1beta/openai``) is used as
  given, as OpenAI's own client does. ``/chat/completions`` follows.
- Key: read from the environment variable named by ``api_key_env`` and sent only as a bearer token; it is
  never logged, stored or put in an error message. A missing key is not an error, because a local server
  needs none; when a server refuses (401/403), the error names the variable to set.
- Retries: timeouts, dropped connections, 408, 409, 429 and any 5xx are tried again, ``attempts`` tries in
  all, waiting ``backoff_s`` x 1, 2, 4... (at most ``max_backoff_s``), or the server's ``Retry-After``. Any
  other answer fails at once: sending the same request again would get the same answer.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any
from urllib.parse import urlsplit

from align.errors import AlignError

log = logging.getLogger(__name__)

RETRY_STATUS = frozenset({408, 409, 429})  # and every 5xx
ATTEMPTS = 4
LONGEST_RETRY_AFTER_S = 60.0  # a server asking for longer is not waited on past this, per try


class EndpointError(AlignError):
    """A chat-completions endpoint failed; ``status`` is its HTTP status, None when it was never reached."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


def chat_completions_url(base_url: str) -> str:
    """``base_url`` (with or without ``/v1``) -> the chat completions URL. See the module docstring."""
    base = base_url.strip().rstrip("/")
    if not urlsplit(base).path:
        base += "/v1"
    return base + "/chat/completions"


def should_retry(status: int) -> bool:
    return status in RETRY_STATUS or status >= 500


class OpenAIClient:
    """POSTs chat completion requests to one endpoint; thread-safe (the judge and the teacher send concurrently)."""

    def __init__(self, base_url: str, *, api_key_env: str | None = None, timeout: float = 120.0,
                 attempts: int = ATTEMPTS, backoff_s: float = 1.0, max_backoff_s: float = 10.0):
        import httpx

        self.url = chat_completions_url(base_url)
        self.api_key_env = api_key_env
        self.attempts = max(1, attempts)
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        headers = {"Content-Type": "application/json"}
        self.has_key = bool(api_key_env and os.environ.get(api_key_env))
        if self.has_key:
            headers["Authorization"] = f"Bearer {os.environ[api_key_env]}"  # type: ignore[index]
        self._client = httpx.Client(headers=headers, timeout=timeout)

    def chat(self, payload: dict[str, Any], *, what: str = "a request") -> dict[str, Any]:
        """The JSON body of a 200 answer to ``payload``, after retries; ``what`` names the request in errors."""
        import httpx

        for attempt in range(1, self.attempts + 1):
            try:
                response = self._client.post(self.url, json=payload)
            except httpx.TransportError as exc:
                if attempt == self.attempts:
                    raise EndpointError(f"cannot reach {self.url} for {what} after {attempt} tries: "
                                        f"{type(exc).__name__}: {exc}") from None
                self._wait(attempt, None, type(exc).__name__)
                continue
            if response.status_code == 200:
                try:
                    return response.json()
                except ValueError:
                    raise EndpointError(f"{self.url} answered 200 for {what} with no JSON body: "
                                        f"{response.text[:200]!r}", 200) from None
            if not should_retry(response.status_code) or attempt == self.attempts:
                raise EndpointError(self._refusal(response, what, attempt), response.status_code)
            self._wait(attempt, response.headers.get("retry-after"), str(response.status_code))
        raise AssertionError("unreachable")

    def served_models(self) -> list[str]:
        """The ids ``GET /v1/models`` lists (the names a request's ``model`` may take)."""
        import httpx

        url = self.url.removesuffix("/chat/completions") + "/models"
        try:
            response = self._client.get(url)
        except httpx.TransportError as exc:
            raise EndpointError(f"cannot reach {url}: {type(exc).__name__}: {exc}") from None
        if response.status_code != 200:
            raise EndpointError(self._refusal(response, "the list of models", 1), response.status_code)
        return [str(entry.get("id")) for entry in (response.json().get("data") or []) if entry.get("id")]

    def _wait(self, attempt: int, retry_after: str | None, why: str) -> None:
        delay = min(self.backoff_s * 2 ** (attempt - 1), self.max_backoff_s)
        try:
            if retry_after is not None:
                delay = min(max(float(retry_after), 0.0), LONGEST_RETRY_AFTER_S)
        except ValueError:
            pass  # an HTTP date: keep our own backoff
        log.warning("%s answered %s; trying again in %.1f s (try %d of %d)", self.url, why, delay, attempt + 1,
                    self.attempts)
        time.sleep(delay)

    def _refusal(self, response: Any, what: str, attempt: int) -> str:
        tries = f" after {attempt} tries" if attempt > 1 else ""
        message = f"{self.url} answered {response.status_code} for {what}{tries}: {_error_message(response)}"
        if response.status_code in (401, 403):
            if not self.api_key_env:
                message += " (the server wants an API key: name the environment variable that holds it)"
            elif not self.has_key:
                message += f" (no API key was sent: set the environment variable {self.api_key_env})"
            else:
                message += f" (check the API key in the environment variable {self.api_key_env})"
        return message

    def close(self) -> None:
        self._client.close()


def _error_message(response: Any) -> str:
    """The server's own explanation: OpenAI-style ``{"error": {"message": ...}}``, else the start of the body."""
    try:
        error = response.json().get("error")
        message = error.get("message") if isinstance(error, dict) else error
    except (ValueError, AttributeError):
        message = None
    return str(message or response.text[:500])
