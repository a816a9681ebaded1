"""The HTTP layer of align's own server: routes, JSON and server-sent events, API key, clean shutdown.

Standard library only (``http.server``, a thread per connection); the threads only parse, tokenize and
write, while one decoding thread (:mod:`align.generate.serving.scheduler`) runs the model for all.
Streams are SSE over chunked transfer encoding (``data: {chunk}`` ... ``data: [DONE]``), so a connection
stays usable after a stream. A client that hangs up is noticed when a write fails or, while its answer
is still being made, by peeking at its socket; its rows then leave the batch.

SIGTERM (or SIGINT): stop accepting connections, let requests in flight finish for up to
``shutdown_timeout`` seconds (new requests on open connections get 503), answer the rest 503, exit 0.
"""

from __future__ import annotations

import hmac
import json
import logging
import select
import signal
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from align.generate.serving.requests import RequestError, parse_chat, parse_completion
from align.generate.serving.responses import error_body
from align.generate.serving.service import ClientGone, Running, Service

log = logging.getLogger("align.server")

ROUTES = {"/v1/chat/completions": parse_chat, "/v1/completions": parse_completion}
ROUTE_ALIASES = {"/chat/completions": "/v1/chat/completions", "/completions": "/v1/completions"}
WRITE_ERRORS = (BrokenPipeError, ConnectionResetError, ConnectionAbortedError, TimeoutError)


class _Requests:
    """Counts requests being answered, so a shutdown can wait until their last bytes are written."""

    def __init__(self) -> None:
        self._count = 0
        self._cond = threading.Condition()

    def __enter__(self) -> None:
        with self._cond:
            self._count += 1

    def __exit__(self, *exc: object) -> None:
        with self._cond:
            self._count -= 1
            self._cond.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self._count == 0, timeout)


def make_handler(service: Service, api_key: str | None = None,
                 requests: _Requests | None = None) -> type[BaseHTTPRequestHandler]:
    active = requests or _Requests()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
            log.debug("%s " + format, self.address_string(), *args)

        # -------------------------------------------------------------- plumbing

        def _path(self) -> str:
            path = self.path.split("?", 1)[0].rstrip("/")
            return ROUTE_ALIASES.get(path, path)

        def _authorised(self) -> bool:
            if api_key is None or hmac.compare_digest(self.headers.get("Authorization", ""), f"Bearer {api_key}"):
                return True
            self._error(401, "missing or wrong API key (send 'Authorization: Bearer <key>')")
            return False

        def _send(self, status: int, payload: dict[str, Any]) -> None:
            data = json.dumps(payload, ensure_ascii=False).encode("utf-8")
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _error(self, status: int, message: str, param: str | None = None) -> None:
            self._send(status, error_body(message, status, param))

        def _gone(self) -> bool:
            """Whether the client has closed its end (readable with nothing to read)."""
            try:
                readable, _, _ = select.select([self.connection], [], [], 0)
                return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
            except (OSError, ValueError):
                return True

        # -------------------------------------------------------------- routes

        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            if not self._authorised():
                return
            path = self._path()
            if path in ("/v1/models", "/models"):
                self._send(200, service.models())
            elif path in ("/health", "/v1/health"):
                self._send(200, {"status": "ok", "in_flight": service.scheduler.in_flight})
            else:
                self._error(404, f"no route GET {path}")

        def do_POST(self) -> None:  # noqa: N802
            with active:
                self._post()

        def _post(self) -> None:
            try:
                length = int(self.headers.get("Content-Length") or 0)
            except ValueError:
                self.close_connection = True  # where this body ends is unknown: the connection cannot go on
                self._error(400, f"bad Content-Length header: {self.headers.get('Content-Length')!r}")
                return
            raw = self.rfile.read(length) if length > 0 else b""  # read before answering, even a refusal
            if not self._authorised():
                return
            path = self._path()
            if path not in ROUTES:
                self._error(404, f"no route POST {path}")
                return
            try:
                try:
                    body = json.loads(raw or b"null")
                except json.JSONDecodeError as exc:
                    raise RequestError(f"the request body is not valid JSON ({exc.msg})") from None
                request = ROUTES[path](body)
                running = service.start(request)
                if request.stream:
                    self._stream(running)
                else:
                    self._send(200, running.response(self._gone))
            except RequestError as exc:
                self._error(exc.status, str(exc), exc.param)
            except ClientGone:
                self.close_connection = True
                log.info("a client left before its answer was ready; its request was cancelled")
            except WRITE_ERRORS:
                self.close_connection = True
            except Exception as exc:  # the server must answer, not hang up, whatever went wrong
                log.exception("request failed")
                self._error(500, f"{type(exc).__name__}: {exc}")

        def _stream(self, running: Running) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            try:
                try:
                    for chunk in running.chunks(self._gone):
                        self._event(json.dumps(chunk, ensure_ascii=False))
                except RequestError as exc:  # after the headers: the error goes in the stream, as vLLM does
                    self._event(json.dumps(error_body(str(exc), exc.status, exc.param)))
                self._event("[DONE]")
                self.wfile.write(b"0\r\n\r\n")
                self.wfile.flush()
            except (ClientGone, *WRITE_ERRORS):
                running.cancel()
                self.close_connection = True
                log.info("a client left mid-stream; its request was cancelled")

        def _event(self, data: str) -> None:
            payload = f"data: {data}\n\n".encode("utf-8")
            self.wfile.write(f"{len(payload):x}\r\n".encode("ascii") + payload + b"\r\n")
            self.wfile.flush()

    return Handler


class Server:
    """align's own OpenAI-compatible server over a loaded engine; :meth:`run` serves until SIGTERM/SIGINT."""

    def __init__(self, service: Service, host: str = "127.0.0.1", port: int = 8000, *,
                 api_key: str | None = None, shutdown_timeout: float = 30.0):
        self.service = service
        self.shutdown_timeout = shutdown_timeout
        self._requests = _Requests()
        self.httpd = ThreadingHTTPServer((host, port), make_handler(service, api_key, self._requests))
        self.httpd.daemon_threads = True  # idle keep-alive connections must not hold the exit
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}/v1"

    def start(self) -> "Server":
        """Serve in a background thread (for Python callers and tests); :meth:`stop` ends it."""
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.1},
                                        name="align-serve-http", daemon=True)
        self._thread.start()
        return self

    def run(self) -> None:
        """Serve until SIGTERM or SIGINT, then shut down cleanly (call from the main thread)."""
        previous = {sig: signal.signal(sig, lambda *_: self._stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            self.start()
            # start_server_process and people read this line (--port 0 picks a free port).
            print(f"align server: serving {self.service.served_name} at {self.base_url}", flush=True)
            while not self._stop.wait(0.5):
                pass
            log.info("stopping: no new connections; waiting up to %.0f s for %d request(s) in flight",
                     self.shutdown_timeout, self.service.scheduler.in_flight)
        finally:
            self.stop()
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def stop(self) -> None:
        """Close the listening socket, finish (or after ``shutdown_timeout`` refuse) what is in flight."""
        start = time.monotonic()
        if self._thread is not None:
            self.httpd.shutdown()  # returns once serve_forever has stopped (it would wait forever if never run)
        self.httpd.server_close()
        cut = self.service.scheduler.close(self.shutdown_timeout)
        self._requests.wait_idle(max(5.0, self.shutdown_timeout - (time.monotonic() - start)))
        log.info("stopped%s", f" ({cut} request(s) cut short with 503)" if cut else "")
