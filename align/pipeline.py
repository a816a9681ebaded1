"""`align pipeline run CONFIG.yaml`: generate -> label -> pairs -> train -> eval, from one config.

Every stage writes into the run dir and records itself in ``manifest.json``:
its inputs (with SHA-256), the hash of its settings, its outputs by name, timings
and library versions. A later stage takes its inputs from those named outputs
(eval scores the weights the train stage says it wrote, adapter or full model),
so a rerun that skips a stage still chains the same files. A rerun skips a
finished stage whose inputs and settings are unchanged; a stage that was stopped
part-way is run again and carries on from what it had written (each stage is
resumable on its own); ``--from STAGE`` reruns that stage and everything after it.
"""

from __future__ import annotations

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
from align.errors import ConfigError
from align.label.stages import LabelConfig, LabelSettings, run_label

if TYPE_CHECKING:
    from align.train.config import TrainConfig

log = logging.getLogger(__name__)

STAGES = ("generate", "label", "pairs", "train", "eval")


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


class PipelineConfig(StrictConfig):
    run_dir: Path
    seed: int = 0
    generate: dict[str, Any] = Field(default_factory=dict, description="align generate settings")
    label: LabelSection = Field(default_factory=LabelSection)
    pairs: PairSettings = Field(default_factory=PairSettings)
    train: dict[str, Any] = Field(default_factory=dict, description="align train settings (method: dpo|kto)")
    eval: dict[str, Any] = Field(default_factory=dict, description="align eval settings")


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

    def save(self, stage: str, record: StageRecord) -> None:
        self.stages[stage] = record.__dict__
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


def check_sections(config: PipelineConfig) -> None:
    """Validate every stage's settings up front: a typo in `train` fails now, not after generation."""
    from align.eval import EvalConfig
    from align.generate import GenerateConfig

    run = config.run_dir
    for name, check in (
        ("generate", lambda: load_config(GenerateConfig, None, (), defaults={**config.generate, "output": run / "c"})),
        ("train", lambda: _train_config(config, _paths(run)[_train_data(config)], run / "train")),
        ("eval", lambda: load_config(EvalConfig, None, (), defaults={"model": "m", "reference": "r",
                                                                      "output_dir": run / "eval", **config.eval})),
    ):
        try:
            check()
        except ConfigError as exc:
            raise ConfigError(f"section '{name}': {exc}") from None


def _paths(run: Path) -> dict[str, Path]:
    """Where the pipeline asks each stage to write (a stage's result then names what it wrote there)."""
    return {"candidates": run / "candidates.jsonl", "judgements": run / "judgements.jsonl",
            "pairs": run / "pairs.jsonl", "unpaired": run / "unpaired.jsonl", "train": run / "train",
            "eval": run / "eval"}


def _train_method(config: PipelineConfig) -> str:
    from align.train.config import TrainConfig

    return config.train.get("method", TrainConfig.model_fields["method"].default)


def _train_data(config: PipelineConfig) -> str:
    """The pairs stage's output the train method reads: pairs for DPO, unpaired rows for KTO."""
    return "pairs" if _train_method(config) == "dpo" else "unpaired"


def _train_config(config: PipelineConfig, data: Path, output_dir: Path) -> TrainConfig:
    """The train section as the train stage's own TrainConfig (its defaults, its validation)."""
    from align.train import load_train_config

    settings = {"seed": config.seed, **{k: v for k, v in config.train.items() if k != "method"}}
    return load_train_config(_train_method(config), settings, data=str(data), output_dir=str(output_dir))


