"""Where the pipeline asks each stage to write, and clearing what a stage that starts over wrote."""

from __future__ import annotations

import shutil
from pathlib import Path


def _paths(run: Path) -> dict[str, Path]:
    """Where the pipeline asks each stage to write (a stage's result then names what it wrote there)."""
    return {"candidates": run / "candidates.jsonl", "judgements": run / "judgements.jsonl",
            "pairs": run / "pairs.jsonl", "unpaired": run / "unpaired.jsonl", "sft": run / "sft.jsonl",
            "train": run / "train", "eval": run / "eval"}


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
