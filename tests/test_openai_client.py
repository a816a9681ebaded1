"""The one OpenAI-compatible client (align.models.openai_client), and both its callers (the HTTP teacher
and the HTTP judge) following its URL, retry and API-key rules.

Rate limits and server errors cannot be asked of align's own server, so these tests run a small real HTTP
server on a free port that answers from a script and records what it was sent.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Union

import pytest

from align.models.openai_client import EndpointError, OpenAIClient, chat_completions_url

Answer = tuple[int, dict[str, str], Any]
Script = list[Union[Answer, Callable[[dict[str, Any]], Answer]]]
KEY_ENV = "ALIGN_TEST_CLIENT_KEY"
SECRET = "sk-client-test-do-not-leak-42"


@dataclass
class Seen:
    path: str
    authorization: str | None
    body: dict[str, Any]


@contextmanager
def scripted_server(script: Script) -> Iterator[tuple[str, list[Seen]]]:
    """``(root URL without /v1, requests seen)``; each POST gets the next answer, the last one repeats."""
    seen: list[Seen] = []
    lock = threading.Lock()
    answers = list(script)

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (the http.server API)
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            with lock:
                seen.append(Seen(self.path, self.headers.get("Authorization"), body))
                answer = answers.pop(0) if len(answers) > 1 else answers[0]
            status, headers, payload = answer(body) if callable(answer) else answer
            data = json.dumps(payload).encode()
            self.send_response(status)
            for name, value in {**headers, "Content-Type": "application/json",
                                "Content-Length": str(len(data))}.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}", seen
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def completion(text: str, logprobs: dict[str, float] | None = None) -> Callable[[dict[str, Any]], Answer]:
    """A chat completion with ``n`` choices of ``text``; with ``logprobs``, top log-probs for its first token."""
    def answer(body: dict[str, Any]) -> Answer:
        block = None
        if logprobs and body.get("logprobs"):
            top = [{"token": t, "logprob": lp} for t, lp in logprobs.items()]
            block = {"content": [{"token": text, "logprob": logprobs[text], "top_logprobs": top}]}
        choices = [{"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": "stop",
                    "logprobs": block} for i in range(body.get("n", 1))]
        return 200, {}, {"object": "chat.completion", "choices": choices, "usage": {"completion_tokens": 1}}
    return answer


def error(status: int, message: str, **headers: str) -> Answer:
    return status, headers, {"error": {"message": message, "type": "test"}}


PAYLOAD = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize("base_url, url", [
    ("http://h:8000", "http://h:8000/v1/chat/completions"),
    ("http://h:8000/", "http://h:8000/v1/chat/completions"),
    ("http://h:8000/v1", "http://h:8000/v1/chat/completions"),
    ("http://h:8000/v1/", "http://h:8000/v1/chat/completions"),
    ("https://api.example.com/openai/v1", "https://api.example.com/openai/v1/chat/completions"),
    ("https://example.com/v1beta/openai/", "https://example.com/v1beta/openai/chat/completions"),
])
def test_a_base_url_with_or_without_v1_gives_one_chat_completions_url(base_url: str, url: str) -> None:
    assert chat_completions_url(base_url) == url


def test_a_root_url_and_its_v1_reach_the_same_endpoint() -> None:
    with scripted_server([completion("hi")]) as (root, seen):
        for base in (root, root + "/v1"):
            assert OpenAIClient(base).chat(PAYLOAD)["choices"][0]["message"]["content"] == "hi"
    assert [s.path for s in seen] == ["/v1/chat/completions"] * 2


@pytest.mark.reliability
def test_rate_limits_and_server_errors_are_tried_again_with_backoff() -> None:
    script: Script = [error(429, "slow down", **{"Retry-After": "0"}), error(503, "overloaded"), completion("ok")]
    with scripted_server(script) as (root, seen):
        body = OpenAIClient(root, backoff_s=0.01).chat(PAYLOAD)
    assert body["choices"][0]["message"]["content"] == "ok"
    assert len(seen) == 3 and all(s.body == PAYLOAD for s in seen)


def test_a_refused_request_is_not_sent_again_and_the_error_says_what_the_server_said() -> None:
    with scripted_server([error(400, "unknown field 'top_k'")]) as (root, seen):
        with pytest.raises(EndpointError, match="answered 400 for prompt 'q7': unknown field 'top_k'") as refused:
            OpenAIClient(root, backoff_s=0.01).chat(PAYLOAD, what="prompt 'q7'")
    assert refused.value.status == 400 and len(seen) == 1


@pytest.mark.reliability
def test_it_gives_up_after_its_attempts() -> None:
    with scripted_server([error(429, "rate limited", **{"Retry-After": "0"})]) as (root, seen):
        with pytest.raises(EndpointError, match="429 for a request after 3 tries: rate limited"):
            OpenAIClient(root, attempts=3).chat(PAYLOAD)
    assert len(seen) == 3


def test_an_unreachable_server_is_named_after_the_last_try() -> None:
    with scripted_server([completion("x")]) as (root, _):
        pass  # the port is free again: nothing listens there
    with pytest.raises(EndpointError, match="cannot reach .* after 2 tries") as failed:
        OpenAIClient(root, attempts=2, backoff_s=0.01).chat(PAYLOAD)
    assert failed.value.status is None


def test_a_missing_key_is_not_sent_and_a_refusal_names_the_variable_to_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(KEY_ENV, raising=False)
    with scripted_server([error(401, "missing bearer token")]) as (root, seen):
        with pytest.raises(EndpointError, match=f"401 .*set the environment variable {KEY_ENV}"):
            OpenAIClient(root, api_key_env=KEY_ENV).chat(PAYLOAD)
        monkeypatch.setenv(KEY_ENV, SECRET)
        with pytest.raises(EndpointError, match=f"check the API key in the environment variable {KEY_ENV}") as bad:
            OpenAIClient(root, api_key_env=KEY_ENV).chat(PAYLOAD)
    assert [s.authorization for s in seen] == [None, f"Bearer {SECRET}"]
    assert SECRET not in str(bad.value)


# ----------------------------------------------------------------------------- both callers, same rules


@pytest.mark.reliability
def test_the_judge_needs_no_key_for_a_local_server_and_waits_out_a_rate_limit(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from align.label.judge import HttpBackend, Judge, JudgeSettings

    monkeypatch.delenv(KEY_ENV, raising=False)
    script: Script = [error(429, "slow down", **{"Retry-After": "0"}), completion("A", {"A": -0.2, "B": -1.7})]
    with scripted_server(script) as (root, seen):
        backend = HttpBackend(root, "judge", api_key_env=KEY_ENV, concurrency=1)
        verdict = Judge(backend, JudgeSettings()).compare([("Capital of France?", "Paris.", "Lyon.")])[0]
    assert not verdict.details.get("unparsed"), verdict.details
    assert [o["p_a"] for o in verdict.details["orders"]] == [pytest.approx(0.8176, abs=1e-3)] * 2
    assert len(seen) == 3 and {s.path for s in seen} == {"/v1/chat/completions"}
    assert all(s.authorization is None for s in seen)


@pytest.mark.reliability
def test_the_http_teacher_waits_out_a_rate_limit_on_a_base_url_without_v1(tmp_path: Path) -> None:
    from align.generate import GenerateConfig, generate

    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"id": "q", "prompt": "hello"}\n')
    script: Script = [error(429, "slow down", **{"Retry-After": "0"}), completion("hi there")]
    with scripted_server(script) as (root, seen):
        result = generate(GenerateConfig(model="teacher", backend="openai", base_url=root, prompts=prompts,
                                         output=tmp_path / "c.jsonl", num_candidates=2, concurrency=1,
                                         progress=False))
    assert result.candidates == 2
    rows = [json.loads(line) for line in (tmp_path / "c.jsonl").read_text().splitlines()]
    assert [c["text"] for c in rows[0]["responses"]] == ["hi there"] * 2
    # Greedy first candidate and a sampled one: two requests, one of them sent twice.
    assert len(seen) == 3 and {s.path for s in seen} == {"/v1/chat/completions"}


def test_llama_servers_log_probs_give_token_ids_and_the_answers_log_probability(tmp_path: Path) -> None:
    """A reply recorded from llama.cpp's llama-server (an align export served with its LoRA adapter): token ids
    come as ``id`` and log-probs only when top_logprobs is above 0. align eval scores a served student's KL on
    these ids and log-probs, so both must come through, even when no alternatives are asked for."""
    from align.data.validate import read_records
    from align.eval.stage import _recorded_logprob
    from align.generate import GenerateConfig, generate

    recorded = json.loads((Path(__file__).parent / "fixtures" / "llamacpp_chat_logprobs.json").read_text())
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"id": "q", "prompt": "Why does ice float on water?"}\n')
    with scripted_server([(200, {}, recorded)]) as (root, seen):
        generate(GenerateConfig(model="student", backend="openai", base_url=root, prompts=prompts,
                                output=tmp_path / "c.jsonl", num_candidates=1, logprobs=0, progress=False))
    assert seen[0].body["logprobs"] is True and seen[0].body["top_logprobs"] == 1  # llama-server computes none for 0
    (row,) = read_records(tmp_path / "c.jsonl", "candidates")
    (response,) = row.responses
    expected = recorded["choices"][0]["logprobs"]["content"]
    assert [e["token_id"] for e in response.logprobs] == [e["id"] for e in expected] == [504, 2166, 327, 3908]
    assert not any("top_logprobs" in e for e in response.logprobs)  # the alternative it was sent for is dropped
    logprob, tokens = _recorded_logprob(response)
    assert tokens == 4 and logprob == pytest.approx(sum(e["logprob"] for e in expected))
