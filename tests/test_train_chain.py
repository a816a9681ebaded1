"""A training run that starts from another run: LoRA after LoRA loads with both runs' training (an adapter on
an adapter, no merged copy written), its reference is the earlier run's model, and full fine-tunes before or after
LoRA keep working. Tiny model, TRL's trainers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

import align.train
from align.data.io import write_records
from align.models import ModelError, load_model, resolve_model
from tests.clihelp import run_align
from tests.test_train import _pairs
from tests.test_train_sft import _sft_rows

# A high learning rate, so that each run's few steps move the tiny model's outputs well beyond float noise.
_RUN = {"max_steps": 4, "per_device_train_batch_size": 2, "max_length": 96, "save_steps": 2, "eval_split": 0,
        "learning_rate": 1e-2}


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("chain-data")
    files = {"sft": folder / "sft.jsonl", "pairs": folder / "pairs.jsonl", "heldout": folder / "heldout.jsonl"}
    write_records(files["sft"], _sft_rows())
    pairs = _pairs(30)
    write_records(files["pairs"], pairs[:24])
    write_records(files["heldout"], pairs[24:])
    return files


def _ids() -> Any:
    import torch

    return torch.tensor([[1, 17, 230, 4051, 99, 12, 7, 600]])


def _logits(model: Any) -> Any:
    import torch

    with torch.no_grad():
        return model.eval()(_ids()).logits[0]


def _merged_by_hand(base: Path, adapters: list[Path]) -> Any:
    """The base model with each adapter's low-rank update W += (lora_alpha / r) B A added to its weights, read
    from the files: no peft involved."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base)
    state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    for adapter in adapters:
        config = json.loads((adapter / "adapter_config.json").read_text())
        scaling = config["lora_alpha"] / config["r"]
        weights = load_file(adapter / "adapter_model.safetensors")
        updated = 0
        for key, a in weights.items():
            if key.endswith(".lora_A.weight"):
                b = weights[key.replace(".lora_A.", ".lora_B.")]
                target = key.removeprefix("base_model.model.").replace(".lora_A.weight", ".weight")
                state[target] += scaling * (b @ a)
                updated += 1
        assert updated, f"no LoRA weights in {adapter}"
    model.load_state_dict(state)
    return model


