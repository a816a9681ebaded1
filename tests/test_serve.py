"""`align serve` with align's own server: a real server on 127.0.0.1 over the tiny model, real HTTP, no mocks.

Most tests share one server started in this process (so they can also read its scheduler's counters); the
SIGTERM tests run `align serve` as a child process, as a user would.
"""

from __future__ import annotations

import json
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from align.generate.serving import ServeConfig, build_server
from align.generate.serving.http import Server
from align.generate.server import start_server_process

CHAT = [{"role": "user", "content": "Name three colours."}]


@pytest.fixture(scope="module")
def served(tiny_model_dir: Path) -> Iterator[Server]:
    server = build_server(ServeConfig(model=str(tiny_model_dir), port=0, max_batch=16,
                                      served_model_name="tiny")).start()
    yield server
    server.stop()


def post(server: Server, path: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(server.base_url + path, json=body, timeout=120)


def chat(server: Server, **body: Any) -> dict[str, Any]:
    response = post(server, "/chat/completions", {"model": "tiny", "messages": CHAT, **body})
    assert response.status_code == 200, response.text
    return response.json()


def stream(server: Server, path: str, body: dict[str, Any]) -> list[Any]:
    """The stream's events in order: each chunk as a dict, and the final "[DONE]" as that string."""
    events = []
    with httpx.stream("POST", server.base_url + path, json={**body, "stream": True}, timeout=120) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("data: "):
                data = line[len("data: "):]
                events.append(data if data == "[DONE]" else json.loads(data))
            else:
                assert line == "", line  # SSE: data lines separated by blank lines, nothing else
    return events


def streamed_chat(events: list[Any]) -> dict[int, dict[str, Any]]:
    """Per choice: the concatenated content, the log-prob entries and the finish reason of a chat stream."""
    out: dict[int, dict[str, Any]] = {}
    for chunk in events[:-1]:
        assert chunk["object"] == "chat.completion.chunk"
        for choice in chunk["choices"]:
            mine = out.setdefault(choice["index"], {"text": "", "logprobs": [], "finish_reason": None})
            assert mine["finish_reason"] is None, "nothing may follow a choice's finish reason"
            mine["text"] += choice["delta"].get("content") or ""
            mine["logprobs"] += (choice["logprobs"] or {}).get("content") or []
            mine["finish_reason"] = choice["finish_reason"]
    return out


# ----------------------------------------------------------------------------- answers


def test_models_lists_the_served_model(served: Server) -> None:
    body = httpx.get(served.base_url + "/models", timeout=10).json()
    assert body["object"] == "list" and [m["id"] for m in body["data"]] == ["tiny"]


def test_chat_answers_with_n_choices_that_a_seed_repeats(served: Server) -> None:
    body = chat(served, n=3, max_tokens=8, temperature=1.0, seed=5)
    assert body["object"] == "chat.completion" and body["model"] == "tiny"
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    for choice in body["choices"]:
        assert choice["message"]["role"] == "assistant" and isinstance(choice["message"]["content"], str)
        assert choice["finish_reason"] in ("stop", "length") and choice["logprobs"] is None
    texts = [c["message"]["content"] for c in body["choices"]]
    assert len(set(texts)) > 1  # three samples, not one copied
    assert [c["message"]["content"] for c in chat(served, n=3, max_tokens=8, temperature=1.0, seed=5)["choices"]] == texts
    usage = body["usage"]
    assert usage["prompt_tokens"] > 0 and 3 <= usage["completion_tokens"] <= 24
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_completions_answer_each_prompt_n_times(served: Server) -> None:
    response = post(served, "/completions", {"model": "tiny", "prompt": ["The sky is", "Two plus two"], "n": 2,
                                             "max_tokens": 5, "temperature": 0})
    body = response.json()
    assert body["object"] == "text_completion" and len(body["choices"]) == 4
    assert body["choices"][0]["text"] == body["choices"][1]["text"]  # greedy: a prompt's choices agree
    assert all(c["finish_reason"] in ("stop", "length") for c in body["choices"])


def test_max_tokens_bounds_the_answer(served: Server) -> None:
    body = chat(served, max_tokens=3, temperature=1.0, seed=1, logprobs=True)
    (choice,) = body["choices"]
    assert body["usage"]["completion_tokens"] <= 3
    if choice["finish_reason"] == "length":
        assert body["usage"]["completion_tokens"] == len(choice["logprobs"]["content"]) == 3


def test_logprobs_come_when_asked_and_only_then(served: Server) -> None:
    body = chat(served, max_tokens=6, temperature=1.0, seed=3, logprobs=True, top_logprobs=3)
    entries = body["choices"][0]["logprobs"]["content"]
    assert entries and len(entries) <= 6
    for entry in entries:
        assert isinstance(entry["token_id"], int) and isinstance(entry["token"], str) and entry["logprob"] <= 0
        assert entry["bytes"] == list(entry["token"].encode("utf-8"))
        assert len(entry["top_logprobs"]) == 3
        assert entry["top_logprobs"][0]["logprob"] >= entry["logprob"] - 1e-6  # the top one is the likeliest
    assert "".join(e["token"] for e in entries) == body["choices"][0]["message"]["content"]

    legacy = post(served, "/completions", {"prompt": "Once upon", "max_tokens": 4, "logprobs": 2,
                                           "temperature": 0}).json()["choices"][0]
    block = legacy["logprobs"]
    assert len(block["tokens"]) == len(block["token_ids"]) == len(block["token_logprobs"]) == len(block["text_offset"])
    assert all(len(top) <= 2 for top in block["top_logprobs"]) and block["text_offset"][0] == 0
    assert chat(served, max_tokens=3)["choices"][0]["logprobs"] is None


def test_a_stop_string_cuts_the_answer_before_it(served: Server) -> None:
    whole = chat(served, max_tokens=24, temperature=1.0, seed=7)["choices"][0]["message"]["content"]
    assert len(whole) > 6, whole
    stop = whole[4:6]
    cut = chat(served, max_tokens=24, temperature=1.0, seed=7, stop=[stop, "never appears"])["choices"][0]
    assert cut["finish_reason"] == "stop" and cut["message"]["content"] == whole[:whole.index(stop)]
    streamed = streamed_chat(stream(served, "/chat/completions", {"messages": CHAT, "max_tokens": 24,
                                                                  "temperature": 1.0, "seed": 7, "stop": stop}))
    assert streamed[0]["text"] == cut["message"]["content"] and streamed[0]["finish_reason"] == "stop"


# ----------------------------------------------------------------------------- streaming


def test_a_greedy_stream_adds_up_to_the_greedy_answer(served: Server) -> None:
    settings = {"messages": CHAT, "max_tokens": 12, "temperature": 0}
    whole = chat(served, **settings)["choices"][0]
    events = stream(served, "/chat/completions", settings)
    assert events[-1] == "[DONE]" and len(events) > 3
    first = events[0]["choices"][0]
    assert first["delta"] == {"role": "assistant", "content": ""} and first["finish_reason"] is None
    assert len({e["id"] for e in events[:-1]}) == 1  # one id for the whole stream
    streamed = streamed_chat(events)
    assert streamed[0]["text"] == whole["message"]["content"]
    assert streamed[0]["finish_reason"] == whole["finish_reason"]


def test_sampled_streams_with_n_and_logprobs_add_up_to_the_same_request_unstreamed(served: Server) -> None:
    settings = {"messages": CHAT, "max_tokens": 16, "temperature": 1.0, "top_p": 0.9, "seed": 21, "n": 3,
                "logprobs": True, "top_logprobs": 2, "stream_options": {"include_usage": True}}
    whole = chat(served, **{k: v for k, v in settings.items() if k != "stream_options"})
    events = stream(served, "/chat/completions", settings)
    assert events[-1] == "[DONE]"
    usage_chunk = events[-2]
    assert usage_chunk["choices"] == [] and usage_chunk["usage"] == whole["usage"]
    streamed = streamed_chat(events[:-2] + ["[DONE]"])
    for choice in whole["choices"]:
        mine = streamed[choice["index"]]
        assert mine["text"] == choice["message"]["content"] and mine["finish_reason"] == choice["finish_reason"]
        assert [e["token_id"] for e in mine["logprobs"]] == [e["token_id"] for e in choice["logprobs"]["content"]]


def test_a_completions_stream_adds_up_to_the_answer(served: Server) -> None:
    settings = {"prompt": "Once upon a time", "max_tokens": 10, "temperature": 1.0, "seed": 4, "logprobs": 1}
    whole = post(served, "/completions", settings).json()["choices"][0]
    events = stream(served, "/completions", settings)
    assert events[-1] == "[DONE]"
    chunks = [c for e in events[:-1] for c in e["choices"]]
    assert all(e["object"] == "text_completion" for e in events[:-1])
    assert "".join(c["text"] for c in chunks) == whole["text"]
    assert chunks[-1]["finish_reason"] == whole["finish_reason"]
    offsets = [o for c in chunks if c["logprobs"] for o in c["logprobs"]["text_offset"]]
    assert offsets == whole["logprobs"]["text_offset"]  # offsets run on across chunks


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("path, body, field", [
    ("/chat/completions", {"messages": CHAT, "temperature": "hot"}, "temperature"),
    ("/chat/completions", {"messages": CHAT, "n": 0}, "n"),
    ("/chat/completions", {"messages": CHAT, "max_tokens": 0}, "max_tokens"),
    ("/chat/completions", {"messages": CHAT, "top_p": 1.5}, "top_p"),
    ("/chat/completions", {"messages": CHAT, "seed": "x"}, "seed"),
    ("/chat/completions", {"messages": CHAT, "stop": 3}, "stop"),
    ("/chat/completions", {"messages": CHAT, "stream": "yes"}, "stream"),
    ("/chat/completions", {"messages": CHAT, "logprobs": 5}, "logprobs"),
    ("/chat/completions", {"messages": CHAT, "top_logprobs": 2}, "top_logprobs"),
    ("/chat/completions", {"messages": CHAT, "presence_penalty": 0.5}, "presence_penalty"),
    ("/chat/completions", {"messages": [{"content": "no role"}]}, "messages"),
    ("/chat/completions", {"messages": "hi"}, "messages"),
    ("/completions", {"prompt": ""}, "prompt"),
    ("/completions", {"prompt": "x", "logprobs": 99}, "logprobs"),
    ("/completions", {"prompt": "x", "echo": True}, "echo"),
])
def test_a_bad_field_gets_400_naming_it_and_the_server_keeps_serving(served: Server, path: str, body: dict,
                                                                     field: str) -> None:
    response = post(served, path, body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == field and field in error["message"] and error["type"] == "invalid_request_error"
    assert chat(served, max_tokens=2)["choices"]  # and the next request is answered


def test_not_json_and_unknown_routes_get_openai_style_errors(served: Server) -> None:
    response = httpx.post(served.base_url + "/chat/completions", content=b"{not json", timeout=10)
    assert response.status_code == 400 and "not valid JSON" in response.json()["error"]["message"]
    host, port = served.httpd.server_address[:2]
    with socket.create_connection((host, port), timeout=10) as sock:  # httpx will not send a bad header
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: two\r\n\r\n{}")
        reply = sock.makefile("rb").read()
    assert reply.startswith(b"HTTP/1.1 400") and b"Content-Length" in reply.split(b"\r\n\r\n", 1)[1]
    response = httpx.post(served.base_url + "/embeddings", json={"input": "x"}, timeout=10)
    assert response.status_code == 404 and "no route" in response.json()["error"]["message"]


# ----------------------------------------------------------------------------- load


def _hang_up(base_url: str, body: dict[str, Any]) -> None:
    """Send a request on a raw socket and close it: a stream once some text has arrived, else at once."""
    host, port = base_url.split("//")[1].split("/")[0].rsplit(":", 1)
    payload = json.dumps(body).encode()
    with socket.create_connection((host, int(port)), timeout=60) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     + f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
        if not body.get("stream"):
            time.sleep(0.5)  # long enough for it to be decoding
            return
        seen = b""
        while seen.count(b"data: ") < 3:  # the role chunk, then some text
            data = sock.recv(4096)
            assert data, "the server closed the stream first"
            seen += data


@pytest.mark.reliability
def test_concurrent_requests_are_batched_and_all_answered_while_some_clients_hang_up(served: Server) -> None:
    """16 requests at once: plain, streamed, n=2, and 4 whose clients hang up (2 mid-stream, 2 waiting for a
    whole answer). Every request that stayed is answered exactly as it is when sent alone; the abandoned
    rows leave the batch; the server serves on."""
    scheduler = served.service.scheduler
    def body(i: int) -> dict[str, Any]:
        return {"messages": [{"role": "user", "content": f"Question {i}: why?"}], "max_tokens": 12 + i % 5,
                "temperature": 1.0, "seed": 100 + i, "n": 1 + i % 2}

    alone = {i: [c["message"]["content"] for c in chat(served, **body(i))["choices"]] for i in range(12)}
    steps_alone = scheduler.steps
    results: dict[int, Any] = {}
    errors: list[BaseException] = []

    def client(i: int) -> None:
        try:
            if i >= 12:  # hangs up; asks for many tokens so that it would otherwise hold its rows for long
                _hang_up(served.base_url, {**body(i), "max_tokens": 2000, "stream": i < 14})
                results[i] = "hung up"
            elif i % 3 == 0:
                streamed = streamed_chat(stream(served, "/chat/completions", body(i)))
                results[i] = [streamed[k]["text"] for k in sorted(streamed)]
            else:
                results[i] = [c["message"]["content"] for c in chat(served, **body(i))["choices"]]
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors, errors
    assert sorted(results) == list(range(16))
    for i in range(12):
        assert results[i] == alone[i], i  # batched with others, the same answer
    assert scheduler.largest_batch > 4  # they really shared batches
    deadline = time.monotonic() + 30
    while scheduler.in_flight and time.monotonic() < deadline:  # the hung-up requests' rows leave
        time.sleep(0.1)
    assert scheduler.in_flight == 0
    assert scheduler.steps - steps_alone < 1000  # they did not run on to their 2000 tokens
    assert chat(served, max_tokens=2)["choices"]


# ----------------------------------------------------------------------------- SIGTERM and the CLI


def _read_stream_in_background(base_url: str, body: dict[str, Any], out: list[Any]) -> threading.Thread:
    def run() -> None:
        try:
            with httpx.stream("POST", base_url + "/chat/completions", json=body, timeout=120) as response:
                out.append(response.status_code)
                out.extend(line for line in response.iter_lines() if line)
        except httpx.HTTPError as exc:
            out.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    return thread


@pytest.mark.reliability
def test_sigterm_lets_the_request_in_flight_finish_then_exits_0(tiny_model_dir: Path) -> None:
    server = start_server_process(str(tiny_model_dir), env={"OMP_NUM_THREADS": "1"},
                                  args=["--shutdown-timeout", "60"])
    with server:
        out: list[Any] = []
        thread = _read_stream_in_background(server.base_url, {"messages": CHAT, "max_tokens": 300,
                                                              "temperature": 1.0, "seed": 1, "stream": True}, out)
        deadline = time.monotonic() + 60
        while len(out) < 3 and time.monotonic() < deadline:  # it is streaming
            time.sleep(0.05)
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(60) == 0
        thread.join(60)
    assert "waiting up to 60 s for 1 request(s) in flight" in server.log_path.read_text()
    assert out[0] == 200 and out[-1] == "data: [DONE]", out[-3:]
    assert json.loads(out[-2][len("data: "):])["choices"][0]["finish_reason"] in ("stop", "length")
    with pytest.raises(httpx.TransportError):  # the socket is closed
        httpx.get(server.base_url + "/models", timeout=5)
    assert "stopped" in server.log_path.read_text()


@pytest.mark.reliability
def test_sigterm_cuts_what_does_not_finish_in_time_with_503_and_still_exits_0(tiny_model_dir: Path) -> None:
    server = start_server_process(str(tiny_model_dir), env={"OMP_NUM_THREADS": "1"},
                                  args=["--shutdown-timeout", "0"])
    with server:
        answer: list[httpx.Response] = []
        thread = threading.Thread(target=lambda: answer.append(httpx.post(
            server.base_url + "/chat/completions", timeout=120,
            json={"messages": CHAT, "max_tokens": 2000, "n": 8, "temperature": 1.0})))
        thread.start()
        time.sleep(1.0)  # decoding has started: 16000 tokens take far longer than that here
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(60) == 0
        thread.join(60)
    assert answer and answer[0].status_code == 503 and "shutting down" in answer[0].json()["error"]["message"]
    assert "cut short" in server.log_path.read_text()


def test_align_generate_and_label_judge_work_against_align_serve(served: Server, tmp_path: Path) -> None:
    """`align generate --backend openai` writes candidates from the served model, and `align label judge
    --base-url` judges them with it (the random tiny model's verdicts are gibberish: unparsed, never wins)."""
    from typer.testing import CliRunner

    from align.cli import app

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"q{i}", "prompt": f"Tell me fact {i}."}) + "\n" for i in range(3)))
    out = tmp_path / "candidates.jsonl"
    result = CliRunner().invoke(app, ["generate", "--backend", "openai", "--base-url", served.base_url, "--model",
                                      "tiny", "-p", str(prompts), "-o", str(out), "-n", "3", "--max-new-tokens", "6",
                                      "--logprobs", "1", "progress=false"])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["prompt_id"] for r in rows) == ["q0", "q1", "q2"]
    for row in rows:
        assert len(row["responses"]) == 3
        for candidate in row["responses"]:
            assert candidate["num_tokens"] == len(candidate["logprobs"]) >= 1

    judged = tmp_path / "judgements.jsonl"
    result = CliRunner().invoke(app, ["label", "judge", str(out), "--model", "tiny", "--base-url", served.base_url,
                                      "-o", str(judged), "--no-progress"])
    assert result.exit_code == 0, result.output
    judgements = [json.loads(line) for line in judged.read_text().splitlines()]
    assert {j["prompt_id"] for j in judgements} == {"q0", "q1", "q2"}  # (pairs of the non-empty answers)
    assert all([o["order"] for o in j["details"]["orders"]] == ["ab", "ba"] for j in judgements)
