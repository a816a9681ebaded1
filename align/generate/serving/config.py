"""Settings of ``align serve`` (CLI options and Python fields share these names)."""

from __future__ import annotations

import socket
from typing import Literal

from pydantic import Field

from align.config import StrictConfig
from align.models import DEFAULT_MODEL


class ServeConfig(StrictConfig):
    model: str = DEFAULT_MODEL
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535, description="0 picks a free port (printed on start)")
    # The name /v1/models lists (default: the model spec as given). align's server answers whatever
    # 'model' a request names; vLLM answers only its served names.
    served_model_name: str | None = None
    # auto: for a GGUF file, llama.cpp's llama-server when installed; else vLLM's own server when vLLM is
    # installed and a GPU is present; else align's.
    engine: Literal["auto", "vllm", "llama.cpp", "align"] = "auto"
    # The key clients must send as 'Authorization: Bearer <key>', read from this environment variable.
    api_key_env: str | None = None

    # align's server only.
    device: str | None = None
    num_threads: int | None = Field(None, ge=1)
    # Rows (requests x n) decoding together; more wait for room. Measured on 2 CPU cores with the bundled
    # model (DESIGN.md): 9 tok/s one row at a time, 54 tok/s in a batch of 8.
    max_batch: int = Field(32, ge=1)
    max_tokens: int = Field(256, ge=1, description="a request's max_tokens when it sends none")
    # The longest answer any request may ask for (each row's random numbers are drawn this long up front).
    max_tokens_cap: int = Field(4096, ge=1)
    # On SIGTERM: how long requests in flight may take to finish before they are answered 503.
    shutdown_timeout: float = Field(30.0, ge=0)

    # vLLM only: more arguments for `vllm serve`, e.g. ["--gpu-memory-utilization", "0.8"].
    vllm_args: list[str] = Field(default_factory=list)
    # llama.cpp only: more arguments for llama-server, e.g. ["--cache-type-k", "q8_0"].
    llamacpp_args: list[str] = Field(default_factory=list)

    @property
    def name(self) -> str:
        return self.served_model_name or self.model

    def external_port(self) -> int:
        """The port to give a server align hands over to (vLLM, llama-server): ``port``, or for 0 a free one
        picked here, since neither prints the port it got for 0."""
        if self.port:
            return self.port
        with socket.socket(socket.AF_INET6 if ":" in self.host else socket.AF_INET) as probe:
            probe.bind((self.host, 0))
            return probe.getsockname()[1]
