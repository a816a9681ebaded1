"""LLM judge: the debiasing math, both orders with a real (tiny) model, pointwise scales, the HTTP judge
against a real local server, rules + judge, routing and resuming."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import pytest

from align.data.pairs import build_pairs
from align.data.records import Candidate, CandidateSet, Judgement, content_hash
from align.data.validate import load_records
from align.label.judge import (
    HttpBackend, Judge, JudgeSettings, LocalBackend, debiased_probability, length_adjusted, pairwise_label,
    parse_http_answer, position_inconsistent, scale_probabilities,
)
from align.label.stages import label_judge

REPO = Path(__file__).resolve().parent.parent
PROMPT = "What is the capital of France?"
X = "Paris is the capital of France."
Y = "I think it might be Lyon, or maybe Marseille, but I am not sure at all about this."


def write_candidates(path: Path, prompts: dict[str, tuple[object, list[str]]]) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for prompt_id, (prompt, texts) in prompts.items():
            responses = [Candidate(id=f"r{i}", text=t, finish_reason="stop") for i, t in enumerate(texts)]
            record = CandidateSet(prompt_id=prompt_id, prompt=prompt, prompt_hash=content_hash(prompt),
                                  responses=responses)
            f.write(json.dumps(record.to_json()) + "\n")
    return path


@pytest.fixture(scope="module")
def tiny_backend(tiny_model_dir: Path) -> LocalBackend:
    import torch

    torch.set_num_threads(1)
    return LocalBackend(str(tiny_model_dir), batch_size=4)


# ----------------------------------------------------------------------------- the math


@pytest.mark.parametrize("p_ab, p_ba", list(itertools.product([0.0, 0.1, 0.35, 0.5, 0.8, 1.0], repeat=2)))
def test_debiasing_is_symmetric_in_the_two_responses(p_ab: float, p_ba: float) -> None:
    # Swapping x and y swaps which order is "x first": the verdict must flip exactly.
    assert debiased_probability(p_ab, p_ba) == pytest.approx(1.0 - debiased_probability(p_ba, p_ab))
    assert position_inconsistent(p_ab, p_ba) == position_inconsistent(p_ba, p_ab)
    for words_a, words_b in [(3, 30), (10, 10)]:
        assert length_adjusted(p_ab, words_a, words_b, 0.5) == pytest.approx(
            1.0 - length_adjusted(1.0 - p_ab, words_b, words_a, 0.5), abs=1e-9)


def test_a_judge_that_always_picks_the_first_slot_gives_a_tie_flagged_inconsistent() -> None:
    assert debiased_probability(0.9, 0.9) == pytest.approx(0.5)
    assert position_inconsistent(0.9, 0.9)
    assert not position_inconsistent(0.9, 0.2) and debiased_probability(0.9, 0.2) == pytest.approx(0.85)
    assert pairwise_label(0.52, 0.05) == "tie" and pairwise_label(0.6, 0.05) == "a" and pairwise_label(0.3, 0.05) == "b"


def test_length_penalty_moves_the_verdict_against_the_longer_answer() -> None:
    assert length_adjusted(0.7, 100, 10, 0.0) == 0.7
    assert length_adjusted(0.7, 100, 10, 0.5) < 0.7 < length_adjusted(0.7, 10, 100, 0.5)


def test_rating_ten_is_read_from_the_second_token() -> None:
    probs = scale_probabilities({"1": 0.5, "9": 0.5}, p_zero_after_one=0.8)
    assert probs["10"] == pytest.approx(0.4) and probs["1"] == pytest.approx(0.1) and probs["9"] == pytest.approx(0.5)
    assert sum(probs.values()) == pytest.approx(1.0) and len(probs) == 10


def test_http_answers_are_parsed_strictly() -> None:
    def body(content: str, top: list[tuple[str, float]] | None = None) -> dict:
        logprobs = {"content": [{"token": content, "logprob": -0.1,
                                 "top_logprobs": [{"token": t, "logprob": lp} for t, lp in top]}]} if top else None
        return {"choices": [{"message": {"role": "assistant", "content": content}, "logprobs": logprobs}]}

    from_logprobs = parse_http_answer(body("A", [("A", math.log(0.6)), (" B", math.log(0.2)), ("C", -1.0)]), "AB")
    assert from_logprobs.probs == pytest.approx({"A": 0.75, "B": 0.25}) and from_logprobs.mass == pytest.approx(0.8)
    assert parse_http_answer(body(" B\n"), "AB", use_logprobs=False).probs == {"A": 0.0, "B": 1.0}
    for unparsable in ["I think A is better", "A.", "", "Both"]:
        answer = parse_http_answer(body(unparsable), "AB", use_logprobs=False)
        assert not answer.parsed and answer.raw == unparsable
    assert not parse_http_answer({"error": "overloaded"}, "AB").parsed


# ----------------------------------------------------------------------------- a real model (tiny), both orders


def test_swapping_a_and_b_in_the_input_does_not_change_the_debiased_verdict(tiny_backend: LocalBackend) -> None:
    judge = Judge(tiny_backend, JudgeSettings(mode="pairwise", tie_margin=0.0))
    xy, yx = judge.compare([(PROMPT, X, Y), (PROMPT, Y, X)])
    # Both orders are recorded; the swapped input sees the same two questions in the other slots.
    assert [o["order"] for o in xy.details["orders"]] == ["ab", "ba"]
    assert xy.details["orders"][0]["p_a"] == pytest.approx(yx.details["orders"][1]["p_a"], abs=1e-5)
    assert xy.details["orders"][1]["p_a"] == pytest.approx(yx.details["orders"][0]["p_a"], abs=1e-5)
    # The raw first-order probability alone would not be symmetric (a random model has a slot bias)...
    p_ab, p_ba = xy.details["orders"][0]["p_a"], xy.details["orders"][1]["p_a"]
    assert p_ab != pytest.approx(1.0 - p_ba, abs=1e-4)
    # ...the debiased one is, and so is the verdict.
    assert xy.score == pytest.approx(1.0 - yx.score, abs=1e-5)
    assert xy.score == pytest.approx((p_ab + 1 - p_ba) / 2, abs=1e-6)
    assert {xy.label, yx.label} in ({"a", "b"}, {"tie"})
    assert xy.confidence == pytest.approx(yx.confidence, abs=1e-5)
    assert xy.details["length"]["longer"] == "b" and yx.details["length"]["longer"] == "a"


def test_batching_and_padding_do_not_change_a_verdict(tiny_backend: LocalBackend) -> None:
    judge = Judge(tiny_backend, JudgeSettings())
    alone = judge.compare([(PROMPT, X, Y)])[0]
    long_text = "A much longer answer that rambles on. " * 30
    batched = judge.compare([(PROMPT, long_text, X), (PROMPT, X, Y), ("Hi", "Hello.", long_text)])[1]
    assert batched.score == pytest.approx(alone.score, abs=1e-5)


def test_shared_prefixes_give_the_numbers_of_separate_passes(tiny_backend: LocalBackend) -> None:
    """Both orders of a pair share rubric and request: one row, computed once up to where they differ."""
    import torch

    from align.label.judge import pairwise_messages, pointwise_messages
    from align.label.shared_prefix import common_prefix_length, share_groups

    long_text = "A much longer answer that rambles on. " * 12
    questions = [(PROMPT, X, Y), (PROMPT, long_text, X), ("Hi", "Hello.", long_text)]
    pairwise = [tiny_backend._encode(pairwise_messages(p, a, b)) for p, x, y in questions for a, b in ((x, y), (y, x))]
    rating = [tiny_backend._encode(pointwise_messages(p, x, "10")) + [16] for p, x, _ in questions]
    ids = [32, 33, 34, 16]
    for sequences, keep in ((pairwise, 1), (rating, 2)):
        offset = common_prefix_length(sequences)
        assert offset > 20  # the rubric is computed once for all questions
        shared = tiny_backend._shared_prefix_logprobs(sequences, ids, keep)
        separate = tiny_backend._separate_logprobs(sequences, ids, keep)
        for a, b in zip(shared, separate):
            assert a.shape == (keep, len(ids))
            torch.testing.assert_close(a, b, atol=2e-5, rtol=0)
    # The two orders of one pair share their request, and so do the pairs asked about the same prompt;
    # questions that show the same answer first (0 and 3 show X) are put side by side.
    offset = common_prefix_length(pairwise)
    assert sorted(map(sorted, share_groups(pairwise, offset, max_size=8))) == [[0, 1, 2, 3], [4, 5]]
    assert [0, 3] in [sorted(group) for group in share_groups(pairwise, offset, max_size=2)]


def test_packed_rows_layout() -> None:
    import torch

    from align.label.shared_prefix import pack_groups

    # after a 2-token cached prefix: trunk [5, 6], branches [7, 8] and [9]; a lone question [5, 1, 2]
    packed = pack_groups([[[0, 0, 5, 6, 7, 8], [0, 0, 5, 6, 9]], [[0, 0, 5, 1, 2]]], offset=2, keep=1, pad_id=0,
                         dtype=torch.float32)
    assert packed.input_ids.tolist() == [[5, 6, 7, 8, 9], [5, 1, 2, 0, 0]]
    assert packed.position_ids[0].tolist() == [2, 3, 4, 5, 4]  # the second branch restarts after the trunk
    assert packed.reads == [(0, [3]), (0, [4]), (1, [2])]
    assert packed.tokens == 8  # 11 without sharing; padding not counted
    visible = packed.attention_mask[0, 0] == 0
    assert visible.shape == (5, 7)
    assert visible[4].tolist() == [True, True, True, True, False, False, True]  # prefix, trunk, itself; not [7, 8]
    assert visible[3].tolist() == [True, True, True, True, True, True, False]


def test_packed_rows_share_every_common_stretch() -> None:
    """All pairs of one prompt's answers: the pairs that show the same answer first share that answer too."""
    import torch

    from align.label.shared_prefix import pack_groups

    # after the cached prefix [0]: request 5 6, then first answer 7 (twice) or 1, then second answer 8, 9 or 2
    packed = pack_groups([[[0, 5, 6, 7, 8], [0, 5, 6, 7, 9], [0, 5, 6, 1, 2]]], offset=1, keep=1, pad_id=0,
                         dtype=torch.float32)
    assert packed.input_ids.tolist() == [[5, 6, 7, 8, 9, 1, 2]]
    assert packed.position_ids.tolist() == [[1, 2, 3, 4, 4, 3, 4]]
    assert packed.reads == [(0, [3]), (0, [4]), (0, [6])]
    assert packed.tokens == 7  # 12 without sharing
    visible = (packed.attention_mask[0, 0] == 0).int().tolist()
    assert visible[4] == [1, 1, 1, 1, 0, 1, 0, 0]  # 9 sees the prefix, 5 6, 7 and itself; not 8
    assert visible[6] == [1, 1, 1, 0, 0, 0, 1, 1]  # 2 sees the prefix, 5 6, 1 and itself
    # A question's last token is read from its own stretch, even when another question is the same.
    twice = pack_groups([[[0, 5, 6], [0, 5, 6]]], offset=1, keep=1, pad_id=0, dtype=torch.float32)
    assert twice.input_ids.tolist() == [[5, 6, 6]] and twice.reads == [(0, [1]), (0, [2])]


