"""``manifest.json``: each stage's record (status, inputs with SHA-256, settings hash, named outputs, timings,
library versions), and a stage run with its record saying so."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from align.data.io import atomic_path
from align.errors import ConfigError


class PipelineWaiting(Exception):
    """A stage waits for people; run the pipeline again later to carry on."""


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
