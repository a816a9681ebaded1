"""``python -m align.generate.server --model M``: align's own OpenAI-compatible server, as before ``align serve``.

It is now ``align serve M --engine align`` (see :mod:`align.generate.serving`): requests are batched
together (continuous batching), streamed on request, and SIGTERM shuts it down cleanly. This module keeps
the old command line working, and :func:`start_server_process`, with which tests and scripts start a
server in a child process and get its URL once it answers.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path


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
    if args.api_key_env and not os.environ.get(args.api_key_env):
        parser.error(f"--api-key-env {args.api_key_env}: that environment variable is empty or unset")
    from align.generate.serving import ServeConfig, serve
    from align.models import DEFAULT_MODEL

    logging.basicConfig(level=logging.INFO, format="align server: %(message)s", stream=sys.stderr)
    serve(ServeConfig(model=args.model or DEFAULT_MODEL, host=args.host, port=args.port,
                      served_model_name=args.served_model_name, device=args.device, num_threads=args.num_threads,
                      api_key_env=args.api_key_env, engine="align"))


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
                         api_key_env: str | None = None, args: list[str] | None = None) -> ServerProcess:
    """Start ``python -m align serve MODEL --engine align`` and return once it answers ``GET /v1/models``.

    ``port=None`` lets the server pick a free port; ``args`` are more ``align serve`` options. ``base_url`` ends in ``/v1``,
    as OpenAI clients expect. With ``api_key_env`` the server requires the key held
    in that environment variable (of this process, or of ``env``). Raises ``RuntimeError`` with the server's log if it
    dies or does not answer within ``timeout`` seconds.
    """
    import httpx

    log_file = tempfile.NamedTemporaryFile(prefix="align-server-", suffix=".log", delete=False)
    command = [sys.executable, "-m", "align", "serve", model, "--engine", "align", "--host", host,
               "--port", str(port or 0)] + (["--api-key-env", api_key_env] if api_key_env else []) + list(args or [])
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
