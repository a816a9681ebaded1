"""vLLM's own OpenAI-compatible server for a model align resolves. align only builds the command line and
hands the process over to it (``exec``): batching, streaming, shutdown are then vLLM's.

Used when vLLM is installed and a GPU is visible (``engine: auto``) or when asked for (``engine: vllm``).
A LoRA run dir is served as its base model plus the adapter (``--enable-lora --lora-modules NAME=DIR``):
clients get the adapter by sending the served name as ``model``. An adapter trained on another adapter
cannot be stacked by vLLM: merge it first (``align export``), or serve it with align's own server.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shlex
import sys
from pathlib import Path
from typing import NoReturn

from align.errors import AlignError
from align.generate.serving.config import ServeConfig
from align.models import ModelSource

# The ranks vLLM accepts for --max-lora-rank; an adapter's rank is rounded up to one of these.
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def unavailable_reason() -> str | None:
    """Why vLLM cannot serve on this machine, or None when it can."""
    if importlib.util.find_spec("vllm") is None:
        return "vLLM is not installed (pip install vllm, or align[gpu])"
    import torch

    if not torch.cuda.is_available():
        return "no GPU is visible"
    return None


def unsupported_reason(source: ModelSource) -> str | None:
    """Why vLLM cannot serve these weights as they are, or None."""
    if source.kind == "gguf":
        return (f"{source.spec} is a GGUF file: serve it with llama.cpp (--engine llama.cpp) or align's server, or "
                "serve the float model it came from with vLLM")
    if source.base_adapters:
        return (f"{source.spec} is a LoRA adapter trained on another adapter ({', '.join(source.base_adapters)}); "
                "vLLM serves one adapter on a plain base: merge it first with align export")
    return None


def vllm_command(config: ServeConfig, source: ModelSource, python: str = sys.executable
                 ) -> tuple[list[str], dict[str, str]]:
    """The argv that starts vLLM's server for ``source``, and the environment variables to add to ours."""
    port = config.external_port()
    argv = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", source.path,
            "--host", config.host, "--port", str(port)]
    if source.adapter:
        adapter = Path(source.adapter)
        rank = int(json.loads((adapter / "adapter_config.json").read_text()).get("r") or 16)
        argv += ["--enable-lora", "--lora-modules", f"{config.name}={adapter}",
                 "--max-lora-rank", str(next((r for r in LORA_RANKS if r >= rank), rank))]
        if (adapter / "tokenizer_config.json").exists():
            argv += ["--tokenizer", str(adapter)]  # as align.models.load_tokenizer: the adapter's own tokenizer
    else:
        argv += ["--served-model-name", config.name]
    env: dict[str, str] = {}
    if config.api_key_env:
        key = os.environ.get(config.api_key_env)
        if not key:
            raise AlignError(f"--api-key-env {config.api_key_env}: that environment variable is empty or unset")
        env["VLLM_API_KEY"] = key  # vLLM reads it from there; on the command line `ps` would show it
    return argv + list(config.vllm_args), env


def exec_vllm(config: ServeConfig, source: ModelSource) -> NoReturn:
    argv, env = vllm_command(config, source)
    print(f"align server: handing over to vLLM: {shlex.join(argv)}", flush=True)
    os.execve(argv[0], argv, {**os.environ, **env})

