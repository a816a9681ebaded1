"""A training run dir's checkpoints: refuse to overwrite a run by accident, resume from one that finished saving."""

from __future__ import annotations

import logging
from pathlib import Path

from align.errors import AlignError

log = logging.getLogger(__name__)


def prepare_run_dir(output_dir: str | Path, resume: bool) -> Path:
    """The run dir, created; an error when it already holds checkpoints and ``resume`` was not asked for."""
    run_dir = Path(output_dir)
    checkpoints = sorted((run_dir / "checkpoints").glob("checkpoint-*")) if run_dir.exists() else []
    if checkpoints and not resume:
        raise AlignError(f"{run_dir} already holds a run with checkpoints; pass --resume to continue it "
                         "or choose another --output-dir")
    if resume and not checkpoints:
        log.info("--resume: no checkpoint in %s yet, starting from the beginning", run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def last_complete_checkpoint(run_dir: Path) -> str | None:
    """The newest checkpoint that finished saving, or None.

    A kill during a save leaves a checkpoint folder without ``trainer_state.json`` (the Trainer writes it
    last); resuming from that one would fail, so it is skipped and the step is simply trained again.
    """
    def step(path: Path) -> int:
        return int(path.name.rsplit("-", 1)[-1]) if path.name.rsplit("-", 1)[-1].isdigit() else -1

    found = sorted((run_dir / "checkpoints").glob("checkpoint-*"), key=step, reverse=True)
    for checkpoint in found:
        if (checkpoint / "trainer_state.json").exists():
            return str(checkpoint)
        log.warning("%s was not finished saving (killed during the save?); resuming from an earlier one", checkpoint)
    return None
