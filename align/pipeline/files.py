"""Where the pipeline asks each stage to write, and clearing what a stage that starts over wrote."""

from __future__ import annotations

import shutil
from pathlib import Path


def _paths(run: Path) -> dict[str, Path]:
    """Where the pipeline asks each stage to write (a stage's result then names what it wrote there); ``run`` is a
    round's folder (round 1's is the run dir itself). A round after the first writes its prompts and each source's
    candidates before merging them into candidates.jsonl."""
    return {"candidates": run / "candidates.jsonl", "judgements": run / "judgements.jsonl",
            "pairs": run / "pairs.jsonl", "unpaired": run / "unpaired.jsonl", "sft": run / "sft.jsonl",
            "train": run / "train", "eval": run / "eval", "export": run / "export", "prompts": run / "prompts.jsonl",
            "candidates_teacher": run / "candidates_teacher.jsonl",
            "candidates_student": run / "candidates_student.jsonl"}


def _round_dir(run: Path, index: int) -> Path:
    """Round ``index``'s folder: round 1 is the run dir itself (as every run dir was before rounds), round k > 1
    ``round-k/`` in it."""
    return run if index == 1 else run / f"round-{index}"


def _clear_outputs(stage: str, paths: dict[str, Path]) -> None:
    """A finished stage whose inputs changed starts over (resumable stages would otherwise keep old rows)."""
    owned = {"generate": ["candidates", "candidates_teacher", "candidates_student"], "label": ["judgements"],
             "pairs": ["pairs", "unpaired"], "select": ["sft"],
             "train": ["train"], "eval": ["eval"], "export": ["export"]}[stage]
    for name in owned:
        _remove(paths[name])


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()
