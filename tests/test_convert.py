"""`align data convert` on every supported format, and every kind of bad input."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from align.data.io import iter_rows
from tests.clihelp import run_align


def rows_of(path: Path) -> list[dict]:
    return [row for _, row in iter_rows(path)]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ----------------------------------------------------------------------------- third-party data


def test_llama_factory_dpo_demo_gives_300_pairs(shared_data: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "p.jsonl"
    code, stdout, _ = run_align(capsys, "data", "convert", shared_data / "dpo_en_demo.json", "--format", "auto", "-o", out)
    assert code == 0
    assert "detected format: sharegpt" in stdout
    pairs = rows_of(out)
    assert len(pairs) == 300
    for pair in pairs:
        assert pair["prompt"][-1]["role"] == "user"
        assert [m["role"] for m in pair["chosen"]] == ["assistant"] == [m["role"] for m in pair["rejected"]]
    # system turns survive as system messages of the prompt
    assert sum(p["prompt"][0]["role"] == "system" for p in pairs) == 80


def test_llama_factory_kto_demo_gives_150_150(shared_data: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "k.jsonl"
    code, stdout, _ = run_align(capsys, "data", "convert", shared_data / "kto_en_demo.json", "-o", out)
    assert code == 0
    rows = rows_of(out)
    assert len(rows) == 300
    assert sum(r["label"] is True for r in rows) == 150 and sum(r["label"] is False for r in rows) == 150
    assert all(r["completion"][-1]["role"] == "assistant" and r["prompt"][-1]["role"] == "user" for r in rows)
    assert "true: 150, false: 150" in stdout


# ----------------------------------------------------------------------------- HH-RLHF

HH_ROWS = [
    {"chosen": "\n\nHuman: What is a good name for a cat?\n\nAssistant: How about Miso?",
     "rejected": "\n\nHuman: What is a good name for a cat?\n\nAssistant: Cats do not need names."},
    {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello! How can I help?\n\nHuman: How do I boil an egg?\n\n"
               "Assistant: Put it in boiling water for nine minutes, then cool it in cold water.",
     "rejected": "\n\nHuman: Hi\n\nAssistant: Hello! How can I help?\n\nHuman: How do I boil an egg?\n\n"
                 "Assistant: I don't know."},
]


def test_hh_rlhf_gzip_splits_shared_prompt_from_final_turns(tmp_path: Path, capsys) -> None:
    src = tmp_path / "train.jsonl.gz"
    with gzip.open(src, "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in HH_ROWS)
    out = tmp_path / "p.jsonl"
    code, _, _ = run_align(capsys, "data", "convert", src, "--format", "hh-rlhf", "-o", out)
    assert code == 0
    pairs = rows_of(out)
    assert len(pairs) == 2
    for pair in pairs:
        assert pair["prompt"] and pair["prompt"][-1]["role"] == "user"
        assert len(pair["chosen"]) == len(pair["rejected"]) == 1
    assert pairs[1]["prompt"] == [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "How do I boil an egg?"},
    ]
    assert pairs[1]["chosen"][0]["content"].startswith("Put it in boiling water")
    assert pairs[1]["rejected"][0]["content"] == "I don't know."


def test_hh_rlhf_is_auto_detected(tmp_path: Path, capsys) -> None:
    out = tmp_path / "p.jsonl"
    code, stdout, _ = run_align(capsys, "data", "convert", write_jsonl(tmp_path / "hh.jsonl", HH_ROWS), "-o", out)
    assert code == 0 and "detected format: hh-rlhf" in stdout


def test_hh_rlhf_diverging_early_is_a_multi_turn_pair_not_an_error(tmp_path: Path, capsys) -> None:
    early = {"chosen": "\n\nHuman: A\n\nAssistant: B\n\nHuman: C\n\nAssistant: D",
             "rejected": "\n\nHuman: A\n\nAssistant: X\n\nHuman: C\n\nAssistant: E"}
    src = write_jsonl(tmp_path / "hh.jsonl", [HH_ROWS[0], early])
    out = tmp_path / "o.jsonl"
    code, stdout, err = run_align(capsys, "data", "convert", src, "--format", "hh-rlhf", "-o", out)
    assert code == 0, err
    assert "1 row where chosen and rejected diverge before the final assistant turn" in stdout
    assert rows_of(out)[1] == {"prompt": [{"role": "user", "content": "A"}],
                               "chosen": [{"role": "assistant", "content": "B"}, {"role": "user", "content": "C"},
                                          {"role": "assistant", "content": "D"}],
                               "rejected": [{"role": "assistant", "content": "X"}, {"role": "user", "content": "C"},
                                            {"role": "assistant", "content": "E"}]}


# ----------------------------------------------------------------------------- TRL and ShareGPT shapes


def test_trl_text_and_implicit_prompt(tmp_path: Path, capsys) -> None:
    rows = [
        {"prompt": "Q?", "chosen": " Yes.", "rejected": " No.", "source": "mine"},
        {"chosen": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "Yes."}],
         "rejected": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "No."}]},
    ]
    for i, row in enumerate(rows):
        out = tmp_path / f"o{i}.jsonl"
        code, stdout, _ = run_align(capsys, "data", "convert", write_jsonl(tmp_path / f"in{i}.jsonl", [row]), "-o", out)
        assert code == 0 and "detected format: trl" in stdout
    assert rows_of(tmp_path / "o0.jsonl") == [rows[0]]  # extra columns are kept
    assert rows_of(tmp_path / "o1.jsonl") == [{"prompt": [{"role": "user", "content": "Q?"}],
                                                "chosen": [{"role": "assistant", "content": "Yes."}],
                                                "rejected": [{"role": "assistant", "content": "No."}]}]


def test_sharegpt_role_content_turns_and_kto(tmp_path: Path, capsys) -> None:
    rows = [{"conversations": [{"role": "user", "content": "Q?"}], "chosen": {"role": "assistant", "content": "A"},
             "rejected": {"role": "assistant", "content": "B"}}]
    out = tmp_path / "o.jsonl"
    code, _, _ = run_align(capsys, "data", "convert", write_jsonl(tmp_path / "in.jsonl", rows), "--format", "sharegpt", "-o", out)
    assert code == 0 and rows_of(out)[0]["chosen"] == [{"role": "assistant", "content": "A"}]


def test_pairs_to_unpaired(tmp_path: Path, capsys) -> None:
    rows = [{"prompt": "Q1", "chosen": "A", "rejected": "B"}, {"prompt": "Q1", "chosen": "A", "rejected": "C"}]
    out = tmp_path / "u.jsonl"
    code, stdout, _ = run_align(capsys, "data", "convert", write_jsonl(tmp_path / "p.jsonl", rows), "--to", "unpaired", "-o", out)
    assert code == 0
    assert rows_of(out) == [{"prompt": "Q1", "completion": "A", "label": True},
                            {"prompt": "Q1", "completion": "B", "label": False},
                            {"prompt": "Q1", "completion": "C", "label": False}]
    assert "dropped 1 repeated completions" in stdout


# ----------------------------------------------------------------------------- bad input

BAD_CASES = {
    "malformed_json": ('{"prompt": "q", "chosen": "a", "rejected": "b"}\n{"prompt": "q", "chosen": \n', 2, None,
                       "malformed JSON"),
    "missing_field": ('{"prompt": "q", "chosen": "a", "rejected": "b"}\n{"prompt": "q", "rejected": "b"}\n', 2,
                      "chosen", "missing"),
    "empty_prompt": ('{"prompt": "q", "chosen": "a", "rejected": "b"}\n\n{"chosen": "a", "rejected": "b", "prompt": ""}\n',
                     3, "prompt", "must not be empty"),
    "empty_completion": ('{"prompt": "q", "chosen": "   ", "rejected": "b"}\n', 1, "chosen", "must not be empty"),
    "wrong_type": ('{"prompt": "q", "chosen": 42, "rejected": "b"}\n', 1, "chosen", "valid string"),
    "chosen_equals_rejected": ('{"prompt": "q", "chosen": "same", "rejected": "same"}\n', 1, "rejected",
                               "identical to chosen"),
    "no_prompt_text_pair": ('{"chosen": "a", "rejected": "b"}\n', 1, "prompt", "missing"),
    "kto_label_not_bool": ('{"prompt": "q", "completion": "a", "label": "yes"}\n', 1, "label", "true or false"),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_input_names_file_line_field_and_writes_nothing(tmp_path: Path, capsys, case: str) -> None:
    text, line, field, message = BAD_CASES[case]
    src = tmp_path / "in.jsonl"
    src.write_text(text)
    out = tmp_path / "out.jsonl"
    code, _, err = run_align(capsys, "data", "convert", src, "--format", "trl", "-o", out)
    assert code != 0
    expected = f"{src}:{line}: " + (f"field '{field}': " if field else "")
    assert expected in err and message in err, err
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]  # no temp files left


def test_existing_output_survives_a_failed_convert(tmp_path: Path, capsys) -> None:
    out = tmp_path / "out.jsonl"
    out.write_text("precious\n")
    src = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "a"}])
    code, _, _ = run_align(capsys, "data", "convert", src, "-o", out)
    assert code != 0 and out.read_text() == "precious\n"


def test_unknown_format_and_missing_file(tmp_path: Path, capsys) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", [{"question": "q", "answer": "a"}])
    code, _, err = run_align(capsys, "data", "convert", src, "-o", tmp_path / "o.jsonl")
    assert code != 0 and f"{src}:1: cannot detect the format" in err and "--format" in err
    code, _, err = run_align(capsys, "data", "convert", src, "--format", "alpaca", "-o", tmp_path / "o.jsonl")
    assert code != 0 and "unknown format 'alpaca'" in err
    code, _, err = run_align(capsys, "data", "convert", tmp_path / "missing.jsonl", "-o", tmp_path / "o.jsonl")
    assert code != 0 and "missing.jsonl: file does not exist" in err
    assert not (tmp_path / "o.jsonl").exists()


def test_skip_invalid_drops_and_counts(tmp_path: Path, capsys) -> None:
    rows = [{"prompt": "q", "chosen": "a", "rejected": "b"}, {"prompt": "q", "chosen": "a", "rejected": "a"}]
    out = tmp_path / "o.jsonl"
    code, stdout, _ = run_align(capsys, "data", "convert", write_jsonl(tmp_path / "in.jsonl", rows), "--skip-invalid", "-o", out)
    assert code == 0 and len(rows_of(out)) == 1 and "skipped 1 invalid rows" in stdout


# ----------------------------------------------------------------------------- validate


def test_validate_reports_all_problems_not_just_the_first(tmp_path: Path, capsys) -> None:
    src = tmp_path / "pairs.jsonl"
    src.write_text('{"prompt": "q", "chosen": "a", "rejected": "b"}\n'
                   '{"prompt": "q", "chosen": "a", "rejected": "a"}\n'
                   'not json\n'
                   '{"prompt": "q", "chosen": "", "rejected": "b"}\n')
    code, stdout, _ = run_align(capsys, "data", "validate", src)
    assert code == 1
    assert "4 records, kind: pairs" in stdout and "valid: 1, with problems: 3" in stdout
    assert f"{src}:2: field 'rejected'" in stdout
    assert f"{src}:3: malformed JSON" in stdout
    assert f"{src}:4: field 'chosen': must not be empty" in stdout


def test_validate_accepts_good_files(shared_data: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "k.parquet"
    assert run_align(capsys, "data", "convert", shared_data / "kto_en_demo.json", "-o", out)[0] == 0
    code, stdout, _ = run_align(capsys, "data", "validate", out)
    assert code == 0 and "300 records, kind: unpaired" in stdout and "labels: False 150, True 150" in stdout
