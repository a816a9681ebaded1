"""SFT on TRL's SFTTrainer with a tiny model: run dir, loss on completions only, held-out loss, resume, export,
and the errors that come before any model loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import align.train
from align.data.io import iter_rows, write_records
from align.errors import ConfigError, DataError
from tests.clihelp import run_align

TOPICS = ["tea", "rain", "maps", "bread", "chess", "bikes", "owls", "glass", "salt", "kites"]


def _sft_rows(n: int = 20) -> list[dict]:
    return [{"prompt": [{"role": "user", "content": f"Tell me one fact about {TOPICS[i % 10]} (#{i})."}],
             "completion": [{"role": "assistant", "content": f"{TOPICS[i % 10].capitalize()} is older than you think."}]}
            for i in range(n)]


@pytest.fixture(scope="module")
def sft_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("sft-data") / "sft.jsonl"
    write_records(path, _sft_rows())
    return path


def _settings(model: Path, data: Path, out: Path, **extra) -> dict:
    return {"model": str(model), "data": str(data), "output_dir": str(out), "max_steps": 4,
            "per_device_train_batch_size": 2, "max_length": 96, "save_steps": 2, **extra}


def _completion_nll(model_dir: Path, rows: list[dict]) -> tuple[float, float]:
    """(mean NLL per completion token, mean NLL per token of the whole sequence) of the untrained model, computed
    here from the chat template, apart from TRL."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    completion_nll = whole_nll = 0.0
    completion_tokens = whole_tokens = 0
    for row in rows:
        prompt_ids = tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=True)
        ids = tokenizer.apply_chat_template(row["prompt"] + row["completion"], tokenize=True)
        prompt_ids, ids = [list(x["input_ids"] if hasattr(x, "keys") else x) for x in (prompt_ids, ids)]
        assert ids[: len(prompt_ids)] == prompt_ids
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, :-1]
        nll = torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]), reduction="none")
        completion_nll += nll[len(prompt_ids) - 1:].sum().item()
        completion_tokens += len(ids) - len(prompt_ids)
        whole_nll += nll.sum().item()
        whole_tokens += len(ids) - 1
    return completion_nll / completion_tokens, whole_nll / whole_tokens


def test_sft_lora_run_dir_and_held_out_loss_on_completion_tokens_only(
        tiny_model_dir: Path, sft_file: Path, tmp_path: Path, capsys) -> None:
    from align.train.data import load_training_data, split_holdout

    result = align.train.sft(**_settings(tiny_model_dir, sft_file, tmp_path / "sft", eval_split=0.25))
    run = Path(result.run_dir)
    for name in ("config.yaml", "data.json", "trl_args.json", "preflight.txt", "metrics.jsonl", "curves.png",
                 "run.json", "eval_before.json", "adapter/adapter_config.json", "adapter/tokenizer_config.json"):
        assert (run / name).exists(), name
    assert not (run / "diagnosis.json").exists()  # no rewards to diagnose
    assert result.method == "sft" and result.steps == 4 and result.ref_cache is None
    assert result.reference.startswith("none")
    args = json.loads((run / "trl_args.json").read_text())
    assert args["completion_only_loss"] is True and args["learning_rate"] == 2e-4
    assert "pre-flight: 15 rows" in (run / "preflight.txt").read_text()
    steps = [m["step"] for _, m in iter_rows(run / "metrics.jsonl") if "loss" in m]
    assert steps == [1, 2, 3, 4]

    # Before training, TRL's held-out loss is the untrained model's mean NLL of the completion tokens alone.
    rows = load_training_data(sft_file, "sft").rows
    _, heldout = split_holdout(rows, 0.25, seed=0)
    completion_only, whole_sequence = _completion_nll(tiny_model_dir, heldout)
    assert result.eval_before["loss"] == pytest.approx(completion_only, rel=1e-4)
    assert abs(completion_only - whole_sequence) > 0.01
    assert result.eval_after["loss"] < result.eval_before["loss"]

    code, _, err = run_align(capsys, "export", result.run_dir, "--merge", "-o", tmp_path / "merged")
    assert code == 0, err
    assert (tmp_path / "merged" / "config.json").exists()


def test_sft_reads_conversations_and_text_rows_and_any_sft_config_key(
        tiny_model_dir: Path, tmp_path: Path, capsys) -> None:
    messages = tmp_path / "messages.jsonl"
    write_records(messages, [{"messages": r["prompt"] + r["completion"]} for r in _sft_rows(6)])
    code, out, err = run_align(capsys, "train", "sft", "--model", tiny_model_dir, "--data", messages,
                               "-o", tmp_path / "conv", "max_steps=1", "per_device_train_batch_size=2",
                               "max_length=64", "completion_only_loss=false", "lora=false")
    assert code == 0, err
    assert "SFT finished: 1 steps" in out
    run = tmp_path / "conv"
    assert json.loads((run / "trl_args.json").read_text())["completion_only_loss"] is False
    assert (run / "model" / "config.json").exists()
    data = json.loads((run / "data.json").read_text())
    assert data["train"]["converted_from"] == "trl" and data["train"]["rows_used"] == 2

    text = tmp_path / "text.jsonl"
    write_records(text, [{"prompt": f"Q{i}: name a colour.", "completion": " Blue."} for i in range(4)])
    result = align.train.sft(**_settings(tiny_model_dir, text, tmp_path / "text", max_steps=1))
    assert result.steps == 1


