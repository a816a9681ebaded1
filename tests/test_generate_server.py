"""The project's OpenAI-compatible server, and the HTTP teacher backend against it (a real server, no mock)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from align.errors import AlignError
from align.generate import GenerateConfig, generate
from align.generate.server import ServerProcess, start_server_process

API_KEY_ENV = "ALIGN_TEST_TEACHER_KEY"
SECRET = "sk-test-do-not-leak-0123456789"


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path) -> Iterator[ServerProcess]:
    with start_server_process(str(tiny_model_dir), env={"OMP_NUM_THREADS": "1"}) as running:
        yield running


@pytest.fixture(scope="module")
def locked_server(tiny_model_dir: Path) -> Iterator[ServerProcess]:
    env = {"OMP_NUM_THREADS": "1", API_KEY_ENV: SECRET}
    with start_server_process(str(tiny_model_dir), env=env, api_key_env=API_KEY_ENV) as running:
        yield running


def chat(server: ServerProcess, **body) -> httpx.Response:
    payload = {"model": "tiny", "messages": [{"role": "user", "content": "Say hi"}], **body}
    return httpx.post(server.base_url + "/chat/completions", json=payload, timeout=60)


def test_models_and_chat_completions(server: ServerProcess, tiny_model_dir: Path) -> None:
    models = httpx.get(server.base_url + "/models", timeout=10).json()
    assert models["object"] == "list" and models["data"][0]["id"] == str(tiny_model_dir)

    body = chat(server, n=3, max_tokens=5, temperature=1.0, seed=11, logprobs=True, top_logprobs=2).json()
    assert body["object"] == "chat.completion" and len(body["choices"]) == 3
    for i, choice in enumerate(body["choices"]):
        assert choice["index"] == i and choice["message"]["role"] == "assistant"
        assert choice["finish_reason"] in ("stop", "length")
        for entry in choice["logprobs"]["content"]:
            assert isinstance(entry["token_id"], int) and isinstance(entry["token"], str) and entry["logprob"] <= 0
            assert len(entry["top_logprobs"]) == 2
            assert entry["top_logprobs"][0]["logprob"] >= entry["logprob"] - 1e-6
    assert body["usage"]["completion_tokens"] >= len(body["choices"])

    again = chat(server, n=3, max_tokens=5, temperature=1.0, seed=11).json()
    texts = [c["message"]["content"] for c in body["choices"]]
    assert [c["message"]["content"] for c in again["choices"]] == texts  # same seed, same answers
    assert len(set(texts)) > 1  # but the n choices differ from each other


def test_legacy_completions(server: ServerProcess) -> None:
    body = httpx.post(server.base_url + "/completions", timeout=60, json={
        "model": "tiny", "prompt": ["The sky is", "Two plus two"], "n": 2, "max_tokens": 4, "logprobs": 1,
        "temperature": 0}).json()
    assert body["object"] == "text_completion" and len(body["choices"]) == 4
    first = body["choices"][0]["logprobs"]
    assert len(first["tokens"]) == len(first["token_ids"]) == len(first["token_logprobs"]) == len(first["top_logprobs"])
    # Greedy: both choices of a prompt agree.
    assert body["choices"][0]["text"] == body["choices"][1]["text"]


@pytest.mark.parametrize("path, body, status, words", [
    ("/chat/completions", {"messages": []}, 400, "'messages' must be a non-empty list"),
    ("/chat/completions", {"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}, 400, "temperature"),
    ("/chat/completions", {"messages": [{"role": "user", "content": "x"}], "n": 0}, 400, "'n' must be between"),
    ("/completions", {"prompt": ""}, 400, "'prompt'"),
    ("/embeddings", {"input": "x"}, 404, "no route"),
])
def test_bad_requests_get_openai_style_errors(server: ServerProcess, path: str, body: dict, status: int,
                                              words: str) -> None:
    response = httpx.post(server.base_url + path, json=body, timeout=30)
    assert response.status_code == status
    assert words in response.json()["error"]["message"]


def test_http_backend_writes_candidates_deterministically(server: ServerProcess, tmp_path: Path) -> None:
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"q{i}", "prompt": f"Tell me fact number {i}."}) + "\n"
                               for i in range(4)))

    def run(output: Path) -> list[dict]:
        result = generate(GenerateConfig(model="tiny", backend="openai", base_url=server.base_url, prompts=prompts,
                                         output=output, num_candidates=3, max_new_tokens=6, top_p=1.0, logprobs=2,
                                         concurrency=3, progress=False))
        assert result.generated == 4 and result.candidates == 12
        return [json.loads(line) for line in output.read_text().splitlines()]

    rows = run(tmp_path / "a.jsonl")
    assert sorted(r["prompt_id"] for r in rows) == ["q0", "q1", "q2", "q3"]
    for row in rows:
        assert row["teacher"]["backend"] == "openai" and row["teacher"]["base_url"] == server.base_url
        greedy, *sampled = row["responses"]
        assert greedy["sampling"]["do_sample"] is False and all(c["sampling"]["do_sample"] for c in sampled)
        for c in row["responses"]:
            assert c["num_tokens"] == len(c["logprobs"]) and c["finish_reason"] in ("stop", "length")
            assert all(isinstance(e["token_id"], int) and len(e["top_logprobs"]) == 2 for e in c["logprobs"])
    texts = lambda rs: {r["prompt_id"]: [c["text"] for c in r["responses"]] for r in rs}  # noqa: E731
    assert texts(run(tmp_path / "b.jsonl")) == texts(rows)


def test_http_backend_takes_the_base_url_with_or_without_v1(server: ServerProcess, tmp_path: Path) -> None:
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"id": "q", "prompt": "hello"}\n')
    root = server.base_url.removesuffix("/v1")
    for base_url in (root, root + "/"):
        out = tmp_path / f"{len(base_url)}.jsonl"
        result = generate(GenerateConfig(model="tiny", backend="openai", base_url=base_url, prompts=prompts,
                                         output=out, num_candidates=1, max_new_tokens=3, progress=False))
        assert result.candidates == 1


def test_http_backend_sends_the_key_from_the_env_and_never_writes_it(
        locked_server: ServerProcess, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"id": "q", "prompt": "hello"}\n')
    settings = dict(model="tiny", backend="openai", base_url=locked_server.base_url, prompts=prompts,
                    num_candidates=2, max_new_tokens=4, progress=False, api_key_env=API_KEY_ENV)

    monkeypatch.delenv(API_KEY_ENV, raising=False)
    with pytest.raises(AlignError, match="401") as refused:
        generate(GenerateConfig(output=tmp_path / "refused.jsonl", **settings))
    assert SECRET not in str(refused.value)
    assert not (tmp_path / "refused.jsonl").exists()  # a failed start leaves no empty output

    monkeypatch.setenv(API_KEY_ENV, SECRET)
    out = tmp_path / "c.jsonl"
    assert generate(GenerateConfig(output=out, **settings)).candidates == 2
    assert SECRET not in out.read_text()
