"""A small OpenAI-compatible HTTP server over the transformers backend.

    python -m align.generate.server --model bundled:smollm2-135m-instruct --host 127.0.0.1 --port 8000

Serves ``GET /v1/models``, ``POST /v1/chat/completions`` and ``POST /v1/completions``
with ``n``, ``temperature``, ``top_p``, ``top_k``, ``max_tokens``, ``seed``, ``stop``
and log-probs (``logprobs``/``top_logprobs``; each entry also carries its
``token_id``). It exists so the HTTP teacher and judge clients can be tested
against a real server on any machine; on a GPU, vLLM or SGLang serve the same API
faster. Requests are answered one at a time (the model is the bottleneck).

Tests start it with :func:`start_server_process`, which returns once it answers.
"""

from __future__ import annotations

import argparse
import hmac
import json
import logging
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

log = logging.getLogger("align.server")

DEFAULT_MAX_TOKENS = 256


class RequestError(Exception):
    """A bad request: answered with status 400 and OpenAI's error shape."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


def _number(body: dict[str, Any], name: str, default: Any, kind: type, low: float | None = None,
            high: float | None = None) -> Any:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not isinstance(value, int)):
        raise RequestError(f"'{name}' must be a {kind.__name__}, got {value!r}", name)
    if (low is not None and value < low) or (high is not None and value > high):
        raise RequestError(f"'{name}' must be between {low} and {high}, got {value!r}", name)
    return kind(value)


def _stop_list(body: dict[str, Any]) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise RequestError("'stop' must be a string or a list of strings", "stop")
    return stop


def _message_text(content: Any) -> str:
    """OpenAI content: a string, or a list of parts of which the text ones are kept."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    raise RequestError("message content must be a string or a list of text parts", "messages")


