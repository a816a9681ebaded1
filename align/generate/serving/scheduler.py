"""Continuous batching for the server: requests join and leave one running batch between decoding steps.

Built from :mod:`align.generate.decode`'s pieces: each prompt is prefilled once and its KV cache fanned
out to its ``n`` rows (``_prefill``), every row samples with its own settings and its own seeded random
stream (``sample_tokens``), finished rows are cut out of the cache and newcomers joined to it
(``_Batch.keep`` / ``_Batch.extend``). So a served answer is sampled the way ``align generate`` samples
one, and an answer does not depend on which other requests shared its batch (up to float rounding).

What differs from ``decode_stream``, which decodes a fixed list of rows with one setting for all: rows
arrive while others decode; each request has its own ``max_tokens``, stop strings and log-probs; every
step's tokens go out at once (streaming); a request whose client left is dropped from the batch at the
next step.

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

import torch

from align.generate.decode import REFILL_FRACTION, RowRequest, StopStrings, _Batch, _mergeable, _prefill, sample_tokens
from align.models import cache_kwarg

log = logging.getLogger("align.server")


@dataclass(frozen=True)
class Token:
    """Row ``choice`` generated ``token_id`` (``logprob``: {"token_id", "logprob", "top_logprobs"} when asked)."""

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
    stopper: StopStrings | None
    token_ids: list[int] = field(default_factory=list)


class Scheduler:
    """Decodes every submitted job's rows in one continuously refilled batch of at most ``max_batch`` rows.

    ``max_tokens_cap`` bounds every row's length: each row's random stream is drawn that long up front
    (as decode.py draws ``max_new_tokens``), the same width for every row so batches can be joined.
    """

    def __init__(self, engine: Any, *, max_batch: int = 32, max_tokens_cap: int = 4096):
        self.engine = engine
        self.model = engine.model
        self.max_batch = max_batch
        self.width = max_tokens_cap
        self.eos = list(engine.eos_token_ids)
        self._cond = threading.Condition()
        self._inbox: deque[Job] = deque()
        self._open: dict[Job, int] = {}  # job -> rows not yet finished (waiting or decoding)
        self._accepting = True
        self._stopping = False
        self._rows: dict[int, _Row] = {}  # global row id -> row, for rows in the batch
        self._ids = itertools.count()
        self._joinable = True  # False once a prefill gave a cache that cannot be joined (then: batch by batch)
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
        batch: _Batch | None = None
        while True:
            with self._cond:
                while not self._stopping and batch is None and not self._inbox:
                    self._cond.wait()
                if self._stopping:
                    return
                admitted = self._take(0 if batch is None else self._live(batch))
            try:
                if admitted:
                    batch = self._admit(batch, admitted)
                if batch is not None:
                    batch = self._step(batch)
            except Exception as exc:  # the model failed: fail what was decoding, keep serving
                log.exception("decoding failed")
                jobs = {row.job for row in self._rows.values()} | set(admitted)
                self._rows.clear()
                batch = None
                for job in jobs:
                    job.events.put(Failed(f"generation failed: {type(exc).__name__}: {exc}"))
                    self._close_job(job, all_rows=True)

    def _live(self, batch: _Batch) -> int:
        return len(batch) - int(batch.done.sum())

    def _take(self, live: int) -> list[Job]:
        """Waiting jobs that fit beside ``live`` rows (whole jobs: a prompt's rows share its prefill)."""
        if live and not self._joinable:
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

    def _admit(self, batch: _Batch | None, jobs: list[Job]) -> _Batch:
        """Prefill the jobs' prompts together and join their rows to the batch."""
        prompts: dict[int, Sequence[int]] = {}
        by_prompt: dict[int, list[int]] = {}
        rows: dict[int, RowRequest] = {}
        for job in jobs:
            prompt_ids = [next(self._ids) for _ in job.prompts]
            for p, ids in zip(prompt_ids, job.prompts):
                prompts[p], by_prompt[p] = ids, []
            stopper = StopStrings(self.engine.tokenizer, job.stop) if job.stop else None
            for choice, row in enumerate(job.rows):
                rid = next(self._ids)
                rows[rid] = RowRequest(prompt_ids[row.prompt_index], row.sampling, row.seed)
                by_prompt[prompt_ids[row.prompt_index]].append(rid)
                self._rows[rid] = _Row(job, choice, stopper)
        # Longest first, as the teacher does: neighbours in a prefill then pad little.
        order = sorted((p for p in by_prompt if by_prompt[p]), key=lambda p: -len(prompts[p]))
        fresh = _prefill(self.model, prompts, order, by_prompt, rows, self.width, self.engine.pad_token_id,
                         self.model.device)
        self._joinable = self._joinable and _mergeable(fresh.cache)
        if batch is None or self._live(batch) == 0:
            return fresh
        batch.keep((~batch.done).nonzero().squeeze(1))
        batch.extend(fresh)
        return batch

    @torch.inference_mode()
    def _step(self, batch: _Batch) -> _Batch | None:
        """Sample one token for every live row, send it, retire finished rows, run the model one step."""
        row_ids = batch.rows.tolist()
        for position, rid in enumerate(row_ids):  # clients that left: their rows go now
            if not batch.done[position] and self._rows[rid].job.cancelled.is_set():
                batch.done[position] = True
                self._retire(rid)
        if bool(batch.done.all()):
            return None
        self.largest_batch = max(self.largest_batch, self._live(batch))

        uniform = batch.uniforms.gather(1, batch.steps.clamp(max=self.width - 1)[:, None]).squeeze(1)
        tokens = sample_tokens(batch.logits, batch.temperature, batch.top_p, batch.top_k, uniform)
        entries = self._logprobs(batch, row_ids, tokens)
        finished = torch.zeros_like(batch.done)
        for position, (rid, token) in enumerate(zip(row_ids, tokens.tolist())):
            if batch.done[position]:
                continue
            row = self._rows[rid]
            row.token_ids.append(token)
            reason = None
            if token in self.eos or (row.stopper is not None and row.stopper.hit(row.token_ids)):
                reason = "stop"
            elif len(row.token_ids) >= row.job.max_tokens:
                reason = "length"
            row.job.events.put(Token(row.choice, token, entries[position] if entries else None))
            if reason is not None:
                row.job.events.put(Finished(row.choice, reason))
                finished[position] = True
                self._retire(rid)
        batch.done |= finished
        batch.steps += 1
        self.steps += 1
        if bool(batch.done.all()):
            return None
        if int(batch.done.sum()) >= max(1, REFILL_FRACTION * len(batch)):
            keep = (~batch.done).nonzero().squeeze(1)
            batch.keep(keep)
            tokens = tokens[keep]
        batch.attention_mask = torch.cat([batch.attention_mask, batch.attention_mask.new_ones((len(batch), 1))], 1)
        batch.logits = self.model(input_ids=tokens[:, None], attention_mask=batch.attention_mask,
                                  position_ids=batch.next_position[:, None], use_cache=True,
                                  **{cache_kwarg(self.model): batch.cache}).logits[:, -1, :].float()
        batch.next_position = batch.next_position + 1
        return batch

    def _logprobs(self, batch: _Batch, row_ids: list[int], tokens: torch.Tensor) -> list[dict[str, Any] | None]:
        """Per position, the model's own log-prob of its token (temperature 1, as decode.py reports) and the
        row's top alternatives, for the rows that asked; [] when none did."""
        wanted = [None if batch.done[p] else self._rows[rid].job.logprobs for p, rid in enumerate(row_ids)]
        if all(w is None for w in wanted):
            return []
        logp = torch.log_softmax(batch.logits, dim=-1)
        chosen = logp.gather(1, tokens[:, None]).squeeze(1).tolist()
        k = max(w for w in wanted if w is not None)
        top_values, top_ids = logp.topk(k, dim=-1) if k else (None, None)
        top_values = top_values.tolist() if k else None
        top_ids = top_ids.tolist() if k else None
        out: list[dict[str, Any] | None] = []
        for p, (token, want) in enumerate(zip(tokens.tolist(), wanted)):
            if want is None:
                out.append(None)
                continue
            top = [{"token_id": t, "logprob": v} for t, v in zip(top_ids[p][:want], top_values[p][:want])] if want else []
            out.append({"token_id": token, "logprob": chosen[p], "top_logprobs": top})
        return out

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