@pytest.mark.parametrize("scale", ["10", "good-bad"])
def test_pointwise_scores_come_from_answer_probabilities(tiny_backend: LocalBackend, scale: str) -> None:
    verdict = Judge(tiny_backend, JudgeSettings(mode="pointwise", scale=scale)).rate([(PROMPT, X)])[0]
    probs = verdict.details["probs"]
    assert sum(probs.values()) == pytest.approx(1.0, abs=1e-4)
    assert set(probs) == ({str(k) for k in range(1, 11)} if scale == "10" else {"good", "bad"})
    if scale == "10":
        assert 1.0 <= verdict.score <= 10.0 and verdict.score == pytest.approx(
            sum(int(k) * p for k, p in probs.items()), abs=1e-4)
    else:
        assert verdict.score == pytest.approx(probs["good"]) and verdict.label in ("good", "bad")
    assert 0 < verdict.details["answer_mass"] <= 1


# ----------------------------------------------------------------------------- the stage: files, rules, routing, resume


def test_judge_stage_with_swapped_candidates_gives_mirrored_judgements(tmp_path: Path,
                                                                       tiny_backend: LocalBackend) -> None:
    settings = JudgeSettings(mode="pairwise")
    forward = write_candidates(tmp_path / "xy.jsonl", {"p": (PROMPT, [X, Y])})
    backward = write_candidates(tmp_path / "yx.jsonl", {"p": (PROMPT, [Y, X])})
    label_judge(forward, tmp_path / "j_xy.jsonl", backend=tiny_backend, settings=settings, progress=False)
    label_judge(backward, tmp_path / "j_yx.jsonl", backend=tiny_backend, settings=settings, progress=False)
    (a,), (b,) = load_records(tmp_path / "j_xy.jsonl", "judgements"), load_records(tmp_path / "j_yx.jsonl", "judgements")
    assert [r.text for r in a.responses] == [X, Y] and [r.text for r in b.responses] == [Y, X]
    assert a.score == pytest.approx(1.0 - b.score, abs=1e-5)
    assert a.judge.type == "llm" and a.judge.model == tiny_backend.model_name


