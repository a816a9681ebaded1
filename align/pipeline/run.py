"""`run_pipeline`: the stages in order, each skipped when up to date, run (and recorded) otherwise; with ``rounds: N``
the stages once per round (:mod:`align.pipeline.rounds`), a summary over the rounds, and ``stop_when``."""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from align.data.io import ExclusiveLock
from align.errors import ConfigError
from align.pipeline.chain import _train_stage
from align.pipeline.checks import check_sections
from align.pipeline.config import STAGES, PipelineConfig, SelectSettings, _evaluates_intermediate, _is_chain
from align.pipeline.files import _clear_outputs, _paths
from align.pipeline.hashes import _hash_input
from align.pipeline.links import _STAGE_OF_DATA, _train_links
from align.pipeline.manifest import Manifest, PipelineWaiting, StageOutput, _run_recorded
from align.pipeline.rounds import (
    Round,
    check_prompts_per_round,
    eval_inputs,
    eval_round,
    generate_round,
    round_config,
    round_prompts,
    round_settings_hash,
    round_start,
)
from align.pipeline.stages import _eval_stage, _export_stage, _generate, _label, _pairs, _select
from align.pipeline.summary import original_row, round_row, stop_reason, write_summary

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
    # Rounds (rounds > 1): a row per finished round (align.pipeline.summary), why they stopped early (stop_when),
    # and rounds_summary.md. eval_metrics, report, links and intermediate are then the last finished round's.
    rounds: list[dict[str, Any]] = field(default_factory=list)
    stopped: str | None = None
    rounds_summary: str | None = None


def _stages(config: PipelineConfig) -> tuple[str, ...]:
    """The stages this config runs: select writes SFT rows, so it runs only when a train link is SFT; export only
    when it names formats."""
    wants_sft_rows = any(link.data == "sft" for link in _train_links(config))
    wanted = {"select": wants_sft_rows, "export": bool(config.export.quantize)}
    return tuple(stage for stage in STAGES if wanted.get(stage, True))


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


def run_pipeline(config: PipelineConfig, *, from_stage: str | None = None, from_round: int = 1) -> PipelineResult:
    """Run (or finish) the pipeline: every round in turn, each stage skipped when up to date. ``from_stage`` reruns
    that stage and every stage after it, in round ``from_round`` and every round after it."""
    check_sections(config)
    stages = _stages(config)
    if "select" not in stages and config.select != SelectSettings():
        log.warning("the select section is set, but no train link is SFT: nothing reads SFT rows, so it is unused")
    if config.rounds == 1:
        unused = [name for name in ("teacher_share", "reference", "stop_when") if name in config.model_fields_set]
        if unused:
            log.warning("%s set, but rounds is 1: only rounds after the first read %s", ", ".join(unused),
                        "it" if len(unused) == 1 else "them")
    if from_stage is not None and from_stage not in stages:
        raise ConfigError(f"unknown stage {from_stage!r}: choose one of {', '.join(stages)}"
                          + (" (select runs only when a train link is SFT)" if from_stage == "select" else ""))
    if not 1 <= from_round <= config.rounds:
        raise ConfigError(f"--round {from_round}: the config has rounds 1 to {config.rounds}")
    check_prompts_per_round(config)
    config.run_dir.mkdir(parents=True, exist_ok=True)
    from align.train.tracking import wandb_group  # imports transformers: not for `align pipeline --help`

    # One pipeline per run dir at a time: a second would race the first through the same stages and manifest.
    with ExclusiveLock(config.run_dir / ".lock", f"pipeline run dir {config.run_dir}"), \
            wandb_group(config.run_dir.resolve().name):  # with report_to: wandb, training and eval in one group
        return _run_rounds(config, stages, from_stage, from_round)


def _run_rounds(config: PipelineConfig, stages: tuple[str, ...], from_stage: str | None,
                from_round: int) -> PipelineResult:
    ran: list[str] = []
    skipped: list[str] = []
    finished: list[Round] = []
    stopped = None
    for index in range(1, config.rounds + 1):
        round_ = Round.open(config.run_dir, index, finished[-1] if finished else None)
        forced = stages[stages.index(from_stage):] if from_stage and index >= from_round else ()
        try:
            _run_round(config, round_, stages, forced, ran, skipped)
        except PipelineWaiting as waiting:
            summary = _summary(config, finished, waiting=f"{round_.name}: {waiting}") if finished else None
            return PipelineResult(str(config.run_dir), ran, skipped, {}, None, waiting=str(waiting),
                                  rounds=summary[0] if summary else [],
                                  rounds_summary=summary[1] if summary else None)
        finished.append(round_)
        if config.rounds > 1:
            stopped = stop_reason(_row(finished), config.stop_when)
            if stopped:
                log.info("stopping after %s of %d: %s", round_.name, config.rounds, stopped)
                break
    return _result(config, finished, ran, skipped, stopped)


