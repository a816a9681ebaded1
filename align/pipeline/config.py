"""The pipeline's config: one section per stage (typed, with the stages' own defaults), loaded from YAML."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from align.config import StrictConfig, load_config
from align.data.pairs import DEFAULT_MIN_MARGIN, DEFAULT_STRATEGY, Strategy, build_pairs
from align.data.select import ReasoningMode, select_sft
from align.errors import ConfigError
from align.label.stages import LabelSettings


STAGES = ("generate", "label", "pairs", "select", "train", "eval", "export")


class PeopleSettings(StrictConfig):
    """People in Argilla label the candidates; the rules/judge labels become their suggestions."""

    dataset: str
    target: int = Field(..., ge=1, description="answered records needed before the pipeline goes on")
    wait_seconds: float = Field(0.0, ge=0, description="0: check once, stop, and carry on at the next run")
    task: Literal["pairwise", "single", "ranking"] | None = Field(None, description="default: from the data")
    only_uncertain: bool = False
    min_confidence: float = 0.8
    min_submitted: int | None = None
    workspace: str | None = None


class LabelSection(LabelSettings):
    """The label stage's own settings (rules, judge and every judge setting, with their defaults), and people."""

    argilla: PeopleSettings | None = None


def _default_of(function: Callable[..., Any], keyword: str) -> Any:
    """A stage function's own default for ``keyword``, so the pipeline's section cannot drift from the stage."""
    return inspect.signature(function).parameters[keyword].default


class PairSettings(StrictConfig):
    """The keywords of :func:`align.data.pairs.build_pairs` a pipeline may set, with build_pairs' defaults."""

    strategy: Strategy = DEFAULT_STRATEGY
    min_margin: float = DEFAULT_MIN_MARGIN
    near_duplicate: float = _default_of(build_pairs, "near_duplicate")
    max_pairs_per_prompt: int | None = _default_of(build_pairs, "max_pairs_per_prompt")


class SelectSettings(StrictConfig):
    """The keywords of :func:`align.data.select.select_sft` a pipeline may set, with select_sft's defaults."""

    top_k: int = Field(_default_of(select_sft, "top_k"), ge=1)
    min_score: float | None = _default_of(select_sft, "min_score")
    near_duplicate: float = Field(_default_of(select_sft, "near_duplicate"), gt=0, le=1)
    reasoning: ReasoningMode = _default_of(select_sft, "reasoning")
    judge: str | None = _default_of(select_sft, "judge")


class StopWhen(StrictConfig):
    """When rounds stop before the last one (checked after each round's eval; the summary says which fired)."""

    no_gain: bool = Field(False, description="stop when a round's held-out win rate against the previous round's "
                          "student has a 95% interval containing 0.5 (no sure gain over it); from round 2")
    kl_per_token: float | None = Field(None, gt=0, description="a budget: stop when a round's KL per token to the "
                                       "original model passes it")


class ExportSettings(StrictConfig):
    """After eval: quantised copies of the student (``align export --quantize``), each served once by align's own
    server as a check, and optionally scored on benchmarks beside the float student (``align eval --tasks``)."""

    quantize: list[str] = Field(default_factory=list, description="formats, e.g. [q8_0, q4_1]; none: no export")
    calibration: str | None = Field(None, description="prompts to calibrate and check on (default: the training "
                                    "data)")
    merge: bool | None = Field(None, description="merge a LoRA student's adapter before quantising (true) or keep "
                               "it beside the GGUF base (false); unset: kept at 4 bits, merged at 8 (align export)")
    serve_check: bool = Field(True, description="serve each export with align's server and ask it one question")
    tasks: list[str] = Field(default_factory=list, description="benchmarks for align eval --tasks (e.g. "
                             "[everyday_mc]): the alignment tax and each export's quantisation loss")


class PipelineConfig(StrictConfig):
    run_dir: Path
    seed: int = 0
    # Rounds (align.pipeline.rounds): round 1 is the pipeline as it always was, in the run dir itself; round k > 1,
    # in run_dir/round-k/, generates with round k-1's student, labels, pairs and trains on from its weights.
    rounds: int = Field(1, ge=1, description="on-policy rounds: each round after the first generates its candidates "
                        "with the previous round's student and trains on from its weights")
    teacher_share: float = Field(0.0, ge=0.0, le=1.0, description="rounds after the first: the share of each "
                                 "prompt's candidates the teacher writes (rounded half up); the previous round's "
                                 "student writes the rest")
    prompts_per_round: int | None = Field(None, ge=1, description="how many prompts each round draws from the "
                                          "generate prompts (after max_prompts), disjoint across rounds while the "
                                          "file lasts, then from the top again; unset: every round the same prompts")
    reference: Literal["original", "previous"] = Field(
        "original", description="rounds after the first: what DPO/KTO is anchored to: the reference of round 1 "
        "(KL always to the starting point) or the previous round's student (where the round starts)")
    stop_when: StopWhen = Field(default_factory=StopWhen)
    generate: dict[str, Any] = Field(default_factory=dict, description="align generate settings")
    label: LabelSection = Field(default_factory=LabelSection)
    pairs: PairSettings = Field(default_factory=PairSettings)
    select: SelectSettings = Field(default_factory=SelectSettings, description="SFT rows, for a train chain's SFT "
                                   "links")
    train: dict[str, Any] | list[dict[str, Any]] = Field(
        default_factory=dict, description="align train settings (method: dpo|kto|sft|orpo|simpo), or a list of "
        "them: a chain, each link starting from the weights of the one before")
    eval: dict[str, Any] = Field(default_factory=dict, description="align eval settings; intermediate: true also "
                                 "scores each earlier link of a chain")
    export: ExportSettings = Field(default_factory=ExportSettings, description="quantised exports after eval")


def _is_chain(config: PipelineConfig) -> bool:
    return isinstance(config.train, list)


def _eval_settings(config: PipelineConfig) -> dict[str, Any]:
    """The eval section as the eval stage's settings: ``intermediate`` is the pipeline's own."""
    return {name: value for name, value in config.eval.items() if name != "intermediate"}


def _evaluates_intermediate(config: PipelineConfig) -> bool:
    """Whether eval also scores each earlier link of a chain (``eval: {intermediate: true}``)."""
    value = config.eval.get("intermediate", False)
    if not isinstance(value, bool):
        raise ConfigError(f"'intermediate' must be true or false, got {value!r}")
    if value and not _is_chain(config):
        raise ConfigError("'intermediate: true' scores each earlier link of a train chain, but train is one stage: "
                          "remove it, or make train a list of stages")
    return value


def load_pipeline_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> PipelineConfig:
    return load_config(PipelineConfig, path, overrides)
