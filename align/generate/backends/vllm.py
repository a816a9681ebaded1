"""vLLM in this process (GPU). Imported only when chosen, so align runs without it.

Every candidate is its own request with its own seed (vLLM's prefix caching
shares the prompt's prefill), so candidates are reproducible per
(seed, prompt id, index) as with the transformers backend. Jobs are handed to
vLLM ``batch_size`` prompts at a time and written as each chunk finishes.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from align.errors import AlignError
from align.generate.backends import Completion, TokenCallback
from align.generate.config import GenerateConfig
from align.generate.plan import PromptJob
from align.models import prompt_token_ids


class VLLMBackend:
    name = "vllm"

    def __init__(self, config: GenerateConfig):
        try:
            import vllm
        except ImportError:
            raise AlignError("the vllm backend needs vLLM and a GPU: pip install vllm (or align[gpu]); "
                             "or use --backend transformers") from None
        from align.models import resolve_model

        source = resolve_model(config.model)
        if source.adapter:
            raise AlignError(f"{config.model} is a LoRA adapter; merge it into its base model for the vllm backend")
        self.config = config
        self._vllm = vllm
        self.llm = vllm.LLM(model=source.path, seed=config.seed, enable_prefix_caching=True)
        self.tokenizer = self.llm.get_tokenizer()

    def describe(self) -> dict[str, Any]:
        return {"vllm_version": self._vllm.__version__}

    def _params(self, job: PromptJob) -> list[Any]:
        params = []
        for spec in job.candidates:
            s = spec.sampling
            params.append(self._vllm.SamplingParams(
                n=1, temperature=s.temperature, top_p=1.0 if s.greedy else s.top_p,
                top_k=(s.top_k or -1) if not s.greedy else -1, max_tokens=self.config.max_new_tokens,
                seed=spec.seed % (2**63), logprobs=self.config.logprobs))
        return params

    def run(self, jobs: Sequence[PromptJob], on_tokens: TokenCallback | None = None
            ) -> Iterator[tuple[PromptJob, list[Completion]]]:
        size = self.config.batch_size
        for start in range(0, len(jobs), size):
            chunk = jobs[start:start + size]
            prompts, params = [], []
            for job in chunk:
                ids = prompt_token_ids(self.tokenizer, job.messages)
                for p in self._params(job):
                    prompts.append({"prompt_token_ids": list(ids)})
                    params.append(p)
            outputs = iter(self.llm.generate(prompts, params, use_tqdm=False))
            for job in chunk:
                completions = [self._completion(next(outputs).outputs[0]) for _ in job.candidates]
                if on_tokens is not None:
                    on_tokens(sum(c.num_tokens or 0 for c in completions))
                yield job, completions

    def _completion(self, out: Any) -> Completion:
        logprobs = None
        if self.config.logprobs is not None and out.logprobs is not None:
            logprobs = []
            for token_id, candidates in zip(out.token_ids, out.logprobs):
                top = sorted(candidates.items(), key=lambda kv: kv[1].rank)[: self.config.logprobs]
                entry: dict[str, Any] = {"token_id": int(token_id), "logprob": float(candidates[token_id].logprob)}
                if self.config.logprobs:
                    entry["top_logprobs"] = [{"token_id": int(t), "logprob": float(lp.logprob)} for t, lp in top]
                logprobs.append(entry)
        return Completion(out.text, out.finish_reason, len(out.token_ids), logprobs)

    def close(self) -> None:
        self.llm = None