def _run_round(config: PipelineConfig, round_: Round, stages: tuple[str, ...], forced: tuple[str, ...],
               ran: list[str], skipped: list[str]) -> None:
    """One round's stages in order; raises PipelineWaiting when people have not answered yet."""
    manifest, paths = round_.manifest, _paths(round_.dir)
    settings = round_config(config, round_.index)  # round 1: the pipeline's own, as it always ran
    # Each stage's inputs, read when the stage comes up: the earlier stages' named outputs, as the manifest
    # holds them whether those stages ran now or were skipped as up to date.
    stage_inputs: dict[str, Callable[[], dict[str, Path]]] = {
        "generate": lambda: {"prompts": Path(config.generate.get("prompts", ""))},
        "label": lambda: {"candidates": manifest.output("generate", "candidates")},
        "pairs": lambda: {"judgements": manifest.output("label", "judgements")},
        "select": lambda: {"judgements": manifest.output("label", "judgements")},
        "train": lambda: _train_inputs(config, manifest),
        "eval": lambda: _eval_inputs(config, manifest),
        "export": lambda: {"weights": manifest.output("train", "weights")},
    }
    # Each stage reads its inputs (above) and writes where ``paths`` asks; what it wrote, its result names.
    runners: dict[str, Callable[[dict[str, Path]], StageOutput]] = {
        "generate": lambda _: _generate(settings, paths["candidates"]),
        "label": lambda given: _label(settings, given["candidates"], paths["judgements"]),
        "pairs": lambda given: _pairs(settings, given["judgements"], paths["pairs"], paths["unpaired"]),
        "select": lambda given: _select(settings, given["judgements"], paths["sft"]),
        "train": lambda given: _train_stage(settings, manifest, given, paths["train"], forced="train" in forced),
        "eval": lambda _: _eval_stage(settings, manifest, paths["eval"]),
        "export": lambda _: _export_stage(settings, manifest, paths["export"]),
    }
    if round_.previous is not None:  # a round after the first: from the previous round's student
        previous = round_.previous.manifest
        stage_inputs.update({
            "generate": lambda: {"prompts": round_prompts(config, round_, paths["prompts"]),
                                 "student": previous.output("train", "weights")},
            "train": lambda: {**_train_inputs(config, manifest), "start": previous.output("train", "weights")},
            "eval": lambda: {**_eval_inputs(config, manifest), **eval_inputs(round_)},
        })
        runners.update({
            "generate": lambda given: generate_round(config, round_, given["prompts"],
                                                     previous.output("train", "run_dir"), paths),
            "train": lambda given: _train_stage(settings, manifest, given, paths["train"], forced="train" in forced,
                                                start=round_start(config, round_)),
            "eval": lambda _: eval_round(settings, round_, paths["eval"]),
        })
    for stage in stages:
        name = round_.stage_name(stage)
        given = stage_inputs[stage]()
        inputs = {key: _hash_input(path, stage) for key, path in given.items()}
        settings_hash = round_settings_hash(config, round_.index, stage)
        if stage not in forced and manifest.is_current(stage, inputs, settings_hash):
            log.info("stage %s: up to date, skipped", name)
            skipped.append(name)
            continue
        fresh = stage in forced or (stage in manifest.stages and manifest.stages[stage].get("status") == "done")
        # A chain starts over link by link instead: finished links with unchanged settings and inputs stay.
        if fresh and not (stage == "train" and _is_chain(config)):
            _clear_outputs(stage, paths)
        log.info("stage %s: running", name)
        _run_recorded(manifest, stage, inputs, settings_hash, functools.partial(runners[stage], given))
        ran.append(name)


def _row(rounds: list[Round]) -> dict[str, Any]:
    """The last round's summary row, from the metrics its eval wrote."""
    round_ = rounds[-1]
    manifest = round_.manifest
    metrics = json.loads(manifest.output("eval", "metrics").read_text())
    previous = (json.loads(manifest.output("eval", "previous/metrics").read_text())
                if round_.previous is not None else None)
    return round_row(round_.index, str(round_.dir), metrics, previous,
                     (manifest.stages.get("pairs") or {}).get("summary"))


def _summary(config: PipelineConfig, rounds: list[Round], *, stopped: str | None = None,
             waiting: str | None = None) -> tuple[list[dict[str, Any]], str]:
    """Write rounds_summary.json/.md/.png over the finished rounds; (the rows, the .md's path)."""
    rows = [_row(rounds[:i]) for i in range(1, len(rounds) + 1)]
    original = original_row(json.loads(rounds[0].manifest.output("eval", "metrics").read_text()))
    files = write_summary(config.run_dir, rows, original, config.rounds, stopped=stopped, waiting=waiting)
    return rows, str(files["md"])


def _result(config: PipelineConfig, rounds: list[Round], ran: list[str], skipped: list[str],
            stopped: str | None) -> PipelineResult:
    manifest = rounds[-1].manifest
    eval_metrics = json.loads(manifest.output("eval", "metrics").read_text())
    links = manifest.stages["train"]["summary"].get("links", []) if _is_chain(config) else []
    intermediate = {link.name: json.loads(manifest.output("eval", f"{link.name}/metrics").read_text())
                    for link in _train_links(config)[:-1]} if _evaluates_intermediate(config) else {}
    result = PipelineResult(str(config.run_dir), ran, skipped, eval_metrics, str(manifest.output("eval", "report")),
                            links=links, intermediate=intermediate, stopped=stopped)
    if config.rounds > 1:  # rounds: 1 writes what the pipeline always wrote, nothing more
        result.rounds, result.rounds_summary = _summary(config, rounds, stopped=stopped)
    return result
