"""Continuous batching for the server: requests join and leave one running batch between decoding steps.

The decoding itself is :class:`align.generate.decode.DecodeBatch`, the one ``align generate`` uses: each
prompt is prefilled once and its KV cache fanned out to its ``n`` rows, every row samples with its own
settings and seeded random stream and ends at its own ``max_tokens`` or stop strings, finished rows leave
the cache and newcomers join it. So a served answer is sampled the way ``align generate`` samples one, and
an answer does not depend on which other requests shared its batch (up to float rounding).

What is the server's own: jobs arrive while others decode and join the batch as soon as there is room;
every step's tokens go out at once (streaming); a job whose client left is dropped at the next step.

One thread owns the model. HTTP threads :meth:`Scheduler.submit` a :class:`Job` and read its
``events`` queue: a :class:`Token` per generated token, a :class:`Finished` per row, or one
:class:`Failed` for the whole job.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from align.generate.decode import DecodeBatch, DecodeRow, RowRequest, StopStrings

log = logging.getLogger("align.server")


@dataclass(frozen=True)
class Token:
    """Row ``choice`` generated ``token_id`` (``logprob``: {"token_id", "logprob"[, "top_logprobs"]} when asked)."""

    choice: int
    token_id: int
    logprob: dict[str, Any] | None = None


@dataclass(frozen=True)
class Finished:
    choice: int
    reason: str  # "stop" (end of turn or a stop string) | "length"


@dataclass(frozen=True)
class Failed:
    """The whole job ended without an answer (the model failed, or the server is shutting down)."""

    message: str
    status: int = 500


class ShuttingDown(Exception):
    """Raised by :meth:`Scheduler.submit` once the server has stopped taking requests."""


@dataclass(eq=False)
class Job:
    """One HTTP request's rows: ``rows[i].prompt_index`` points into ``prompts``; choice ``i`` is ``rows[i]``."""

    prompts: Sequence[Sequence[int]]
    rows: Sequence[RowRequest]
    max_tokens: int
    stop: Sequence[str] = ()
    logprobs: int | None = None
    events: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        """Drop the job's rows at the next step (its client left); no more events are sent."""
        self.cancelled.set()


@dataclass(eq=False)
class _Row:
    job: Job
    choice: int


