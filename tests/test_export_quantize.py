"""`align export --quantize`: GGUF files that llama.cpp's own converter would write, loaded back, checked,
served; and the refusals that come before any work."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import numpy as np
import pytest

from align.export.gguf import GGUF_QUANTS, rotary_rows_to_interleaved, write_gguf
from align.models import load_model, load_tokenizer, resolve_model
from tests.clihelp import run_align

PROMPT = [{"role": "user", "content": "Name three colours and say which one you like."}]


def _logp(model, tokenizer):
    import torch

    from align.models.tokens import prompt_token_ids

    ids = torch.tensor([prompt_token_ids(tokenizer, PROMPT)])
    with torch.inference_mode():
        return torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)


def _kl(a, b) -> float:
    """Mean KL(a || b) over positions, from log-probabilities."""
    return float((a.exp() * (a - b)).sum(-1).mean())


def test_rotary_rows_move_from_halves_to_neighbouring_pairs() -> None:
    # one head of 4 dims (rows a0 a1 | b0 b1, each a row of 2 values), and two heads to show heads stay apart
    rows = np.arange(8, dtype=np.float32).reshape(4, 2)
    assert rotary_rows_to_interleaved(rows, 1)[:, 0].tolist() == [0, 4, 2, 6]
    two_heads = np.arange(16, dtype=np.float32).reshape(8, 2)
    assert rotary_rows_to_interleaved(two_heads, 2)[:, 0].tolist() == [0, 4, 2, 6, 8, 12, 10, 14]


@pytest.fixture(scope="module")
def exports(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from align.export import quantize_run

    out = tmp_path_factory.mktemp("exports")
    return {q: quantize_run(str(tiny_model_dir), q, out / q) for q in ("q8_0", "q4_0")}


def test_the_file_loads_back_as_the_weights_align_checked_with_the_same_tokens(
        tiny_model_dir: Path, tmp_path: Path) -> None:
    """transformers reads the file with its own GGUF loader (names, shapes, rotary order undone): the logits must
    be those of the dequantised weights write_gguf returned, and far from a model whose rows were not reordered."""
    float_model, tokenizer = load_model(str(tiny_model_dir), device="cpu"), load_tokenizer(str(tiny_model_dir))
    dequantised = write_gguf(float_model, tokenizer, tmp_path / "m.gguf", GGUF_QUANTS["q4_0"], name="tiny")
    checked = copy.deepcopy(float_model)
    checked.load_state_dict(dequantised, strict=False)
    source = resolve_model(str(tmp_path / "m.gguf"))
    loaded, tokenizer_back = load_model(source, device="cpu"), load_tokenizer(source)
    text = tokenizer.apply_chat_template(PROMPT, tokenize=False, add_generation_prompt=True)
    assert tokenizer_back(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert tokenizer_back.chat_template == tokenizer.chat_template
    assert _kl(_logp(checked, tokenizer), _logp(loaded, tokenizer_back)) < 1e-9
    assert 0 < _kl(_logp(float_model, tokenizer), _logp(checked, tokenizer)) < 1e-3


def test_eight_bits_cost_less_than_four(exports: dict[str, Path]) -> None:
    kl = {name: json.loads((folder / "export.json").read_text())["check"]["kl_per_token"]
          for name, folder in exports.items()}
    assert 0 < kl["q8_0"] < kl["q4_0"], kl


def test_the_export_records_size_calibration_and_its_own_check(exports: dict[str, Path]) -> None:
    report = json.loads((exports["q4_0"] / "export.json").read_text())
    assert report["format"] == "q4_0" and report["bits"] == 4 and report["file"] == "model-q4_0.gguf"
    assert report["size_bytes"] == (exports["q4_0"] / "model-q4_0.gguf").stat().st_size
    assert report["size_bytes"] < report["float_size_bytes"]
    assert report["calibration"]["prompts"] == 4 and "general prompts" in report["calibration"]["from"]
    check = report["check"]
    assert check["tokens"] > 0 and 0 <= check["kl_per_token"] < 1e-3 and check["next_token_agreement"] > 0.9
    assert isinstance(check["smoke"]["answer"], str)


def test_a_gguf_file_or_its_folder_is_a_model_spec(exports: dict[str, Path]) -> None:
    folder = exports["q8_0"]
    by_file = resolve_model(str(folder / "model-q8_0.gguf"))
    assert (by_file.path, by_file.gguf_file) == (str(folder), "model-q8_0.gguf")
    (folder.parent / "two").mkdir()
    for name in ("a.gguf", "b.gguf"):
        (folder.parent / "two" / name).write_bytes(b"")
    from align.models import ModelError

    with pytest.raises(ModelError, match="2 GGUF files"):
        resolve_model(str(folder.parent / "two"))


@pytest.fixture(scope="module")
def lora_run(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A LoRA DPO run of a few steps at a high rate (its adapter moves the weights), and its training data. The
    data is given relative to where training ran, and the run dir lies elsewhere, as a user's often does."""
    import align.train

    folder = tmp_path_factory.mktemp("lora")
    pairs = folder / "data" / "pairs.jsonl"
    pairs.parent.mkdir()
    pairs.write_text("".join(json.dumps({"prompt": f"Question {i}?", "chosen": "Yes, because.", "rejected": "No."})
                             + "\n" for i in range(6)))
    run_dir = tmp_path_factory.mktemp("elsewhere") / "run"
    here = Path.cwd()
    os.chdir(folder)
    try:
        result = align.train.dpo(model=str(tiny_model_dir), data="data/pairs.jsonl", output_dir=str(run_dir),
                                 ref_cache_dir=str(folder / "cache"), max_steps=3, eval_split=0, learning_rate=1e-2,
                                 per_device_train_batch_size=2, max_length=64)
    finally:
        os.chdir(here)
    return Path(result.run_dir), pairs.resolve()


