"""``align serve``: an OpenAI-compatible server (``/v1/models``, ``/v1/chat/completions``,
``/v1/completions``) for any model align makes: a hub id, a folder, a training run dir with its LoRA
adapter, or ``bundled:NAME``, resolved through :mod:`align.models` as every stage resolves it.

A GGUF file (``align export --quantize``) goes to llama.cpp's ``llama-server`` when it is installed
(:mod:`.llamacpp`); with vLLM installed and a GPU visible, vLLM's own server is started (:mod:`.vllm`).
Otherwise align's own server runs, in four parts with one job each:

- :mod:`.requests`: OpenAI request bodies -> typed requests, or a 400 naming the bad field;
- :mod:`.scheduler`: continuous batching (requests join and leave one running batch between steps),
  decoding with :class:`align.generate.decode.DecodeBatch`, as ``align generate`` does;
- :mod:`.service` and :mod:`.responses`: requests -> scheduler jobs -> OpenAI responses and stream chunks;
- :mod:`.http`: routes, JSON and server-sent events, the API key, SIGTERM.

From Python::

    from align.generate.serving import ServeConfig, serve
    serve(ServeConfig(model="runs/dpo", port=8000))     # blocks until SIGTERM / Ctrl-C
"""

from __future__ import annotations

import logging
import os

from align.errors import AlignError
from align.generate.serving.config import ServeConfig

log = logging.getLogger("align.server")


def choose_engine(config: ServeConfig, source: object) -> tuple[str, str]:
    """("llama.cpp" | "vllm" | "align", why), for ``config.engine`` and the resolved model ``source``."""
    from align.generate.serving import llamacpp, vllm

    if config.engine == "align":
        return "align", "asked for"
    if config.engine == "llama.cpp" or getattr(source, "kind", None) == "gguf":
        reason = llamacpp.unavailable_reason(source)  # type: ignore[arg-type]
        if config.engine == "llama.cpp":
            if reason:
                raise AlignError(f"--engine llama.cpp: {reason}; or use --engine align (align's own server)")
            return "llama.cpp", "asked for"
        if config.engine == "auto":
            return ("align", f"{reason}: align's server runs the GGUF weights dequantised, at float speed and "
                             "memory") if reason else ("llama.cpp", "a GGUF file, and llama-server is installed")
    reason = vllm.unavailable_reason() or vllm.unsupported_reason(source)  # type: ignore[arg-type]
    if config.engine == "vllm":
        if reason:
            raise AlignError(f"--engine vllm: {reason}; or use --engine align (align's own server)")
        return "vllm", "asked for"
    return ("align", reason) if reason else ("vllm", "vLLM is installed and a GPU is visible")


def build_server(config: ServeConfig, source: object = None):  # -> align.generate.serving.http.Server
    """align's own server, model loaded (``source``: ``config.model`` already resolved) and decoding thread
    started; ``.run()`` serves until a signal, ``.start()`` / ``.stop()`` in the background."""
    from align.generate.backends.transformers import TransformersEngine
    from align.generate.serving.http import Server
    from align.generate.serving.scheduler import Scheduler
    from align.generate.serving.service import Service

    api_key = None
    if config.api_key_env:
        api_key = os.environ.get(config.api_key_env)
        if not api_key:
            raise AlignError(f"--api-key-env {config.api_key_env}: that environment variable is empty or unset")
    engine = TransformersEngine(source or config.model, device=config.device, num_threads=config.num_threads)
    cap = min(config.max_tokens_cap, engine.max_length or config.max_tokens_cap)
    scheduler = Scheduler(engine, max_batch=config.max_batch, max_tokens_cap=cap).start()
    service = Service(engine, scheduler, config.name, default_max_tokens=config.max_tokens)
    try:
        return Server(service, config.host, config.port, api_key=api_key, shutdown_timeout=config.shutdown_timeout)
    except OSError as exc:
        scheduler.close(0)
        raise AlignError(f"cannot listen on {config.host}:{config.port}: {exc}") from None


def serve(config: ServeConfig) -> None:
    """Serve ``config.model`` until SIGTERM or SIGINT (with vLLM: this process becomes vLLM's server)."""
    from align.models import resolve_model

    source = resolve_model(config.model)
    engine, why = choose_engine(config, source)
    if engine == "vllm":
        from align.generate.serving.vllm import exec_vllm

        exec_vllm(config, source)
    if engine == "llama.cpp":
        from align.generate.serving.llamacpp import exec_llamacpp

        exec_llamacpp(config, source)
    if config.engine == "auto":
        log.info("align's own server (%s)", why)
    build_server(config, source).run()


__all__ = ["ServeConfig", "build_server", "choose_engine", "serve"]
