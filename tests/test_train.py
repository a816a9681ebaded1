"""DPO/KTO training on the real TRL trainers with a tiny model: run dir, cache, pre-flight, resume, multi-process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

import align.train
from align.data.io import iter_rows, write_records
from align.errors import AlignError, ConfigError, DataError
from align.train.preflight import run_preflight
from tests.clihelp import run_align

REPO = Path(__file__).resolve().parent.parent


def _pairs(n: int = 24) -> list[dict]:
    topics = ["tea", "rain", "maps", "bread", "chess", "bikes", "owls", "glass", "salt", "kites", "clocks", "moss"]
    rows = []
    for i in range(n):
        topic = topics[i % len(topics)]
        rows.append({"prompt": [{"role": "user", "content": f"Tell me one fact about {topic} (#{i})."}],
                     "chosen": [{"role": "assistant", "content": f"{topic.capitalize()} is interesting in a concrete way."}],
                     "rejected": [{"role": "assistant", "content": f"I do not know anything about {topic}, sorry, " * 3}]})
    return rows


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "pairs.jsonl"
    write_records(path, _pairs())
    return path


@pytest.fixture(scope="module")
def isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("ref-cache")


def _settings(tiny_model_dir: Path, data: Path, out: Path, cache: Path, **extra) -> dict:
    return {"model": str(tiny_model_dir), "data": str(data), "output_dir": str(out), "ref_cache_dir": str(cache),
            "max_steps": 4, "per_device_train_batch_size": 2, "max_length": 96, "save_steps": 2, **extra}


def test_dpo_lora_writes_a_complete_run_dir_and_second_run_reuses_the_reference(
        tiny_model_dir: Path, pairs_file: Path, tmp_path: Path, isolated_cache: Path) -> None:
    first = align.train.dpo(**_settings(tiny_model_dir, pairs_file, tmp_path / "a", isolated_cache, eval_split=0.25))
    run = Path(first.run_dir)
    for name in ("config.yaml", "data.json", "preflight.txt", "metrics.jsonl", "curves.png", "run.json",
                 "adapter/adapter_config.json", "adapter/tokenizer_config.json"):
        assert (run / name).exists(), name
    metrics = [row for _, row in iter_rows(run / "metrics.jsonl")]
    assert [m["step"] for m in metrics if "loss" in m] == [1, 2, 3, 4]
    last_step = [m for m in metrics if "loss" in m][-1]
    assert all(k in last_step for k in ("rewards/margins", "rewards/accuracies", "learning_rate"))
    assert any("tokens_per_second" in m for m in metrics)
    data = json.loads((run / "data.json").read_text())
    assert len(data["train"]["sha256"]) == 64 and data["eval"]["rows"] > 0
    assert first.ref_cache == {"rows": 8, "reused": 0, "computed": 8}
    assert "adapter switched off" in first.reference
    assert "rewards/accuracies" in first.eval_before and "rewards/accuracies" in first.eval_after

    second = align.train.dpo(**_settings(tiny_model_dir, pairs_file, tmp_path / "b", isolated_cache, eval_split=0.25))
    assert second.ref_cache == {"rows": 8, "reused": 8, "computed": 0}
    # same data, same reference, same seed: the cached reference gives the very same losses
    assert second.final_loss == pytest.approx(first.final_loss, abs=1e-6)


def test_a_separate_reference_is_resolved_once_and_cached_by_its_weights(
        tiny_model_dir: Path, pairs_file: Path, tmp_path: Path, monkeypatch) -> None:
    from align.models import loading

    cache = tmp_path / "cache"
    with monkeypatch.context() as m, pytest.raises(AlignError, match="does not exist"):
        m.setattr("align.train.run.load_model", lambda *a, **k: pytest.fail("a model loaded first"))
        align.train.dpo(**_settings(tiny_model_dir, pairs_file, tmp_path / "bad", cache, eval_split=0,
                                    reference=str(tmp_path / "no-such-model")))
    base = align.train.dpo(**_settings(tiny_model_dir, pairs_file, tmp_path / "base", cache, eval_split=0))
    assert base.ref_cache == {"rows": 8, "reused": 0, "computed": 8}
    resolved = []
    resolve = loading.resolve_model
    monkeypatch.setattr(loading, "resolve_model", lambda spec: resolved.append(spec) or resolve(spec))
    monkeypatch.setattr("align.train.run.resolve_model", loading.resolve_model)
    separate = align.train.dpo(**_settings(tiny_model_dir, pairs_file, tmp_path / "separate", cache, eval_split=0,
                                           reference=str(tiny_model_dir)))
    assert "separate model" in separate.reference
    assert resolved == [str(tiny_model_dir)] * 2  # the student and the reference, once each
    # the same weights as the first run's base reference: its cached log-probs serve
    assert separate.ref_cache == {"rows": 8, "reused": 8, "computed": 0}


def test_the_cache_holds_answers_so_flipped_pairs_need_no_second_reference_pass(
        tiny_model_dir: Path, pairs_file: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    first = align.train.dpo(**_settings(tiny_model_dir, pairs_file, tmp_path / "first", cache, eval_split=0))
    assert first.ref_cache == {"rows": 8, "reused": 0, "computed": 8}
    shards = sorted(cache.glob("*/shard-*.jsonl"))
    entries = [json.loads(line) for shard in shards for line in shard.read_text().splitlines()]
    assert len(entries) == 16  # a chosen and a rejected answer for each of the 8 pairs trained on
    # A random-label control flips some pairs; a relabelled set pairs the same answers again, in any order.
    rows = [json.loads(line) for line in pairs_file.read_text().splitlines()]
    flipped = [{**r, "chosen": r["rejected"], "rejected": r["chosen"]} if i % 2 else r for i, r in enumerate(rows)]
    write_records(tmp_path / "flipped.jsonl", flipped)
    second = align.train.dpo(**_settings(tiny_model_dir, tmp_path / "flipped.jsonl", tmp_path / "second", cache,
                                         eval_split=0))
    assert second.ref_cache == {"rows": 8, "reused": 8, "computed": 0}
    assert sorted(cache.glob("*/shard-*.jsonl")) == shards  # nothing new computed or written


def test_an_example_goes_through_the_reference_only_for_an_answer_nobody_else_brings() -> None:
    from align.train.speedups.ref_cache import answer_keys, rows_to_compute

    # all-pairs of one prompt: a>b, a>c, b>c; then a pair whose answers are both cached
    keys = [["a", "b"], ["a", "c"], ["b", "c"], ["d", "e"]]
    assert rows_to_compute(keys, known=set(), lengths=[1, 2, 3, 4]) == [0, 1, 3]
    assert rows_to_compute(keys, known={"d", "e"}, lengths=[3, 2, 1, 4]) == [2, 1]  # shortest first
    assert rows_to_compute(keys, known={"a", "b", "c", "d", "e"}, lengths=[1, 1, 1, 1]) == []
    row = {"prompt_ids": [1, 2], "chosen_ids": [3], "rejected_ids": [4, 5]}
    flipped = {"prompt_ids": [1, 2], "chosen_ids": [4, 5], "rejected_ids": [3]}
    columns = ["chosen_ids", "rejected_ids"]
    assert answer_keys(row, columns, pairwise=False) == answer_keys(flipped, columns, pairwise=False)[::-1]
    # LD-DPO weighs an answer's tail by the other's length: there an entry belongs to its pair and its side
    pairwise = answer_keys(row, columns, pairwise=True)
    assert len(set(pairwise)) == 2 and not set(pairwise) & set(answer_keys(flipped, columns, pairwise=True))


def test_full_finetune_and_export(tiny_model_dir: Path, pairs_file: Path, tmp_path: Path, isolated_cache: Path,
                                  capsys) -> None:
    result = align.train.dpo(**_settings(tiny_model_dir, pairs_file, tmp_path / "full", isolated_cache, lora=False))
    assert (Path(result.run_dir) / "model" / "config.json").exists()
    assert "no copy kept" in result.reference
    code, _, err = run_align(capsys, "export", result.run_dir, "-o", tmp_path / "exported")
    assert code == 0, err
    assert (tmp_path / "exported" / "model.safetensors").exists()


def test_export_merges_a_lora_run(tiny_model_dir: Path, pairs_file: Path, tmp_path: Path, isolated_cache: Path,
                                  capsys) -> None:
    result = align.train.dpo(**_settings(tiny_model_dir, pairs_file, tmp_path / "lora", isolated_cache, max_steps=1))
    code, _, err = run_align(capsys, "export", result.run_dir, "-o", tmp_path / "no-merge")
    assert code != 0 and "--merge" in err
    code, _, err = run_align(capsys, "export", result.run_dir, "--merge", "-o", tmp_path / "merged")
    assert code == 0, err
    assert not (tmp_path / "merged" / "adapter_config.json").exists()
    assert (tmp_path / "merged" / "config.json").exists()


def test_kto_sets_class_weights_from_eq8(tiny_model_dir: Path, tmp_path: Path, isolated_cache: Path, caplog) -> None:
    rows = [{"prompt": f"Question {i}?", "completion": f" Answer {i}.", "label": i % 4 == 0} for i in range(16)]
    data = tmp_path / "kto.jsonl"
    write_records(data, rows)
    caplog.set_level("INFO", logger="align")
    result = align.train.kto(**_settings(tiny_model_dir, data, tmp_path / "kto", isolated_cache))
    assert result.steps == 4
    args = json.loads((Path(result.run_dir) / "trl_args.json").read_text())
    ratio = args["desirable_weight"] * 4 / (args["undesirable_weight"] * 12)
    assert 1.0 <= ratio <= 4 / 3
    assert "set automatically" in caplog.text


def test_kto_trains_on_its_rows_shuffled_not_grouped_by_prompt(tiny_model_dir: Path, tmp_path: Path,
                                                               isolated_cache: Path) -> None:
    # TRL's KTOTrainer reads rows in order and takes each row's KL completion from its batch neighbour; rows as
    # `align pairs build` writes them (a prompt's answers together) made every step one prompt's answers.
    from align.train.run import train

    rows = [{"prompt": f"Question {p}?", "completion": f" Answer {p}.{k}", "label": k < 2}
            for p in range(8) for k in range(4)]
    data = tmp_path / "kto.jsonl"
    write_records(data, rows)
    seen: list[list[tuple[int, ...]]] = []

    class RecordOrder:  # the order TRL reads, each row named by its prompt's tokens
        def train(self, *args: Any, **kwargs: Any) -> Any:
            seen.append([tuple(ids) for ids in self.train_dataset["prompt_ids"]])
            return super().train(*args, **kwargs)

    settings = _settings(tiny_model_dir, data, tmp_path / "kto", isolated_cache, eval_split=0,
                         max_steps=8, per_device_train_batch_size=4)  # 32 rows: all of them, in one epoch
    train(align.train.load_train_config("kto", **settings), extra_mixins=(RecordOrder,))
    order = seen[0]
    assert len(order) == 32 and sorted(Counter(order).values()) == [4] * 8
    neighbours_of_one_prompt = sum(a == b for a, b in zip(order, order[1:]))
    assert neighbours_of_one_prompt < 12, order  # 24 in file order; a shuffle of 8 prompts x 4 expects ~9


def test_bad_config_fails_before_any_model_is_loaded(tmp_path: Path, pairs_file: Path, capsys) -> None:
    out = tmp_path / "never"
    code, _, err = run_align(capsys, "train", "dpo", "--model", "/nonexistent/model", "--data", pairs_file,
                             "-o", out, "max_step=8")
    assert code != 0 and "unknown key 'max_step' for DPO (did you mean 'max_steps'?)" in err
    code, _, err = run_align(capsys, "train", "dpo", "--data", pairs_file, "-o", out, "beta=strong")
    assert code != 0 and "'beta' must be a number" in err
    assert not out.exists()


def test_unpaired_data_given_to_dpo_says_how_to_build_pairs(tmp_path: Path, tiny_model_dir: Path) -> None:
    data = tmp_path / "kto.jsonl"
    write_records(data, [{"prompt": "q", "completion": "a", "label": True}])
    with pytest.raises(DataError, match="align pairs build"):
        align.train.dpo(model=str(tiny_model_dir), data=str(data), output_dir=str(tmp_path / "r"))


def test_qlora_on_cpu_is_a_clear_error(tmp_path: Path, pairs_file: Path, tiny_model_dir: Path) -> None:
    with pytest.raises(ConfigError, match="QLoRA .* needs a CUDA GPU"):
        align.train.dpo(model=str(tiny_model_dir), data=str(pairs_file), output_dir=str(tmp_path / "q"),
                        lora={"quantize": "4bit"})


def test_existing_run_needs_resume(tiny_model_dir: Path, pairs_file: Path, tmp_path: Path, isolated_cache: Path) -> None:
    settings = _settings(tiny_model_dir, pairs_file, tmp_path / "r", isolated_cache, max_steps=2)
    align.train.dpo(**settings)
    with pytest.raises(AlignError, match="--resume"):
        align.train.dpo(**settings)


# ----------------------------------------------------------------------------- pre-flight


def test_preflight_catches_duplicate_bos_leaks_and_truncation(tiny_model_dir: Path) -> None:
    from align.models import load_tokenizer

    tokenizer = load_tokenizer(str(tiny_model_dir))
    tokenizer.add_bos_token = True
    rendered = "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
    rows = [{"prompt": rendered, "chosen": "4.", "rejected": "Five."},
            {"prompt": "Q: name a colour.", "chosen": "Blue.\n\nHuman: and another?", "rejected": "Red."},
            {"prompt": "Please name the largest ocean on Earth.",
             "chosen": "Please name the largest ocean on Earth. The Pacific.", "rejected": "The Atlantic."}]
    report = run_preflight(rows, tokenizer, method="dpo", max_length=1024, per_device_train_batch_size=2)
    text = "\n".join(report.errors)
    assert "1 of 6 completions start with their prompt" in "\n".join(report.warnings)
    assert "1 rows start with BOS twice" in text
    assert "1 of 6 completions contain another turn's markers" in "\n".join(report.warnings)
    leaky = [{"prompt": f"Please answer question number {i} now.", "chosen": f"Please answer question number {i} now. Yes.",
              "rejected": "No."} for i in range(3)]
    report = run_preflight(leaky, tokenizer, method="dpo", max_length=1024, per_device_train_batch_size=2)
    assert any("3 of 6 completions start with their prompt" in e for e in report.errors)

    tokenizer.add_bos_token = False
    long = [{"prompt": "word " * 50, "chosen": "yes " * 40, "rejected": "yes " * 40 + "no"}]
    report = run_preflight(long, tokenizer, method="dpo", max_length=80, per_device_train_batch_size=2)
    assert "1 pairs are identical after truncation" in "\n".join(report.errors)
    assert report.stats["completions cut by max_length"] == "2 of 2"


def test_preflight_catches_a_template_that_never_closes_the_turn(tiny_model_dir: Path) -> None:
    from align.models import load_tokenizer

    tokenizer = load_tokenizer(str(tiny_model_dir))
    tokenizer.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                               "{% if add_generation_prompt %}assistant: {% endif %}")
    rows = [{"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant", "content": "hello"}],
             "rejected": [{"role": "assistant", "content": "go away"}]}]
    report = run_preflight(rows, tokenizer, method="dpo", max_length=256, per_device_train_batch_size=2)
    assert any("do not end with EOS" in e for e in report.errors)


def test_kto_batch_of_one_is_refused(tiny_model_dir: Path, tmp_path: Path) -> None:
    data = tmp_path / "kto.jsonl"
    write_records(data, [{"prompt": f"q{i}", "completion": f"a{i}", "label": i % 2 == 0} for i in range(4)])
    with pytest.raises(AlignError, match="per_device_train_batch_size >= 2"):
        align.train.kto(model=str(tiny_model_dir), data=str(data), output_dir=str(tmp_path / "k"),
                        per_device_train_batch_size=1)


# ----------------------------------------------------------------------------- resume and multi-process


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "align", *map(str, args)]


def _env(cache: Path) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "ALIGN_CACHE_DIR": str(cache.parent / "align-cache"),
            "TQDM_DISABLE": "1"}


@pytest.mark.reliability
@pytest.mark.parametrize("method", ["dpo", "kto"])
def test_killed_run_resumes_to_the_same_result(method: str, tiny_model_dir: Path, pairs_file: Path, tmp_path: Path,
                                               isolated_cache: Path) -> None:
    common = ["--model", tiny_model_dir, "--data", pairs_file, f"ref_cache_dir={isolated_cache}", "max_steps=8",
              "per_device_train_batch_size=2", "max_length=96", "save_steps=3"]
    env = _env(isolated_cache)
    subprocess.run(_cli("train", method, "-o", tmp_path / "whole", *common), check=True, env=env, capture_output=True)

    proc = subprocess.Popen(_cli("train", method, "-o", tmp_path / "killed", *common), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint = tmp_path / "killed" / "checkpoints" / "checkpoint-3"
    deadline = time.time() + 300
    while not (checkpoint / "trainer_state.json").exists():
        assert proc.poll() is None, "training ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed" / "run.json").exists()

    done = subprocess.run(_cli("train", method, "-o", tmp_path / "killed", "--resume", *common), env=env,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    whole = json.loads((tmp_path / "whole" / "run.json").read_text())
    resumed = json.loads((tmp_path / "killed" / "run.json").read_text())
    assert resumed["steps"] == whole["steps"] == 8
    assert resumed["final_loss"] == pytest.approx(whole["final_loss"], abs=1e-4)
    steps = [m["step"] for _, m in iter_rows(tmp_path / "killed" / "metrics.jsonl") if "loss" in m]
    assert steps == list(range(1, 9))  # no step logged twice after the resume


def test_two_cpu_processes_with_accelerate(tiny_model_dir: Path, pairs_file: Path, tmp_path: Path,
                                           isolated_cache: Path) -> None:
    cmd = [sys.executable, "-m", "accelerate.commands.launch",
           "--config_file", str(REPO / "configs" / "accelerate" / "multi-cpu.yaml"), "-m", "align", "train", "dpo", "--model", str(tiny_model_dir), "--data", str(pairs_file),
           "-o", str(tmp_path / "ddp"), f"ref_cache_dir={isolated_cache}", "max_steps=3",
           "per_device_train_batch_size=2", "max_length=96"]
    done = subprocess.run(cmd, env=_env(isolated_cache), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    run = json.loads((tmp_path / "ddp" / "run.json").read_text())
    assert run["steps"] == 3
    trl_args = json.loads((tmp_path / "ddp" / "trl_args.json").read_text())
    assert trl_args["use_cpu"] is True
    # each step consumed 2 processes x 2 pairs
    assert json.loads((tmp_path / "ddp" / "data.json").read_text())["train"]["rows_used"] == 12


def test_prefix_sharing_gives_the_same_losses_and_gradients(tiny_model_dir: Path, pairs_file: Path,
                                                            tmp_path: Path, isolated_cache: Path) -> None:
    """One packed sequence per pair (shared prompt) must be the same math as TRL's two rows per pair."""
    runs = {}
    for shared in (False, True):
        result = align.train.dpo({"micro_batch_size": None},  # whole batches: packing across pairs is tested too
                                 **_settings(tiny_model_dir, pairs_file, tmp_path / f"shared-{shared}", isolated_cache,
                                             max_steps=3, per_device_train_batch_size=4, prefix_sharing=shared,
                                             save_strategy="no"))
        rows = [m for _, m in iter_rows(Path(result.run_dir) / "metrics.jsonl") if "loss" in m]
        runs[shared] = [(m["loss"], m["grad_norm"], m["rewards/margins"], m["logps/chosen"]) for m in rows]
    for unshared, shared in zip(runs[False], runs[True]):
        assert shared == pytest.approx(unshared, rel=1e-4, abs=1e-5)
    assert runs[True][-1][0] < runs[True][0][0]  # and it does train


