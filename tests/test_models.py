"""Model specs: bundled, local folders, run dirs, hub ids; the tiny test model; the real model (slow)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from align.models import ModelError, load_model, load_tokenizer, resolve_model


def test_unknown_bundled_name_lists_the_choices() -> None:
    with pytest.raises(ModelError, match="bundled:smollm2-135m-instruct"):
        resolve_model("bundled:gpt-5")


def test_missing_local_folder_is_an_error_not_a_hub_lookup(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="does not exist"):
        resolve_model(str(tmp_path / "no-such-model"))
    assert resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct").kind == "hub"


def test_folder_without_a_model_is_explained(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="holds no model"):
        resolve_model(str(tmp_path))


def test_tiny_model_shares_the_real_tokenizer_and_template(tiny_model_dir: Path) -> None:
    tokenizer = load_tokenizer(str(tiny_model_dir))
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    assert tokenizer.eos_token == tokenizer.pad_token == "<|im_end|>"
    assert len(tokenizer) == 49152


def test_run_dir_and_adapter_are_resolved(tiny_model_dir: Path, tmp_path: Path) -> None:
    import torch
    from peft import LoraConfig, get_peft_model

    run = tmp_path / "run"
    model = get_peft_model(load_model(str(tiny_model_dir)), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    model.save_pretrained(run / "adapter")
    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tiny_model_dir)

    source = resolve_model(str(run))
    assert source.kind == "adapter" and source.path == str(tiny_model_dir) and source.adapter == str(run / "adapter")
    loaded = load_model(str(run))
    assert loaded.peft_config["default"].r == 2
    merged = load_model(str(run), merge_adapter=True)
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, merged(ids).logits, atol=1e-5)


def test_loading_takes_a_resolved_source_without_resolving_again(tiny_model_dir: Path, monkeypatch) -> None:
    from align.models import loading

    source = resolve_model(str(tiny_model_dir))
    monkeypatch.setattr(loading, "resolve_model", lambda spec: pytest.fail(f"{spec} resolved again"))
    assert len(load_tokenizer(source)) == 49152
    assert load_model(source).config.vocab_size == 49152


def test_remote_code_is_off_by_default() -> None:
    import inspect

    for fn in (load_model, load_tokenizer):
        assert inspect.signature(fn).parameters["trust_remote_code"].default is False


@pytest.mark.slow
def test_bundled_model_answers_in_coherent_english(bundled_model: str) -> None:
    import torch

    tokenizer = load_tokenizer(bundled_model)
    model = load_model(bundled_model)
    inputs = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=24, do_sample=False)
    answer = tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer
    words = answer.split()
    assert len(words) >= 4 and sum(w.strip(".,!?").isalpha() for w in words) / len(words) > 0.8
