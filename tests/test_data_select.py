"""`align data select`: judgements -> SFT rows (best-of-N), with the teacher's reasoning kept apart or inline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from align.data.io import iter_rows
from align.data.pairs import ScoredResponse
from align.data.records import JudgedResponse, Judgement, JudgeInfo
from align.data.select import SelectCounts, select_best, select_sft, split_reasoning
from align.errors import DataError
from tests.clihelp import run_align
from tests.test_openai_client import Answer, scripted_server

RULES = JudgeInfo(type="rules", name="concise")


def scored(*items: tuple[str, float], filtered: tuple[int, ...] = ()) -> list[ScoredResponse]:
    return [ScoredResponse(f"r{i}", text, score, i in filtered, i) for i, (text, score) in enumerate(items)]


def pointwise(prompt_id: str, response_id: str, text: str, score: float, *, reasoning: str | None = None,
              failed_hard: bool = False) -> Judgement:
    return Judgement(id=f"{prompt_id}:{response_id}", prompt_id=prompt_id, prompt=f"Question {prompt_id}?",
                     kind="pointwise", responses=[JudgedResponse(id=response_id, text=text, reasoning=reasoning)],
                     judge=RULES, score=score, details={"failed_hard": ["hard"] if failed_hard else []},
                     prompt_hash="h" + prompt_id)


def write(path: Path, judgements: list[Judgement]) -> Path:
    path.write_text("".join(json.dumps(j.to_json()) + "\n" for j in judgements))
    return path


def test_reasoning_is_split_from_the_answer_in_every_form() -> None:
    assert split_reasoning("<think>\nadd 2 and 2\n</think>\n\nFour.") == split_reasoning("add 2 and 2</think>Four.")
    both = split_reasoning("<think>add 2 and 2</think>\nFour.")
    assert (both.answer, both.reasoning, both.unfinished) == ("Four.", "add 2 and 2", False)
    assert split_reasoning("Four.", stored="  add them ").reasoning == "add them"
    assert split_reasoning("<think>inline</think>Four.", stored="apart").reasoning == "apart"  # the API's wins
    assert split_reasoning("<think>still thinking when the tokens ran out").unfinished
    plain = split_reasoning("Use <think> tags like this.")
    assert (plain.answer, plain.reasoning) == ("Use <think> tags like this.", None)


def test_best_answer_wins_ties_go_to_the_first_written_and_filtered_never_win() -> None:
    counts = SelectCounts()
    kept = select_best(scored(("fine", 0.5), ("best but failed a hard rule", 0.9), ("good", 0.7), ("also good", 0.7),
                              filtered=(1,)), counts=counts)
    assert [r.id for r, _ in kept] == ["r2"]
    assert counts.filtered == 1 and counts.tied_at_top == 1


def test_top_k_skips_near_duplicates_and_min_score_rejects_weak_answers() -> None:
    responses = scored(("The sky is blue because of Rayleigh scattering.", 0.9),
                       ("the sky is blue because of rayleigh scattering", 0.8),
                       ("Sunlight scatters off air molecules, blue the most.", 0.6),
                       ("No idea.", 0.1))
    counts = SelectCounts()
    kept = select_best(responses, top_k=3, min_score=0.5, counts=counts)
    assert [r.id for r, _ in kept] == ["r0", "r2"]
    assert counts.near_duplicates == 1 and counts.below_min_score == 1
    assert select_best(responses, min_score=0.95) == []


def test_select_writes_sft_rows_with_reasoning_dropped_or_kept(tmp_path: Path, capsys) -> None:
    from align.train.data import load_training_data

    judgements = write(tmp_path / "j.jsonl", [
        pointwise("a", "a0", "Paris.", 0.9, reasoning="France's capital"),
        pointwise("a", "a1", "Lyon.", 0.2),
        pointwise("b", "b0", "<think>2 + 2</think>\nFour.", 0.8),
        pointwise("b", "b1", "<think>counting on fingers", 0.95),  # cut off mid-thought: never an answer
        pointwise("c", "c0", "Too short.", 0.1),
    ])
    code, out, err = run_align(capsys, "data", "select", judgements, "-o", tmp_path / "sft.jsonl", "--min-score", "0.5")
    assert code == 0, err
    assert "wrote 2 SFT rows from 3 prompts" in out and "1 with unfinished reasoning" in out
    rows = [row for _, row in iter_rows(tmp_path / "sft.jsonl")]
    assert [r["completion"][0]["content"] for r in rows] == ["Paris.", "Four."]
    assert rows[0]["prompt"] == [{"role": "user", "content": "Question a?"}]
    assert {k: rows[1][k] for k in ("prompt_id", "completion_id", "score", "rank")} == \
        {"prompt_id": "b", "completion_id": "b0", "score": 0.8, "rank": 1}
    assert load_training_data(tmp_path / "sft.jsonl", "sft").rows[0]["completion"][0]["content"] == "Paris."
    code, out, err = run_align(capsys, "data", "validate", tmp_path / "sft.jsonl")
    assert code == 0 and "2 records, kind: sft" in out, err

    select_sft(judgements, tmp_path / "keep.jsonl", min_score=0.5, reasoning="keep")
    kept = [row["completion"][0]["content"] for _, row in iter_rows(tmp_path / "keep.jsonl")]
    assert kept == ["<think>France's capital</think>\nParis.", "<think>2 + 2</think>\nFour."]


def test_bad_judgements_name_file_line_and_field(tmp_path: Path, capsys) -> None:
    good = pointwise("a", "a0", "Paris.", 0.9).to_json()
    bad = {**good, "id": "a:a1"}
    del bad["responses"]
    path = tmp_path / "j.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(DataError, match=r"j\.jsonl:2: field 'responses': missing"):
        select_sft(path, tmp_path / "out.jsonl")
    code, _, err = run_align(capsys, "data", "select", path, "-o", tmp_path / "out.jsonl", "--reasoning", "maybe")
    assert code != 0 and "--reasoning must be keep or drop" in err
    assert not (tmp_path / "out.jsonl").exists()


def test_reasoning_content_from_an_openai_teacher_travels_apart_to_select(tmp_path: Path) -> None:
    from align.generate import GenerateConfig, generate
    from align.label.stages import label_rules

    def reply(body: dict) -> Answer:
        message = {"role": "assistant", "content": "Blue.", "reasoning_content": "Rayleigh scattering."}
        return 200, {}, {"choices": [{"index": i, "message": message, "finish_reason": "stop"}
                                     for i in range(body.get("n", 1))]}

    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"id": "sky", "prompt": "What colour is the sky?"}\n')
    with scripted_server([reply]) as (root, _):
        generate(GenerateConfig(model="teacher", backend="openai", base_url=root, prompts=prompts,
                                output=tmp_path / "c.jsonl", num_candidates=1, progress=False))
    candidate = json.loads((tmp_path / "c.jsonl").read_text())["responses"][0]
    assert (candidate["text"], candidate["reasoning"]) == ("Blue.", "Rayleigh scattering.")
    rules = tmp_path / "rules.yaml"
    rules.write_text("name: short\nrules:\n  - {name: short, min_words: 1, max_words: 50}\n")
    label_rules(tmp_path / "c.jsonl", rules, tmp_path / "j.jsonl", progress=False)
    select_sft(tmp_path / "j.jsonl", tmp_path / "sft.jsonl", reasoning="keep")
    row = next(iter_rows(tmp_path / "sft.jsonl"))[1]
    assert row["completion"][0]["content"] == "<think>Rayleigh scattering.</think>\nBlue."