def _uneven_pairs(n: int = 24) -> list[dict]:
    """Pairs whose chosen answers run from one to four sentences: the sft term's token mean then depends on how
    the batch's tokens are grouped."""
    rows = _pairs(n)
    for i, row in enumerate(rows):
        row["chosen"][0]["content"] = " ".join(f"Point {k + 1} about item {i} is clear." for k in range(1 + i % 4))
    return rows


@pytest.mark.parametrize("batch, accumulation", [(4, 1), (2, 2)])
def test_micro_batches_give_the_same_steps_as_whole_batches(batch: int, accumulation: int, tiny_model_dir: Path,
                                                           tmp_path: Path, isolated_cache: Path, monkeypatch) -> None:
    """A batch of 4 pairs run as 4 passes of 1 (gradient accumulation) must take the same optimizer steps, with
    align's default loss (sigmoid + sft: the sft term a mean over each batch's chosen tokens) and pairs of
    unequal chosen lengths; also when the user accumulates 2 batches of 2 (4 passes, 2 batches' token means)."""
    from align.train.speedups.micro_batches import ExactMicroBatchMixin

    data = tmp_path / "uneven.jsonl"
    write_records(data, _uneven_pairs())

    def steps(name: str, micro: Any) -> list[tuple]:
        result = align.train.dpo({"micro_batch_size": micro},  # a dict config keeps None (keywords drop it)
                                 **_settings(tiny_model_dir, data, tmp_path / name, isolated_cache, max_steps=3,
                                             per_device_train_batch_size=batch,
                                             gradient_accumulation_steps=accumulation, save_strategy="no"))
        trl_args = json.loads((Path(result.run_dir) / "trl_args.json").read_text())
        assert trl_args["loss_type"] == ["sigmoid", "sft"]
        assert (trl_args["per_device_train_batch_size"], trl_args["gradient_accumulation_steps"]) == (
            (batch, accumulation) if micro is None else (1, batch * accumulation))
        rows = [m for _, m in iter_rows(Path(result.run_dir) / "metrics.jsonl") if "loss" in m]
        return [(m["loss"], m["grad_norm"], m["rewards/margins"], m["logps/chosen"]) for m in rows]

    whole, micro = steps("whole", None), steps("micro", "auto")  # auto: passes of one pair on a CPU
    assert len(micro) == 3
    for w, m in zip(whole, micro):
        assert m == pytest.approx(w, rel=1e-4, abs=1e-5)
    if accumulation == 1:
        # The same passes with TRL's per-pass token mean (the mixin off) take other steps: the test can fail.
        monkeypatch.setattr(ExactMicroBatchMixin, "_align_passes_per_batch", lambda self: None)
        naive = steps("naive", "auto")
        assert naive[0][:2] != pytest.approx(whole[0][:2], rel=1e-3)


