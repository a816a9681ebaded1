"""llama.cpp's own OpenAI-compatible server (``llama-server``) for a GGUF model, as llama.cpp and Ollama users run
it: integer kernels on the quantised weights, continuous batching over parallel slots. align builds the command
line and hands the process over (``exec``), as it does for vLLM.

Used for a GGUF model (``align export --quantize q4_1``) when ``llama-server`` is on the PATH (or named by
``$LLAMA_SERVER``) and ``engine`` is ``auto`` or ``llama.cpp``. Without it, align's own server serves the GGUF
file's weights dequantised by transformers: the same answers, at float speed and memory. A 4-bit export of a
LoRA run keeps its adapter apart (``lora/``): llama-server applies its GGUF form to the base with ``--lora``.
"""

from __future__ import annotations

import os
import shlex
import shutil
from pathlib import Path
from typing import NoReturn

from align.errors import AlignError
from align.generate.serving.config import ServeConfig
from align.models import ModelSource

# Tokens in the KV cache, shared by all parallel slots (--kv-unified): 16 requests of a 200-token prompt and a
# 256-token answer fit in half of it. Each slot may use all of it, so one long request is not cut short.
KV_TOKENS = 8192


def server_binary() -> str | None:
    return os.environ.get("LLAMA_SERVER") or shutil.which("llama-server")


def unavailable_reason(source: ModelSource) -> str | None:
    """Why llama.cpp cannot serve ``source`` here, or None when it can."""
    if source.kind != "gguf":
        return f"{source.spec} is not a GGUF file (align export --quantize q8_0|q4_0|q4_1 writes one)"
    if server_binary() is None:
        return "llama.cpp's llama-server is not on the PATH (build llama.cpp, or set LLAMA_SERVER to the binary)"
    return None


def gguf_adapter(source: ModelSource) -> Path:
    """The GGUF form of the LoRA adapter a 4-bit export keeps beside its base."""
    found = sorted(Path(source.adapter or "").glob("*.gguf"))
    if len(found) != 1:
        raise AlignError(f"{source.adapter}: expected one GGUF adapter file for llama.cpp, found "
                         f"{len(found) or 'none'}; export the run again with align export --quantize")
    return found[0]


def llamacpp_command(config: ServeConfig, source: ModelSource, binary: str) -> tuple[list[str], dict[str, str]]:
    """The argv that starts ``llama-server`` for ``source``, and the environment variables to add to ours."""
    slots = config.max_batch
    argv = [binary, "--model", str(source.gguf_path), "--host", config.host,
            "--port", str(config.external_port()), "--alias", config.name,
            "--parallel", str(slots), "--ctx-size", str(KV_TOKENS), "--kv-unified",
            "--n-predict", str(config.max_tokens), "--no-webui"]
    if source.adapter:
        argv += ["--lora", str(gguf_adapter(source))]
    if config.num_threads:
        argv += ["--threads", str(config.num_threads)]
    env: dict[str, str] = {}
    if config.api_key_env:
        key = os.environ.get(config.api_key_env)
        if not key:
            raise AlignError(f"--api-key-env {config.api_key_env}: that environment variable is empty or unset")
        env["LLAMA_API_KEY"] = key  # read from the environment: on the command line `ps` would show it
    return argv + list(config.llamacpp_args), env


def exec_llamacpp(config: ServeConfig, source: ModelSource) -> NoReturn:
    binary = server_binary()
    if binary is None:
        raise AlignError(unavailable_reason(source) or "llama-server not found")
    argv, env = llamacpp_command(config, source, binary)
    print(f"align server: handing over to llama.cpp: {shlex.join(argv)}", flush=True)
    os.execve(argv[0], argv, {**os.environ, **env})
