"""`align generate`: the teacher writes N candidate responses per prompt."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer


def generate(
    overrides: list[str] = typer.Argument(None, metavar="[KEY=VALUE]...",
                                          help="Any config setting, e.g. greedy_first=false logprobs=5."),
    model: str = typer.Option(None, "--model", "-m", help="Teacher: bundled:NAME, a model folder, a hub id, "
                                                          "or the served model name (openai backend)."),
    prompts: Path = typer.Option(None, "--prompts", "-p", help="Prompts JSONL: {\"id\", \"prompt\"} per line."),
    num_candidates: int = typer.Option(None, "--num-candidates", "-n", help="Candidates per prompt [8]."),
    output: Path = typer.Option(None, "--output", "-o", help="Candidates JSONL (appended; reruns resume)."),
    temperature: float = typer.Option(None, "--temperature", help="Sampling temperature; 0 = greedy [0.8]."),
    top_p: float = typer.Option(None, "--top-p", help="Nucleus sampling mass [0.95]."),
    max_new_tokens: int = typer.Option(None, "--max-new-tokens", help="Longest response in tokens [256]."),
    seed: int = typer.Option(None, "--seed", help="Run seed; each candidate's seed derives from it [0]."),
    system_prompt: str = typer.Option(None, "--system-prompt",
                                      help="Teacher-only system prompt (a 'constitution'): text, or @file."),
    backend: str = typer.Option(None, "--backend", help="transformers (default), vllm, or openai (HTTP)."),
    batch_size: int = typer.Option(None, "--batch-size", help="Sequences per forward pass (transformers) [64]."),
    logprobs: int = typer.Option(None, "--logprobs", help="Store per-token log-probs with the top K alternatives."),
    base_url: str = typer.Option(None, "--base-url", help="OpenAI-compatible endpoint, e.g. http://host:8000/v1."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Start the output again instead of resuming it."),
    config: Path = typer.Option(None, "--config", "-c", help="YAML config; options and KEY=VALUE override it."),
) -> None:
    """Write N candidate responses per prompt with a teacher model (resumes an interrupted run)."""
    from align.config import load_config
    from align.generate import GenerateConfig, run_generate

    options: dict[str, Any] = {
        "model": model, "prompts": prompts, "num_candidates": num_candidates, "output": output,
        "temperature": temperature, "top_p": top_p, "max_new_tokens": max_new_tokens, "seed": seed,
        "system_prompt": system_prompt, "backend": backend, "batch_size": batch_size, "logprobs": logprobs,
        "base_url": base_url, "overwrite": overwrite or None,
    }
    given = [f"{key}={_yaml_value(value)}" for key, value in options.items() if value is not None]
    settings = load_config(GenerateConfig, config, given + list(overrides or []))
    result = run_generate(settings)
    if result.generated == 0:
        typer.echo(f"nothing to do: all {result.prompts} prompts are already in {result.output}")
        return
    resumed = f" (resumed: {result.already_done} prompts were already there)" if result.already_done else ""
    typer.echo(f"wrote {result.candidates} candidates for {result.generated} prompts to {result.output}{resumed}")
    typer.echo(f"{result.tokens} tokens in {result.seconds:.1f} s ({result.tokens_per_second:.1f} tok/s); "
               f"duplicates flagged: {result.duplicates}, empty: {result.empty}")


def _yaml_value(value: Any) -> str:
    """An option as the right-hand side of a key=value override (kept a string where it is text)."""
    import json

    if isinstance(value, (bool, int, float)):
        return json.dumps(value)
    return json.dumps(str(value))  # JSON strings are YAML strings: no surprise from "yes", "1e3" or "@x"
