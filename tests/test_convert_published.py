"""`align data convert` on public preference sets in their published file formats (fixtures written by
tests/fixtures/convert/make_fixtures.py with the releases' field names), through the CLI users run."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from align.data.formats import parse_hh_transcript
from align.data.io import iter_rows
from tests.clihelp import run_align

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "convert"
HH = FIXTURES / "hh-rlhf-harmless-base-test.jsonl.gz"


def rows_of(path: Path) -> list[dict]:
    return [row for _, row in iter_rows(path)]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def hh(*turns: str) -> str:
    return "".join(f"\n\n{'Human' if i % 2 == 0 else 'Assistant'}: {t}" for i, t in enumerate(turns))


# ----------------------------------------------------------------------------- HH-RLHF


def test_hh_rlhf_release_converts_every_line_and_early_divergence_becomes_a_multi_turn_pair(
        tmp_path: Path, capsys) -> None:
    out = tmp_path / "pairs.jsonl"
    code, stdout, err = run_align(capsys, "data", "convert", HH, "-o", out)
    assert code == 0, err
    assert "detected format: hh-rlhf, from the first row: 'chosen' is a '\\n\\nHuman: ... \\n\\nAssistant: ...' " \
           "transcript and there is no 'prompt'" in stdout
    assert "read 5 rows, wrote 4 pairs" in stdout
    assert "1 row where chosen and rejected diverge before the final assistant turn: 1 written as pairs" in stdout
    assert "skipped 1 row with no pair: 1 where chosen and rejected are identical" in stdout
    pairs = rows_of(out)
    assert len(pairs) == 4
    early = pairs[2]  # line 3 diverges at the first assistant turn, two turns before the end
    assert early["prompt"] == [user("What cleaning products are dangerous to mix?")]
    assert early["chosen"] == [
        assistant("Bleach with ammonia, and bleach with vinegar or other acids. Both give off toxic gases."),
        user("I just want to clean my bathroom safely."),
        assistant("Good idea. Use one product at a time, rinse between them, and keep a window open.")]
    assert early["rejected"] == [assistant("Why do you want to know?"),
                                 user("I just want to clean my bathroom safely."),
                                 assistant("Then mix whatever you like.")]
    for pair in (pairs[0], pairs[1], pairs[3]):  # the usual case: only the final assistant turns differ
        assert pair["prompt"][-1]["role"] == "user" and len(pair["chosen"]) == len(pair["rejected"]) == 1
    # a paragraph break inside a turn is part of the turn, not a new one
    assert "\n\nOne small thing" in pairs[1]["chosen"][0]["content"]
    assert run_align(capsys, "data", "validate", out)[0] == 0


def test_hh_rlhf_a_split_of_2312_transcripts_with_line_2037_diverging_early_converts_whole(
        tmp_path: Path, capsys) -> None:
    # The shape of the report: harmless-base's test split stopped at line 2037 and wrote nothing.
    rows = [{"chosen": hh(f"Question {i}?", f"Good answer {i}."), "rejected": hh(f"Question {i}?", f"Bad answer {i}.")}
            for i in range(2312)]
    rows[2036] = {"chosen": hh("Q", "A1", "Q2", "A2"), "rejected": hh("Q", "B1", "Q2", "B2")}
    src = tmp_path / "test.jsonl.gz"
    with gzip.open(src, "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    out = tmp_path / "pairs.jsonl"
    code, stdout, err = run_align(capsys, "data", "convert", src, "-o", out)
    assert code == 0, err
    assert "read 2312 rows, wrote 2312 pairs" in stdout and "1 row where chosen and rejected diverge" in stdout
    assert rows_of(out)[2036]["chosen"] == [assistant("A1"), user("Q2"), assistant("A2")]


def test_hh_rlhf_prompt_and_tails_are_trls_extract_prompt(tmp_path: Path, capsys) -> None:
    from trl.data_utils import extract_prompt

    out = tmp_path / "pairs.jsonl"
    assert run_align(capsys, "data", "convert", HH, "-o", out)[0] == 0
    published = [row for _, row in iter_rows(HH)]
    expected = []
    for row in published:
        chosen = parse_hh_transcript(row["chosen"], "chosen")
        rejected = parse_hh_transcript(row["rejected"], "rejected")
        if chosen != rejected:
            expected.append(extract_prompt({"chosen": chosen, "rejected": rejected}))
    assert rows_of(out) == expected


def test_hh_rlhf_early_divergence_skip_drops_and_counts_them(tmp_path: Path, capsys) -> None:
    out = tmp_path / "pairs.jsonl"
    code, stdout, _ = run_align(capsys, "data", "convert", HH, "--early-divergence", "skip", "-o", out)
    assert code == 0
    assert "read 5 rows, wrote 3 pairs" in stdout
    assert "1 row where chosen and rejected diverge before the final assistant turn: 1 skipped (--early-divergence " \
           "skip" in stdout
    assert all(len(p["chosen"]) == len(p["rejected"]) == 1 for p in rows_of(out))
    code, _, err = run_align(capsys, "data", "convert", HH, "--early-divergence", "drop", "-o", out)
    assert code != 0 and "unknown --early-divergence 'drop': use pairs or skip" in err


def test_hh_rlhf_other_divergences_never_stop_a_conversion(tmp_path: Path, capsys) -> None:
    rows = [
        # the human's second turn differs: the prompt ends with the shared assistant turn, as TRL splits it
        {"chosen": hh("Hi", "Hello!", "Tell me a joke.", "Why did the chicken cross the road?"),
         "rejected": hh("Hi", "Hello!", "Tell me a fact.", "Honey never spoils.")},
        # rejected stops after an earlier, different answer
        {"chosen": hh("Hi", "Hello! How can I help?", "Recommend a book.", "Try 'The Hobbit'."),
         "rejected": hh("Hi", "What do you want?")},
        # different from the first turn: no shared prompt, so no pair
        {"chosen": hh("Hi", "Hello!"), "rejected": hh("Hey", "Hello!")},
    ]
    out = tmp_path / "pairs.jsonl"
    code, stdout, _ = run_align(capsys, "data", "convert", write_jsonl(tmp_path / "hh.jsonl", rows), "-o", out)
    assert code == 0
    assert "3 rows where chosen and rejected diverge before the final assistant turn: 2 written as pairs" in stdout
    assert "1 skipped: they differ from the first turn, so there is no shared prompt" in stdout
    human_differs, shorter = rows_of(out)
    assert human_differs["prompt"] == [user("Hi"), assistant("Hello!")]
    assert human_differs["chosen"] == [user("Tell me a joke."), assistant("Why did the chicken cross the road?")]
    assert shorter["prompt"] == [user("Hi")] and shorter["rejected"] == [assistant("What do you want?")]
    assert len(shorter["chosen"]) == 3


def test_hh_rlhf_unknown_shape_names_file_line_field_and_the_way_past_it(tmp_path: Path, capsys) -> None:
    rows = [{"chosen": hh("Hi", "Hello!"), "rejected": hh("Hi", "Hey.")},
            {"chosen": hh("Hi", "Hello!"), "rejected": hh("Hi", "Hey.", "Bye")},  # ends with a Human turn
            {"chosen": hh("Hi", "Hello!")}]
    src = write_jsonl(tmp_path / "hh.jsonl", rows)
    out = tmp_path / "pairs.jsonl"
    out.write_text("earlier output\n")
    code, _, err = run_align(capsys, "data", "convert", src, "--format", "hh-rlhf", "-o", out)
    assert code != 0
    assert f"{src}:2: field 'rejected': transcript does not end with an Assistant turn" in err
    assert f"{src}:3: field 'rejected': missing" in err
    assert f"nothing was written ({out} is unchanged)" in err and "--skip-invalid" in err
    assert out.read_text() == "earlier output\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hh.jsonl", "pairs.jsonl"]  # no temp file left
    code, stdout, _ = run_align(capsys, "data", "convert", src, "--format", "hh-rlhf", "--skip-invalid", "-o", out)
    assert code == 0 and "skipped 2 invalid rows" in stdout and len(rows_of(out)) == 1


# ----------------------------------------------------------------------------- UltraFeedback


def test_ultrafeedback_raw_pairs_best_and_worst_by_mean_rating(tmp_path: Path, capsys) -> None:
    out = tmp_path / "pairs.jsonl"
    code, stdout, err = run_align(capsys, "data", "convert", FIXTURES / "ultrafeedback.jsonl", "-o", out)
    assert code == 0, err
    assert "detected format: ultrafeedback, from the first row: 'instruction' with a list of 'completions'" in stdout
    assert "read 3 rows, wrote 1 pairs" in stdout
    assert "skipped 2 rows with no pair: 1 where every rated completion has the same score; 1 where fewer than " \
           "two completions have a response and a rating" in stdout
    [pair] = rows_of(out)
    assert pair["prompt"] == [user("Name the three primary colors of light.")]
    assert pair["chosen"] == [assistant("Red, green and blue (RGB).")] and pair["chosen_model"] == "gpt-4"
    assert pair["rejected"] == [assistant("Colors are nice.")] and pair["rejected_model"] == "pythia-12b"
    # the "N/A" honesty rating is left out of the mean, as the release's fine-grained_score does
    assert pair["score_chosen"] == 5.0 and pair["score_rejected"] == pytest.approx(4 / 3)
    assert pair["source"] == "evol_instruct" and len(pair["prompt_id"]) == 64


def test_ultrafeedback_raw_rank_by_overall_score(tmp_path: Path, capsys) -> None:
    out = tmp_path / "pairs.jsonl"
    code, stdout, _ = run_align(capsys, "data", "convert", FIXTURES / "ultrafeedback.jsonl", "--format",
                                "ultrafeedback", "--rank-by", "overall", "-o", out)
    assert code == 0 and "wrote 2 pairs" in stdout
    first, snake = rows_of(out)
    assert first["chosen_model"] == "llama-2-7b-chat" and first["score_chosen"] == 9.0  # not gpt-4's 7.5
    assert first["rejected_model"] == "pythia-12b" and first["score_rejected"] == 2.0
    # equal overall scores: the first of them is chosen, as distilabel's FormatTextGenerationDPO picks
    assert snake["chosen_model"] == "gpt-4" and snake["rejected_model"] == "ultralm-65b"


def test_ultrafeedback_unknown_rating_names_the_field_and_keeps_earlier_output(tmp_path: Path, capsys) -> None:
    rows = [json.loads(line) for line in (FIXTURES / "ultrafeedback.jsonl").read_text().splitlines()]
    rows[0]["completions"][1]["annotations"]["honesty"]["Rating"] = "five"
    src = write_jsonl(tmp_path / "uf.jsonl", rows)
    out = tmp_path / "pairs.jsonl"
    out.write_text("earlier output\n")
    code, _, err = run_align(capsys, "data", "convert", src, "-o", out)
    assert code != 0
    assert f"{src}:1: field 'completions[1].annotations.honesty.Rating': must be a number or 'N/A', got 'five'" in err
    assert "--skip-invalid" in err and out.read_text() == "earlier output\n"


def test_ultrafeedback_binarized_parquet_as_published(tmp_path: Path, capsys) -> None:
    out = tmp_path / "pairs.jsonl"
    src = FIXTURES / "ultrafeedback-binarized-test_prefs.parquet"
    code, stdout, err = run_align(capsys, "data", "convert", src, "-o", out)
    assert code == 0, err
    assert "detected format: ultrafeedback-binarized, from the first row: a text 'prompt' with 'chosen'/'rejected' " \
           "message lists and 'score_chosen'" in stdout
    assert "read 3 rows, wrote 2 pairs" in stdout
    assert "1 where chosen and rejected are identical" in stdout
    assert "1 pair with score_chosen equal to score_rejected (kept, as published)" in stdout
    haiku, tied = rows_of(out)
    assert haiku["prompt"] == [user("Write a haiku about autumn.")]
    assert haiku["chosen"][0]["role"] == "assistant" and haiku["chosen"][0]["content"].startswith("Leaves drift")
    assert haiku["rejected"] == [assistant("Autumn is a season.")]
    assert (haiku["score_chosen"], haiku["score_rejected"]) == (5.0, 2.5) and "prompt_id" in haiku
    assert "messages" not in haiku  # the binarized set's copy of chosen
    assert tied["score_chosen"] == tied["score_rejected"] == 4.0


# ----------------------------------------------------------------------------- distilabel, OpenAI, hub pairs


def test_distilabel_rated_generations_give_best_and_worst(tmp_path: Path, capsys) -> None:
    out = tmp_path / "pairs.jsonl"
    code, stdout, _ = run_align(capsys, "data", "convert", FIXTURES / "distilabel.jsonl", "-o", out)
    assert code == 0 and "detected format: distilabel" in stdout
    sleep, capital = rows_of(out)
    assert sleep["chosen"] == [assistant("Avoid screens for an hour before bed; the light delays melatonin.")]
    assert sleep["rejected"] == [assistant("Sleep is important.")]
    assert (sleep["chosen_rating"], sleep["rejected_rating"]) == (5, 2)
    assert sleep["chosen_model"] == "Qwen/Qwen2-7B-Instruct"
    # a generation whose rating failed (None) is left out
    assert capital["chosen"] == [assistant("Canberra.")] and capital["rejected"] == [assistant("Sydney.")]


def test_openai_chat_rows_become_sft_rows(tmp_path: Path, capsys) -> None:
    out = tmp_path / "sft.jsonl"
    code, stdout, _ = run_align(capsys, "data", "convert", FIXTURES / "openai-chat.jsonl", "-o", out)
    assert code == 0 and "detected format: trl, from the first row: 'messages' chat rows" in stdout
    assert "wrote 2 sft" in stdout
    multi, parts = rows_of(out)
    assert [m["role"] for m in multi["prompt"]] == ["system", "user", "assistant", "user"]
    assert multi["completion"] == [{"role": "assistant", "content": "Rome.", "weight": 1}]
    assert multi["prompt"][2]["weight"] == 0  # OpenAI's per-message weight travels with the message
    # the developer role is the system message; text content parts are joined
    assert parts["prompt"] == [{"role": "system", "content": "Answer in one word."}, user("Largest planet?")]


def test_openai_preference_rows_become_pairs_and_tool_calls_are_refused_by_field(tmp_path: Path, capsys) -> None:
    out = tmp_path / "pairs.jsonl"
    code, stdout, _ = run_align(capsys, "data", "convert", FIXTURES / "openai-preference.jsonl", "-o", out)
    assert code == 0 and "detected format: openai" in stdout
    [pair] = rows_of(out)
    assert pair["prompt"] == [user("Hello, can you tell me how cold San Francisco is today?")]
    assert pair["chosen"][0]["content"].startswith("Today in San Francisco")
    assert pair["rejected"][0]["content"].startswith("It is not particularly cold")
    tool = {"messages": [user("Weather?"), {"role": "assistant", "content": None,
                                            "tool_calls": [{"id": "1", "type": "function"}]}]}
    src = write_jsonl(tmp_path / "chat.jsonl", [tool])
    code, _, err = run_align(capsys, "data", "convert", src, "-o", tmp_path / "sft.jsonl")
    assert code != 0 and f"{src}:1: field 'messages[1].tool_calls': tool calls are not supported" in err


def test_hub_conversational_pairs_with_implicit_prompt(tmp_path: Path, capsys) -> None:
    rows = [
        {"chosen": [user("Hi"), assistant("Hello!")], "rejected": [user("Hi"), assistant("Go away.")]},
        {"chosen": [user("Q1"), assistant("A1"), user("Q2"), assistant("A2")],
         "rejected": [user("Q1"), assistant("B1"), user("Q2"), assistant("B2")]},
        {"chosen": [user("Same"), assistant("Same")], "rejected": [user("Same"), assistant("Same")]},
    ]
    src = write_jsonl(tmp_path / "hub.jsonl", rows)
    out = tmp_path / "pairs.jsonl"
    code, stdout, _ = run_align(capsys, "data", "convert", src, "-o", out)
    assert code == 0
    assert "detected format: trl, from the first row: 'chosen' and 'rejected' with no 'prompt'" in stdout
    assert "read 3 rows, wrote 2 pairs" in stdout and "1 written as pairs" in stdout
    assert rows_of(out)[1] == {"prompt": [user("Q1")], "chosen": [assistant("A1"), user("Q2"), assistant("A2")],
                               "rejected": [assistant("B1"), user("Q2"), assistant("B2")]}
    code, stdout, _ = run_align(capsys, "data", "convert", src, "--early-divergence", "skip", "-o", out)
    assert code == 0 and "wrote 1 pairs " in stdout
