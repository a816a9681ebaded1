"""Agreement and Cohen's kappa, routing to review, and the rules-then-judge combining rule."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from typer.testing import CliRunner

from align.cli import app
from align.data.records import JudgedResponse, Judgement, JudgeInfo
from align.label.agreement import cohen_kappa, compare, pair_verdicts, percent_agreement
from align.label.combine import decide_by_rules
from align.label.routing import mark_for_review, review_reason
from align.label.rules import RuleResult


def test_cohen_kappa_known_values() -> None:
    # Wikipedia's worked example: 50 items, yes/yes 20, yes/no 5, no/yes 10, no/no 15 -> kappa 0.4.
    a = ["yes"] * 25 + ["no"] * 25
    b = ["yes"] * 20 + ["no"] * 5 + ["yes"] * 10 + ["no"] * 15
    assert percent_agreement(a, b) == pytest.approx(0.7)
    assert cohen_kappa(a, b) == pytest.approx(0.4)
    assert cohen_kappa([1, 1, 0, 0], [1, 0, 0, 0]) == pytest.approx(0.5)
    assert cohen_kappa(["a", "b", "c"], ["a", "b", "c"]) == pytest.approx(1.0)
    assert cohen_kappa([1, 0, 1, 0], [0, 1, 0, 1]) == pytest.approx(-1.0)
    assert math.isnan(cohen_kappa(["a", "a"], ["a", "a"]))  # chance agreement is already total


INFO_A, INFO_B = JudgeInfo(type="llm", name="judge"), JudgeInfo(type="human", name="people")


def pair(a: str, b: str, label: str | None, info: JudgeInfo = INFO_A, prompt_id: str = "p") -> Judgement:
    return Judgement(id=f"{prompt_id}:{a}-vs-{b}", prompt_id=prompt_id, prompt="Q?", kind="pairwise", judge=info,
                     responses=[JudgedResponse(id=a, text=a), JudgedResponse(id=b, text=b)], label=label)


def point(r: str, score: float, prompt_id: str = "p") -> Judgement:
    return Judgement(id=f"{prompt_id}:{r}", prompt_id=prompt_id, prompt="Q?", kind="pointwise",
                     judge=JudgeInfo(type="rules", name="rules"), responses=[JudgedResponse(id=r, text=r)],
                     score=score, label="good")


def test_pair_verdicts_ignore_presentation_order() -> None:
    judge = [pair("r1", "r2", "a"), pair("r3", "r1", "a"), pair("r2", "r3", "tie"), pair("r1", "r4", None)]
    people = [pair("r2", "r1", "b", INFO_B), pair("r1", "r3", "a", INFO_B), pair("r3", "r2", "tie", INFO_B)]
    assert pair_verdicts(judge) == {("p", "r1", "r2"): "first", ("p", "r1", "r3"): "second",
                                    ("p", "r2", "r3"): "tie"}
    result = compare(judge, people)
    assert result.unit == "pairs" and result.items == 3 and result.only_in_a == 0
    assert result.agreement == pytest.approx(2 / 3)
    assert result.confusion[("second", "first")] == 1


def test_judge_against_rules_compares_on_pairs_from_scores() -> None:
    rules = [point("r1", 0.9), point("r2", 0.4), point("r3", 0.4)]
    judge = [pair("r1", "r2", "a"), pair("r2", "r3", "a"), pair("r1", "r9", "b")]
    result = compare(judge, rules)
    assert result.items == 2 and result.only_in_a == 1 and result.only_in_b == 1  # r1-r3 only from rules
    assert result.confusion == {("first", "first"): 1, ("first", "tie"): 1}


def test_agreement_cli(tmp_path: Path) -> None:
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text("".join(json.dumps(j.to_json()) + "\n" for j in
                         [pair("r1", "r2", "a", prompt_id=str(i)) for i in range(6)]
                         + [pair("r1", "r2", "b", prompt_id=str(i)) for i in range(6, 10)]))
    b.write_text("".join(json.dumps(j.to_json()) + "\n" for j in
                         [pair("r2", "r1", "b", INFO_B, prompt_id=str(i)) for i in range(5)]
                         + [pair("r1", "r2", "b", INFO_B, prompt_id=str(i)) for i in range(5, 10)]))
    out = CliRunner().invoke(app, ["label", "agreement", str(a), str(b)])
    assert out.exit_code == 0, out.output
    # 9 of 10 agree; marginals A: 6 first/4 second, B: 5/5 -> p_e = 0.5, kappa = 0.8.
    assert "shared pairs: 10" in out.output and "agreement: 90.0%   Cohen's kappa: 0.800" in out.output
    as_json = json.loads(CliRunner().invoke(app, ["label", "agreement", str(a), str(b), "--json"]).output)
    assert as_json["kappa"] == pytest.approx(0.8) and as_json["shared_items"] == 10


def test_routing_reasons() -> None:
    confident = pair("r1", "r2", "a")
    confident.confidence = 0.8
    assert review_reason(confident, 0.5) is None
    unsure = pair("r1", "r2", "a")
    unsure.confidence = 0.2
    assert review_reason(unsure, 0.5) == "confidence 0.200 < 0.5"
    flipped = pair("r1", "r2", "a")
    flipped.confidence, flipped.details = 0.9, {"position_inconsistent": True}
    assert review_reason(flipped, 0.5) == "position-inconsistent"
    unparsed = pair("r1", "r2", None)
    unparsed.details = {"unparsed": True}
    assert mark_for_review(unparsed, 0.5) and unparsed.details["review_reason"] == "unparsed"
    assert not mark_for_review(unsure, None)


def verdict(score: float, failed: list[str] | None = None) -> RuleResult:
    return RuleResult(0.0 if failed else score, "bad" if failed else "good", {}, failed or [], {})


def test_combining_rule() -> None:
    assert decide_by_rules(verdict(0.9, ["refusal"]), verdict(0.1, ["refusal"])).label == "both_bad"  # type: ignore[union-attr]
    one_bad = decide_by_rules(verdict(0.9, ["refusal"]), verdict(0.2))
    assert one_bad is not None and (one_bad.label, one_bad.score, one_bad.decided_by) == ("b", 0.0, "rules-filter")
    clear = decide_by_rules(verdict(0.9), verdict(0.5), rules_margin=0.2)
    assert clear is not None and (clear.label, clear.decided_by) == ("a", "rules-score")
    assert decide_by_rules(verdict(0.9), verdict(0.8), rules_margin=0.2) is None  # the judge decides
    assert decide_by_rules(verdict(1.0), verdict(0.0), rules_margin=1.5) is None  # rules as pure filters