def test_a_lora_run_is_merged_at_8_bits_and_calibrated_on_its_own_training_prompts(
        lora_run: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run, pairs = lora_run
    code, out, err = run_align(capsys, "export", run, "--quantize", "q8_0", "-o", tmp_path / "q8")
    assert code == 0, err
    assert "merging its adapter" in err and "as q8_0" in out
    report = json.loads((tmp_path / "q8" / "export.json").read_text())
    assert report["merged_adapter"] is True and report["adapter"] is None
    assert report["calibration"] == {"from": str(pairs), "prompts": 6,
                                     "used_for": "the check only: round-to-nearest needs no calibration"}
    assert resolve_model(str(tmp_path / "q8")).adapter is None


def test_at_4_bits_the_adapter_stays_apart_with_its_change_whole(
        lora_run: tuple[Path, Path], tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Rounded to 4 bits, a merged adapter's small change mostly vanishes; kept apart, the export computes with
    the 4-bit base plus exactly the adapter's B·A, both as align loads the folder (PEFT's files) and as llama.cpp
    would (the GGUF adapter: B·A with the rotary rows put back must be the same change)."""
    import gguf
    import torch

    from align.export.gguf import interleaved_rows_to_rotary
    from align.generate.serving.config import ServeConfig
    from align.generate.serving.llamacpp import llamacpp_command

    run, _ = lora_run
    code, out, err = run_align(capsys, "export", run, "--quantize", "q4_0", "-o", tmp_path / "q4")
    assert code == 0, err
    assert "keeping its adapter beside the quantised base" in err and "+ LoRA adapter lora/adapter-f16.gguf" in out
    folder = tmp_path / "q4"
    report = json.loads((folder / "export.json").read_text())
    assert report["merged_adapter"] is False and report["adapter"]["gguf"] == "lora/adapter-f16.gguf"
    assert report["size_bytes"] == ((folder / "model-q4_0.gguf").stat().st_size
                                    + (folder / "lora" / "adapter-f16.gguf").stat().st_size)
    source = resolve_model(str(folder))
    assert (source.kind, source.gguf_file, source.adapter) == ("gguf", "model-q4_0.gguf", str(folder / "lora"))

    float_student = load_model(str(run), device="cpu", merge_adapter=True).state_dict()
    float_base = load_model(str(run), device="cpu").get_base_model()
    float_base = {k.replace(".base_layer", ""): v for k, v in float_base.state_dict().items() if "lora_" not in k}
    exported = load_model(source, device="cpu")  # the 4-bit base, dequantised, with the adapter on it
    name = "model.layers.0.self_attn.q_proj.weight"
    exported_base = exported.get_base_model().state_dict()[name.replace(".weight", ".base_layer.weight")].clone()
    change = float_student[name] - float_base[name]
    assert change.abs().max() > 1e-4  # the adapter moved the weight
    torch.testing.assert_close(exported.merge_and_unload().state_dict()[name] - exported_base, change,
                               atol=1e-5, rtol=1e-3)

    heads = json.loads((tiny_model_dir / "config.json").read_text())["num_attention_heads"]
    tensors = {t.name: np.asarray(t.data, dtype=np.float32)
               for t in gguf.GGUFReader(folder / "lora" / "adapter-f16.gguf").tensors}
    llama_cpp_change = tensors["blk.0.attn_q.weight.lora_b"] @ tensors["blk.0.attn_q.weight.lora_a"]
    llama_cpp_change = interleaved_rows_to_rotary(llama_cpp_change, heads)
    np.testing.assert_allclose(llama_cpp_change, change.numpy(), atol=1e-5, rtol=1e-2)

    argv, _ = llamacpp_command(ServeConfig(model=str(folder), port=8999), source, "llama-server")
    assert argv[argv.index("--lora") + 1] == str(folder / "lora" / "adapter-f16.gguf")


def test_bad_requests_fail_before_any_work(tiny_model_dir: Path, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_align(capsys, "export", tiny_model_dir, "--quantize", "q3_k", "-o", tmp_path / "a")
    assert code != 0 and "unknown format" in err and "q4_0 (4-bit gguf, CPU" in err and "gptq-w4a16" in err
    code, _, err = run_align(capsys, "export", tiny_model_dir, "--quantize", "gptq-w4a16", "-o", tmp_path / "b")
    assert code != 0 and "needs a CUDA GPU" in err and "q8_0, q4_0, q4_1" in err
    (tmp_path / "c").mkdir()
    code, _, err = run_align(capsys, "export", tiny_model_dir, "--quantize", "q8_0", "-o", tmp_path / "c")
    assert code != 0 and "exists" in err
    bad = tmp_path / "calibration.jsonl"
    bad.write_text(json.dumps({"prompt": "ok"}) + "\n" + json.dumps({"question": "no prompt"}) + "\n")
    code, _, err = run_align(capsys, "export", tiny_model_dir, "--quantize", "q8_0", "-o", tmp_path / "d",
                             "--calibration", bad)
    assert code != 0 and f"{bad}:2" in err and "'prompt'" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c", "calibration.jsonl"]  # nothing half-written


def test_an_architecture_llama_cpp_lays_out_otherwise_is_refused_with_the_way_out(tmp_path: Path) -> None:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from align.export.gguf import GGUFExportError

    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2))
    with pytest.raises(GGUFExportError, match="convert_hf_to_gguf.py"):
        write_gguf(model, None, tmp_path / "x.gguf", GGUF_QUANTS["q8_0"], name="x")
    assert not (tmp_path / "x.gguf").exists()


def test_align_serve_answers_from_a_gguf_export(exports: dict[str, Path]) -> None:
    import httpx

    from align.generate.serving import ServeConfig, build_server

    server = build_server(ServeConfig(model=str(exports["q4_0"]), port=0, served_model_name="q4")).start()
    try:
        response = httpx.post(server.base_url + "/chat/completions", timeout=60,
                              json={"model": "q4", "messages": PROMPT, "max_tokens": 5})
    finally:
        server.stop()
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] == 5


@pytest.mark.slow
def test_the_bundled_model_exports_to_the_very_bytes_llama_cpp_wrote(bundled_model: str, tmp_path: Path) -> None:
    """The bundled GGUF is llama.cpp's own Q4_1 file; its weights, converted to float and quantised again by
    align, must come out block for block the same (Q4_1 of values already on a Q4_1 grid is exact), with the
    same tensor names, the same rotary row order and the same tokenizer."""
    import gguf

    from align.models import bundled_gguf

    original = gguf.GGUFReader(bundled_gguf(bundled_model.removeprefix("bundled:"))[0])
    write_gguf(load_model(bundled_model, device="cpu"), load_tokenizer(bundled_model), tmp_path / "q.gguf",
               GGUF_QUANTS["q4_1"], name="smollm2")
    ours = gguf.GGUFReader(tmp_path / "q.gguf")
    theirs = {t.name: t for t in original.tensors}
    assert sorted(t.name for t in ours.tensors) == sorted(theirs)
    for tensor in ours.tensors:
        assert tensor.tensor_type == theirs[tensor.name].tensor_type, tensor.name
        assert np.array_equal(np.asarray(tensor.data), np.asarray(theirs[tensor.name].data)), tensor.name
    for key, field in original.fields.items():
        if key.startswith(("tokenizer.", "llama.")) or key in ("general.architecture", "general.file_type"):
            assert ours.fields[key].contents() == field.contents(), key
