"""`align serve`: an OpenAI-compatible server for any model align makes (vLLM's on a GPU, else align's)."""

from __future__ import annotations

from typing import Any

import typer


def serve(
    model: str = typer.Argument(None, help="bundled:NAME, a model folder, a training run dir or a hub id "
                                           "(default: bundled:smollm2-135m-instruct)."),
    host: str = typer.Option(None, "--host", help="Address to listen on (default: 127.0.0.1)."),
    port: int = typer.Option(None, "--port", help="Port [8000]; 0 picks a free one (printed on start)."),
    served_model_name: str = typer.Option(None, "--served-model-name",
                                          help="The name /v1/models lists (default: the model as given)."),
    engine: str = typer.Option(None, "--engine", help="auto (default: llama.cpp's llama-server for a GGUF file "
                                                      "when installed; vLLM when installed and a GPU is visible; "
                                                      "else align's own server), llama.cpp, vllm or align."),
    api_key_env: str = typer.Option(None, "--api-key-env",
                                    help="Require 'Authorization: Bearer <key>', the key read from this variable."),
    max_batch: int = typer.Option(None, "--max-batch", help="Rows decoding together (llama.cpp: parallel slots) [32]."),
    max_tokens: int = typer.Option(None, "--max-tokens", help="max_tokens of a request "
                                                              "that sends none [256]."),
    device: str = typer.Option(None, "--device", help="align's server: cpu, cuda, cuda:1 ... (default: cuda if any)."),
    num_threads: int = typer.Option(None, "--num-threads", help="align's server: torch CPU threads."),
    shutdown_timeout: float = typer.Option(None, "--shutdown-timeout",
                                           help="align's server: seconds requests in flight get to finish "
                                                "on SIGTERM before they are answered 503 [30]."),
    vllm_arg: list[str] = typer.Option(None, "--vllm-arg", help="vLLM: one more argument for its server, "
                                                                "repeatable (--vllm-arg=--max-model-len=4096)."),
    llamacpp_arg: list[str] = typer.Option(None, "--llamacpp-arg", help="llama.cpp: one more argument for "
                                                                        "llama-server, repeatable."),
) -> None:
    """Serve a model over OpenAI's API (/v1/models, /v1/chat/completions, /v1/completions) until Ctrl-C/SIGTERM."""
    from align.config import load_config
    from align.generate.serving import ServeConfig
    from align.generate.serving import serve as run

    options: dict[str, Any] = {
        "model": model, "host": host, "port": port, "served_model_name": served_model_name, "engine": engine,
        "api_key_env": api_key_env, "max_batch": max_batch, "max_tokens": max_tokens, "device": device,
        "num_threads": num_threads, "shutdown_timeout": shutdown_timeout, "vllm_args": vllm_arg or None,
        "llamacpp_args": llamacpp_arg or None,
    }
    run(load_config(ServeConfig, updates=options))
