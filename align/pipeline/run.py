"""`run_pipeline`: the stages in order, each skipped when up to date, run (and recorded) otherwise."""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from align.errors import ConfigError
from align.pipeline.chain import _train_stage
from align.pipeline.checks import check_sections
from align.pipeline.config import STAGES, PipelineConfig, SelectSettings, _evaluates_intermediate, _is_chain
from align.pipeline.files import _clear_outputs, _paths
from align.pipeline.hashes import _hash_input, stage_settings_hash
from align.pipeline.links import _STAGE_OF_DATA, _train_links
from align.pipeline.manifest import Manifest, PipelineWaiting, StageOutput, _run_recorded
from align.pipeline.stages import _eval_stage, _generate, _label, _pairs, _select

log = logging.getLogger(__name__)


@dataclass
class PipelineResult:
    run_dir: str
    ran: list[str]
    skipped: list[str]
    eval_metrics: dict[str, Any]
    report: str | None
    waiting: str | None = None  # why the pipeline stopped early (people have not answered yet)
    # A train chain: each link's summary as the manifest holds it (method, where it started, its reference), and
    # with eval's intermediate: true each earlier link's eval metrics against the original model, by link name.
    links: list[dict[str, Any]] = field(default_factory=list)
    intermediate: dict[str, dict[str, Any]] = field(default_factory=dict)


def _stages(config: PipelineConfig) -> tuple[str, ...]:
    """The stages this config runs: select writes SFT rows, so it runs only when a train link is SFT."""
    wants_sft_rows = any(link.data == "sft" for link in _train_links(config))
    return tuple(stage for stage in STAGES if stage != "select" or wants_sft_rows)


def _train_inputs(config: PipelineConfig, manifest: Manifest) -> dict[str, Path]:
    """The files the train section reads, as the stages before named them: one stage's under ``data`` (as its
    manifest entries have always had it), a chain's by kind (pairs, unpaired, sft)."""
    kinds = list(dict.fromkeys(link.data for link in _train_links(config)))
    files = {kind: manifest.output(_STAGE_OF_DATA[kind], kind) for kind in kinds}
    return files if _is_chain(config) else {"data": files[kinds[0]]}


def _eval_inputs(config: PipelineConfig, manifest: Manifest) -> dict[str, Path]:
    inputs = {"weights": manifest.output("train", "weights"), "prompts": Path(config.eval.get("prompts", ""))}
    if _evaluates_intermediate(config):
        inputs.update({f"weights/{link.name}": manifest.output("train", f"{link.name}/weights")
                       for link in _train_links(config)[:-1]})
    return inputs


def run_pipeline(config: PipelineConfig, *, from_stage: str | None = None) -> PipelineResult:
    check_sections(config)
    stages = _stages(config)
    if "select" not in stages and config.select != SelectSettings():
        log.warning("the select section is set, but no train link is SFT: nothing reads SFT rows, so it is unused")
    if from_stage is not None and from_stage not in stages:
        raise ConfigError(f"unknown stage {from_stage!r}: choose one of {', '.join(stages)}"
                          + (" (select runs only when a train link is SFT)" if from_stage == "select" else ""))
    run = config.run_dir
    run.mkdir(parents=True, exist_ok=True)
    manifest = Manifest(run)
    paths = _paths(run)
    prompts = Path(config.generate.get("prompts", ""))
    forced = stages[stages.index(from_stage):] if from_stage else ()
    # Each stage's inputs, read when the stage comes up: the earlier stages' named outputs, as the manifest
    # holds them whether those stages ran now or were skipped as up to date.
    stage_inputs: dict[str, Callable[[], dict[str, Path]]] = {
        "generate": lambda: {"prompts": prompts},
        "label": lambda: {"candidates": manifest.output("generate", "candidates")},
        "pairs": lambda: {"judgements": manifest.output("label", "judgements")},
        "select": lambda: {"judgements": manifest.output("label", "judgements")},
        "train": lambda: _train_inputs(config, manifest),
        "eval": lambda: _eval_inputs(config, manifest),
    }
    # Each stage reads its inputs (above) and writes where ``paths`` asks; what it wrote, its result names.
    runners: dict[str, Callable[[dict[str, Path]], StageOutput]] = {
        "generate": lambda _: _generate(config, paths["candidates"]),
        "label": lambda given: _label(config, given["candidates"], paths["judgements"]),
        "pairs": lambda given: _pairs(config, given["judgements"], paths["pairs"], paths["unpaired"]),
        "select": lambda given: _select(config, given["judgements"], paths["sft"]),
        "train": lambda given: _train_stage(config, manifest, given, paths["train"], forced="train" in forced),
        "eval": lambda _: _eval_stage(config, manifest, paths["eval"]),
    }
    ran, skipped = [], []
    for stage in stages:
        given = stage_inputs[stage]()
        inputs = {name: _hash_input(path, stage) for name, path in given.items()}
        settings_hash = stage_settings_hash(config, stage)
        if stage not in forced and manifest.is_current(stage, inputs, settings_hash):
            log.info("stage %s: up to date, skipped", stage)
            skipped.append(stage)
            continue
        fresh = stage in forced or (stage in manifest.stages and manifest.stages[stage].get("status") == "done")
        # A chain starts over link by link instead: finished links with unchanged settings and inputs stay.
        if fresh and not (stage == "train" and _is_chain(config)):
            _clear_outputs(stage, paths)
        log.info("stage %s: running", stage)
        try:
            _run_recorded(manifest, stage, inputs, settings_hash, functools.partial(runners[stage], given))
        except PipelineWaiting as waiting:
            return PipelineResult(str(run), ran, skipped, {}, None, waiting=str(waiting))
        ran.append(stage)
    return _result(config, manifest, ran, skipped)


def _result(config: PipelineConfig, manifest: Manifest, ran: list[str], skipped: list[str]) -> PipelineResult:
    eval_metrics = json.loads(manifest.output("eval", "metrics").read_text())
    links = manifest.stages["train"]["summary"].get("links", []) if _is_chain(config) else []
    intermediate = {link.name: json.loads(manifest.output("eval", f"{link.name}/metrics").read_text())
                    for link in _train_links(config)[:-1]} if _evaluates_intermediate(config) else {}
    return PipelineResult(str(config.run_dir), ran, skipped, eval_metrics, str(manifest.output("eval", "report")),
                          links=links, intermediate=intermediate)
