"""The Argilla loop's pure parts: records, ids, suggestions, aggregation and agreement (no server needed)."""

from __future__ import annotations

import math
import socket

import pytest

from align.argilla.aggregate import agreement_report, fleiss_kappa, majority, rank_verdicts
from align.argilla.items import SuggestionIndex, build_items, choose_task
from align.argilla.push import plan_push, to_record
from align.argilla.settings import ArgillaUnavailable, connect, resolve_settings
from align.data.records import Candidate, CandidateSet, JudgedResponse, Judgement, JudgeInfo, content_hash
from align.errors import AlignError, ConfigError


def candidate_set(prompt_id: str, texts: list[str], prompt: str | None = None) -> CandidateSet:
    prompt = prompt or f"prompt {prompt_id}"
    return CandidateSet(prompt_id=prompt_id, prompt=prompt, prompt_hash=content_hash(prompt),
                        responses=[Candidate(id=f"c{i}", text=t) for i, t in enumerate(texts)])


def pair_judgement(s: CandidateSet, first: int, second: int, label: str, confidence: float | None,
                   **details: object) -> Judgement:
    a, b = s.responses[first], s.responses[second]
    return Judgement(id=f"{s.prompt_id}:{a.id}-vs-{b.id}", prompt_id=s.prompt_id, prompt=s.prompt, kind="pairwise",
                     responses=[JudgedResponse(id=a.id, text=a.text), JudgedResponse(id=b.id, text=b.text)],
                     judge=JudgeInfo(type="llm", name="judge:t"), label=label, confidence=confidence,
                     score=0.5, details=dict(details))


def point_judgement(s: CandidateSet, index: int, score: float, label: str | None = None,
                    confidence: float | None = None) -> Judgement:
    c = s.responses[index]
    return Judgement(id=f"{s.prompt_id}:{c.id}", prompt_id=s.prompt_id, prompt=s.prompt, kind="pointwise",
                     responses=[JudgedResponse(id=c.id, text=c.text)], judge=JudgeInfo(type="rules", name="rules:t"),
                     score=score, label=label, confidence=confidence)


# ----------------------------------------------------------------------------- aggregation


def test_fleiss_kappa_matches_the_published_example() -> None:
    # Fleiss (1971) as reproduced on Wikipedia: 10 items, 14 raters, 5 categories -> kappa 0.210.
    table = [[0, 0, 0, 0, 14], [0, 2, 6, 4, 2], [0, 0, 3, 5, 6], [0, 3, 9, 2, 0], [2, 2, 8, 1, 1],
             [7, 7, 0, 0, 0], [3, 2, 6, 3, 0], [2, 5, 3, 2, 2], [6, 5, 2, 1, 0], [0, 2, 2, 3, 7]]
    items = [[category for category, n in enumerate(row) for _ in range(n)] for row in table]
    assert fleiss_kappa(items) == pytest.approx(0.20993, abs=1e-4)


def test_fleiss_kappa_edge_cases() -> None:
    assert fleiss_kappa([["a", "a"], ["b", "b"], ["a", "a"]]) == pytest.approx(1.0)
    assert math.isnan(fleiss_kappa([["a", "a"], ["a", "a"]]))  # one label only: undefined
    assert math.isnan(fleiss_kappa([["a"], ["b"]]))  # nobody overlaps
    # Items with a single rating are ignored, not counted as agreement.
    assert fleiss_kappa([["a", "b"], ["a", "b"], ["a"]]) == fleiss_kappa([["a", "b"], ["a", "b"]])
    # Perfect disagreement on two labels is below chance.
    assert fleiss_kappa([["a", "b"], ["b", "a"]]) < 0


def test_majority_reports_ties() -> None:
    assert majority(["a", "b", "a"]) == ("a", [])
    assert majority(["b", "a"]) == (None, ["a", "b"])
    assert majority([]) == (None, [])


def test_rank_verdicts_keep_ties() -> None:
    assert rank_verdicts({"r1": 2, "r2": 1, "r3": 2}) == {("r1", "r2"): "second", ("r1", "r3"): "tie",
                                                           ("r2", "r3"): "first"}


def test_agreement_report_counts_annotators_and_suggestions() -> None:
    votes = {1: {"x": "a", "y": "a"}, 2: {"x": "a", "y": "b"}, 3: {"x": "b"}}
    report = agreement_report("records", votes, {1: "a", 2: None, 3: "b"}, {1: "a", 2: "a", 3: "a"})
    assert report.multi_rated == 2 and report.ties == 1
    assert report.observed_agreement == 0.5
    assert report.cohen == [{"annotators": ["x", "y"], "items": 2, "agreement": 0.5, "kappa": 0.0}]
    # Record 2 has no majority, so the suggestion is compared on records 1 and 3 only.
    assert report.suggestion_items == 2 and report.suggestion_agreement == 0.5


# ----------------------------------------------------------------------------- records and suggestions


