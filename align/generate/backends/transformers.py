"""The default backend: a transformers model in this process (CPU or one GPU).

Prompts are sorted by length so a batch wastes little on padding; all
candidates of a prompt go in the same batch so its prefill is shared (see
:mod:`align.generate.decode`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from align.errors import AlignError
from align.generate.backends import Completion, TokenCallback
from align.generate.config import GenerateConfig
from align.generate.decode import RowOutput, RowRequest, StopStrings, decode_stream, generate_rows
from align.generate.plan import PromptJob
from align.models import eos_token_ids, load_model, load_tokenizer, prompt_token_ids


class TransformersEngine:
    """A loaded model and tokenizer that turn chat messages and row requests into completions."""

    def __init__(self, model: str, *, device: str | None = None, num_threads: int | None = None):
        import torch

        if num_threads:
            torch.set_num_threads(num_threads)
        self.spec = model
        self.tokenizer = load_tokenizer(model)
        self.model = load_model(model, device=device).eval()
        self.eos_token_ids = eos_token_ids(self.model, self.tokenizer)
        self.pad_token_id = self.tokenizer.pad_token_id
        self.max_length = getattr(self.model.config, "max_position_embeddings", None)

    def encode(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of the chat prompt, ending where the assistant's answer starts (see align.models.tokens)."""
        return prompt_token_ids(self.tokenizer, messages)

    def encode_text(self, text: str) -> list[int]:
        return self.tokenizer(text)["input_ids"]

    def check_length(self, prompt_ids: Sequence[int], max_new_tokens: int, what: str) -> None:
        if self.max_length and len(prompt_ids) + max_new_tokens > self.max_length:
            raise AlignError(f"{what} has {len(prompt_ids)} tokens; with max_new_tokens={max_new_tokens} it exceeds "
                             f"the model's context of {self.max_length} tokens: shorten it or lower max_new_tokens")

    def generate(self, prompts: Sequence[Sequence[int]], rows: Sequence[RowRequest], *, max_new_tokens: int,
                 logprobs: int | None = None, stop: Sequence[str] | None = None,
                 on_tokens: TokenCallback | None = None, batch_size: int | None = None) -> list[Completion]:
        """Completions for ``rows`` in their order (all in one batch unless ``batch_size`` says otherwise)."""
        stopper = StopStrings(self.tokenizer, stop) if stop else None
        outputs = generate_rows(self.model, prompts, rows, max_new_tokens=max_new_tokens,
                                eos_token_ids=self.eos_token_ids, pad_token_id=self.pad_token_id,
                                logprobs=logprobs, stop=stopper, on_tokens=on_tokens, batch_size=batch_size)
        return [self.completion(out, stopper) for out in outputs]

    def completion(self, out: RowOutput, stopper: StopStrings | None = None) -> Completion:
        ids = out.token_ids
        if out.finish_reason == "stop" and ids and ids[-1] in self.eos_token_ids:
            ids = ids[:-1]  # the end-of-turn token is counted and scored, but is not text
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        if stopper is not None:
            text = stopper.cut(text)
        return Completion(text, out.finish_reason, len(out.token_ids), out.logprobs)


class TransformersBackend:
    name = "transformers"

    def __init__(self, config: GenerateConfig):
        self.config = config
        self.engine = TransformersEngine(config.model, device=config.device, num_threads=config.num_threads)

    def describe(self) -> dict[str, Any]:
        return {"dtype": str(self.engine.model.dtype).removeprefix("torch."), "device": str(self.engine.model.device)}

    def run(self, jobs: Sequence[PromptJob], on_tokens: TokenCallback | None = None
            ) -> Iterator[tuple[PromptJob, list[Completion]]]:
        encoded = [self.engine.encode(job.messages) for job in jobs]
        for job, ids in zip(jobs, encoded):
            self.engine.check_length(ids, self.config.max_new_tokens, f"prompt {job.prompt_id!r}")
        # Longest first: the biggest prefill (memory peak) comes at once, and neighbours pad little.
        order = sorted(range(len(jobs)), key=lambda i: -len(encoded[i]))
        prompts = [encoded[j] for j in order]
        rows = [(j, spec) for j in order for spec in jobs[j].candidates]
        slot = {j: k for k, j in enumerate(order)}
        requests = [RowRequest(slot[j], spec.sampling, spec.seed) for j, spec in rows]
        pending: dict[int, dict[int, Completion]] = {}
        stream = decode_stream(self.engine.model, prompts, requests, batch_size=self.config.batch_size,
                               max_new_tokens=self.config.max_new_tokens, eos_token_ids=self.engine.eos_token_ids,
                               pad_token_id=self.engine.pad_token_id, logprobs=self.config.logprobs,
                               on_tokens=on_tokens)
        for row_index, output in stream:
            j, spec = rows[row_index]
            pending.setdefault(j, {})[spec.index] = self.engine.completion(output)
            if len(pending[j]) == len(jobs[j].candidates):
                done = pending.pop(j)
                yield jobs[j], [done[s.index] for s in jobs[j].candidates]

    def close(self) -> None:
        self.engine = None  # type: ignore[assignment]