def test_lora_after_lora_loads_with_both_runs_training_and_is_referenced_to_the_first(
        tiny_model_dir: Path, data: dict[str, Path], tmp_path: Path, capsys, monkeypatch) -> None:
    import torch

    import align.train.run

    torch.set_num_threads(1)
    cache = tmp_path / "ref-cache"
    sft = align.train.sft(model=str(tiny_model_dir), data=str(data["sft"]), output_dir=str(tmp_path / "sft"), **_RUN)
    # The held-out figures before training are measured, not taken from the reference's log-probs as a policy that
    # starts as its reference allows: only a measured pass shows the reference is where the policy starts.
    monkeypatch.setattr(align.train.run, "starts_at_reference", lambda config, trainer: False)
    # The second run's LoRA settings differ from the first's: the chain does not depend on them matching.
    dpo = align.train.dpo(model=sft.run_dir, data=str(data["pairs"]), output_dir=str(tmp_path / "dpo"),
                          eval_data=str(data["heldout"]), ref_cache_dir=str(cache),
                          lora={"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"]}, **_RUN)
    sft_adapter, dpo_adapter = tmp_path / "sft" / "adapter", tmp_path / "dpo" / "adapter"

    # The new adapter names the first run's adapter as its base; nothing else was written (no merged copy).
    config = json.loads((dpo_adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(sft_adapter.resolve())
    assert sorted(p.name for p in (tmp_path / "sft").iterdir() if p.is_dir()) == ["adapter", "checkpoints"]
    source = resolve_model(dpo.run_dir)
    assert (source.kind, source.path, source.base_adapters, source.adapter) == (
        "adapter", str(tiny_model_dir), (str(sft_adapter.resolve()),), str(dpo_adapter))
    # run.json says what the run started from.
    started = json.loads((tmp_path / "dpo" / "run.json").read_text())["started_from"]
    assert started == dpo.started_from == {"model": sft.run_dir, "base": str(tiny_model_dir),
                                           "adapters": [str(sft_adapter)]}
    assert json.loads((tmp_path / "sft" / "run.json").read_text())["started_from"]["adapters"] == []

    # The loaded model is the base with both updates, as merged by hand from the adapter files ...
    expected = _logits(_merged_by_hand(tiny_model_dir, [sft_adapter, dpo_adapter]))
    loaded = load_model(dpo.run_dir, device="cpu")  # the adapter attached (eval's students load merged)
    assert loaded.peft_config["default"].r == 4
    torch.testing.assert_close(_logits(loaded), expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(_logits(load_model(dpo.run_dir, merge_adapter=True, device="cpu")), expected,
                               atol=1e-4, rtol=1e-4)
    code, _, err = run_align(capsys, "export", dpo.run_dir, "--merge", "-o", tmp_path / "exported")
    assert code == 0, err
    torch.testing.assert_close(_logits(load_model(str(tmp_path / "exported"), device="cpu")), expected,
                               atol=1e-4, rtol=1e-4)
    # ... which is neither the base, nor the first run, nor the second run's update alone on the base (the
    # adapter as it loaded before: without the first run's training).
    for other in (load_model(str(tiny_model_dir), device="cpu"), load_model(sft.run_dir, device="cpu"),
                  _merged_by_hand(tiny_model_dir, [dpo_adapter])):
        assert (_logits(other) - expected).abs().max() > 1e-2

    # The reference is the first run's model, where the second started: before any step the policy equals it,
    # so every held-out reward is zero (against the original base they would not be).
    assert "the model it starts from" in dpo.reference and "adapter switched off" not in dpo.reference
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert dpo.eval_before[key] == pytest.approx(0.0, abs=1e-5), key
    # Its cached reference log-probs are keyed by the first run's weights too: a DPO run from the original base
    # with the same data and cache computes its own.
    assert dpo.ref_cache == {"rows": 8, "reused": 0, "computed": 8}
    plain = align.train.dpo(model=str(tiny_model_dir), data=str(data["pairs"]), output_dir=str(tmp_path / "plain"),
                            ref_cache_dir=str(cache), **_RUN)
    assert plain.ref_cache == {"rows": 8, "reused": 0, "computed": 8}


def test_full_finetunes_before_and_after_lora(tiny_model_dir: Path, data: dict[str, Path], tmp_path: Path) -> None:
    import torch

    torch.set_num_threads(1)
    sft = align.train.sft(model=str(tiny_model_dir), data=str(data["sft"]), output_dir=str(tmp_path / "sft"), **_RUN)
    # A full fine-tune after LoRA trains the first run's weights (its adapter merged) into a plain model folder,
    # referenced to them.
    full = align.train.dpo(model=sft.run_dir, data=str(data["pairs"]), output_dir=str(tmp_path / "full"), lora=False,
                           eval_data=str(data["heldout"]), ref_cache_dir=str(tmp_path / "cache"),
                           **{**_RUN, "learning_rate": 1e-3})
    assert resolve_model(full.run_dir).kind == "local" and full.started_from["adapters"] == [
        str(tmp_path / "sft" / "adapter")]
    assert full.eval_before["rewards/margins"] == pytest.approx(0.0, abs=1e-5)
    # LoRA after a full fine-tune: the adapter's base is the full run's model folder, a plain model.
    lora = align.train.sft(model=full.run_dir, data=str(data["sft"]), output_dir=str(tmp_path / "lora"), **_RUN)
    source = resolve_model(lora.run_dir)
    assert (source.path, source.base_adapters) == (str(tmp_path / "full" / "model"), ())
    expected = _logits(_merged_by_hand(tmp_path / "full" / "model", [tmp_path / "lora" / "adapter"]))
    torch.testing.assert_close(_logits(load_model(lora.run_dir, device="cpu")), expected, atol=1e-4, rtol=1e-4)


def test_an_adapter_whose_base_leads_back_to_itself_is_refused(tiny_model_dir: Path, tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(load_model(str(tiny_model_dir), device="cpu"), LoraConfig(r=2, target_modules=["q_proj"]))
    for name, base in (("a", tmp_path / "b"), ("b", tmp_path / "a")):
        model.save_pretrained(tmp_path / name)
        config = json.loads((tmp_path / name / "adapter_config.json").read_text())
        (tmp_path / name / "adapter_config.json").write_text(json.dumps({**config,
                                                                         "base_model_name_or_path": str(base)}))
    with pytest.raises(ModelError, match="leads back to itself"):
        resolve_model(str(tmp_path / "a"))
