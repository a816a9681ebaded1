"""`align pipeline run CONFIG.yaml`: generate -> label -> pairs [-> select] -> train -> eval, from one config.

Every stage writes into the run dir and records itself in ``manifest.json``:
its inputs (with SHA-256), the hash of its settings, its outputs by name, timings
and library versions. A later stage takes its inputs from those named outputs
(eval scores the weights the train stage says it wrote, adapter or full model),
so a rerun that skips a stage still chains the same files. A rerun skips a
finished stage whose inputs and settings are unchanged; a stage that was stopped
part-way is run again and carries on from what it had written (each stage is
resumable on its own); ``--from STAGE`` reruns that stage and everything after it.

``train`` is one stage (a mapping) or a chain of them (a list, e.g. SFT then DPO): each link starts from the
weights of the link before it, and a DPO/KTO link's reference is that link's model unless it sets ``reference``.
Each link is recorded in the manifest under ``train/<n>-<method>`` like a stage of its own, so a chain stopped
part-way carries on at its first unfinished link; a changed link reruns with every link after it. The chain's
SFT links read rows that the ``select`` stage picks from the judgements (:func:`align.data.select.select_sft`);
that stage runs only when some link is SFT. Eval scores the last link against the original model (the first
link's ``model``) and, with ``eval: {intermediate: true}``, every earlier link against it too.
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from align.config import StrictConfig, load_config
from align.data.io import atomic_path, sha256_of
from align.data.pairs import DEFAULT_MIN_MARGIN, DEFAULT_STRATEGY, Strategy, build_pairs
from align.data.records import content_hash
from align.data.select import ReasoningMode, select_sft
from align.errors import ConfigError
from align.label.stages import LabelConfig, LabelSettings, run_label

if TYPE_CHECKING:
    from align.train.config import TrainConfig

log = logging.getLogger(__name__)

STAGES = ("generate", "label", "pairs", "select", "train", "eval")


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


# The label settings the pipeline hashed before it took the label stage's settings type whole. They stay in the
# settings hash as they were; the others enter it only when set away from their defaults (speed-only ones never),
# so a run dir labeled before them keeps its label stage instead of relabeling once.
_LABEL_SETTINGS_HASHED_FIRST = frozenset({"rules", "judge_model", "judge_base_url", "judge_api_key_env", "mode",
                                          "argilla"})


class PipelineWaiting(Exception):
    """A stage waits for people; run the pipeline again later to carry on."""


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


class PipelineConfig(StrictConfig):
    run_dir: Path
    seed: int = 0
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


@dataclass
class StageOutput:
    """What a stage hands on: its output files by name (later stages take their inputs from these) and a summary."""

    files: dict[str, Path]
    summary: dict[str, Any]


@dataclass
class StageRecord:
    status: str
    inputs: dict[str, str]
    settings_hash: str
    outputs: dict[str, str]  # name -> path, as the stage's StageOutput named them
    started: float
    finished: float | None = None
    seconds: float | None = None
    summary: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for name in ("align", "torch", "transformers", "trl", "peft"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return out


class Manifest:
    def __init__(self, run_dir: Path):
        self.path = run_dir / "manifest.json"
        self.stages: dict[str, dict[str, Any]] = json.loads(self.path.read_text())["stages"] if self.path.exists() else {}
        for stage, record in self.stages.items():
            record["outputs"] = _named_outputs(stage, record.get("outputs") or {})

    def is_current(self, stage: str, inputs: dict[str, str], settings_hash: str) -> bool:
        record = self.stages.get(stage)
        return bool(record and record["status"] == "done" and record["inputs"] == inputs
                    and record["settings_hash"] == settings_hash
                    and all(Path(o).exists() for o in record["outputs"].values()))

    def output(self, stage: str, name: str) -> Path:
        """The file ``stage`` named ``name`` when it last finished."""
        record = self.stages.get(stage)
        if not record or record["status"] != "done" or name not in record["outputs"]:
            raise ConfigError(f"stage {stage} has not finished, so it has no {name} yet: rerun the pipeline "
                              f"with --from {stage}")
        return Path(record["outputs"][name])

    def stage_output(self, stage: str) -> StageOutput:
        """What ``stage`` handed on when it last finished, as it handed it on."""
        record = self.stages[stage]
        return StageOutput({name: Path(path) for name, path in record["outputs"].items()}, record["summary"])

    def save(self, stage: str, record: StageRecord) -> None:
        self.stages[stage] = record.__dict__
        self._write()

    def forget(self, stage: str) -> None:
        if self.stages.pop(stage, None) is not None:
            self._write()

    def _write(self) -> None:
        with atomic_path(self.path) as tmp:
            tmp.write_text(json.dumps({"stages": self.stages}, indent=1, default=str) + "\n")


def _named_outputs(stage: str, outputs: dict[str, str] | list[str]) -> dict[str, str]:
    """A manifest written before stages named their outputs holds a list; name its entries so that a run dir
    from then carries on without redoing its stages. The train stage's only output was its weights folder."""
    if isinstance(outputs, dict):
        return outputs
    if stage == "train":
        return {"weights": outputs[0], "run_dir": str(Path(outputs[0]).parent)} if outputs else {}
    return {Path(o).stem: o for o in outputs}


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


