"""Batched decoding with a transformers causal LM, built for many candidates per prompt.

Why not ``model.generate``: it prefills every copy of a prompt when asked for
``num_return_sequences``, keeps computing rows that have already finished, waits
for the longest row of a batch before starting the next, and samples a whole
batch with one setting and one random stream. Here

* each prompt is prefilled once and its KV cache copied to its candidate rows;
* each step's keys and values are written into spare room in the cache, not
  appended by copying the whole cache (align.generate.kv_cache);
* finished rows leave the batch and waiting prompts take their places
  (continuous batching: the cache is compacted and refilled once a quarter of
  the batch is free, so each copy pays for itself);
* every row has its own temperature / top-p / top-k (greedy and sampled rows
  share a batch) and its own random stream seeded per candidate, so a
  candidate's text does not depend on which other rows it was batched with.

Log-probs, when asked for, are the model's own distribution (temperature 1,
no top-p): what distillation needs, and what vLLM and OpenAI report.

:class:`DecodeBatch` is the one step loop: rows join between steps, each step
gives every live row a token and says which rows finished. :func:`decode_stream`
feeds it a fixed list of rows (``align generate``); ``align serve``'s scheduler
feeds it requests as they arrive.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from align.generate.config import SamplingParams
from align.generate.kv_cache import GrowingLayer, growing_cache
from align.models import cache_kwarg

REFILL_FRACTION = 0.25
NUCLEUS_WINDOW = 256


@dataclass(frozen=True)
class RowRequest:
    """One sequence to generate: which prompt (index into the prompt list), how, with which seed."""

    prompt_index: int
    sampling: SamplingParams
    seed: int


@dataclass
class RowOutput:
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str = "length"
    # Per token: {"token_id", "logprob", "top_logprobs": [{"token_id", "logprob"}, ...]}
    logprobs: list[dict[str, Any]] | None = None


def sample_tokens(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor, top_k: torch.Tensor,
                  uniform: torch.Tensor) -> torch.Tensor:
    """Next token per row: argmax where temperature is 0, else inverse-CDF sampling with the row's uniform."""
    tokens = logits.argmax(dim=-1)
    sampled = temperature > 0
    if not sampled.any():
        return tokens
    where = sampled.nonzero().squeeze(1)
    probs = torch.softmax(logits[where] / temperature[where, None], dim=-1)
    p, k, u = top_p[where], top_k[where], uniform[where]
    chosen = torch.empty(len(where), dtype=torch.long, device=logits.device)
    # Plain sampling needs no ordering: inverse CDF over the vocabulary as it is.
    plain = (p >= 1.0) & (k == 0)
    if plain.any():
        chosen[plain] = _inverse_cdf(probs[plain], u[plain])
    cut = ~plain
    if cut.any():
        chosen[cut] = _truncated(probs[cut], p[cut], k[cut], u[cut])
    tokens[where] = chosen
    return tokens


