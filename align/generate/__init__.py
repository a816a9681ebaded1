"""Teacher generation: N candidate responses per prompt, from transformers, vLLM or any OpenAI-compatible server.

From Python::

    from align.generate import GenerateConfig, generate
    result = generate(GenerateConfig(prompts="prompts.jsonl", output="candidates.jsonl", num_candidates=4))
"""

from __future__ import annotations

from typing import Any

from align.generate.config import GenerateConfig, SamplingOverride, SamplingParams
from align.generate.stage import GenerateResult, run_generate


def generate(config: GenerateConfig | None = None, **settings: Any) -> GenerateResult:
    """Run the generate stage from a config, or from keyword settings (``prompts=..., output=...``)."""
    from align.config import load_config

    if config is None or settings:
        base = config.model_dump() if config is not None else {}
        config = load_config(GenerateConfig, defaults={**base, **settings})
    return run_generate(config)


__all__ = ["GenerateConfig", "GenerateResult", "SamplingOverride", "SamplingParams", "generate", "run_generate"]