# What each method trains on, by the name the stage before gave that file, and which stage that is.
_DATA_OF_METHOD = {"dpo": "pairs", "orpo": "pairs", "simpo": "pairs", "kto": "unpaired", "sft": "sft"}
_STAGE_OF_DATA = {"pairs": "pairs", "unpaired": "pairs", "sft": "select"}


@dataclass(frozen=True)
class TrainLink:
    """One stage of the train section: the section itself, or one item of a chain (``index`` counts from 1)."""

    index: int
    settings: dict[str, Any]

    @property
    def method(self) -> str:
        from align.train.config import TrainConfig

        return self.settings.get("method", TrainConfig.model_fields["method"].default)

    @property
    def name(self) -> str:
        """Its folder under the run dir's train/ (a chain's links only)."""
        return f"{self.index}-{self.method}"

    @property
    def key(self) -> str:
        """Its entry in the manifest (a chain's links only)."""
        return f"train/{self.name}"

    @property
    def data(self) -> str:
        return _DATA_OF_METHOD[self.method]


def _is_chain(config: PipelineConfig) -> bool:
    return isinstance(config.train, list)


def _train_links(config: PipelineConfig) -> list[TrainLink]:
    sections = config.train if isinstance(config.train, list) else [config.train]
    return [TrainLink(index, settings) for index, settings in enumerate(sections, 1)]


def _original_model(config: PipelineConfig) -> str:
    """The model training starts from (the first link's): eval compares the trained student with it."""
    from align.train.config import TrainConfig

    return _train_links(config)[0].settings.get("model", TrainConfig.model_fields["model"].default)


def _stages(config: PipelineConfig) -> tuple[str, ...]:
    """The stages this config runs: select writes SFT rows, so it runs only when a train link is SFT."""
    wants_sft_rows = any(link.data == "sft" for link in _train_links(config))
    return tuple(stage for stage in STAGES if stage != "select" or wants_sft_rows)


def check_sections(config: PipelineConfig) -> None:
    """Validate every stage's settings up front: a typo in `train` fails now, not after generation."""
    from align.generate import GenerateConfig

    run = config.run_dir
    for name, check in (
        ("generate", lambda: load_config(GenerateConfig, None, (), defaults={**config.generate, "output": run / "c"})),
        ("train", lambda: _check_train(config)),
        ("eval", lambda: _check_eval(config)),
    ):
        try:
            check()
        except ConfigError as exc:
            raise ConfigError(f"section '{name}': {exc}") from None


def _check_train(config: PipelineConfig) -> None:
    if _is_chain(config) and not config.train:
        raise ConfigError("the list of stages is empty: give one stage (a mapping) or a list of them")
    for link in _train_links(config):
        try:
            _check_link(config, link)
        except ConfigError as exc:
            raise ConfigError(f"link {link.index} of the chain: {exc}" if _is_chain(config) else str(exc)) from None