def test_micro_batch_settings() -> None:
    from align.train.config import (PASSES_PER_BATCH_ATTR, TrainConfig, build_trl_args, micro_batches,
                                    resolve_micro_batch)

    assert micro_batches(8, 1, 1) == (1, 8)
    assert micro_batches(8, 2, 4) == (4, 4)
    assert micro_batches(6, 1, 4) == (6, 1)  # does not divide: the batch stays whole
    assert micro_batches(4, 1, 8) == (4, 1)
    dpo = TrainConfig(data="p.jsonl", output_dir="o")
    assert resolve_micro_batch(dpo, {}, on_gpu=False) == 1
    assert resolve_micro_batch(dpo, {}, on_gpu=True) is None
    assert resolve_micro_batch(dpo, {"loss_type": "aot"}, on_gpu=False) is None  # looks across the batch
    assert resolve_micro_batch(TrainConfig(data="p", output_dir="o", method="kto"), {}, on_gpu=False) is None
    # SFT: TRL divides its token sum by the whole batch's token count, so it splits (not label smoothing's mean)
    sft_config = TrainConfig(data="p", output_dir="o", method="sft")
    assert resolve_micro_batch(sft_config, {}, on_gpu=False) == 1
    assert resolve_micro_batch(sft_config, {"loss_type": "dft"}, on_gpu=False) == 1
    assert resolve_micro_batch(sft_config, {}, on_gpu=True) is None
    assert resolve_micro_batch(sft_config, {"label_smoothing_factor": 0.1}, on_gpu=False) is None
    # align's default loss: its sft term (a token mean) is kept exact by align's trainer, so it splits too
    sft = {"loss_type": ["sigmoid", "sft"]}
    assert resolve_micro_batch(dpo, sft, on_gpu=False) == 1
    assert resolve_micro_batch(TrainConfig(data="p", output_dir="o", micro_batch_size=2), sft, on_gpu=False) == 2
    # ... but not with WPO weights (the term times the batch's mean pair weight)
    assert resolve_micro_batch(dpo, {**sft, "use_weighting": True}, on_gpu=False) is None
    with pytest.raises(ConfigError, match=r"\(sft with use_weighting\) is not a mean of per-pair terms"):
        resolve_micro_batch(TrainConfig(data="p", output_dir="o", micro_batch_size=2), {**sft, "use_weighting": True},
                            on_gpu=False)
    # build_trl_args splits align's default (TRL's batch of 8) and tells the trainer how many passes make a batch
    args = build_trl_args(dpo, "o", on_gpu=False, bf16_ok=False)
    assert args.loss_type == ["sigmoid", "sft"]
    assert (args.per_device_train_batch_size, args.gradient_accumulation_steps) == (1, 8)
    assert getattr(args, PASSES_PER_BATCH_ATTR) == 8 and PASSES_PER_BATCH_ATTR not in args.to_json_string()
    assert args.precompute_ref_batch_size == 8  # the reference pass holds no activations: whole batches
    mine = build_trl_args(TrainConfig(data="p", output_dir="o", precompute_ref_batch_size=2),
                          "o", on_gpu=False, bf16_ok=False)
    assert mine.precompute_ref_batch_size == 2
    whole = build_trl_args(TrainConfig(data="p", output_dir="o", micro_batch_size=None), "o", on_gpu=False,
                           bf16_ok=False)
    assert whole.per_device_train_batch_size == 8 and not hasattr(whole, PASSES_PER_BATCH_ATTR)
    # A term added by a trainer mixin (DPO + KD) counts like a loss type.
    assert resolve_micro_batch(dpo, {}, on_gpu=False, extra_loss="KD") is None
    with pytest.raises(ConfigError, match="KD"):
        resolve_micro_batch(TrainConfig(data="p", output_dir="o", micro_batch_size=1), {}, on_gpu=False,
                            extra_loss="KD")
    with pytest.raises(ConfigError, match="micro_batch_size"):
        align.train.load_train_config("dpo", {"data": "p", "output_dir": "o"}, overrides=["micro_batch_size=0"])