def _truncated(probs: torch.Tensor, top_p: torch.Tensor, top_k: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """Top-p / top-k sampling. Sorting 49k probabilities costs ~5 ms a row on a CPU, and the nucleus
    nearly always lies among the few hundred likeliest tokens, so sort only those unless it does not."""
    window = min(NUCLEUS_WINDOW, probs.shape[-1])
    sorted_probs, order = probs.topk(window, dim=-1)
    cumulative = sorted_probs.cumsum(dim=-1)
    fits = (cumulative[:, -1] >= top_p) | ((top_k > 0) & (top_k <= window))
    if bool(fits.all()):
        return _nucleus(sorted_probs, order, cumulative, top_p, top_k, uniform)
    tokens = torch.empty(len(probs), dtype=torch.long, device=probs.device)
    if fits.any():
        tokens[fits] = _nucleus(sorted_probs[fits], order[fits], cumulative[fits], top_p[fits], top_k[fits],
                                uniform[fits])
    wide = ~fits
    sorted_probs, order = probs[wide].sort(dim=-1, descending=True)
    tokens[wide] = _nucleus(sorted_probs, order, sorted_probs.cumsum(dim=-1), top_p[wide], top_k[wide], uniform[wide])
    return tokens


def _inverse_cdf(probs: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    cumulative = probs.cumsum(dim=-1)
    position = torch.searchsorted(cumulative, (uniform * cumulative[:, -1])[:, None]).squeeze(1)
    return position.clamp(max=probs.shape[-1] - 1)


def _nucleus(sorted_probs: torch.Tensor, order: torch.Tensor, cumulative: torch.Tensor, top_p: torch.Tensor,
             top_k: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """Sample from the kept prefix of probabilities sorted in descending order (``order`` maps back to ids)."""
    # Nucleus: the smallest prefix whose mass reaches top_p (the first token always stays); then top-k.
    kept = ((cumulative - sorted_probs) < top_p[:, None]).sum(dim=-1)
    kept = torch.where(top_k > 0, torch.minimum(kept, top_k), kept)
    last = kept - 1
    total = cumulative.gather(1, last[:, None])
    position = torch.searchsorted(cumulative, uniform[:, None] * total).squeeze(1)
    position = torch.minimum(position, last)
    return order.gather(1, position[:, None]).squeeze(1)


class StopStrings:
    """Stops a row once its decoded text contains one of ``stop`` (OpenAI's ``stop`` parameter)."""

    def __init__(self, tokenizer: Any, stop: Sequence[str]):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        # A stop string spans at most len(s) tokens; decode a little more than that from the end.
        self.window = max((len(s) for s in self.stop), default=0) + 8

    def hit(self, token_ids: list[int]) -> bool:
        tail = self.tokenizer.decode(token_ids[-self.window:], skip_special_tokens=True)
        return any(s in tail for s in self.stop)

    def cut(self, text: str) -> str:
        """The text before the first stop string (the stop string itself is not returned)."""
        positions = [text.find(s) for s in self.stop if s in text]
        return text[: min(positions)] if positions else text


@dataclass(frozen=True)
class DecodeRow:
    """A row for :class:`DecodeBatch`: the caller's ``key`` for it (unique among the batch's rows), how it
    samples (its own settings and seeded random stream) and when it ends: the end-of-turn token, a ``stop``
    string, or ``max_tokens``. ``logprobs``: None for none, else each token's log-prob and that many
    likeliest alternatives."""

    key: int
    sampling: SamplingParams
    seed: int
    max_tokens: int
    stop: StopStrings | None = None
    logprobs: int | None = None


@dataclass(frozen=True)
class NewToken:
    """A row's token from one :meth:`DecodeBatch.step`; ``finish_reason`` ("stop" | "length") when it was
    the row's last. ``logprob``: {"token_id", "logprob"[, "top_logprobs": [{"token_id", "logprob"}, ...]]}
    when the row asked for log-probs."""

    key: int
    token_id: int
    logprob: dict[str, Any] | None
    finish_reason: str | None


class DecodeBatch:
    """Rows decoding together over one KV cache: rows :meth:`join` between steps (each prompt prefilled
    once, its cache fanned out to its rows), every :meth:`step` gives each live row one token, and rows
    leave when they finish or are :meth:`drop`-ped. ``align generate`` (:func:`decode_stream`) and
    ``align serve`` (its scheduler) both decode with it; each decides who joins when.

    ``stream_length``: how many uniforms each row's random stream holds (drawn up front, the same width
    for every row so batches can be joined); a row's ``max_tokens`` should not exceed it.
    """

    def __init__(self, model: Any, *, eos_token_ids: Sequence[int], pad_token_id: int, stream_length: int):
        self.model = model
        self.eos_token_ids = list(eos_token_ids)
        self.pad_token_id = pad_token_id
        self.stream_length = stream_length
        self.joinable = True  # False once a prefill gave a cache that cannot be joined: then batch by batch
        self._state: _BatchState | None = None
        self._rows: dict[int, _LiveRow] = {}  # key -> row, for the live rows
        self._pending: torch.Tensor | None = None  # last step's tokens, not yet run through the model

    @property
    def live(self) -> int:
        return len(self._rows)

    @torch.inference_mode()
    def join(self, prompts: Sequence[tuple[Sequence[int], Sequence[DecodeRow]]]) -> None:
        """Prefill ``(prompt token ids, its rows)`` together (left padded, in the order given) and add the rows."""
        prompts = [(ids, rows) for ids, rows in prompts if rows]
        if not prompts:
            return
        joining = [row for _, rows in prompts for row in rows]
        if any(row.key in self._rows for row in joining) or len({row.key for row in joining}) < len(joining):
            raise ValueError("a row's key is already in use in this batch")
        self._advance()
        fresh = _prefill(self.model, prompts, self.stream_length, self.pad_token_id)
        self.joinable = self.joinable and _mergeable(fresh.cache)
        if self._state is None or not self._rows:
            self._state = fresh
        else:
            self._state.keep((~self._state.done).nonzero().squeeze(1))
            self._state.extend(fresh)
        self._rows.update((row.key, _LiveRow(row)) for row in joining)

    @torch.inference_mode()
    def drop(self, keys: Sequence[int]) -> None:
        """Rows that are not wanted any more (their client left) stop here, without a last token."""
        if self._state is None or not keys:
            return
        for key in keys:
            self._rows.pop(key, None)
        self._state.done |= torch.isin(self._state.rows, torch.tensor(list(keys), device=self._state.rows.device))
        if not self._rows:
            self.clear()

    def clear(self) -> None:
        """Forget every row (after a failure)."""
        self._state, self._pending = None, None
        self._rows.clear()

    @torch.inference_mode()
    def step(self, compact: bool = True) -> list[NewToken]:
        """One token for every live row, in batch order; finished rows leave. ``compact=False`` leaves them
        in the cache until the next :meth:`join` cuts them out; otherwise they are cut once a quarter of the
        batch has finished. The model runs on these tokens at the start of the next step or join, so a
        caller can hand them out first."""
        self._advance()
        state = self._state
        if state is None or not self._rows:
            return []
        uniform = state.uniforms.gather(1, state.steps.clamp(max=self.stream_length - 1)[:, None]).squeeze(1)
        tokens = sample_tokens(state.logits, state.temperature, state.top_p, state.top_k, uniform)
        keys, done = state.rows.tolist(), state.done.tolist()
        entries = self._logprobs(state.logits, tokens, [None if d else self._rows[k].row.logprobs
                                                        for k, d in zip(keys, done)])
        new: list[NewToken] = []
        for position, (key, token) in enumerate(zip(keys, tokens.tolist())):
            if done[position]:
                continue
            live = self._rows[key]
            live.token_ids.append(token)
            reason = None
            if token in self.eos_token_ids or (live.row.stop is not None and live.row.stop.hit(live.token_ids)):
                reason = "stop"
            elif len(live.token_ids) >= live.row.max_tokens:
                reason = "length"
            if reason is not None:
                done[position] = True
                del self._rows[key]
            new.append(NewToken(key, token, entries[position], reason))
        state.done = torch.tensor(done, dtype=torch.bool, device=state.done.device)
        state.steps += 1
        if not self._rows:
            self._state = None
            return new
        if compact and done.count(True) >= max(1, REFILL_FRACTION * len(state)):
            keep = (~state.done).nonzero().squeeze(1)
            state.keep(keep)
            tokens = tokens[keep]
        self._pending = tokens
        return new

    def _advance(self) -> None:
        """Run the model one step on the tokens the last step sampled: every row's next logits."""
        tokens, self._pending = self._pending, None
        state = self._state
        if tokens is None or state is None:
            return
        state.attention_mask = torch.cat([state.attention_mask, state.attention_mask.new_ones((len(state), 1))], 1)
        state.logits = self.model(input_ids=tokens[:, None], attention_mask=state.attention_mask,
                                  position_ids=state.next_position[:, None], use_cache=True,
                                  **{cache_kwarg(self.model): state.cache}).logits[:, -1, :].float()
        state.next_position = state.next_position + 1

    @staticmethod
    def _logprobs(logits: torch.Tensor, tokens: torch.Tensor, wanted: list[int | None]
                  ) -> list[dict[str, Any] | None]:
        """Per position, the model's own log-prob of its token (temperature 1) and the ``wanted`` likeliest
        alternatives, for the rows that asked."""
        if all(w is None for w in wanted):
            return [None] * len(wanted)
        logp = torch.log_softmax(logits, dim=-1)
        chosen = logp.gather(1, tokens[:, None]).squeeze(1).tolist()
        top = max(w for w in wanted if w is not None)
        if top:
            top_values, top_ids = (t.tolist() for t in logp.topk(top, dim=-1))
        out: list[dict[str, Any] | None] = []
        for position, (token, want) in enumerate(zip(tokens.tolist(), wanted)):
            if want is None:
                out.append(None)
                continue
            entry: dict[str, Any] = {"token_id": token, "logprob": chosen[position]}
            if want:
                entry["top_logprobs"] = [{"token_id": t, "logprob": v}
                                         for t, v in zip(top_ids[position][:want], top_values[position][:want])]
            out.append(entry)
        return out


@dataclass
class _LiveRow:
    row: DecodeRow
    token_ids: list[int] = field(default_factory=list)


@dataclass
class _BatchState:
    """A DecodeBatch's tensors, aligned to its rows (finished ones too, until cut); compacted and extended together."""

    rows: torch.Tensor  # batch position -> row key
    steps: torch.Tensor  # tokens generated so far by each row
    done: torch.Tensor
    attention_mask: torch.Tensor  # (batch, cache width), left padded
    next_position: torch.Tensor
    temperature: torch.Tensor
    top_p: torch.Tensor
    top_k: torch.Tensor
    uniforms: torch.Tensor  # (batch, stream_length): each row's own random stream, drawn up front
    logits: torch.Tensor  # the next-token logits of every row
    cache: Any

    TENSORS = ("rows", "steps", "done", "attention_mask", "next_position", "temperature", "top_p", "top_k",
               "uniforms", "logits")

    def __len__(self) -> int:
        return len(self.rows)

    def keep(self, index: torch.Tensor) -> None:
        for name in self.TENSORS:
            setattr(self, name, getattr(self, name)[index])
        self.cache.batch_select_indices(index)
        # Columns that are padding for every remaining row only cost attention: cut them.
        used = self.attention_mask.any(dim=0).nonzero()
        first = int(used[0]) if len(used) else self.attention_mask.shape[1]
        if first > 0:
            self.attention_mask = self.attention_mask[:, first:]
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[:, :, first:], layer.values[:, :, first:]

    def extend(self, other: "_BatchState") -> None:
        """Append rows; the narrower cache is left padded (masked) to the wider one's width."""
        width = max(self.attention_mask.shape[1], other.attention_mask.shape[1])
        for mine, theirs in zip(self.cache.layers, other.cache.layers):
            mine.keys = torch.cat([_left_pad(mine.keys, width, 2), _left_pad(theirs.keys, width, 2)])
            mine.values = torch.cat([_left_pad(mine.values, width, 2), _left_pad(theirs.values, width, 2)])
        self.attention_mask = torch.cat([_left_pad(self.attention_mask, width, 1),
                                         _left_pad(other.attention_mask, width, 1)])
        for name in self.TENSORS:
            if name != "attention_mask":
                setattr(self, name, torch.cat([getattr(self, name), getattr(other, name)]))


def _left_pad(tensor: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    missing = width - tensor.shape[dim]
    if missing == 0:
        return tensor
    pad = [0, 0] * (tensor.dim() - 1 - dim) + [missing, 0]
    return F.pad(tensor, pad)


def _mergeable(cache: Any) -> bool:
    """Only plain full-attention layers can be padded and joined (not sliding windows or linear attention)."""
    return all(type(layer) is GrowingLayer for layer in cache.layers)


def _prefill(model: Any, prompts: Sequence[tuple[Sequence[int], Sequence[DecodeRow]]], stream_length: int,
             pad_token_id: int) -> _BatchState:
    """Run the prompts once (left padded together) and fan each out to its rows."""
    device = model.device
    width = max(len(ids) for ids, _ in prompts)
    input_ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, (ids, _) in enumerate(prompts):
        input_ids[i, width - len(ids):] = torch.tensor(list(ids), dtype=torch.long)
        attention_mask[i, width - len(ids):] = 1
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    cache = growing_cache(model.config)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                   use_cache=True, logits_to_keep=1, **{cache_kwarg(model): cache}).logits[:, -1, :].float()

    chosen = [row for _, rows in prompts for row in rows]
    fan_out = torch.tensor([k for k, (_, rows) in enumerate(prompts) for _ in rows], device=device)
    cache.batch_select_indices(fan_out)
    uniforms = torch.stack([torch.rand(stream_length, generator=torch.Generator().manual_seed(r.seed))
                            for r in chosen]).to(device)
    return _BatchState(
        rows=torch.tensor([r.key for r in chosen], device=device),
        steps=torch.zeros(len(chosen), dtype=torch.long, device=device),
        done=torch.zeros(len(chosen), dtype=torch.bool, device=device), attention_mask=attention_mask[fan_out],
        next_position=position_ids[fan_out, -1] + 1,
        temperature=torch.tensor([r.sampling.temperature for r in chosen], device=device),
        top_p=torch.tensor([r.sampling.top_p for r in chosen], device=device),
        top_k=torch.tensor([r.sampling.top_k for r in chosen], device=device),
        uniforms=uniforms, logits=logits[fan_out], cache=cache,
    )


def decode_stream(model: Any, prompts: Sequence[Sequence[int]], rows: Sequence[RowRequest], *, batch_size: int,
                  max_new_tokens: int, eos_token_ids: Sequence[int], pad_token_id: int, logprobs: int | None = None,
                  stop: StopStrings | None = None, on_tokens: Callable[[int], None] | None = None
                  ) -> Iterator[tuple[int, RowOutput]]:
    """Generate every row, yielding ``(row index, output)`` as each finishes.

    Prompts are admitted in the order their rows first appear (sort them by
    length beforehand), all candidates of a prompt together, each prompt
    prefilled once; up to ``batch_size`` rows decode at a time.
    """
    by_prompt: dict[int, list[int]] = {}
    for i, row in enumerate(rows):
        by_prompt.setdefault(row.prompt_index, []).append(i)
    waiting = deque(by_prompt)
    outputs: dict[int, RowOutput] = {}
    batch = DecodeBatch(model, eos_token_ids=eos_token_ids, pad_token_id=pad_token_id, stream_length=max_new_tokens)

    while True:
        room = batch_size - batch.live
        wanted = max(len(by_prompt[waiting[0]]), batch_size * REFILL_FRACTION) if waiting else 0
        # Refill once a quarter of the batch is free (each join copies the cache); a cache that cannot be
        # joined runs until it empties.
        if waiting and (batch.live == 0 or (batch.joinable and room >= wanted)):
            admitted: list[int] = []
            while waiting and (not admitted or len(by_prompt[waiting[0]]) <= room):
                room -= len(by_prompt[waiting[0]])
                admitted.append(waiting.popleft())
            batch.join([(prompts[p], [DecodeRow(i, rows[i].sampling, rows[i].seed, max_new_tokens, stop, logprobs)
                                      for i in by_prompt[p]]) for p in admitted])
            for p in admitted:
                for i in by_prompt[p]:
                    outputs[i] = RowOutput(logprobs=[] if logprobs is not None else None)
        if batch.live == 0:
            return
        new = batch.step(compact=not waiting)
        if on_tokens is not None:
            on_tokens(len(new))
        for token in new:
            out = outputs[token.key]
            out.token_ids.append(token.token_id)
            if token.logprob is not None:
                out.logprobs.append(token.logprob)  # type: ignore[union-attr]
            if token.finish_reason is not None:
                out.finish_reason = token.finish_reason
                yield token.key, outputs.pop(token.key)


def generate_rows(model: Any, prompts: Sequence[Sequence[int]], rows: Sequence[RowRequest], *,
                  max_new_tokens: int, eos_token_ids: Sequence[int], pad_token_id: int,
                  logprobs: int | None = None, stop: StopStrings | None = None,
                  on_tokens: Callable[[int], None] | None = None, batch_size: int | None = None) -> list[RowOutput]:
    """All rows at once (in their order); by default in a single batch."""
    outputs: list[RowOutput | None] = [None] * len(rows)
    for i, out in decode_stream(model, prompts, rows, batch_size=batch_size or max(len(rows), 1),
                                max_new_tokens=max_new_tokens, eos_token_ids=eos_token_ids,
                                pad_token_id=pad_token_id, logprobs=logprobs, stop=stop, on_tokens=on_tokens):
        outputs[i] = out
    return outputs  # type: ignore[return-value]