def _check_link(config: PipelineConfig, link: TrainLink) -> None:
    if _is_chain(config) and "method" not in link.settings:
        raise ConfigError("'method' is required in each link: dpo, kto, sft, orpo or simpo")
    if link.index > 1 and "model" in link.settings:
        raise ConfigError("'model' is set, but a later link starts from the weights of the link before it: remove "
                          "it (the first link names the model the chain starts from)")
    train_config = _link_config(config, link, config.run_dir / "data.jsonl", config.run_dir / "train")
    if train_config.reference != "base":
        _check_reference(train_config.reference)


def _check_reference(spec: str) -> None:
    """A reference that names no model fails now, before generation and before any link trains (a bundled name is
    looked up without converting it; a folder must exist)."""
    from align.models import BUNDLED_PREFIX, ModelError, bundled_gguf, resolve_model

    try:
        if spec.startswith(BUNDLED_PREFIX):
            bundled_gguf(spec.removeprefix(BUNDLED_PREFIX))
        else:
            resolve_model(spec)
    except ModelError as exc:
        raise ConfigError(f"'reference' cannot be resolved: {exc}") from None


def _check_eval(config: PipelineConfig) -> None:
    from align.eval import EvalConfig

    _evaluates_intermediate(config)
    load_config(EvalConfig, None, (), defaults={"model": "m", "reference": "r", "output_dir": config.run_dir / "eval",
                                                **_eval_settings(config)})


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


def _paths(run: Path) -> dict[str, Path]:
    """Where the pipeline asks each stage to write (a stage's result then names what it wrote there)."""
    return {"candidates": run / "candidates.jsonl", "judgements": run / "judgements.jsonl",
            "pairs": run / "pairs.jsonl", "unpaired": run / "unpaired.jsonl", "sft": run / "sft.jsonl",
            "train": run / "train", "eval": run / "eval"}


def _train_config(config: PipelineConfig, data: Path, output_dir: Path) -> TrainConfig:
    """The train section (one stage) as the train stage's own TrainConfig (its defaults, its validation)."""
    return _link_config(config, _train_links(config)[0], data, output_dir)


def _link_config(config: PipelineConfig, link: TrainLink, data: Path, output_dir: Path, *,
                 start: Path | None = None) -> TrainConfig:
    """A train link as the train stage's own TrainConfig; ``start``: the weights it starts from instead of a
    ``model`` of its own (a later link of a chain)."""
    from align.train import load_train_config

    settings = {"seed": config.seed, **{k: v for k, v in link.settings.items() if k != "method"}}
    if start is not None:
        settings["model"] = str(start)
    return load_train_config(link.method, settings, data=str(data), output_dir=str(output_dir))


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


def _run_recorded(manifest: Manifest, stage: str, inputs: dict[str, str], settings_hash: str,
                  run: Callable[[], StageOutput]) -> StageOutput:
    """Run a stage (or a train link) with its manifest entry saying so: running, then done with the files it
    named, or waiting (for people; the exception goes on to the caller)."""
    started = time.time()
    manifest.save(stage, StageRecord("running", inputs, settings_hash, {}, started, versions=_versions()))
    try:
        output = run()
    except PipelineWaiting as waiting:
        manifest.save(stage, StageRecord("waiting", inputs, settings_hash, {}, started, versions=_versions(),
                                         summary={"message": str(waiting)}))
        raise
    finished = time.time()
    manifest.save(stage, StageRecord("done", inputs, settings_hash, {k: str(v) for k, v in output.files.items()},
                                     started, finished, round(finished - started, 2), output.summary,
                                     _versions()))
    return output


def _result(config: PipelineConfig, manifest: Manifest, ran: list[str], skipped: list[str]) -> PipelineResult:
    eval_metrics = json.loads(manifest.output("eval", "metrics").read_text())
    links = manifest.stages["train"]["summary"].get("links", []) if _is_chain(config) else []
    intermediate = {link.name: json.loads(manifest.output("eval", f"{link.name}/metrics").read_text())
                    for link in _train_links(config)[:-1]} if _evaluates_intermediate(config) else {}
    return PipelineResult(str(config.run_dir), ran, skipped, eval_metrics, str(manifest.output("eval", "report")),
                          links=links, intermediate=intermediate)