class CompletionService:
    """Turns OpenAI request bodies into engine calls and engine results into OpenAI responses."""

    def __init__(self, engine: Any, served_name: str):
        self.engine = engine
        self.served_name = served_name
        self.lock = threading.Lock()  # one generation at a time: the model is not re-entrant

    def models(self) -> dict[str, Any]:
        return {"object": "list", "data": [{"id": self.served_name, "object": "model", "created": int(time.time()),
                                            "owned_by": "align"}]}

    def _sampling(self, body: dict[str, Any], prompt_len: int) -> tuple[Any, int, int, int | None]:
        from align.generate.config import SamplingParams

        temperature = _number(body, "temperature", 1.0, float, 0.0, 2.0)
        top_p = _number(body, "top_p", 1.0, float, 0.0, 1.0)
        top_k = _number(body, "top_k", 0, int, -1, None)
        if top_p == 0.0:
            raise RequestError("'top_p' must be greater than 0", "top_p")
        n = _number(body, "n", 1, int, 1, 128)
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
        max_tokens = _number({"max_tokens": max_tokens}, "max_tokens", DEFAULT_MAX_TOKENS, int, 1, None)
        context = self.engine.max_length
        if context:
            if prompt_len >= context:
                raise RequestError(f"the prompt has {prompt_len} tokens; the model's context is {context}", "messages")
            max_tokens = min(max_tokens, context - prompt_len)
        seed = _number(body, "seed", None, int)
        sampling = SamplingParams(temperature=temperature, top_p=top_p, top_k=max(top_k, 0))
        return sampling, n, max_tokens, seed

    def _rows(self, prompt_index: int, sampling: Any, n: int, seed: int | None) -> list[Any]:
        from align.generate.decode import RowRequest
        from align.generate.plan import derive_seed

        base = seed if seed is not None else random.getrandbits(62)
        return [RowRequest(prompt_index, sampling, derive_seed(base, i)) for i in range(n)]

    def chat(self, body: dict[str, Any]) -> dict[str, Any]:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise RequestError("'messages' must be a non-empty list", "messages")
        try:
            plain = [{"role": str(m["role"]), "content": _message_text(m.get("content", ""))} for m in messages]
        except (KeyError, TypeError):
            raise RequestError("each message needs a 'role' and 'content'", "messages") from None
        prompt_ids = self.engine.encode(plain)
        sampling, n, max_tokens, seed = self._sampling(body, len(prompt_ids))
        want_logprobs = bool(body.get("logprobs"))
        top = _number(body, "top_logprobs", 0, int, 0, 20) if want_logprobs else None
        with self.lock:
            completions = self.engine.generate([prompt_ids], self._rows(0, sampling, n, seed),
                                               max_new_tokens=max_tokens, logprobs=top, stop=_stop_list(body))
        choices = []
        for i, c in enumerate(completions):
            choice: dict[str, Any] = {"index": i, "message": {"role": "assistant", "content": c.text},
                                      "finish_reason": c.finish_reason, "logprobs": None}
            if want_logprobs:
                choice["logprobs"] = {"content": [self._chat_logprob(e) for e in self._text_entries(c)]}
            choices.append(choice)
        return self._response("chat.completion", "chatcmpl", choices, len(prompt_ids), completions)

    def completions(self, body: dict[str, Any]) -> dict[str, Any]:
        prompt = body.get("prompt")
        prompts = [prompt] if isinstance(prompt, str) else prompt
        if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) and p for p in prompts):
            raise RequestError("'prompt' must be a non-empty string or list of strings", "prompt")
        encoded = [self.engine.encode_text(p) for p in prompts]
        sampling, n, max_tokens, seed = self._sampling(body, max(len(e) for e in encoded))
        top = _number(body, "logprobs", None, int, 0, 20)
        rows = [r for p in range(len(prompts)) for r in self._rows(p, sampling, n, None if seed is None else seed + p)]
        with self.lock:
            completions = self.engine.generate(encoded, rows, max_new_tokens=max_tokens, logprobs=top,
                                               stop=_stop_list(body))
        choices = []
        for i, c in enumerate(completions):
            choice: dict[str, Any] = {"index": i, "text": c.text, "finish_reason": c.finish_reason, "logprobs": None}
            if top is not None:
                choice["logprobs"] = self._legacy_logprobs(self._text_entries(c))
            choices.append(choice)
        return self._response("text_completion", "cmpl", choices, sum(len(e) for e in encoded), completions)

    def _text_entries(self, completion: Any) -> list[dict[str, Any]]:
        entries = completion.logprobs or []
        if completion.finish_reason == "stop" and entries and entries[-1]["token_id"] in self.engine.eos_token_ids:
            entries = entries[:-1]  # the end-of-turn token is not part of the text
        return entries

    def _token(self, token_id: int) -> str:
        return self.engine.tokenizer.decode([token_id])

    def _chat_logprob(self, entry: dict[str, Any]) -> dict[str, Any]:
        def item(token_id: int, logprob: float) -> dict[str, Any]:
            token = self._token(token_id)
            return {"token": token, "token_id": token_id, "logprob": logprob, "bytes": list(token.encode("utf-8"))}

        out = item(entry["token_id"], entry["logprob"])
        out["top_logprobs"] = [item(t["token_id"], t["logprob"]) for t in entry.get("top_logprobs", [])]
        return out

    def _legacy_logprobs(self, entries: list[dict[str, Any]]) -> dict[str, Any]:
        tokens = [self._token(e["token_id"]) for e in entries]
        offsets, position = [], 0
        for token in tokens:
            offsets.append(position)
            position += len(token)
        return {"tokens": tokens, "token_ids": [e["token_id"] for e in entries],
                "token_logprobs": [e["logprob"] for e in entries],
                "top_logprobs": [{self._token(t["token_id"]): t["logprob"] for t in e.get("top_logprobs", [])}
                                 for e in entries],
                "text_offset": offsets}

    def _response(self, obj: str, prefix: str, choices: list[dict[str, Any]], prompt_tokens: int,
                  completions: list[Any]) -> dict[str, Any]:
        completion_tokens = sum(c.num_tokens or 0 for c in completions)
        return {"id": f"{prefix}-{uuid.uuid4().hex}", "object": obj, "created": int(time.time()),
                "model": self.served_name, "choices": choices,
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                          "total_tokens": prompt_tokens + completion_tokens}}


def make_handler(service: CompletionService, api_key: str | None = None) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _authorised(self) -> bool:
            if api_key is None or hmac.compare_digest(self.headers.get("Authorization", ""), f"Bearer {api_key}"):
                return True
            self._error(401, "missing or wrong API key (send 'Authorization: Bearer <key>')")
            return False

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
            log.debug("%s " + format, self.address_string(), *args)

        def _send(self, status: int, payload: dict[str, Any]) -> None:
            data = json.dumps(payload, ensure_ascii=False).encode("utf-8")
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _error(self, status: int, message: str, param: str | None = None) -> None:
            kind = "invalid_request_error" if status < 500 else "server_error"
            self._send(status, {"error": {"message": message, "type": kind, "param": param, "code": None}})

        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            if not self._authorised():
                return
            path = self.path.split("?", 1)[0].rstrip("/")
            if path in ("/v1/models", "/models"):
                self._send(200, service.models())
            elif path in ("/health", "/v1/health"):
                self._send(200, {"status": "ok"})
            else:
                self._error(404, f"no route GET {path}")

        def do_POST(self) -> None:  # noqa: N802
            if not self._authorised():
                return
            path = self.path.split("?", 1)[0].rstrip("/")
            routes = {"/v1/chat/completions": service.chat, "/v1/completions": service.completions}
            if path not in routes:
                self._error(404, f"no route POST {path}")
                return
            try:
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"null")
                if not isinstance(body, dict):
                    raise RequestError("the request body must be a JSON object")
                self._send(200, routes[path](body))
            except json.JSONDecodeError as exc:
                self._error(400, f"the request body is not valid JSON ({exc.msg})")
            except RequestError as exc:
                self._error(400, str(exc), exc.param)
            except Exception as exc:  # the server must answer, not hang up, whatever went wrong
                log.exception("request failed")
                self._error(HTTPStatus.INTERNAL_SERVER_ERROR, f"{type(exc).__name__}: {exc}")

    return Handler


