"""Metrics that always land in the run dir (``metrics.jsonl``), whatever else ``report_to`` says."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
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


WANDB_PROJECT = "align"  # training (TRL's callback reads WANDB_PROJECT) and eval log to the same project
WANDB_HOST = "api.wandb.ai"


def configure_wandb(report_to: list[str], run_dir: str) -> str | None:
    """Set up wandb for a run: online when the user is logged in, offline into the run dir otherwise.

    Called before any model loads, so a missing wandb (an optional extra) stops the run here with
    the install line, not after loading, in TRL's callback. Returns the mode, None when not asked for.
    """
    if "wandb" not in report_to:
        return None
    from align import extras

    extras.wandb()
    os.environ.setdefault("WANDB_DIR", run_dir)
    os.environ.setdefault("WANDB_PROJECT", WANDB_PROJECT)
    os.environ.setdefault("WANDB_MODE", "online" if wandb_logged_in() else "offline")
    return os.environ["WANDB_MODE"]


def wandb_logged_in() -> bool:
    """Whether wandb has a key: ``WANDB_API_KEY``, or the entry ``wandb login`` writes to the netrc file
    (``NETRC`` or ~/.netrc) for its server (``WANDB_BASE_URL``'s host, or api.wandb.ai). Without one, wandb
    would stop the run to ask for a key; with one the user expects their runs online."""
    import netrc
    from urllib.parse import urlparse

    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "")).hostname or WANDB_HOST
    path = Path(os.environ.get("NETRC") or Path.home() / ".netrc")
    try:
        entry = netrc.netrc(str(path)).authenticators(host)
    except (OSError, netrc.NetrcParseError):  # no netrc file, or one wandb could not read either
        return False
    return bool(entry and entry[2])


@contextmanager
def wandb_group(name: str) -> Iterator[None]:
    """Every wandb run started inside (training, through TRL's callback, and eval) joins the group ``name``, so
    one pipeline's runs show together in the project; a ``WANDB_RUN_GROUP`` the user set is kept."""
    if os.environ.get("WANDB_RUN_GROUP"):
        yield
        return
    os.environ["WANDB_RUN_GROUP"] = name
    try:
        yield
    finally:
        os.environ.pop("WANDB_RUN_GROUP", None)