def stage_settings_hash(config: PipelineConfig, stage: str) -> str:
    """The hash of a stage's settings (and the seed) in the manifest: a change reruns the stage. A train link's
    (``train/<n>-<method>``) covers its own settings and those of the links before it, so a changed link reruns
    every link after it too."""
    settings: Any
    if isinstance(config.train, list) and stage.startswith("train/"):
        index = {link.key: link.index for link in _train_links(config)}[stage]
        settings = config.train[:index]
    else:
        settings = {"generate": config.generate, "label": _label_settings_hashed(config.label),
                    "pairs": config.pairs.model_dump(mode="json"), "select": config.select.model_dump(mode="json"),
                    "train": config.train, "eval": config.eval}[stage]
    return content_hash({"settings": settings, "seed": config.seed}, 32)


def _label_settings_hashed(label: LabelSection) -> dict[str, Any]:
    settings, defaults = label.model_dump(mode="json"), LabelSection().model_dump(mode="json")
    return {name: value for name, value in settings.items() if name not in LabelSection.SPEED_ONLY
            and (name in _LABEL_SETTINGS_HASHED_FIRST or value != defaults[name])}


def _hash_input(path: Path, stage: str) -> str:
    if not path.exists():
        raise ConfigError(f"stage {stage}: input {path} does not exist")
    return sha256_of(path)


def _clear_outputs(stage: str, paths: dict[str, Path]) -> None:
    """A finished stage whose inputs changed starts over (resumable stages would otherwise keep old rows)."""
    owned = {"generate": ["candidates"], "label": ["judgements"], "pairs": ["pairs", "unpaired"], "select": ["sft"],
             "train": ["train"], "eval": ["eval"]}[stage]
    for name in owned:
        _remove(paths[name])


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def _generate(config: PipelineConfig, output: Path) -> StageOutput:
    from align.generate import generate

    settings = {"seed": config.seed, **config.generate, "output": output}
    result = generate(**settings)
    return StageOutput({"candidates": Path(result.output)},
                       {k: v for k, v in vars(result).items() if isinstance(v, (int, float, str))})


def _label(config: PipelineConfig, candidates: Path, output: Path) -> StageOutput:
    if config.label.argilla is not None:
        return _label_with_people(config, candidates, output)
    settings = config.label.model_dump(exclude={"argilla"})
    result = run_label(LabelConfig(**settings, candidates=candidates, output=output))
    return StageOutput({"judgements": Path(result.output)}, {"written": result.written, "labels": dict(result.labels)})


def _label_with_people(config: PipelineConfig, candidates: Path, output: Path) -> StageOutput:
    from align.argilla.loop import label_with_people
    from align.argilla.settings import resolve_settings

    people = config.label.argilla
    assert people is not None
    suggestions = None
    if config.label.rules or config.label.judge_model:
        auto = config.label.model_copy(update={"argilla": None})
        suggestions = _label(config.model_copy(update={"label": auto}), candidates,
                             output.with_name("judgements_auto.jsonl")).files["judgements"]
    result = label_with_people(candidates, people.dataset, output,
                               resolve_settings(workspace=people.workspace), target=people.target,
                               wait_seconds=people.wait_seconds, judgements_path=suggestions, task=people.task,
                               only_uncertain=people.only_uncertain, min_confidence=people.min_confidence,
                               min_submitted=people.min_submitted)
    for line in result.lines():
        log.info("%s", line)
    if result.pulled is None:  # not done: too few answers yet
        raise PipelineWaiting(result.lines()[-1])
    return StageOutput({"judgements": Path(result.pulled.output)},
                       {"submitted": result.submitted, "target": result.target})


def _pairs(config: PipelineConfig, judgements: Path, output: Path, unpaired: Path) -> StageOutput:
    result = build_pairs(judgements, output, seed=config.seed, unpaired=unpaired,
                         **config.pairs.model_dump())
    for line in result.lines():
        log.info("%s", line)
    assert result.unpaired_output is not None  # asked for above: KTO trains on it
    return StageOutput({"pairs": Path(result.output), "unpaired": Path(result.unpaired_output)},
                       {"pairs": result.pairs, "prompts": result.prompts})