def test_rules_settle_what_they_can_and_the_judge_breaks_the_rest(tmp_path: Path,
                                                                  tiny_backend: LocalBackend) -> None:
    candidates = write_candidates(tmp_path / "c.jsonl", {
        "p": (PROMPT, ["Paris is the capital of France.",            # r0: passes everything
                       "Paris is the capital city of France.",       # r1: passes everything (judge decides r0/r1)
                       "I'm sorry, but I can't help with that.",     # r2: refusal, a hard filter
                       "Certainly! - **Paris**"]),                   # r3: preamble, markdown: low rule score
    })
    out, review = tmp_path / "j.jsonl", tmp_path / "review.jsonl"
    result = label_judge(candidates, out, backend=tiny_backend, settings=JudgeSettings(),
                         rules_path=REPO / "configs/rules/concise.yaml", route_below=0.5, review=review,
                         progress=False)
    judged: list[Judgement] = [Judgement.model_validate(json.loads(line))
                               for path in (out, review) if path.exists() for line in path.read_text().splitlines()]
    by_id = {j.id: j for j in judged}
    assert len(judged) == 6
    assert by_id["p:r0-vs-r2"].details["decided_by"] == "rules-filter" and by_id["p:r0-vs-r2"].label == "a"
    assert by_id["p:r0-vs-r2"].details["filtered"] == {"r2": ["no_refusal"]}
    assert by_id["p:r2-vs-r3"].label == "b"  # a filtered answer loses even to a poor one
    assert by_id["p:r0-vs-r3"].details["decided_by"] == "rules-score"
    asked = by_id["p:r0-vs-r1"]
    assert asked.details["decided_by"] == "judge" and len(asked.details["orders"]) == 2
    assert "orders" not in by_id["p:r0-vs-r2"].details  # the judge was never asked about settled pairs
    assert result.decided_by == {"rules-filter": 3, "rules-score": 2, "judge": 1}
    # Routing: the judge's uncertain verdict went to review, with its reason; rules verdicts stayed.
    assert result.routed == 1 and "review_reason" in load_records(review, "judgements")[0].details
    assert len(load_records(out, "judgements")) == 5
    rerun = label_judge(candidates, out, backend=tiny_backend, settings=JudgeSettings(),
                        rules_path=REPO / "configs/rules/concise.yaml", route_below=0.5, review=review,
                        progress=False)
    assert rerun.written == 0 and rerun.routed == 0 and rerun.already_done == 6


