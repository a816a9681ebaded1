"""`align eval --tasks`: the shipped multiple-choice task through the real lm-evaluation-harness, on a student, its
reference and a quantised export; and the small pure parts (task files, headline metric, paired differences)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from align.eval.retention import SHIPPED_TASKS, headline, paired_difference, retention_rows, task_config
from tests.clihelp import run_align


def test_a_shipped_task_is_found_by_name_with_its_data_next_to_it() -> None:
    config = task_config("everyday_mc")
    assert config["task"] == "everyday_mc"
    data = Path(config["dataset_kwargs"]["data_files"]["test"])
    assert data == SHIPPED_TASKS / "everyday-mc.jsonl" and data.is_file()
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    assert len(rows) == 80 and all(0 <= r["answer"] < len(r["choices"]) == 4 for r in rows)
    assert len({r["answer"] for r in rows}) == 4  # the right answer is not always in one place
    assert task_config("hellaswag") == "hellaswag"  # anything else is the harness's own task name


def test_a_task_yaml_reads_its_data_relative_to_itself(tmp_path: Path) -> None:
    (tmp_path / "t.yaml").write_text("task: mine\ndataset_path: json\ndataset_kwargs:\n  data_files: q.jsonl\n")
    assert task_config(str(tmp_path / "t.yaml"))["dataset_kwargs"]["data_files"] == str(tmp_path / "q.jsonl")


def test_headline_takes_the_first_standard_metric_with_its_error() -> None:
    assert headline({"acc,none": 0.5, "acc_stderr,none": 0.1, "acc_norm,none": 0.6}) == ("acc", 0.5, 0.1)
    assert headline({"exact_match,none": 0.25, "exact_match_stderr,none": "N/A"}) == ("exact_match", 0.25, None)


def test_paired_difference_is_tighter_than_two_separate_errors() -> None:
    a = [1, 1, 0, 0, 1, 0, 1, 1]
    b = [1, 1, 0, 0, 1, 0, 1, 0]  # one question lost
    mean, se = paired_difference(a, b)
    assert mean == pytest.approx(-1 / 8)
    assert se == pytest.approx(0.125)  # sample variance of the differences 1/8, over 8 questions
    assert se < 0.5 / 8 ** 0.5  # one binomial error alone at p=0.5


def test_rows_judge_the_student_against_the_reference_and_an_export_against_the_student() -> None:
    score = {"metric": "acc", "stderr": 0.1}
    scores = {"reference": {"t": {**score, "value": 0.5, "per_question": [1, 0, 1, 0]}},
              "student": {"t": {**score, "value": 0.75, "per_question": [1, 1, 1, 0]}},
              "quantized": {"t": {**score, "value": 0.5, "per_question": [1, 1, 0, 0]}}}
    rows = retention_rows(scores, {"reference": "base", "student": "run", "quantized": "q4"})
    by_model = {r["model"]: r for r in rows}
    assert "against" not in by_model["reference"]
    assert (by_model["student"]["against"], by_model["student"]["ratio"], by_model["student"]["difference"]) == (
        "reference", 1.5, 0.25)
    assert (by_model["quantized"]["against"], by_model["quantized"]["ratio"]) == ("student", 0.6667)


def test_retention_through_the_harness_on_a_student_its_reference_and_an_export(
        tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from align.export import quantize_run

    export = quantize_run(str(tiny_model_dir), "q4_0", tmp_path / "q4")
    code, out, err = run_align(capsys, "eval", "--tasks", "everyday_mc", "--model", tiny_model_dir,
                               "--reference", tiny_model_dir, "--quantized", export, "--limit", "12",
                               "-o", tmp_path / "report")
    assert code == 0, err
    report = json.loads((tmp_path / "report" / "retention.json").read_text())
    rows = {r["model"]: r for r in report["rows"]}
    assert set(rows) == {"reference", "student", "quantized"}
    assert all(r["metric"] == "acc" and 0 <= r["value"] <= 1 and r["stderr"] > 0 for r in rows.values())
    assert len(report["per_question"]["student"]["everyday_mc"]) == 12
    # the same weights as student and reference: no tax, exactly
    assert (rows["student"]["ratio"], rows["student"]["difference"]) == (1.0, 0.0)
    assert rows["quantized"]["against"] == "student"
    assert "| everyday_mc | quantized" in out and (tmp_path / "report" / "retention.md").exists()


def test_a_missing_task_file_fails_before_any_model_loads(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_align(capsys, "eval", "--tasks", str(tmp_path / "nope.yaml"), "--model", "no/such-model",
                             "-o", tmp_path / "r")
    assert code != 0 and "no such task file" in err