def test_gradient_checkpointing_is_off_unless_asked_for(tmp_path: Path) -> None:
    from align.train.config import TrainConfig, align_trl_defaults, build_trl_args

    # TRL turns it on by default; align keeps it off on every device (its cost is time, the models here fit)
    for on_gpu in (False, True):
        assert align_trl_defaults("dpo", on_gpu=on_gpu, bf16_ok=on_gpu)["gradient_checkpointing"] is False
    asked = TrainConfig(data="p.jsonl", output_dir="o", gradient_checkpointing=True)
    assert build_trl_args(asked, str(tmp_path), on_gpu=False, bf16_ok=False).gradient_checkpointing is True


def test_dpo_and_kto_train_lora_at_the_rate_the_quality_suite_chose_and_a_set_rate_wins(tmp_path: Path) -> None:
    from align.train.config import align_trl_defaults, build_trl_args

    rates = {m: align_trl_defaults(m, on_gpu=False, bf16_ok=False)["learning_rate"]
             for m in ("dpo", "kto", "sft", "orpo", "simpo")}
    assert rates == {"dpo": 4e-4, "kto": 8e-4, "sft": 2e-4, "orpo": 2e-4, "simpo": 2e-4}
    assert align_trl_defaults("dpo", on_gpu=False, bf16_ok=False, lora=False)["learning_rate"] == 5e-6
    asked = align.train.load_train_config("dpo", {"data": "p", "output_dir": "o"}, overrides=["learning_rate=1e-4"])
    assert build_trl_args(asked, str(tmp_path), on_gpu=False, bf16_ok=False).learning_rate == 1e-4