def run_pipeline(config: PipelineConfig, *, from_stage: str | None = None) -> PipelineResult:
    if from_stage is not None and from_stage not in STAGES:
        raise ConfigError(f"unknown stage {from_stage!r}: choose one of {', '.join(STAGES)}")
    check_sections(config)
    run = config.run_dir
    run.mkdir(parents=True, exist_ok=True)
    manifest = Manifest(run)
    paths = _paths(run)
    prompts = Path(config.generate.get("prompts", ""))
    # Each stage's inputs, read when the stage comes up: the earlier stages' named outputs, as the manifest
    # holds them whether those stages ran now or were skipped as up to date.
    stage_inputs: dict[str, Callable[[], dict[str, Path]]] = {
        "generate": lambda: {"prompts": prompts},
        "label": lambda: {"candidates": manifest.output("generate", "candidates")},
        "pairs": lambda: {"judgements": manifest.output("label", "judgements")},
        "train": lambda: {"data": manifest.output("pairs", _train_data(config))},
        "eval": lambda: {"weights": manifest.output("train", "weights"),
                         "prompts": Path(config.eval.get("prompts", ""))},
    }
    # Each stage reads its inputs (above) and writes where ``paths`` asks; what it wrote, its result names.
    runners: dict[str, Callable[[dict[str, Path]], StageOutput]] = {
        "generate": lambda _: _generate(config, paths["candidates"]),
        "label": lambda given: _label(config, given["candidates"], paths["judgements"]),
        "pairs": lambda given: _pairs(config, given["judgements"], paths["pairs"], paths["unpaired"]),
        "train": lambda given: _train(config, given["data"], paths["train"]),
        "eval": lambda _: _eval(config, manifest.output("train", "run_dir"), paths["eval"], reference=_train_config(
            config, manifest.output("pairs", _train_data(config)), paths["train"]).model),
    }
    ran, skipped = [], []
    forced = STAGES[STAGES.index(from_stage):] if from_stage else ()
    for stage in STAGES:
        given = stage_inputs[stage]()
        inputs = {name: _hash_input(path, stage) for name, path in given.items()}
        settings_hash = stage_settings_hash(config, stage)
        if stage not in forced and manifest.is_current(stage, inputs, settings_hash):
            log.info("stage %s: up to date, skipped", stage)
            skipped.append(stage)
            continue
        fresh = stage in forced or (stage in manifest.stages and manifest.stages[stage].get("status") == "done")
        if fresh:
            _clear_outputs(stage, paths)
        log.info("stage %s: running", stage)
        started = time.time()
        manifest.save(stage, StageRecord("running", inputs, settings_hash, {}, started, versions=_versions()))
        try:
            output = runners[stage](given)
        except PipelineWaiting as waiting:
            manifest.save(stage, StageRecord("waiting", inputs, settings_hash, {}, started, versions=_versions(),
                                             summary={"message": str(waiting)}))
            return PipelineResult(str(run), ran, skipped, {}, None, waiting=str(waiting))
        finished = time.time()
        manifest.save(stage, StageRecord("done", inputs, settings_hash, {k: str(v) for k, v in output.files.items()},
                                         started, finished, round(finished - started, 2), output.summary,
                                         _versions()))
        ran.append(stage)
    eval_metrics = json.loads(manifest.output("eval", "metrics").read_text())
    return PipelineResult(str(run), ran, skipped, eval_metrics, str(manifest.output("eval", "report")))


def stage_settings_hash(config: PipelineConfig, stage: str) -> str:
    """The hash of a stage's settings (and the seed) in the manifest: a change reruns the stage."""
    settings: Any = {"generate": config.generate, "label": _label_settings_hashed(config.label),
                     "pairs": config.pairs.model_dump(mode="json"), "train": config.train,
                     "eval": config.eval}[stage]
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
    owned = {"generate": ["candidates"], "label": ["judgements"], "pairs": ["pairs", "unpaired"],
             "train": ["train"], "eval": ["eval"]}[stage]
    for name in owned:
        path = paths[name]
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


def _train(config: PipelineConfig, data: Path, output_dir: Path) -> StageOutput:
    from align.train.run import train

    # A run stopped part-way continues from its last checkpoint.
    result = train(_train_config(config, data, output_dir), resume=True)
    # Held-out figures before -> after and align.train.diagnosis's warnings (memorised, drifted), so the manifest
    # says whether the student moved, not only that training ran.
    heldout = {key: [result.eval_before.get(key), result.eval_after[key]]
               for key in ("rewards/accuracies", "rewards/margins") if key in result.eval_after}
    # The run says where its weights are (adapter/ for LoRA, model/ for a full fine-tune); eval reads it from here.
    return StageOutput({"weights": Path(result.weights), "run_dir": Path(result.run_dir)},
                       {"steps": result.steps, "final_loss": result.final_loss, "ref_cache": result.ref_cache,
                        "heldout": heldout, "warnings": result.warnings})


def _eval(config: PipelineConfig, train_run: Path, output_dir: Path, *, reference: str) -> StageOutput:
    from align.eval import EvalConfig, run_eval

    # The student is the train stage's run dir: the model layer loads the weights it holds, and eval reads the
    # run's beta from it. The reference is where that run started.
    settings = {"seed": config.seed, "reference": reference,
                **config.eval, "model": str(train_run), "output_dir": output_dir}
    result = run_eval(load_config(EvalConfig, None, (), defaults=settings))
    m = result.metrics
    return StageOutput({name: Path(path) for name, path in result.files.items()}, {
        k: m[k] for k in ("win_rate", "win_rate_ci_low", "win_rate_ci_high", "ties", "kl_per_token")})


def load_pipeline_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> PipelineConfig:
    return load_config(PipelineConfig, path, overrides)