def test_a_finished_judgement_file_follows_the_candidates_order(tmp_path: Path, tiny_backend: LocalBackend) -> None:
    candidates = write_candidates(tmp_path / "c.jsonl", {
        "p": (PROMPT, ["Paris is the capital of France.", "Paris is the capital city of France.",
                       "I'm sorry, but I can't help with that.", "Certainly! - **Paris**"]),
        "q": (PROMPT, ["Paris.", "It is Paris."]),
    })
    out = tmp_path / "j.jsonl"
    label_judge(candidates, out, backend=tiny_backend, settings=JudgeSettings(),
                rules_path=REPO / "configs/rules/concise.yaml", progress=False)
    ids = [json.loads(line)["id"] for line in out.read_text().splitlines()]
    # the rules settle five of p's pairs at once and the judge answers the rest later; the file reads in order
    assert ids == ["p:r0-vs-r1", "p:r0-vs-r2", "p:r0-vs-r3", "p:r1-vs-r2", "p:r1-vs-r3", "p:r2-vs-r3",
                   "q:r0-vs-r1"]


def test_http_judge_against_a_real_local_server(tmp_path: Path, tiny_model_dir: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A random tiny model answers gibberish: every verdict must be unparsed, kept raw, never a win."""
    from align.generate.server import start_server_process

    candidates = write_candidates(tmp_path / "c.jsonl", {"p": (PROMPT, [X, Y])})
    monkeypatch.setenv("ALIGN_TEST_JUDGE_KEY", "sk-secret-value-123")
    with start_server_process(str(tiny_model_dir), env={"OMP_NUM_THREADS": "1"}) as server:
        backend = HttpBackend(server.base_url, str(tiny_model_dir), api_key_env="ALIGN_TEST_JUDGE_KEY")
        out, review = tmp_path / "j.jsonl", tmp_path / "review.jsonl"
        result = label_judge(candidates, out, backend=backend, settings=JudgeSettings(), route_below=0.1,
                             review=review, progress=False)
        pointwise = label_judge(candidates, tmp_path / "pw.jsonl", backend=backend, progress=False,
                                settings=JudgeSettings(mode="pointwise", scale="10"))
    assert result.unparsed == 1 and result.routed == 1 and result.written == 0
    (judgement,) = load_records(review, "judgements")
    assert judgement.score is None and judgement.label is None and judgement.details["unparsed"] is True
    assert judgement.details["review_reason"] == "unparsed"
    orders = judgement.details["orders"]
    assert [o["order"] for o in orders] == ["ab", "ba"] and all(o.get("unparsed") for o in orders)
    assert all(isinstance(o["raw"], str) for o in orders)
    assert pointwise.unparsed == 2
    assert all(j.score is None and "raw" in j.details for j in load_records(tmp_path / "pw.jsonl", "judgements"))
    # Unparsed verdicts are never wins: no pair can be built from them.
    assert build_pairs(review, tmp_path / "pairs.jsonl").pairs == 0
    for path in tmp_path.glob("*.jsonl"):
        assert "sk-secret-value-123" not in path.read_text()


@pytest.mark.slow
def test_real_model_local_and_http_judges_read_the_same_probabilities(bundled_model: str) -> None:
    """The bundled SmolLM2 as judge, locally and through a real local server: same verdict both ways.

    (SmolLM2-135M is a weak judge with a strong first-slot bias; this checks the mechanism, not its taste.)
    """
    from align.generate.server import start_server_process

    right, wrong = "The capital of France is Paris.", "The capital of France is Berlin."
    local = Judge(LocalBackend(bundled_model), JudgeSettings()).compare([(PROMPT, right, wrong)])[0]
    assert all(o["answer_mass"] > 0.05 for o in local.details["orders"])  # it does answer with A or B
    p_ab, p_ba = (o["p_a"] for o in local.details["orders"])
    assert local.score == pytest.approx((p_ab + 1 - p_ba) / 2, abs=1e-6)
    with start_server_process(bundled_model) as server:
        over_http = Judge(HttpBackend(server.base_url, bundled_model), JudgeSettings()).compare(
            [(PROMPT, right, wrong)])[0]
    assert not over_http.details.get("unparsed"), over_http.details
    for local_order, http_order in zip(local.details["orders"], over_http.details["orders"]):
        assert http_order["p_a"] == pytest.approx(local_order["p_a"], abs=0.02)  # read from top_logprobs
    assert over_http.score == pytest.approx(local.score, abs=0.02)


def test_label_judge_cli_pointwise_with_a_rubric_file(tmp_path: Path, tiny_model_dir: Path) -> None:
    from typer.testing import CliRunner

    from align.cli import app

    candidates = write_candidates(tmp_path / "c.jsonl", {"p": (PROMPT, [X, Y]), "q": ("Say hi.", ["Hi!"])})
    (tmp_path / "rubric.txt").write_text("Prefer short, correct answers.\n")
    args = ["label", "judge", str(candidates), "--model", str(tiny_model_dir), "--mode", "pointwise", "--scale",
            "good-bad", "--rubric", f"@{tmp_path / 'rubric.txt'}", "-o", str(tmp_path / "j.jsonl"), "--no-progress"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "wrote 3 judgements" in result.output
    judgements = load_records(tmp_path / "j.jsonl", "judgements")
    assert {j.id for j in judgements} == {"p:r0", "p:r1", "q:r0"}
    assert all(j.kind == "pointwise" and 0 <= j.score <= 1 and j.label in ("good", "bad") for j in judgements)
    other_rubric = CliRunner().invoke(app, args[:-4] + ["Be harsh.", "-o", str(tmp_path / "j.jsonl")])
    assert other_rubric.exit_code != 0 and "other settings" in str(other_rubric.exception)
    bad_mode = CliRunner().invoke(app, ["label", "judge", str(candidates), "--mode", "triwise", "-o", "x.jsonl"])
    assert bad_mode.exit_code != 0 and "--mode 'triwise'" in str(bad_mode.exception)