def test_record_ids_come_from_content_not_ids_or_order_of_files() -> None:
    one = build_items([candidate_set("p1", ["x", "y"])], "pairwise")[0][0]
    renamed = build_items([candidate_set("other", ["x", "y"], prompt="prompt p1")], "pairwise")[0][0]
    changed = build_items([candidate_set("p1", ["x", "z"])], "pairwise")[0][0]
    assert one.record_id == renamed.record_id
    assert one.record_id != changed.record_id
    assert to_record(one).id == one.record_id


def test_build_items_per_task() -> None:
    sets = [candidate_set("p1", ["x", "y", "z"]), candidate_set("p2", ["u", "v"])]
    pairs, skipped = build_items(sets, "pairwise")
    assert [(i.prompt_id, [r.id for r in i.responses]) for i in pairs] == [
        ("p1", ["c0", "c1"]), ("p1", ["c0", "c2"]), ("p1", ["c1", "c2"]), ("p2", ["c0", "c1"])]
    singles, _ = build_items(sets, "single")
    assert len(singles) == 5 and skipped == 0
    rankings, skipped = build_items(sets, "ranking")
    assert [i.prompt_id for i in rankings] == ["p1"] and skipped == 1  # p2 has two, not three


def test_empty_and_duplicate_candidates_are_not_labeled() -> None:
    s = candidate_set("p1", ["x", "y", "x"])
    s.responses[2].duplicate_of = "c0"
    s.responses[1].empty = True
    assert build_items([s], "pairwise") == ([], 1)


def test_choose_task() -> None:
    assert choose_task([candidate_set("p", ["x", "y"])], None) == "pairwise"
    assert choose_task([candidate_set("p", ["x"])], None) == "single"
    assert choose_task([candidate_set("p", ["x", "y", "z"])], None) == "ranking"
    with pytest.raises(AlignError, match="--task"):
        choose_task([candidate_set("p", ["x", "y"]), candidate_set("q", ["x", "y", "z"])], None)


def test_pair_suggestion_follows_the_presented_order() -> None:
    s = candidate_set("p1", ["x", "y"])
    item = build_items([s], "pairwise")[0][0]
    # The judge saw (c1, c0) and preferred its first, c1: shown as (c0, c1) that is "b".
    suggestion = SuggestionIndex([pair_judgement(s, 1, 0, "a", 0.9)]).for_item(item)
    assert suggestion is not None and (suggestion.value, suggestion.score, suggestion.agent) == ("b", 0.9, "judge:t")


def test_pointwise_scores_suggest_pairs_and_rankings() -> None:
    s = candidate_set("p1", ["x", "y", "z"])
    judgements = [point_judgement(s, 0, 0.2), point_judgement(s, 1, 0.9), point_judgement(s, 2, 0.5)]
    index = SuggestionIndex(judgements)
    pair = index.for_item(build_items([s], "pairwise")[0][0])
    assert pair is not None and pair.value == "b" and pair.score is None
    ranking = index.for_item(build_items([s], "ranking")[0][0])
    assert ranking is not None and ranking.value == ["response_2", "response_3", "response_1"]


def test_only_uncertain_uses_confidence_and_routing() -> None:
    sets = [candidate_set(f"p{i}", [f"x{i}", f"y{i}"]) for i in range(4)]
    judgements = [pair_judgement(sets[0], 0, 1, "a", 0.95), pair_judgement(sets[1], 0, 1, "b", 0.6),
                  pair_judgement(sets[2], 0, 1, "a", 0.99, review_reason="position-inconsistent")]
    items, result = plan_push(sets, judgements, only_uncertain=True, min_confidence=0.8)
    assert [i.prompt_id for i in items] == ["p1", "p2"]
    assert (result.certain_left_out, result.unjudged_left_out) == (1, 1)
    with pytest.raises(ConfigError, match="--judgements"):
        plan_push(sets, None, only_uncertain=True)


# ----------------------------------------------------------------------------- settings


def test_unreachable_argilla_names_the_url_and_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("ARGILLA_API_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("ARGILLA_API_KEY", "secret-key-that-must-not-leak")
    settings = resolve_settings()
    with pytest.raises(ArgillaUnavailable) as caught:
        connect(settings)
    message = str(caught.value)
    assert f"http://127.0.0.1:{port}" in message and "align argilla up" in message
    assert "secret-key-that-must-not-leak" not in message + repr(settings)


def test_no_configuration_says_how_to_start_one(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.delenv("ARGILLA_API_URL", raising=False)
    monkeypatch.delenv("ARGILLA_API_KEY", raising=False)
    with pytest.raises(ArgillaUnavailable, match="align argilla up"):
        resolve_settings(home=tmp_path)


def test_config_file_and_environment(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    config = tmp_path / "argilla.yaml"
    config.write_text("argilla:\n  api_url: http://argilla.example:6900\n  api_key: from-file\n  workspace: team\n")
    monkeypatch.delenv("ARGILLA_API_URL", raising=False)
    monkeypatch.delenv("ARGILLA_API_KEY", raising=False)
    settings = resolve_settings(config)
    assert (settings.api_url, settings.api_key.get_secret_value(), settings.workspace) == \
        ("http://argilla.example:6900", "from-file", "team")
    monkeypatch.setenv("ARGILLA_API_URL", "http://other:6900")
    assert resolve_settings(config).api_url == "http://other:6900"
