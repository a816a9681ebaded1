"""`align train distill` on tiny random models: data, batch layout, dense and sparse teachers, refusals, eval."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import align.train.distill
from align.data.io import iter_rows, write_records
from align.errors import ConfigError, DataError
from align.train.distill.collate import DistillCollator
from align.train.distill.data import check_stored_tokens, encode_examples, load_distill_data
from tests.clihelp import run_align

SYSTEM = "Answer in one short sentence."


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from align.models import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("teacher") / "model", seed=1)


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "prompts.jsonl"
    topics = ["tea", "rain", "maps", "bread", "chess", "owls", "salt", "moss"]
    write_records(path, [{"id": f"q{i}", "prompt": f"Why is {t} interesting?"} for i, t in enumerate(topics)])
    return path


@pytest.fixture(scope="module")
def candidates_file(teacher_dir: Path, prompts_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from align.generate import generate

    path = tmp_path_factory.mktemp("cands") / "candidates.jsonl"
    generate(model=str(teacher_dir), prompts=prompts_file, output=path, num_candidates=2, greedy_first=False,
             temperature=1.0, top_p=1.0, logprobs=5, max_new_tokens=6, system_prompt=SYSTEM, progress=False)
    return path


def _settings(student: Path, out: Path, **extra) -> dict:
    return {"model": str(student), "output_dir": str(out), "max_steps": 2, "per_device_train_batch_size": 2,
            "max_new_tokens": 6, "max_length": 128, **extra}


# ----------------------------------------------------------------------------- data


def test_candidates_keep_their_token_ids_and_the_teachers_top_k(candidates_file: Path) -> None:
    data = load_distill_data(candidates_file)
    assert data.kind == "candidates" and data.system_prompt == SYSTEM and data.has_logprobs
    rows = [row for _, row in iter_rows(candidates_file)]
    stored = [r for row in rows for r in row["responses"] if not r["empty"] and not r.get("duplicate_of")]
    assert len(data.examples) == len(stored) > 0
    for example, response in zip(data.examples, stored):
        assert example.completion_ids == [t["token_id"] for t in response["logprobs"]]
        for token, ids, logprobs, entry in zip(example.completion_ids, example.topk_ids, example.topk_logprobs,
                                                response["logprobs"]):
            assert token in ids and 5 <= len(ids) <= 6  # the written token joins the top 5 when it is not among them
            assert logprobs[ids.index(token)] == pytest.approx(entry["logprob"])


def test_bad_rows_point_at_their_line_and_field(tmp_path: Path, candidates_file: Path) -> None:
    rows = [row for _, row in iter_rows(candidates_file)]
    broken = json.loads(json.dumps(rows[1]))
    for response in broken["responses"]:
        for entry in response["logprobs"] or []:
            entry.pop("token_id")
    path = tmp_path / "no-ids.jsonl"
    write_records(path, [rows[0], broken])
    with pytest.raises(DataError, match=r"no-ids.jsonl:2: field 'responses.0.logprobs.0': log-probs without token ids"):
        load_distill_data(path)
    mixed = tmp_path / "mixed.jsonl"
    write_records(mixed, [{"prompt": "Hi?"}, {"prompt": "Hi?", "chosen": "a", "rejected": "b"}])
    with pytest.raises(DataError, match=r"mixed.jsonl:2: row holds pairs but earlier rows held prompts"):
        load_distill_data(mixed)
    odd = tmp_path / "odd.jsonl"
    write_records(odd, [{"question": "Hi?"}])
    with pytest.raises(DataError, match=r"odd.jsonl:1: rows with keys \['question'\] are not distillation data"):
        load_distill_data(odd)


def test_stored_ids_of_another_vocabulary_are_refused(tmp_path: Path, candidates_file: Path,
                                                      tiny_model_dir: Path) -> None:
    from align.models import load_tokenizer

    rows = [row for _, row in iter_rows(candidates_file)]
    for row in rows:  # what another tokenizer's ids look like to ours: the same numbers, other tokens
        for response in row["responses"]:
            for entry in response["logprobs"] or []:
                entry["token_id"] = (entry["token_id"] * 7 + 11) % 40000
    path = tmp_path / "foreign.jsonl"
    write_records(path, rows)
    with pytest.raises(DataError, match="foreign.jsonl:1: .*the teacher used another vocabulary"):
        check_stored_tokens(load_distill_data(path), load_tokenizer(str(tiny_model_dir)))


def test_the_completion_sits_in_the_same_columns_after_both_prompts(tiny_model_dir: Path) -> None:
    """The padded batch gives every completion position the logits an unpadded forward gives it."""
    from align.models import load_model, load_tokenizer
    from align.train.distill.data import DistillExample
    from align.errors import Location

    tokenizer = load_tokenizer(str(tiny_model_dir))
    model = load_model(str(tiny_model_dir)).eval()
    examples = [DistillExample("Hi?", Location("x"), completion="Hello there, friend."),
                DistillExample("A much longer question about the weather in spring?", Location("x"),
                               completion="Rain.")]
    rows, dropped = encode_examples(examples, tokenizer, teacher_system_prompt=SYSTEM, max_length=None)
    assert dropped == 0 and all(r["teacher_prompt_ids"] != r["prompt_ids"] for r in rows)
    batch = DistillCollator(tokenizer.pad_token_id)(rows)
    width = batch["completion_ids"].shape[1]
    with torch.no_grad():
        for prefix, prompt_key in (("", "prompt_ids"), ("teacher_", "teacher_prompt_ids")):
            padded = model(input_ids=batch[f"{prefix}input_ids"], attention_mask=batch[f"{prefix}attention_mask"],
                           position_ids=batch[f"{prefix}position_ids"], logits_to_keep=width + 1).logits[:, :-1]
            for i, row in enumerate(rows):
                ids = row[prompt_key] + row["completion_ids"]
                alone = model(input_ids=torch.tensor([ids])).logits[0, len(row[prompt_key]) - 1:-1]
                n = len(row["completion_ids"])
                assert batch["completion_mask"][i].sum() == n
                assert torch.equal(batch["completion_ids"][i, :n], torch.tensor(row["completion_ids"]))
                assert torch.allclose(padded[i, :n], alone, atol=1e-5), (prefix, i)
    assert rows[0]["completion_ids"][-1] == tokenizer.eos_token_id  # a text answer ends its turn


# ----------------------------------------------------------------------------- training


def test_distilling_from_prompts_with_a_prompted_teacher_lowers_the_held_out_kl(
        tiny_model_dir: Path, teacher_dir: Path, prompts_file: Path, tmp_path: Path) -> None:
    result = align.train.distill.distill(**_settings(
        tiny_model_dir, tmp_path / "run", teacher=str(teacher_dir), teacher_system_prompt=SYSTEM,
        data=str(prompts_file), eval_data=str(prompts_file), eval_max_prompts=4, eval_max_new_tokens=6,
        lora=False, learning_rate=3e-3, max_steps=6, lmbda=0.5, beta=0.5))
    run = Path(result.run_dir)
    for name in ("config.yaml", "data.json", "trl_args.json", "metrics.jsonl", "curves.png", "run.json",
                 "eval_before.json", "eval_after.json", "model/config.json", "model/tokenizer_config.json"):
        assert (run / name).exists(), name
    metrics = [row for _, row in iter_rows(run / "metrics.jsonl") if "loss" in row]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5, 6]
    assert all(k in metrics[0] for k in ("kl", "divergence", "on_policy", "learning_rate"))
    # lmbda 0.5: some steps on the student's own samples, the others on the teacher's answers
    assert {m["on_policy"] for m in metrics} == {0.0, 1.0}
    args = json.loads((run / "trl_args.json").read_text())
    assert (args["lmbda"], args["beta"], args["temperature"]) == (0.5, 0.5, 1.0)
    assert json.loads((run / "data.json").read_text())["teacher_system_prompt"] == SYSTEM
    before, after = result.eval_before, result.eval_after
    assert before["prompts"] == after["prompts"] == 4 and before["tokens"] == after["tokens"] > 0
    assert after["kl_per_token"] < 0.9 * before["kl_per_token"]
    assert "with a system prompt" in result.teacher


def test_sparse_distillation_needs_no_teacher_model(tiny_model_dir: Path, candidates_file: Path,
                                                    tmp_path: Path) -> None:
    result = align.train.distill.distill(**_settings(tiny_model_dir, tmp_path / "sparse", data=str(candidates_file),
                                                     alpha=0.5))
    assert "no teacher loaded" in result.teacher and "k up to 6" in result.teacher
    metrics = [row for _, row in iter_rows(Path(result.run_dir) / "metrics.jsonl") if "loss" in row]
    assert len(metrics) == 2 and all("cross_entropy" in m and m["on_policy"] == 0.0 for m in metrics)
    args = json.loads((Path(result.run_dir) / "trl_args.json").read_text())
    assert args["lmbda"] == 0.0 and args["seq_kd"] is False
    with pytest.raises(ConfigError, match="'lmbda' needs completions the stored log-probs do not cover"):
        align.train.distill.distill(**_settings(tiny_model_dir, tmp_path / "never", data=str(candidates_file),
                                                lmbda=0.5))


def test_sparse_loss_in_the_trainer_equals_the_dense_one_when_k_covers_the_vocabulary(
        tiny_model_dir: Path, teacher_dir: Path, tmp_path: Path) -> None:
    from datasets import Dataset

    from align.models import load_model, load_tokenizer
    from align.train.distill.config import DistillConfig, build_gkd_args
    from align.train.distill.trainer import DistillTrainer, LossSettings

    tokenizer = load_tokenizer(str(tiny_model_dir))
    teacher = load_model(str(teacher_dir)).eval()
    rows = [{"prompt_ids": p, "teacher_prompt_ids": t, "completion_ids": c} for p, t, c in (
        (tokenizer("Hi?")["input_ids"], tokenizer(f"{SYSTEM} Hi?")["input_ids"], tokenizer(" Hello.")["input_ids"]),
        (tokenizer("Why?")["input_ids"], tokenizer(f"{SYSTEM} Why?")["input_ids"], tokenizer(" Be.")["input_ids"]))]
    collator = DistillCollator(tokenizer.pad_token_id)
    batch = collator(rows)
    width = batch["completion_ids"].shape[1]
    with torch.no_grad():
        teacher_logp = torch.log_softmax(teacher(
            input_ids=batch["teacher_input_ids"], attention_mask=batch["teacher_attention_mask"],
            position_ids=batch["teacher_position_ids"], logits_to_keep=width + 1).logits[:, :-1], -1)
    full = [dict(r, topk_ids=[list(range(teacher_logp.shape[-1]))] * len(r["completion_ids"]),
                 topk_logprobs=teacher_logp[i, :len(r["completion_ids"])].tolist()) for i, r in enumerate(rows)]
    sparse_batch = collator(full)
    losses = {}
    for name, teacher_model, inputs in (("dense", teacher, batch), ("sparse", None, sparse_batch)):
        config = DistillConfig(model=str(tiny_model_dir), data="unused", output_dir=str(tmp_path / name), lora=None,
                               beta=0.3, temperature=1.7, sparse=name == "sparse",
                               teacher=None if name == "sparse" else str(teacher_dir))
        trainer = DistillTrainer(model=load_model(str(tiny_model_dir)), teacher_model=teacher_model,
                                 args=build_gkd_args(config, tmp_path / name, on_gpu=False, bf16_ok=False),
                                 data_collator=collator, loss=LossSettings(sparse_tail="bucket"),
                                 train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
        with torch.no_grad():
            losses[name] = float(trainer.compute_loss(trainer.model, inputs))
    assert losses["sparse"] == pytest.approx(losses["dense"], rel=1e-4)
    assert losses["dense"] > 0


def test_refusals_come_before_any_model_is_loaded(tiny_model_dir: Path, teacher_dir: Path, prompts_file: Path,
                                                  tmp_path: Path, capsys) -> None:
    out = tmp_path / "never"
    code, _, err = run_align(capsys, "train", "distill", "--data", prompts_file, "-o", out, "max_step=3")
    assert code != 0 and "unknown key 'max_step' for distillation (did you mean 'max_steps'?)" in err
    code, _, err = run_align(capsys, "train", "distill", "--data", prompts_file, "-o", out, "--teacher", "y",
                             "teacher_model_name_or_path=x")
    assert code != 0 and "'teacher_model_name_or_path' ('x', TRL's name) and 'teacher' ('y') are both set" in err
    code, _, err = run_align(capsys, "train", "distill", "--data", prompts_file, "-o", out,
                             "teacher_model_init_kwargs={}")
    assert code != 0 and "'teacher_model_init_kwargs' is set by align: use 'teacher'" in err
    code, _, err = run_align(capsys, "train", "distill", "--model", tiny_model_dir, "--data", prompts_file, "-o", out)
    assert code != 0 and "holds prompts without stored teacher log-probs, and no 'teacher' is given" in err
    code, _, err = run_align(capsys, "train", "distill", "--model", tiny_model_dir, "--teacher", teacher_dir,
                             "--teacher-system-prompt", "@/nonexistent/constitution.txt", "--data", prompts_file,
                             "-o", out)
    assert code != 0 and "system prompt file /nonexistent/constitution.txt does not exist" in err
    # a teacher whose tokenizer knows one more token
    other = tmp_path / "other-teacher"
    shutil.copytree(teacher_dir, other)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(other)
    tokenizer.add_tokens(["<|brand-new|>"])
    tokenizer.save_pretrained(other)
    code, _, err = run_align(capsys, "train", "distill", "--model", tiny_model_dir, "--teacher", other,
                             "--data", prompts_file, "-o", out)
    assert code != 0 and "have different vocabularies" in err and "'<|brand-new|>'" in err
    assert not out.exists()


# ----------------------------------------------------------------------------- evaluation against a teacher


def test_a_model_is_its_own_teacher_with_zero_kl_and_full_agreement(tiny_model_dir: Path) -> None:
    from align.train.distill.heldout import compare_with_teacher, teacher_answers
    from align.models import load_model, load_tokenizer

    tokenizer = load_tokenizer(str(tiny_model_dir))
    model = load_model(str(tiny_model_dir))
    answers = teacher_answers(model, tokenizer, ["Why?", "Tell me about owls."], system_prompt=None, max_new_tokens=5)
    metrics, per_prompt = compare_with_teacher(model, model, tokenizer, answers, max_new_tokens=5)
    assert metrics["kl_per_token"] == pytest.approx(0.0, abs=1e-6)
    assert metrics["reverse_kl_per_token"] == pytest.approx(0.0, abs=1e-6)
    assert metrics["token_agreement"] == 1.0 and metrics["exact_match"] == 1.0 and metrics["tokens"] == 10
    assert len(per_prompt) == 2


def test_align_eval_reports_the_students_kl_to_a_prompted_teacher(tiny_model_dir: Path, teacher_dir: Path,
                                                                   prompts_file: Path, tmp_path: Path, capsys) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text("rules:\n  - name: short\n    max_chars: 60\n")
    system = tmp_path / "constitution.txt"
    system.write_text(SYSTEM + "\n")
    out = tmp_path / "eval"
    code, stdout, err = run_align(capsys, "eval", "--model", tiny_model_dir, "--reference", tiny_model_dir,
                                  "--teacher", teacher_dir, "--teacher-system-prompt", f"@{system}",
                                  "--prompts", prompts_file, "--judge", rules, "-o", out, "max_new_tokens=5")
    assert code == 0, err
    teacher = json.loads((out / "metrics.json").read_text())["teacher"]
    assert teacher["prompts"] == 8 and teacher["system_prompt"] == SYSTEM and teacher["kl_per_token"] > 0
    assert 0.0 <= teacher["token_agreement"] <= 1.0 and 0.0 <= teacher["exact_match"] <= 1.0
    report = (out / "report.md").read_text()
    assert "## Distillation: the student against the teacher" in report and "win rate" in report
    assert len((out / "teacher_answers.jsonl").read_text().splitlines()) == 8
    assert "KL(teacher||student)" in stdout


def test_the_shipped_config_validates(monkeypatch: pytest.MonkeyPatch) -> None:
    repo = Path(__file__).resolve().parent.parent
    monkeypatch.chdir(repo)  # its paths are relative to the repository, like every shipped config's
    config = align.train.distill.load_distill_config(repo / "configs" / "distill.yaml", ["max_steps=3"])
    assert config.teacher == config.model == "bundled:smollm2-135m-instruct" and not config.uses_stored_logprobs
    assert config.teacher_system_prompt.startswith("You answer questions concisely")
    assert config.trl_overrides["max_steps"] == 3 and config.trl_overrides["lmbda"] == 0.5
    assert len(load_distill_data(config.data).examples) == 120


@pytest.mark.reliability
def test_a_stopped_run_resumes_from_its_checkpoint(tiny_model_dir: Path, candidates_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "resumable"
    first = align.train.distill.distill(**_settings(tiny_model_dir, out, data=str(candidates_file), save_steps=1))
    assert first.steps == 2
    with pytest.raises(Exception, match="already holds a run with checkpoints"):
        align.train.distill.distill(**_settings(tiny_model_dir, out, data=str(candidates_file), max_steps=3))
    resumed = align.train.distill.distill(**_settings(tiny_model_dir, out, data=str(candidates_file), max_steps=3,
                                                      save_steps=1), resume=True)
    assert resumed.steps == 3
    assert [row["step"] for _, row in iter_rows(out / "metrics.jsonl") if "loss" in row] == [1, 2, 3]