class Scheduler:
    """Decodes every submitted job's rows in one continuously refilled batch of at most ``max_batch`` rows.

    ``max_tokens_cap`` bounds every row's length: each row's random stream is drawn that long up front
    (as decode.py draws ``max_new_tokens``), the same width for every row so batches can be joined.
    """

    def __init__(self, engine: Any, *, max_batch: int = 32, max_tokens_cap: int = 4096):
        self.engine = engine
        self.max_batch = max_batch
        self.width = max_tokens_cap
        self._batch = DecodeBatch(engine.model, eos_token_ids=engine.eos_token_ids, pad_token_id=engine.pad_token_id,
                                 stream_length=max_tokens_cap)
        self._cond = threading.Condition()
        self._inbox: deque[Job] = deque()
        self._open: dict[Job, int] = {}  # job -> rows not yet finished (waiting or decoding)
        self._accepting = True
        self._stopping = False
        self._rows: dict[int, _Row] = {}  # row key in the batch -> row, for rows in the batch
        self._ids = itertools.count()
        self.steps = 0  # decoding steps so far (tests and logs)
        self.largest_batch = 0
        self._thread = threading.Thread(target=self._run, name="align-serve-decoder", daemon=True)

    # ------------------------------------------------------------------ for HTTP threads

    def start(self) -> "Scheduler":
        self._thread.start()
        return self

    def submit(self, job: Job) -> Job:
        with self._cond:
            if not self._accepting:
                raise ShuttingDown("the server is shutting down")
            self._inbox.append(job)
            self._open[job] = len(job.rows)
            self._cond.notify_all()
        return job

    @property
    def in_flight(self) -> int:
        with self._cond:
            return len(self._open)

    def close(self, grace: float = 30.0) -> int:
        """Stop taking jobs, let those in flight finish for up to ``grace`` seconds, fail the rest with 503
        and stop the decoding thread. Returns how many jobs were cut short."""
        deadline = time.monotonic() + grace
        with self._cond:
            self._accepting = False
            while self._open and time.monotonic() < deadline:
                self._cond.wait(min(0.1, max(deadline - time.monotonic(), 0.0)))
            self._stopping = True
            self._cond.notify_all()
        self._thread.join(timeout=60)
        with self._cond:
            cut = list(self._open)
            self._open.clear()
        for job in cut:  # the thread is gone (or wedged in a forward pass): nothing else writes these now
            job.events.put(Failed("the server is shutting down; send the request again later", 503))
        return len(cut)

    # ------------------------------------------------------------------ the decoding thread

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and not self._batch.live and not self._inbox:
                    self._cond.wait()
                if self._stopping:
                    return
                admitted = self._take(self._batch.live)
            try:
                if admitted:
                    self._admit(admitted)
                if self._batch.live:
                    self._step()
            except Exception as exc:  # the model failed: fail what was decoding, keep serving
                log.exception("decoding failed")
                jobs = {row.job for row in self._rows.values()} | set(admitted)
                self._rows.clear()
                self._batch.clear()
                for job in jobs:
                    job.events.put(Failed(f"generation failed: {type(exc).__name__}: {exc}"))
                    self._close_job(job, all_rows=True)

    def _take(self, live: int) -> list[Job]:
        """Waiting jobs that fit beside ``live`` rows (whole jobs: a prompt's rows share its prefill)."""
        if live and not self._batch.joinable:
            return []
        taken: list[Job] = []
        room = self.max_batch - live
        while self._inbox:
            job = self._inbox[0]
            if job.cancelled.is_set():
                self._inbox.popleft()
                self._open.pop(job, None)
                self._cond.notify_all()
                continue
            if (taken or live) and len(job.rows) > room:
                break  # a job bigger than max_batch still runs, alone
            taken.append(self._inbox.popleft())
            room -= len(job.rows)
        return taken

    def _admit(self, jobs: list[Job]) -> None:
        """Prefill the jobs' prompts together and join their rows to the batch."""
        prompts: list[tuple[Sequence[int], list[DecodeRow]]] = []
        for job in jobs:
            stopper = StopStrings(self.engine.tokenizer, job.stop) if job.stop else None
            rows: list[list[DecodeRow]] = [[] for _ in job.prompts]
            for choice, row in enumerate(job.rows):
                key = next(self._ids)
                rows[row.prompt_index].append(DecodeRow(key, row.sampling, row.seed, job.max_tokens, stopper,
                                                        job.logprobs))
                self._rows[key] = _Row(job, choice)
            prompts += zip(job.prompts, rows)
        # Longest first, as the teacher does: neighbours in a prefill then pad little.
        self._batch.join(sorted(prompts, key=lambda prompt: -len(prompt[0])))

    def _step(self) -> None:
        """Drop the rows whose clients left, then one token for every live row: send it, retire finished rows."""
        gone = [key for key, row in self._rows.items() if row.job.cancelled.is_set()]
        self._batch.drop(gone)
        for key in gone:
            self._retire(key)
        if not self._batch.live:
            return
        self.largest_batch = max(self.largest_batch, self._batch.live)
        for new in self._batch.step():
            row = self._rows[new.key]
            row.job.events.put(Token(row.choice, new.token_id, new.logprob))
            if new.finish_reason is not None:
                row.job.events.put(Finished(row.choice, new.finish_reason))
                self._retire(new.key)
        self.steps += 1

    def _retire(self, rid: int) -> None:
        self._close_job(self._rows.pop(rid).job)

    def _close_job(self, job: Job, all_rows: bool = False) -> None:
        with self._cond:
            left = 0 if all_rows else self._open.get(job, 1) - 1
            if left <= 0:
                self._open.pop(job, None)
                self._cond.notify_all()
            else:
                self._open[job] = left
