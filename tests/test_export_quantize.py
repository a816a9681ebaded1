"""`align export --quantize`: GGUF files that llama.cpp's own converter would write, loaded back, checked,
served; and the refusals that come before any work."""

from __future__ import annotations

import copy
import json
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


def test_a_lora_run_is_merged_and_calibrated_on_its_own_training_prompts(
        tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import align.train

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"Question {i}?", "chosen": "Yes, because.", "rejected": "No."})
                             + "\n" for i in range(6)))
    result = align.train.dpo(model=str(tiny_model_dir), data=str(pairs), output_dir=str(tmp_path / "run"),
                             ref_cache_dir=str(tmp_path / "cache"), max_steps=1, eval_split=0,
                             per_device_train_batch_size=2, max_length=64)
    code, out, err = run_align(capsys, "export", result.run_dir, "--quantize", "q8_0", "-o", tmp_path / "q8")
    assert code == 0, err
    assert "merging its adapter" in err and "as q8_0" in out
    report = json.loads((tmp_path / "q8" / "export.json").read_text())
    assert report["merged_adapter"] is True
    assert report["calibration"] == {"from": str(pairs), "prompts": 6,
                                     "used_for": "the check only: round-to-nearest needs no calibration"}


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