def test_sft_speed_ups_take_trls_steps(tiny_model_dir: Path, tmp_path: Path, monkeypatch) -> None:
    """align's SFT defaults on a CPU (passes of one row, the lean LM head) take the same optimizer steps as TRL's
    trainer on whole batches with its own head, on completions of unequal lengths (the loss is a mean over the
    whole batch's tokens, not over each pass's)."""
    from align.train.speedups.lm_head import TokenLogProbs

    rows = _sft_rows(12)
    for i, row in enumerate(rows):
        row["completion"][0]["content"] = " ".join(f"Fact {k + 1} about {TOPICS[i % 10]}." for k in range(1 + i % 4))
    data = tmp_path / "uneven.jsonl"
    write_records(data, rows)
    lean_calls = []
    forward = TokenLogProbs.forward
    monkeypatch.setattr(TokenLogProbs, "forward",
                        staticmethod(lambda *a, **k: lean_calls.append(1) or forward(*a, **k)))  # counts, still runs

    def steps(name: str, **switches) -> tuple[tuple[int, int], list[tuple]]:
        result = align.train.sft({"micro_batch_size": switches.pop("micro", "auto")},  # a dict keeps None
                                 **_settings(tiny_model_dir, data, tmp_path / name, max_steps=3, eval_split=0,
                                             per_device_train_batch_size=4, save_strategy="no", **switches))
        batches = json.loads((Path(result.run_dir) / "trl_args.json").read_text())
        metrics = [m for _, m in iter_rows(Path(result.run_dir) / "metrics.jsonl") if "loss" in m]
        return (batches["per_device_train_batch_size"], batches["gradient_accumulation_steps"]), \
            [(m["loss"], m["grad_norm"]) for m in metrics]

    plain_batches, plain = steps("trl", micro=None, lean_lm_head=False)
    assert plain_batches == (4, 1) and not lean_calls
    fast_batches, fast = steps("align")
    assert fast_batches == (1, 4) and lean_calls
    assert len(fast) == 3
    for p, f in zip(plain, fast):
        assert f == pytest.approx(p, rel=1e-4, abs=1e-5)
    # Label smoothing's loss is a mean over each pass's tokens: asked for passes, it is refused, not made inexact.
    with pytest.raises(ConfigError, match="label_smoothing_factor"):
        align.train.sft({"micro_batch_size": 1}, **_settings(tiny_model_dir, data, tmp_path / "smooth",
                                                            label_smoothing_factor=0.1))


@pytest.mark.reliability
def test_sft_resumes_from_its_last_checkpoint(tiny_model_dir: Path, sft_file: Path, tmp_path: Path) -> None:
    first = align.train.sft(**_settings(tiny_model_dir, sft_file, tmp_path / "r", max_steps=2, eval_split=0))
    assert (Path(first.run_dir) / "checkpoints" / "checkpoint-2").exists()
    resumed = align.train.sft(**_settings(tiny_model_dir, sft_file, tmp_path / "r", max_steps=4, eval_split=0),
                              resume=True)
    assert resumed.steps == 4
    steps = [m["step"] for _, m in iter_rows(Path(resumed.run_dir) / "metrics.jsonl") if "loss" in m]
    assert steps == [1, 2, 3, 4]  # steps 1-2 are not trained again


def test_sft_bad_input_is_refused_before_any_model_loads(tmp_path: Path, capsys) -> None:
    pairs = tmp_path / "pairs.jsonl"
    write_records(pairs, [{"prompt": "q", "chosen": "a", "rejected": "b"}])
    never = str(tmp_path / "never")
    with pytest.raises(DataError, match=r"align data select judgements.jsonl"):
        align.train.sft(model="/nonexistent", data=str(pairs), output_dir=never)
    unpaired = tmp_path / "kto.jsonl"
    write_records(unpaired, [{"prompt": "q", "completion": "a", "label": True}])
    with pytest.raises(DataError, match=r"SFT needs SFT rows .*`align train kto`"):
        align.train.sft(model="/nonexistent", data=str(unpaired), output_dir=never)
    with pytest.raises(ConfigError, match="SFT uses no reference model"):
        align.train.sft(model="/nonexistent", data=str(pairs), output_dir=never, reference="other-model")
    code, _, err = run_align(capsys, "train", "sft", "--data", pairs, "-o", never, "completion_only_los=true")
    assert code != 0 and "(did you mean 'completion_only_loss'?)" in err
    sft_rows = tmp_path / "sft.jsonl"
    write_records(sft_rows, [{"prompt": "q", "completion": "a"}, {"prompt": "q2", "completion": ""}])
    with pytest.raises(DataError, match=r"sft.jsonl:2: field 'completion'"):
        align.train.sft(model="/nonexistent", data=str(sft_rows), output_dir=never)
    assert not Path(never).exists()
