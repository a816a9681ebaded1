"""The model side of the server, without HTTP: a validated request becomes a scheduler job, and the
job's events become an OpenAI response or a stream of chunks."""

from __future__ import annotations

import queue
import random
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from align.generate.decode import RowRequest
from align.generate.plan import derive_seed
from align.generate.serving.requests import CompletionRequest, RequestError
from align.generate.serving.responses import ChoiceText, ResponseWriter
from align.generate.serving.scheduler import Failed, Finished, Job, Scheduler, ShuttingDown, Token

DEFAULT_MAX_TOKENS = 256
POLL_S = 0.2  # how often a waiting request checks that its client is still there

Gone = Callable[[], bool]


class ClientGone(Exception):
    """The client closed its connection: its job was cancelled."""


class Service:
    def __init__(self, engine: Any, scheduler: Scheduler, served_name: str, *,
                 default_max_tokens: int = DEFAULT_MAX_TOKENS):
        self.engine = engine
        self.scheduler = scheduler
        self.served_name = served_name
        self.default_max_tokens = default_max_tokens
        self._tokenizer_lock = threading.Lock()  # HTTP threads encode at once; fast tokenizers may refuse that

    def models(self) -> dict[str, Any]:
        return {"object": "list", "data": [{"id": self.served_name, "object": "model", "created": int(time.time()),
                                            "owned_by": "align", "max_model_len": self.engine.max_length}]}

    def start(self, request: CompletionRequest) -> "Running":
        """Encode the prompts, check they fit, and hand the job to the scheduler (answers arrive as events)."""
        field = "messages" if request.kind == "chat" else "prompt"
        with self._tokenizer_lock:
            try:
                if request.kind == "chat":
                    prompts = [self.engine.encode(request.messages)]
                else:
                    prompts = [self.engine.encode_text(p) for p in request.prompts or []]
            except Exception as exc:  # a chat template that refuses these messages (roles, order) says why
                raise RequestError(f"'{field}' cannot be rendered for this model: {type(exc).__name__}: {exc}",
                                   field) from None
        longest = max(len(p) for p in prompts)
        if not longest:
            raise RequestError(f"'{field}' encodes to no tokens", field)
        room = self.scheduler.width
        if self.engine.max_length:
            if longest >= self.engine.max_length:
                raise RequestError(f"the prompt has {longest} tokens; the model's context is "
                                   f"{self.engine.max_length}", field)
            room = min(room, self.engine.max_length - longest)
        max_tokens = min(request.max_tokens or self.default_max_tokens, room)
        base = request.seed if request.seed is not None else random.getrandbits(62)
        rows = [RowRequest(p, request.sampling, derive_seed(base + p, i))
                for p in range(len(prompts)) for i in range(request.n)]
        job = Job(prompts, rows, max_tokens, request.stop, request.logprobs)
        try:
            self.scheduler.submit(job)
        except ShuttingDown as exc:
            raise RequestError(f"{exc}; send the request again later", status=503) from None
        return Running(self, request, job, sum(len(p) for p in prompts))


class Running:
    """A submitted request: read its answer whole (:meth:`response`) or as chunks (:meth:`chunks`)."""

    def __init__(self, service: Service, request: CompletionRequest, job: Job, prompt_tokens: int):
        self.request = request
        self.job = job
        self.prompt_tokens = prompt_tokens
        self.choices = [ChoiceText(service.engine, request.stop) for _ in job.rows]
        self.writer = ResponseWriter(service.engine, request.kind, request.model or service.served_name,
                                     request.logprobs is not None, request.include_usage)

    def cancel(self) -> None:
        self.job.cancel()

    def response(self, gone: Gone | None = None) -> dict[str, Any]:
        for _ in self._events(gone):
            pass
        return self.writer.response(self.choices, self.prompt_tokens)

    def chunks(self, gone: Gone | None = None) -> Iterator[dict[str, Any]]:
        """Stream chunks: the role first (chat), then each choice's new text as it settles, its finish
        reason with its last text, and the token counts last when ``stream_options.include_usage``."""
        if self.request.kind == "chat":
            for i in range(len(self.choices)):
                yield self.writer.chunk(i, "", [], role=True)
        touched: dict[int, None] = {}
        for event in self._events(gone, batched=True):
            if event is None:  # the events that were waiting are in: send what they settled
                for i in touched:
                    choice = self.choices[i]
                    text, entries = choice.pending()
                    if text or entries or choice.finish_reason:
                        yield self.writer.chunk(i, text, entries, choice.finish_reason)
                touched.clear()
            else:
                touched[event.choice] = None
        if self.request.include_usage:
            yield self.writer.usage_chunk(self.prompt_tokens, self.choices)

    def _events(self, gone: Gone | None, batched: bool = False) -> Iterator[Token | Finished | None]:
        """The job's events, applied to the choices, until every choice is finished. With ``batched``, a
        ``None`` follows each run of events that were already waiting (one chunk per choice per run).
        Raises RequestError when the job failed, ClientGone when ``gone()`` says the client left."""
        unfinished = len(self.choices)
        complete = False
        checked = time.monotonic()
        try:
            while unfinished:
                if gone is not None and time.monotonic() - checked >= POLL_S:
                    if gone():
                        raise ClientGone()
                    checked = time.monotonic()
                try:
                    event = self.job.events.get(timeout=POLL_S)
                except queue.Empty:
                    continue
                while True:
                    if isinstance(event, Failed):
                        raise RequestError(event.message, status=event.status)
                    if isinstance(event, Token):
                        self.choices[event.choice].add(event)
                    else:
                        self.choices[event.choice].finish(event.reason)
                        unfinished -= 1
                    yield event
                    try:
                        event = self.job.events.get_nowait()
                    except queue.Empty:
                        break
                if batched:
                    yield None
            complete = True
        finally:
            if not complete:
                self.job.cancel()