def test_short_runs_sample_their_rows_and_kto_samples_keep_the_class_shares() -> None:
    import random

    from align.train.data import sample_for_run

    rows = [{"prompt": f"q{i}", "completion": f"a{i}", "label": i % 4 == 0} for i in range(200)]  # 50 / 150
    kto = sample_for_run(rows, 48, seed=3, stratify_by="label")
    assert len(kto) == 48 and len({r["prompt"] for r in kto}) == 48
    assert sum(r["label"] for r in kto) == 12  # a quarter, like the file
    assert kto == sample_for_run(rows, 48, seed=3, stratify_by="label")  # seeded: a resumed run gets the same rows
    assert {r["label"] for r in kto[:8]} == {True, False}  # shuffled, not one class after the other
    # DPO's sample is the one earlier versions drew, so their reference caches stay valid.
    assert sample_for_run(rows, 48, seed=3) == random.Random(3).sample(rows, 48)
    assert sample_for_run(rows, 500, seed=3) is rows


def test_pack_pairs_layout() -> None:
    import torch

    from align.train.speedups.prefix_sharing import pack_pairs, unpack

    # two pairs: prompt [5, 6] + chosen [7, 8] / rejected [9]; prompt [1] + chosen [2] / rejected [3, 4]
    ids = torch.tensor([[5, 6, 7, 8], [1, 2, 0, 0], [5, 6, 9, 0], [1, 3, 4, 0]])
    mask = (torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 0]]))
    labels = torch.tensor([[-100, -100, 7, 8], [-100, 2, -100, -100], [-100, -100, 9, -100], [-100, 3, 4, -100]])
    packed = pack_pairs(ids, mask, labels, torch.float32)
    assert packed.input_ids.tolist() == [[5, 6, 7, 8, 6, 9], [1, 2, 1, 3, 4, 0]]
    assert packed.position_ids.tolist() == [[0, 1, 2, 3, 1, 2], [0, 1, 0, 1, 2, 0]]
    assert packed.shift_labels.tolist() == [[-100, 7, 8, -100, 9, -100], [2, -100, 3, 4, -100, -100]]
    allowed = packed.attention_mask[0, 0] == 0
    assert not allowed[4, 1] and not allowed[4, 2] and allowed[4, 0] and allowed[5, 4] and not allowed[5, 3]
    values = torch.arange(12, dtype=torch.float32).reshape(2, 6)
    assert unpack(values, packed).tolist() == [[0, 1, 2], [6, 0, 0], [0, 4, 0], [8, 9, 0]]
    # rows that are not prompt-sharing pairs are left alone
    assert pack_pairs(ids[[0, 1, 3, 2]], mask[[0, 1, 3, 2]], labels[[0, 1, 3, 2]], torch.float32) is None


@pytest.mark.reliability
def test_resume_skips_a_checkpoint_killed_while_saving(tmp_path: Path) -> None:
    from align.train.checkpoints import last_complete_checkpoint

    assert last_complete_checkpoint(tmp_path) is None
    for step, complete in ((5, True), (9, True), (10, False)):  # 10: killed before trainer_state.json was written
        folder = tmp_path / "checkpoints" / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        (folder / "model.safetensors").write_text("")
        if complete:
            (folder / "trainer_state.json").write_text("{}")
    assert last_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoints" / "checkpoint-9")