def _select(config: PipelineConfig, judgements: Path, output: Path) -> StageOutput:
    result = select_sft(judgements, output, **config.select.model_dump())
    for line in result.lines():
        log.info("%s", line)
    return StageOutput({"sft": Path(result.output)}, {"rows": result.rows, "prompts": result.prompts,
                                                      "prompts_without_answer": result.prompts_without_answer})


def _train_stage(config: PipelineConfig, manifest: Manifest, given: dict[str, Path], train_dir: Path, *,
                 forced: bool) -> StageOutput:
    if _is_chain(config):
        return _train_chain(config, manifest, given, train_dir, forced=forced)
    _forget_other_links(manifest, [], train_dir)
    return _train(config, given["data"], train_dir)


def _train(config: PipelineConfig, data: Path, output_dir: Path) -> StageOutput:
    return _run_train(_train_config(config, data, output_dir))


def _run_train(train_config: TrainConfig) -> StageOutput:
    from align.train.run import train

    # A run stopped part-way continues from its last checkpoint.
    result = train(train_config, resume=True)
    # Held-out figures before -> after and align.train.diagnosis's warnings (memorised, drifted), so the manifest
    # says whether the student moved, not only that training ran.
    heldout = {key: [result.eval_before.get(key), result.eval_after[key]]
               for key in ("rewards/accuracies", "rewards/margins") if key in result.eval_after}
    # The run says where its weights are (adapter/ for LoRA, model/ for a full fine-tune); eval reads it from here.
    return StageOutput({"weights": Path(result.weights), "run_dir": Path(result.run_dir)},
                       {"steps": result.steps, "final_loss": result.final_loss, "ref_cache": result.ref_cache,
                        "heldout": heldout, "warnings": result.warnings})


def _train_chain(config: PipelineConfig, manifest: Manifest, data: dict[str, Path], train_dir: Path, *,
                 forced: bool) -> StageOutput:
    """Each link in turn, from the weights of the link before. A finished link whose settings and inputs are
    unchanged is skipped, so a chain stopped part-way carries on at its first unfinished link."""
    links = _train_links(config)
    _forget_other_links(manifest, links, train_dir)
    files: dict[str, Path] = {}
    previous: tuple[TrainLink, StageOutput] | None = None
    for link in links:
        output = _train_link(config, manifest, link, data[link.data], train_dir / link.name, previous, forced=forced)
        files.update({f"{link.name}/{name}": path for name, path in output.files.items()})
        previous = (link, output)
    assert previous is not None  # check_sections refuses an empty chain
    last = previous[1]
    return StageOutput({"weights": last.files["weights"], "run_dir": last.files["run_dir"], **files},
                       {"links": [manifest.stages[link.key]["summary"] for link in links]})


def _train_link(config: PipelineConfig, manifest: Manifest, link: TrainLink, data: Path, output_dir: Path,
                previous: tuple[TrainLink, StageOutput] | None, *, forced: bool) -> StageOutput:
    """One link, recorded in the manifest under its own key; ``previous``: the link before it and what it wrote."""
    # A later link starts from the run dir of the link before: align.train loads its weights (an adapter merged
    # into its base), and a LoRA link's adapter names that earlier adapter as its base (align.train.start).
    train_config = _link_config(config, link, data, output_dir,
                                start=previous[1].files["run_dir"] if previous else None)
    inputs = {"data": _hash_input(data, link.key)}
    if previous is not None:
        inputs["start"] = _hash_input(previous[1].files["weights"], link.key)
    settings_hash = stage_settings_hash(config, link.key)
    if not forced and manifest.is_current(link.key, inputs, settings_hash):
        log.info("train link %s: up to date, skipped", link.name)
        return manifest.stage_output(link.key)
    if _starts_over(manifest.stages.get(link.key), inputs, settings_hash, forced=forced):
        _remove(output_dir)
    reference, reference_model = _link_reference(link, train_config, previous[0] if previous else None)
    log.info("train link %s: running from %s; reference: %s", link.name, train_config.model, reference)

    def run() -> StageOutput:
        output = _run_train(train_config)
        return StageOutput(output.files, {"link": link.name, "method": link.method,
                                          "started_from": train_config.model, "reference": reference,
                                          "reference_model": reference_model, **output.summary})

    return _run_recorded(manifest, link.key, inputs, settings_hash, run)


