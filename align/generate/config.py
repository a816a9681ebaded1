"""Settings of a generation run (YAML keys, CLI options and Python fields share these names)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from align.config import StrictConfig, text_or_file
from align.models import DEFAULT_MODEL


class SamplingParams(StrictConfig):
    """How one candidate is sampled. ``temperature: 0`` means greedy (as in OpenAI's API)."""

    temperature: float = Field(0.8, ge=0.0)
    top_p: float = Field(0.95, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, description="0 = no top-k cut")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


class SamplingOverride(StrictConfig):
    """One entry of ``mix``: the settings that differ from the run's for that candidate."""

    temperature: float | None = Field(None, ge=0.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0)


class GenerateConfig(StrictConfig):
    """Everything ``align generate`` needs. Settings that change the output are hashed into each row,
    so a resumed run refuses to mix rows written with different ones."""

    prompts: Path
    output: Path
    model: str = DEFAULT_MODEL
    # 8, not 4: even hinted, the bundled teacher rarely does what a rule asks (of its candidates 16% point to a
    # professional, 8% are laid out as points, 15% give an example). 4 candidates give 47%, 23% and 42% of such
    # tasks' prompts at least one answer that does, 8 give 57%, 33% and 60%; on the quality suite (lr 4e-4, each
    # prompt's 4 widest pairs) DPO beat the random-label control on 5 tasks of 5 with 8 candidates (3 seeds), on 2
    # with 4 (seed 0; README). It doubles teacher time, and a pairwise judge (`align label judge`'s default mode)
    # compares 28 pairs per prompt instead of 6: `-n 4` or `--mode pointwise` where judge time counts more.
    num_candidates: int = Field(8, ge=1)
    # The first N prompts of the file only (a quick trial); raising it later answers the rest.
    max_prompts: int | None = Field(None, ge=1)
    backend: Literal["transformers", "vllm", "openai"] = "transformers"

    # Sampling, in transformers' GenerationConfig names.
    temperature: float = Field(0.8, ge=0.0)
    top_p: float = Field(0.95, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)
    max_new_tokens: int = Field(256, ge=1)
    seed: int = 0
    # Candidate 0 greedy, the rest sampled: the teacher's best guess plus variety to compare it with.
    greedy_first: bool = True
    # Per-candidate overrides (candidate i takes mix[i]; later ones the run's settings). Wins over greedy_first.
    mix: list[SamplingOverride] = Field(default_factory=list)

    # The teacher-only "constitution": text, or "@path" to read it from a file.
    system_prompt: str | None = None
    # Per-token log-probs: the chosen token's plus this many alternatives (0 = chosen only). None = off.
    logprobs: int | None = Field(None, ge=0, le=20)

    # transformers: sequences per forward pass; vllm: prompts per chunk written at once.
    batch_size: int = Field(64, ge=1)
    device: str | None = None
    num_threads: int | None = Field(None, ge=1)

    # OpenAI-compatible HTTP backend.
    base_url: str | None = None
    api_key_env: str = "OPENAI_API_KEY"
    concurrency: int = Field(8, ge=1)
    request_timeout: float = Field(600.0, gt=0)
    request_n: bool = True  # send n>1 in one request; turn off for servers that ignore n (Ollama)
    # Extra request fields, e.g. {"return_tokens_as_token_ids": true} so vLLM sends token ids with log-probs.
    extra_body: dict[str, Any] = Field(default_factory=dict)

    overwrite: bool = False
    progress: bool = True

    @field_validator("system_prompt")
    @classmethod
    def _read_system_prompt(cls, value: str | None) -> str | None:
        return text_or_file(value, "system prompt")

    @model_validator(mode="after")
    def _check(self) -> "GenerateConfig":
        if self.backend == "openai" and not self.base_url:
            raise ValueError("the openai backend needs base_url (e.g. http://127.0.0.1:8000/v1)")
        if len(self.mix) > self.num_candidates:
            raise ValueError(f"mix has {len(self.mix)} entries but num_candidates is {self.num_candidates}")
        return self

    def sampling_for(self, index: int) -> SamplingParams:
        """The sampling settings of candidate ``index``."""
        base = SamplingParams(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)
        if index < len(self.mix):
            return base.model_copy(update=self.mix[index].model_dump(exclude_none=True))
        if self.greedy_first and index == 0 and not self.mix:
            return base.model_copy(update={"temperature": 0.0})
        return base
