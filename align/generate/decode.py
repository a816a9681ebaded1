"""Batched decoding with a transformers causal LM, built for many candidates per prompt.

Why not ``model.generate``: it prefills every copy of a prompt when asked for
``num_return_sequences``, keeps computing rows that have already finished, waits
for the longest row of a batch before starting the next, and samples a whole
batch with one setting and one random stream. Here

* each prompt is prefilled once and its KV cache copied to its candidate rows;
* finished rows leave the batch and waiting prompts take their places
  (continuous batching: the cache is compacted and refilled once a quarter of
  the batch is free, so each copy pays for itself);
* every row has its own temperature / top-p / top-k (greedy and sampled rows
  share a batch) and its own random stream seeded per candidate, so a
  candidate's text does not depend on which other rows it was batched with.

Log-probs, when asked for, are the model's own distribution (temperature 1,
no top-p): what distillation needs, and what vLLM and OpenAI report.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from align.generate.config import SamplingParams
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


@dataclass
class _Batch:
    """Everything aligned to the rows now in the batch; compacted and extended together."""

    rows: torch.Tensor  # batch position -> row index
    steps: torch.Tensor  # tokens generated so far by each row
    done: torch.Tensor
    attention_mask: torch.Tensor  # (batch, cache width), left padded
    next_position: torch.Tensor
    temperature: torch.Tensor
    top_p: torch.Tensor
    top_k: torch.Tensor
    uniforms: torch.Tensor  # (batch, max_new_tokens): each row's own random stream, drawn up front
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

    def extend(self, other: "_Batch") -> None:
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
    from transformers.cache_utils import DynamicLayer

    return all(type(layer) is DynamicLayer for layer in cache.layers)


@torch.inference_mode()
def decode_stream(model: Any, prompts: Sequence[Sequence[int]], rows: Sequence[RowRequest], *, batch_size: int,
                  max_new_tokens: int, eos_token_ids: Sequence[int], pad_token_id: int, logprobs: int | None = None,
                  stop: StopStrings | None = None, on_tokens: Callable[[int], None] | None = None
                  ) -> Iterator[tuple[int, RowOutput]]:
    """Generate every row, yielding ``(row index, output)`` as each finishes.

    Prompts are admitted in the order their rows first appear (sort them by
    length beforehand), all candidates of a prompt together, each prompt
    prefilled once; up to ``batch_size`` rows decode at a time.
    """
    device = model.device
    by_prompt: dict[int, list[int]] = {}
    for i, row in enumerate(rows):
        by_prompt.setdefault(row.prompt_index, []).append(i)
    waiting = deque(by_prompt)
    outputs: dict[int, RowOutput] = {}
    eos = torch.tensor(list(eos_token_ids), device=device)
    batch: _Batch | None = None
    refill = True  # becomes False for caches that cannot be joined: then a batch runs until it empties

    while True:
        live = 0 if batch is None else len(batch) - int(batch.done.sum())
        room = batch_size - live
        wanted = max(len(by_prompt[waiting[0]]), batch_size * REFILL_FRACTION) if waiting else 0
        if waiting and (live == 0 or (refill and room >= wanted)):
            admitted: list[int] = []
            while waiting and (not admitted or len(by_prompt[waiting[0]]) <= room):
                room -= len(by_prompt[waiting[0]])
                admitted.append(waiting.popleft())
            fresh = _prefill(model, prompts, admitted, by_prompt, rows, max_new_tokens, pad_token_id, device)
            refill = refill and _mergeable(fresh.cache)
            for prompt_index in admitted:
                for i in by_prompt[prompt_index]:
                    outputs[i] = RowOutput(logprobs=[] if logprobs is not None else None)
            if batch is None or live == 0:
                batch = fresh
            else:
                batch.keep((~batch.done).nonzero().squeeze(1))
                batch.extend(fresh)
        if batch is None:
            return

        uniform = batch.uniforms.gather(1, batch.steps.clamp(max=max_new_tokens - 1)[:, None]).squeeze(1)
        tokens = sample_tokens(batch.logits, batch.temperature, batch.top_p, batch.top_k, uniform)
        if logprobs is not None:
            _record_logprobs(outputs, batch.logits, tokens, batch.rows, batch.done, logprobs)
        finished = torch.isin(tokens, eos) | (batch.steps + 1 >= max_new_tokens)
        if on_tokens is not None:
            on_tokens(len(batch) - int(batch.done.sum()))
        for position, (row, token) in enumerate(zip(batch.rows.tolist(), tokens.tolist())):
            if batch.done[position]:
                continue
            out = outputs[row]
            out.token_ids.append(token)
            if token in eos_token_ids or (stop is not None and stop.hit(out.token_ids)):
                out.finish_reason = "stop"
                finished[position] = True
            if finished[position]:
                yield row, outputs.pop(row)
        batch.done |= finished
        batch.steps += 1

        if bool(batch.done.all()):
            batch = None
            continue
        if not waiting and int(batch.done.sum()) >= max(1, REFILL_FRACTION * len(batch)):
            keep = (~batch.done).nonzero().squeeze(1)
            batch.keep(keep)
            tokens = tokens[keep]
        batch.attention_mask = torch.cat([batch.attention_mask, batch.attention_mask.new_ones((len(batch), 1))], 1)
        batch.logits = model(input_ids=tokens[:, None], attention_mask=batch.attention_mask,
                             position_ids=batch.next_position[:, None], use_cache=True,
                             **{cache_kwarg(model): batch.cache}).logits[:, -1, :].float()
        batch.next_position = batch.next_position + 1


def _prefill(model: Any, prompts: Sequence[Sequence[int]], admitted: list[int], by_prompt: dict[int, list[int]],
             rows: Sequence[RowRequest], max_new_tokens: int, pad_token_id: int, device: Any) -> _Batch:
    """Run the admitted prompts once (left padded together) and fan each out to its candidate rows."""
    from transformers import DynamicCache

    width = max(len(prompts[p]) for p in admitted)
    input_ids = torch.full((len(admitted), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(admitted), width), dtype=torch.long)
    for i, p in enumerate(admitted):
        ids = prompts[p]
        input_ids[i, width - len(ids):] = torch.tensor(list(ids), dtype=torch.long)
        attention_mask[i, width - len(ids):] = 1
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache(config=model.config)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                   use_cache=True, logits_to_keep=1, **{cache_kwarg(model): cache}).logits[:, -1, :].float()

    row_ids = [i for p in admitted for i in by_prompt[p]]
    fan_out = torch.tensor([k for k, p in enumerate(admitted) for _ in by_prompt[p]], device=device)
    cache.batch_select_indices(fan_out)
    chosen = [rows[i] for i in row_ids]
    uniforms = torch.stack([torch.rand(max_new_tokens, generator=torch.Generator().manual_seed(r.seed))
                            for r in chosen]).to(device)
    return _Batch(
        rows=torch.tensor(row_ids, device=device), steps=torch.zeros(len(row_ids), dtype=torch.long, device=device),
        done=torch.zeros(len(row_ids), dtype=torch.bool, device=device), attention_mask=attention_mask[fan_out],
        next_position=position_ids[fan_out, -1] + 1,
        temperature=torch.tensor([r.sampling.temperature for r in chosen], device=device),
        top_p=torch.tensor([r.sampling.top_p for r in chosen], device=device),
        top_k=torch.tensor([r.sampling.top_k for r in chosen], device=device),
        uniforms=uniforms, logits=logits[fan_out], cache=cache,
    )


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


def _record_logprobs(outputs: dict[int, RowOutput], logits: torch.Tensor, tokens: torch.Tensor, rows: torch.Tensor,
                     done: torch.Tensor, top: int) -> None:
    logp = torch.log_softmax(logits, dim=-1)
    chosen = logp.gather(1, tokens[:, None]).squeeze(1).tolist()
    token_ids = tokens.tolist()
    if top:
        top_values, top_ids = logp.topk(top, dim=-1)
        top_values, top_ids = top_values.tolist(), top_ids.tolist()
    for position, row in enumerate(rows.tolist()):
        if done[position]:
            continue
        entry: dict[str, Any] = {"token_id": token_ids[position], "logprob": chosen[position]}
        if top:
            entry["top_logprobs"] = [{"token_id": t, "logprob": v}
                                     for t, v in zip(top_ids[position], top_values[position])]
        outputs[row].logprobs.append(entry)  # type: ignore[union-attr]