def _starts_over(record: dict[str, Any] | None, inputs: dict[str, str], settings_hash: str, *, forced: bool) -> bool:
    """Whether a link's folder is emptied before it runs. A link stopped part-way resumes from its checkpoint only
    with the same settings and inputs (one from other weights or data would carry them on); a finished link that
    runs again has changed; a folder the manifest knows nothing of is not trusted."""
    if record is None or forced or record["status"] == "done":
        return True
    return record["inputs"] != inputs or record["settings_hash"] != settings_hash


def _link_reference(link: TrainLink, train_config: TrainConfig, previous: TrainLink | None) -> tuple[str, str | None]:
    """(how the log and manifest say it, the model spec) of the reference a link's KL term anchors to: for DPO/KTO
    the weights the link starts from (the link before's model) unless the link sets one."""
    from align.train.config import REFERENCE_METHODS

    if link.method not in REFERENCE_METHODS:
        return f"none ({link.method.upper()} uses no reference model)", None
    if train_config.reference != "base":
        return f"{train_config.reference} (set in the link)", train_config.reference
    if previous is None:
        return f"the original model {train_config.model}, where the chain starts", train_config.model
    return f"the {previous.name} link's model {train_config.model}, where this link starts", train_config.model


def _forget_other_links(manifest: Manifest, links: list[TrainLink], train_dir: Path) -> None:
    """Drop the manifest entries and train/ folders of links this config does not have (a changed or shorter
    chain, or one stage where there was a chain), so that neither names weights this config did not train."""
    keep = {link.key for link in links}
    for key in [key for key in manifest.stages if key.startswith("train/") and key not in keep]:
        manifest.forget(key)
    if links and train_dir.is_dir():  # a single stage's folder is train/ itself, cleared as a stage's is
        names = {link.name for link in links}
        for child in train_dir.iterdir():
            if child.name not in names:
                _remove(child)


def _eval_stage(config: PipelineConfig, manifest: Manifest, output_dir: Path) -> StageOutput:
    """The trained student (a chain's last link) against the original model; with ``intermediate: true``, each
    earlier link against it too, in ``eval/<link>/``, all on the same reference answers."""
    original = _original_model(config)
    if not _evaluates_intermediate(config):
        return _eval(config, manifest.output("train", "run_dir"), output_dir, reference=original)
    shared = {"reference_answers": config.eval.get("reference_answers") or output_dir / "responses_original.jsonl"}
    files: dict[str, Path] = {}
    intermediate: dict[str, Any] = {}
    for link in _train_links(config)[:-1]:
        output = _eval(config, manifest.output("train", f"{link.name}/run_dir"), output_dir / link.name,
                       reference=original, **shared)
        files.update({f"{link.name}/{name}": path for name, path in output.files.items()})
        intermediate[link.name] = output.summary
    final = _eval(config, manifest.output("train", "run_dir"), output_dir, reference=original, **shared)
    return StageOutput({**final.files, **files}, {**final.summary, "intermediate": intermediate})


def _eval(config: PipelineConfig, train_run: Path, output_dir: Path, *, reference: str, **shared: Any) -> StageOutput:
    from align.eval import EvalConfig, run_eval

    # The student is the train stage's run dir: the model layer loads the weights it holds, and eval reads the
    # run's beta from it. The reference is where training started.
    settings = {"seed": config.seed, "reference": reference,
                **_eval_settings(config), **shared, "model": str(train_run), "output_dir": output_dir}
    result = run_eval(load_config(EvalConfig, None, (), defaults=settings))
    m = result.metrics
    return StageOutput({name: Path(path) for name, path in result.files.items()}, {
        k: m[k] for k in ("win_rate", "win_rate_ci_low", "win_rate_ci_high", "ties", "kl_per_token")})


def load_pipeline_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> PipelineConfig:
    return load_config(PipelineConfig, path, overrides)
