"""`align serve`'s parts that need no running server (which engine serves, vLLM's command line for each kind
of model align makes, how a streamed choice holds back text that may still change, request checks), and a
training run dir served by align's own server."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from align.errors import AlignError
from align.generate.serving import ServeConfig, choose_engine
from align.generate.serving.requests import RequestError, parse_chat
from align.generate.serving.vllm import unavailable_reason, unsupported_reason, vllm_command
from align.models import resolve_model


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA adapter (rank 12, weights that change the answers) on the tiny model, with its own tokenizer,
    as a training run leaves it."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = tmp_path_factory.mktemp("run")
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           LoraConfig(r=12, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(0)
    for name, parameter in model.named_parameters():
        if "lora_B" in name:  # peft starts B at zero: the adapter would change nothing
            torch.nn.init.normal_(parameter, std=0.5)
    model.save_pretrained(run / "adapter")
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(run / "adapter")
    return run


def test_vllm_serves_a_model_folder_under_the_served_name(tiny_model_dir: Path) -> None:
    config = ServeConfig(model=str(tiny_model_dir), port=8123, served_model_name="tiny", vllm_args=["--seed", "1"])
    argv, env = vllm_command(config, resolve_model(config.model), python="python")
    assert argv == ["python", "-m", "vllm.entrypoints.openai.api_server", "--model", str(tiny_model_dir),
                    "--host", "127.0.0.1", "--port", "8123", "--served-model-name", "tiny", "--seed", "1"]
    assert env == {}


def test_vllm_serves_a_run_dir_as_its_base_plus_the_adapter(adapter_dir: Path, tiny_model_dir: Path) -> None:
    config = ServeConfig(model=str(adapter_dir), port=0, served_model_name="student")
    argv, _ = vllm_command(config, resolve_model(config.model), python="python")
    assert argv[argv.index("--model") + 1] == str(tiny_model_dir)
    assert argv[argv.index("--lora-modules") + 1] == f"student={adapter_dir / 'adapter'}"
    assert argv[argv.index("--max-lora-rank") + 1] == "16"  # rank 12 rounded up to a rank vLLM takes
    assert argv[argv.index("--tokenizer") + 1] == str(adapter_dir / "adapter")
    assert "--enable-lora" in argv and int(argv[argv.index("--port") + 1]) > 0  # port 0: a free one chosen here


def test_vllm_gets_the_api_key_in_its_environment_never_on_its_command_line(
        tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = ServeConfig(model=str(tiny_model_dir), api_key_env="ALIGN_TEST_SERVE_KEY")
    monkeypatch.delenv("ALIGN_TEST_SERVE_KEY", raising=False)
    with pytest.raises(AlignError, match="ALIGN_TEST_SERVE_KEY"):
        vllm_command(config, resolve_model(config.model))
    monkeypatch.setenv("ALIGN_TEST_SERVE_KEY", "sk-serve-secret")
    argv, env = vllm_command(config, resolve_model(config.model))
    assert env == {"VLLM_API_KEY": "sk-serve-secret"} and "sk-serve-secret" not in " ".join(argv)


def test_an_adapter_on_an_adapter_is_not_for_vllm(adapter_dir: Path, tmp_path: Path) -> None:
    second = tmp_path / "second"
    shutil.copytree(adapter_dir / "adapter", second)
    settings = json.loads((second / "adapter_config.json").read_text())
    (second / "adapter_config.json").write_text(json.dumps({**settings,
                                                            "base_model_name_or_path": str(adapter_dir)}))
    assert "merge it first" in unsupported_reason(resolve_model(str(second)))
    assert unsupported_reason(resolve_model(str(adapter_dir))) is None


def test_the_engine_is_vllm_only_where_vllm_can_run(tiny_model_dir: Path) -> None:
    source = resolve_model(str(tiny_model_dir))
    assert choose_engine(ServeConfig(model=str(tiny_model_dir), engine="align"), source)[0] == "align"
    reason = unavailable_reason()
    if reason is None:
        pytest.skip("vLLM and a GPU are here: auto picks vLLM")
    assert choose_engine(ServeConfig(model=str(tiny_model_dir)), source) == ("align", reason)
    with pytest.raises(AlignError, match="--engine vllm: .*--engine align"):
        choose_engine(ServeConfig(model=str(tiny_model_dir), engine="vllm"), source)


def test_a_streamed_choice_holds_back_a_possible_stop_string_and_a_split_character(tiny_model_dir: Path) -> None:
    from align.generate.backends.transformers import TransformersEngine
    from align.generate.serving.responses import ChoiceText
    from align.generate.serving.scheduler import Token

    engine = TransformersEngine(str(tiny_model_dir), device="cpu")
    text = "Hello wonderful world, café"
    ids = engine.tokenizer(text, add_special_tokens=False)["input_ids"]
    choice = ChoiceText(engine, ["world!"])
    sent = []
    for token_id in ids:
        choice.add(Token(0, token_id))
        delta, _ = choice.pending()
        sent.append(delta)
        so_far = "".join(sent)
        assert "\ufffd" not in so_far and text.startswith(so_far)
        assert not so_far.endswith(("w", "wo", "wor", "worl", "world"))  # could still become "world!"
    choice.finish("length")
    sent.append(choice.pending()[0])
    assert "".join(sent) == choice.text == text


def test_requests_name_the_field_they_fail_on() -> None:
    with pytest.raises(RequestError) as bad:
        parse_chat({"messages": [{"role": "user", "content": "x"}], "stream_options": {"include_usage": True}})
    assert bad.value.param == "stream_options" and bad.value.status == 400
    request = parse_chat({"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
                          "logprobs": True, "top_k": -1, "frequency_penalty": 0, "max_completion_tokens": 9,
                          "return_tokens_as_token_ids": True})  # a vendor extra: ignored, as vLLM ignores them
    assert request.messages == [{"role": "user", "content": "hi"}] and request.logprobs == 0
    assert request.sampling.top_k == 0 and request.max_tokens == 9


def test_align_serves_a_run_dir_and_samples_as_the_teacher_does(adapter_dir: Path, tiny_model_dir: Path) -> None:
    """A request with a seed gets the very tokens the transformers teacher draws for that seed, from the
    adapter's weights (not the base model's)."""
    import httpx

    from align.generate.backends.transformers import TransformersEngine
    from align.generate.config import SamplingParams
    from align.generate.decode import RowRequest
    from align.generate.plan import derive_seed
    from align.generate.serving import build_server

    messages = [{"role": "user", "content": "Say something."}]
    body = {"messages": messages, "max_tokens": 12, "temperature": 1.0, "seed": 42}
    answers = {}
    for spec in (str(adapter_dir), str(tiny_model_dir)):
        server = build_server(ServeConfig(model=spec, port=0, device="cpu")).start()
        try:
            assert httpx.get(server.base_url + "/models", timeout=10).json()["data"][0]["id"] == spec
            answers[spec] = httpx.post(server.base_url + "/chat/completions", json=body,
                                       timeout=60).json()["choices"][0]["message"]["content"]
        finally:
            server.stop()
    engine = TransformersEngine(str(adapter_dir), device="cpu")
    (teacher,) = engine.generate([engine.encode(messages)],
                                 [RowRequest(0, SamplingParams(temperature=1.0, top_p=1.0), derive_seed(42, 0))],
                                 max_new_tokens=12)
    assert answers[str(adapter_dir)] == teacher.text
    assert answers[str(adapter_dir)] != answers[str(tiny_model_dir)]  # the adapter was applied


def test_the_scheduler_gives_pinned_tokens_with_per_request_limits_stops_and_logprobs(tiny_model_dir: Path) -> None:
    """Four jobs queued before the decoding thread starts, so what joins when is fixed: at most 4 rows, the
    third and fourth jobs join a running batch as the first two finish. Tokens recorded on CPU with torch
    2.13 from the tiny random model (see tests/test_decode.py)."""
    import torch

    from align.generate.backends.transformers import TransformersEngine
    from align.generate.config import SamplingParams
    from align.generate.decode import RowRequest
    from align.generate.serving.scheduler import Failed, Finished, Job, Scheduler, Token

    if not torch.__version__.startswith("2.13."):
        pytest.skip("tokens recorded with torch 2.13 on CPU")
    engine = TransformersEngine(str(tiny_model_dir), device="cpu")
    p = [engine.encode([{"role": "user", "content": "hi " * n}]) for n in (1, 6, 3, 9)]
    hot, greedy = SamplingParams(temperature=1.0, top_p=1.0), SamplingParams(temperature=0.0)
    nucleus, top5 = SamplingParams(temperature=0.7, top_p=0.9), SamplingParams(temperature=1.2, top_p=1.0, top_k=5)
    jobs = [Job([p[0]], [RowRequest(0, hot, 11), RowRequest(0, hot, 12)], 6, logprobs=2),
            Job([p[1]], [RowRequest(0, greedy, 13)], 3),
            Job([p[2]], [RowRequest(0, nucleus, 14), RowRequest(0, nucleus, 15)], 9, stop=["oda", "Tibetan"]),
            Job([p[3], p[0]], [RowRequest(0, top5, 16), RowRequest(1, hot, 17)], 5, logprobs=0)]
    scheduler = Scheduler(engine, max_batch=4, max_tokens_cap=64)
    for job in jobs:
        scheduler.submit(job)
    scheduler.start()
    results = []
    try:
        for job in jobs:
            tokens, reasons, entries = [[] for _ in job.rows], [None] * len(job.rows), [[] for _ in job.rows]
            while None in reasons:
                event = job.events.get(timeout=60)
                assert not isinstance(event, Failed), event
                if isinstance(event, Token):
                    tokens[event.choice].append(event.token_id)
                    entries[event.choice].append(event.logprob)
                elif isinstance(event, Finished):
                    reasons[event.choice] = event.reason
            results.append((tokens, reasons, entries))
    finally:
        scheduler.close(1)
    assert [(tokens, reasons) for tokens, reasons, _ in results] == [
        ([[7324, 23885, 48446, 8268, 28692, 34095], [22877, 11436, 22246, 28855, 20084, 6240]], ["length", "length"]),
        ([[198, 198, 198]], ["length"]),
        ([[22872, 3827, 3026, 25378, 35312, 24298], [21406, 32736, 5772, 43463, 11351, 19156, 28830, 46622, 4731]],
         ["stop", "length"]),
        ([[198, 25347, 5377, 25347, 5377], [21331, 26283, 40803, 6078, 1434]], ["length", "length"]),
    ]
    (first, *_), (second, *_), (third, *_), (fourth, *_) = (entries for _, _, entries in results)
    assert [len(e["top_logprobs"]) for e in first] == [2] * 6 and first[0]["token_id"] == 7324
    assert second == [None] * 3 and third == [None] * 6
    assert [e.get("top_logprobs", []) for e in fourth] == [[]] * 5 and fourth[0]["token_id"] == 198
    assert scheduler.largest_batch == 4


def test_a_gguf_goes_to_llama_server_when_installed_else_to_align_with_the_reason(
        tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from align.export.gguf import GGUF_QUANTS, write_gguf
    from align.generate.serving.llamacpp import llamacpp_command
    from align.models import load_model, load_tokenizer

    write_gguf(load_model(str(tiny_model_dir), device="cpu"), load_tokenizer(str(tiny_model_dir)),
               tmp_path / "m.gguf", GGUF_QUANTS["q8_0"], name="tiny")
    source = resolve_model(str(tmp_path))
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.delenv("LLAMA_SERVER", raising=False)
    engine, why = choose_engine(ServeConfig(model=str(tmp_path)), source)
    assert engine == "align" and "llama-server is not on the PATH" in why and "dequantised" in why
    with pytest.raises(AlignError, match="--engine llama.cpp: .*not on the PATH.*--engine align"):
        choose_engine(ServeConfig(model=str(tmp_path), engine="llama.cpp"), source)
    with pytest.raises(AlignError, match="--engine llama.cpp: .*is not a GGUF file"):
        choose_engine(ServeConfig(model=str(tiny_model_dir), engine="llama.cpp"), resolve_model(str(tiny_model_dir)))

    monkeypatch.setenv("LLAMA_SERVER", "/opt/llama/llama-server")
    monkeypatch.setenv("KEY_VAR", "s3cret")
    assert choose_engine(ServeConfig(model=str(tmp_path)), source)[0] == "llama.cpp"
    config = ServeConfig(model=str(tmp_path), port=8123, max_batch=16, served_model_name="student",
                         api_key_env="KEY_VAR", llamacpp_args=["--cache-type-k", "q8_0"])
    argv, env = llamacpp_command(config, source, "/opt/llama/llama-server")
    assert argv[:5] == ["/opt/llama/llama-server", "--model", str(tmp_path / "m.gguf"), "--host", "127.0.0.1"]
    assert argv[argv.index("--alias") + 1] == "student" and argv[argv.index("--parallel") + 1] == "16"
    assert argv[-2:] == ["--cache-type-k", "q8_0"] and "s3cret" not in argv and env == {"LLAMA_API_KEY": "s3cret"}
