"""Metrics that always land in the run dir (``metrics.jsonl``), whatever else ``report_to`` says."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from align.data.io import JsonlAppender, atomic_path, dumps, iter_rows


class MetricsFileCallback(TrainerCallback):
    """Appends every log event to ``metrics.jsonl`` with its step, adding tokens/s.

    On a resumed run, entries logged after the checkpoint being resumed are
    dropped first, so the file reads as one uninterrupted run.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._last: tuple[float, float] | None = None  # (time, num_tokens) at the previous log

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not state.is_world_process_zero or not self.path.exists():
            return
        kept = [row for _, row in iter_rows(self.path, tolerate_torn_tail=True) if row.get("step", 0) <= state.global_step]
        with atomic_path(self.path) as tmp:
            tmp.write_text("".join(dumps(r) + "\n" for r in kept))

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if not state.is_world_process_zero or not logs:
            return
        row = {"step": state.global_step, "epoch": state.epoch, "time": round(time.time(), 3), **logs}
        now, tokens = time.time(), logs.get("num_tokens")
        if tokens is not None:
            if self._last is not None and now > self._last[0] and tokens > self._last[1]:
                row["tokens_per_second"] = round((tokens - self._last[1]) / (now - self._last[0]), 1)
            self._last = (now, tokens)
        with JsonlAppender(self.path) as out:
            out.append(row)


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    if not Path(path).exists():
        return []
    return [row for _, row in iter_rows(path, tolerate_torn_tail=True)]


def configure_wandb(report_to: list[str], run_dir: str) -> str | None:
    """wandb without a network or a key runs offline into the run dir instead of failing.

    Called before any model loads, so a missing wandb (an optional extra) stops the run here with
    the install line, not after loading, in TRL's callback.
    """
    if "wandb" not in report_to:
        return None
    from align import extras

    extras.wandb()
    os.environ.setdefault("WANDB_DIR", run_dir)
    if not os.environ.get("WANDB_API_KEY") and not os.environ.get("WANDB_MODE"):
        os.environ["WANDB_MODE"] = "offline"
    return os.environ.get("WANDB_MODE", "online")
