"""Teacher backends behind one interface: take prompt jobs, yield each job's candidates when done.

A backend may finish jobs in any order (batches sorted by length, concurrent
HTTP requests); the stage writes each one as it arrives.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from align.generate.config import GenerateConfig
from align.generate.plan import PromptJob

# Called with the number of tokens just generated, for a live tokens/s display.
TokenCallback = Callable[[int], None]


@dataclass
class Completion:
    """One candidate as a backend returns it (the stage adds ids, flags and provenance)."""

    text: str
    finish_reason: str | None
    num_tokens: int | None
    logprobs: list[dict[str, Any]] | None = None
    reasoning: str | None = None  # an OpenAI-compatible reply's reasoning_content, apart from the answer


class Backend(Protocol):
    name: str

    def describe(self) -> dict[str, Any]:
        """Provenance to store with every row (never secrets)."""

    def run(self, jobs: Sequence[PromptJob], on_tokens: TokenCallback | None = None
            ) -> Iterator[tuple[PromptJob, list[Completion]]]:
        """Yield each job with its completions, in the order of ``job.candidates``."""

    def close(self) -> None: ...


def make_backend(config: GenerateConfig) -> Backend:
    if config.backend == "transformers":
        from align.generate.backends.transformers import TransformersBackend

        return TransformersBackend(config)
    if config.backend == "vllm":
        from align.generate.backends.vllm import VLLMBackend

        return VLLMBackend(config)
    from align.generate.backends.openai import OpenAIBackend

    return OpenAIBackend(config)
