"""Any OpenAI-compatible chat endpoint as the teacher: vLLM or SGLang servers, Ollama, hosted APIs.

Requests go through align.models.openai_client (its URL, API-key and retry rules
are the judge's too). Prompts are sent concurrently (``concurrency`` requests in
flight); candidates with the same sampling go in one request with ``n``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any

from align.generate.backends import Completion, TokenCallback
from align.generate.config import GenerateConfig
from align.generate.plan import CandidateSpec, PromptJob
from align.models.openai_client import EndpointError, OpenAIClient


class OpenAIBackend:
    name = "openai"

    def __init__(self, config: GenerateConfig):
        assert config.base_url is not None
        self.config = config
        self.client = OpenAIClient(config.base_url, api_key_env=config.api_key_env, timeout=config.request_timeout)

    def describe(self) -> dict[str, Any]:
        return {}

    def run(self, jobs: Sequence[PromptJob], on_tokens: TokenCallback | None = None
            ) -> Iterator[tuple[PromptJob, list[Completion]]]:
        # Submit lazily: at most `concurrency` jobs in flight, so a kill loses only those.
        with ThreadPoolExecutor(self.config.concurrency, thread_name_prefix="align-http") as pool:
            queue = iter(jobs)
            running: dict[Future, PromptJob] = {}

            def submit_next() -> None:
                job = next(queue, None)
                if job is not None:
                    running[pool.submit(self._complete_job, job)] = job

            for _ in range(self.config.concurrency):
                submit_next()
            try:
                while running:
                    finished, _ = wait(running, return_when=FIRST_COMPLETED)
                    for future in finished:
                        job = running.pop(future)
                        completions = future.result()
                        if on_tokens is not None:
                            on_tokens(sum(c.num_tokens or 0 for c in completions))
                        yield job, completions
                        submit_next()
            finally:
                for future in running:
                    future.cancel()

    def _groups(self, job: PromptJob) -> list[list[CandidateSpec]]:
        """Candidates that can share one request (same sampling), or one per request."""
        if not self.config.request_n:
            return [[spec] for spec in job.candidates]
        groups: dict[tuple[float, float, int], list[CandidateSpec]] = {}
        for spec in job.candidates:
            s = spec.sampling
            groups.setdefault((s.temperature, s.top_p, s.top_k), []).append(spec)
        return list(groups.values())

    def _complete_job(self, job: PromptJob) -> list[Completion]:
        by_index: dict[int, Completion] = {}
        for group in self._groups(job):
            for spec, completion in zip(group, self._request(job, group)):
                by_index[spec.index] = completion
        return [by_index[spec.index] for spec in job.candidates]

    def _payload(self, job: PromptJob, group: list[CandidateSpec]) -> dict[str, Any]:
        sampling = group[0].sampling
        payload: dict[str, Any] = {
            "model": self.config.model, "messages": job.messages, "n": len(group),
            "temperature": sampling.temperature, "max_tokens": self.config.max_new_tokens,
            # The first candidate's seed stands for the group: deterministic where the server honours seeds.
            "seed": group[0].seed % (2**31),
        }
        if not sampling.greedy:
            payload["top_p"] = sampling.top_p
            if sampling.top_k:
                payload["top_k"] = sampling.top_k  # not OpenAI's; vLLM, SGLang and ours accept it
        if self.config.logprobs is not None:
            payload["logprobs"] = True
            # At least one: llama-server computes no log-probs at all for top_logprobs 0. The extra
            # alternative is dropped again in _parse, so callers get what they asked for.
            payload["top_logprobs"] = max(1, self.config.logprobs)
        return {**payload, **self.config.extra_body}

    def _request(self, job: PromptJob, group: list[CandidateSpec]) -> list[Completion]:
        body = self.client.chat(self._payload(job, group), what=f"prompt {job.prompt_id!r}")
        return self._parse(job, body, len(group))

    def _parse(self, job: PromptJob, body: dict[str, Any], n: int) -> list[Completion]:
        choices = sorted(body.get("choices") or [], key=lambda c: c.get("index", 0))
        if len(choices) != n:
            raise EndpointError(f"{self.client.url} returned {len(choices)} choices for n={n} "
                                f"(prompt {job.prompt_id!r}); if the server ignores n (Ollama does), set request_n=false")
        usage_tokens = (body.get("usage") or {}).get("completion_tokens")
        completions = []
        for choice in choices:
            logprobs = _logprobs(choice.get("logprobs"), self.config.logprobs or 0)
            num_tokens = len(logprobs) if logprobs is not None else (usage_tokens if n == 1 else None)
            message = choice.get("message") or {}
            completions.append(Completion(message.get("content") or "", choice.get("finish_reason"), num_tokens,
                                          logprobs, _reasoning(message)))
        return completions

    def close(self) -> None:
        self.client.close()


def _reasoning(message: dict[str, Any]) -> str | None:
    """A reasoning model's thinking, when the server returns it apart from the answer: ``reasoning_content``
    (vLLM's and SGLang's reasoning parsers, DeepSeek's API) or ``reasoning`` (newer vLLM, OpenRouter)."""
    for key in ("reasoning_content", "reasoning"):
        if isinstance(message.get(key), str) and message[key].strip():
            return message[key]
    return None


def _token_id(entry: dict[str, Any]) -> int | None:
    """Our server sends ``token_id``, llama.cpp's ``id``; vLLM with ``return_tokens_as_token_ids`` sends
    ``token: "token_id:123"``."""
    for key in ("token_id", "id"):
        if isinstance(entry.get(key), int):
            return entry[key]
    token = entry.get("token")
    if isinstance(token, str) and token.startswith("token_id:") and token[9:].isdigit():
        return int(token[9:])
    return None


def _logprob_entry(entry: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"token_id": _token_id(entry), "token": entry.get("token"), "logprob": entry.get("logprob")}
    return {k: v for k, v in out.items() if v is not None}


def _logprobs(block: dict[str, Any] | None, top: int) -> list[dict[str, Any]] | None:
    """Each sampled token's log-prob, with at most ``top`` alternatives (none when ``top`` is 0)."""
    if not block or block.get("content") is None:
        return None
    entries = []
    for item in block["content"]:
        entry = _logprob_entry(item)
        if top and item.get("top_logprobs") is not None:
            entry["top_logprobs"] = [_logprob_entry(t) for t in item["top_logprobs"][:top]]
        entries.append(entry)
    return entries