def serve(model: str, host: str = "127.0.0.1", port: int = 8000, *, served_name: str | None = None,
          device: str | None = None, num_threads: int | None = None, api_key: str | None = None) -> None:
    from align.generate.backends.transformers import TransformersEngine

    engine = TransformersEngine(model, device=device, num_threads=num_threads)
    handler = make_handler(CompletionService(engine, served_name or model), api_key)
    server = ThreadingHTTPServer((host, port), handler)
    bound_host, bound_port = server.server_address[:2]
    # start_server_process reads this line to learn the port (--port 0 picks a free one).
    print(f"align server: serving {served_name or model} at http://{bound_host}:{bound_port}/v1", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m align.generate.server", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="bundled:NAME, a model folder or a hub id (default: bundled)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000, help="0 picks a free port (printed on start)")
    parser.add_argument("--served-model-name", default=None, help="the name clients send as 'model'")
    parser.add_argument("--device", default=None)
    parser.add_argument("--num-threads", type=int, default=None)
    parser.add_argument("--api-key-env", default=None,
                        help="require 'Authorization: Bearer <key>' with the key from this environment variable")
    args = parser.parse_args(argv)
    api_key = None
    if args.api_key_env:
        api_key = os.environ.get(args.api_key_env)
        if not api_key:
            parser.error(f"--api-key-env {args.api_key_env}: that environment variable is empty or unset")
    from align.models import DEFAULT_MODEL

    logging.basicConfig(level=logging.INFO, format="align server: %(message)s", stream=sys.stderr)
    serve(args.model or DEFAULT_MODEL, args.host, args.port, served_name=args.served_model_name,
          device=args.device, num_threads=args.num_threads, api_key=api_key)


# ----------------------------------------------------------------------------- for tests and scripts


@dataclass
class ServerProcess:
    """A server running in a child process; ``stop()`` ends it (by its PID)."""

    base_url: str
    process: subprocess.Popen
    log_path: Path

    def stop(self, timeout: float = 10.0) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process.stdout:
            self.process.stdout.close()

    def __enter__(self) -> "ServerProcess":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_server_process(model: str, port: int | None = None, *, host: str = "127.0.0.1",
                         timeout: float = 300.0, env: dict[str, str] | None = None,
                         api_key_env: str | None = None) -> ServerProcess:
    """Start ``python -m align.generate.server`` and return once it answers ``GET /v1/models``.

    ``port=None`` lets the server pick a free port. ``base_url`` ends in ``/v1``,
    as OpenAI clients expect. With ``api_key_env`` the server requires the key held
    in that environment variable (of this process, or of ``env``). Raises ``RuntimeError`` with the server's log if it
    dies or does not answer within ``timeout`` seconds.
    """
    import httpx

    log_file = tempfile.NamedTemporaryFile(prefix="align-server-", suffix=".log", delete=False)
    command = [sys.executable, "-m", "align.generate.server", "--model", model, "--host", host,
               "--port", str(port or 0)] + (["--api-key-env", api_key_env] if api_key_env else [])
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log_file, text=True,
                               env={**os.environ, **(env or {})})
    log_file.close()
    log_path = Path(log_file.name)
    url: list[str] = []
    ready = threading.Event()

    def read_stdout() -> None:  # also keeps draining so the server never blocks on a full pipe
        assert process.stdout is not None
        for line in process.stdout:
            if not url and " at http://" in line:
                url.append(line.strip().rsplit(" at ", 1)[1])
                ready.set()
        ready.set()

    threading.Thread(target=read_stdout, daemon=True).start()
    server = ServerProcess("", process, log_path)
    deadline = time.monotonic() + timeout
    try:
        if not ready.wait(timeout) or not url:
            raise RuntimeError("the server did not start")
        server.base_url = url[0]
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"the server exited with code {process.returncode}")
            try:
                if httpx.get(server.base_url + "/models", timeout=5).status_code in (200, 401):
                    return server
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"the server did not answer within {timeout:.0f} s")
    except BaseException as exc:
        server.stop()
        tail = log_path.read_text(errors="replace")[-3000:] if log_path.exists() else ""
        if isinstance(exc, RuntimeError):
            raise RuntimeError(f"{exc}: {' '.join(command)}\n--- server log ({log_path}) ---\n{tail}") from None
        raise


if __name__ == "__main__":
    main()
