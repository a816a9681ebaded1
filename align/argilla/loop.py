"""The label stage with people in it: push, wait until enough records are answered, pull.

Nothing is kept locally between runs: the records are on the server under
content-derived ids and the answers with them. So the stage can return
"waiting" and be run again tomorrow; the push is then an update, and the
pull happens once the target is met.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from align.argilla.pull import PullResult, pull
from align.argilla.push import PushResult, push
from align.argilla.remote import iter_records, require_dataset
from align.argilla.settings import ArgillaSettings, connect


@dataclass
class HumanLabelResult:
    pushed: PushResult
    submitted: int
    target: int
    pulled: PullResult | None  # None while waiting

    @property
    def done(self) -> bool:
        return self.pulled is not None

    def lines(self) -> list[str]:
        out = self.pushed.lines()
        if self.pulled is None:
            out.append(f"waiting: {self.submitted} of {self.target} records answered; run this again later to "
                       "pull (nothing is pushed twice)")
        else:
            out.extend(self.pulled.lines())
        return out


def count_answered(settings: ArgillaSettings, dataset: str) -> int:
    """Records whose task distribution is met (``min_submitted`` people submitted an answer)."""
    client = connect(settings)
    ds = require_dataset(client, dataset, settings.workspace)
    return sum(r["status"] == "completed" for r in iter_records(client, ds, include=""))


def label_with_people(candidates: str | Path, dataset: str, output: str | Path, settings: ArgillaSettings, *,
                      target: int, wait_seconds: float = 0.0, poll_seconds: float = 30.0,
                      sleep: Callable[[float], Any] = time.sleep, **push_options: Any) -> HumanLabelResult:
    """Push (idempotent); wait up to ``wait_seconds`` for ``target`` answered records; pull if reached.

    ``wait_seconds=0`` checks once and returns at once: the pipeline stops
    there and resumes on its next run.
    """
    pushed = push(candidates, dataset, settings, **push_options)
    target = min(target, pushed.total_on_server)
    deadline = time.monotonic() + wait_seconds
    while True:
        submitted = count_answered(settings, dataset)
        if submitted >= target or time.monotonic() >= deadline:
            break
        sleep(min(poll_seconds, max(deadline - time.monotonic(), 0.0)))
    if submitted < target:
        return HumanLabelResult(pushed, submitted, target, None)
    return HumanLabelResult(pushed, submitted, target, pull(dataset, output, settings))
