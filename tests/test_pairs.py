"""Pair building: strategies, ties, margins, near-duplicates, KTO rows and the Eq. 8 weights."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from typer.testing import CliRunner

from align.cli import app
from align.data.pairs import (
    ScoredResponse, build_pairs, jaccard, kto_class_weights, kto_weight_ratio, near_duplicates, select_pairs,
    split_unpaired,
)
from align.data.records import JudgedResponse, Judgement, JudgeInfo, PreferencePair, UnpairedExample
from align.data.validate import load_records, validate_file
from align.errors import ConfigError

RULES = JudgeInfo(type="rules", name="concise")


def responses(*scores: float, filtered: tuple[int, ...] = ()) -> list[ScoredResponse]:
    return [ScoredResponse(f"r{i}", f"answer number {i} " + "word " * i, s, i in filtered, i)
            for i, s in enumerate(scores)]


def pointwise(prompt_id: str, response_id: str, text: str, score: float | None, *, prompt: object = "Q?",
              failed_hard: list[str] | None = None, judge: JudgeInfo = RULES) -> Judgement:
    return Judgement(id=f"{prompt_id}:{response_id}", prompt_id=prompt_id, prompt=prompt, kind="pointwise",
                     responses=[JudgedResponse(id=response_id, text=text)], judge=judge, score=score,
                     label="bad" if failed_hard else "good", details={"failed_hard": failed_hard or []},
                     prompt_hash="h" + prompt_id)


def write(path: Path, judgements: list[Judgement]) -> Path:
    path.write_text("".join(json.dumps(j.to_json()) + "\n" for j in judgements))
    return path


# ----------------------------------------------------------------------------- KTO weights, Eq. 8


@pytest.mark.parametrize("n_d, n_u", [(1, 1), (10, 10), (13, 10), (1, 9), (9, 1), (3, 1000), (1000, 3), (7, 5)])
def test_kto_weights_keep_the_eq8_ratio_in_range(n_d: int, n_u: int) -> None:
    desirable_weight, undesirable_weight = kto_class_weights(n_d, n_u)
    assert 1.0 <= kto_weight_ratio(n_d, n_u, desirable_weight, undesirable_weight) <= 4 / 3


def test_kto_weights_known_values() -> None:
    assert kto_class_weights(12, 10) == (1.0, 1.0)          # 1.2 is already in [1, 4/3]
    assert kto_class_weights(10, 10) == (1.0, 1.0)
    assert kto_class_weights(1, 9) == (10.5, 1.0)           # 10.5 * 1 / 9 = 7/6
    assert kto_weight_ratio(2, 4, 3.0, 1.5) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="both classes"):
        kto_class_weights(5, 0)


# ----------------------------------------------------------------------------- selecting pairs


def test_ties_never_become_pairs() -> None:
    for strategy in ("best-worst", "all-pairs", "random-pair"):
        assert select_pairs(responses(0.5, 0.5, 0.5), strategy) == []
        pairs = select_pairs(responses(0.9, 0.9, 0.2, 0.2), strategy, rng=random.Random(1))
        assert pairs and all(c.score > r.score for c, r in pairs)
    assert len(select_pairs(responses(0.9, 0.9, 0.2, 0.2), "all-pairs")) == 4  # never 0.9-0.9 or 0.2-0.2


def test_strategies_and_margin() -> None:
    rs = responses(0.2, 0.9, 0.5, 0.6)
    (best, worst), = select_pairs(rs, "best-worst")
    assert (best.id, worst.id) == ("r1", "r0")
    all_pairs = select_pairs(rs, "all-pairs")
    assert len(all_pairs) == 6 and [round(c.score - r.score, 2) for c, r in all_pairs][0] == 0.7
    assert len(select_pairs(rs, "all-pairs", min_margin=0.35)) == 3  # 0.7, 0.4, 0.4
    assert len(select_pairs(rs, "all-pairs", max_pairs=2)) == 2
    draws = {tuple(p.id for p in select_pairs(rs, "random-pair", rng=random.Random(seed))[0]) for seed in range(40)}
    assert len(draws) > 1 and all(c != r for c, r in draws)
    assert select_pairs(rs, "random-pair", rng=random.Random(3)) == select_pairs(rs, "random-pair", rng=random.Random(3))


def test_a_filtered_response_is_never_chosen() -> None:
    rs = responses(0.9, 0.5, 0.1, filtered=(0,))
    assert all(c.id != "r0" for c, _ in select_pairs(rs, "all-pairs"))
    (chosen, rejected), = select_pairs(rs, "best-worst")
    assert (chosen.id, rejected.id) == ("r1", "r2")


def test_near_duplicates_are_not_paired() -> None:
    assert jaccard("Paris is the capital.", "paris IS the capital!") == 1.0
    assert near_duplicates("The capital is Paris, France.", "The capital is Paris France", 0.9)
    assert not near_duplicates("Paris.", "Berlin is the capital of Germany.", 0.9)
    rs = [ScoredResponse("r0", "The capital of France is Paris.", 0.9, False, 0),
          ScoredResponse("r1", "the capital of France is Paris!", 0.1, False, 1),
          ScoredResponse("r2", "Berlin, I believe.", 0.5, False, 2)]
    (chosen, rejected), = select_pairs(rs, "best-worst")
    assert (chosen.id, rejected.id) == ("r0", "r2")  # best-worst falls back past the duplicate


def test_unpaired_split_by_rank_and_threshold() -> None:
    rs = responses(0.9, 0.9, 0.5, 0.1, 0.95, filtered=(4,))
    desirable, undesirable = split_unpaired(rs, "rank")
    assert [r.id for r in desirable] == ["r0", "r1"] and [r.id for r in undesirable] == ["r3", "r4"]
    assert split_unpaired(responses(0.4, 0.4), "rank") == ([], [])
    desirable, undesirable = split_unpaired(rs, "threshold", desirable_min=0.5)
    assert [r.id for r in desirable] == ["r0", "r1", "r2"] and [r.id for r in undesirable] == ["r3", "r4"]
    desirable, undesirable = split_unpaired(rs, "threshold", desirable_min=0.8, undesirable_max=0.2)
    assert [r.id for r in desirable] == ["r0", "r1"] and [r.id for r in undesirable] == ["r3", "r4"]
    with pytest.raises(ConfigError, match="--desirable-min"):
        split_unpaired(rs, "threshold")


# ----------------------------------------------------------------------------- the stage


def test_build_pairs_from_pointwise_judgements_writes_trl_rows_with_provenance(tmp_path: Path) -> None:
    messages = [{"role": "user", "content": "Name a color."}]
    judgements = write(tmp_path / "j.jsonl", [
        pointwise("p1", "r0", "Paris is the capital of France.", 1.0),
        pointwise("p1", "r1", "Sure! **Paris**.", 0.6),
        pointwise("p1", "r2", "I'm sorry, but I can't help.", 0.0, failed_hard=["no_refusal"]),
        pointwise("p2", "r0", "Blue.", 0.8, prompt=messages),
        pointwise("p2", "r1", "Red is one.", 0.8, prompt=messages),   # a tie: no pair for p2
        pointwise("p3", "r0", "Green is a color.", 0.9, prompt=messages),
        pointwise("p3", "r1", "Colour: green", 0.3, prompt=messages),
    ])
    result = build_pairs(judgements, tmp_path / "pairs.jsonl", strategy="best-worst", unpaired=tmp_path / "kto.jsonl")
    assert result.pairs == 2 and result.prompts_without_pair == 1 and result.counts.ties == 1
    pairs = [json.loads(line) for line in (tmp_path / "pairs.jsonl").read_text().splitlines()]
    first = pairs[0]
    # a text prompt was answered through the chat template: the pair is conversational, as TRL must see it
    assert first["prompt"] == [{"role": "user", "content": first["prompt"][0]["content"]}]
    assert (first["chosen"], first["rejected"]) == ([{"role": "assistant", "content": "Paris is the capital of France."}],
                                                    [{"role": "assistant", "content": "I'm sorry, but I can't help."}])
    assert first["prompt_id"] == "p1" and first["chosen_id"] == "r0" and first["rejected_id"] == "r2"
    assert first["margin"] == 1.0 and first["judges"] == ["concise"] and first["prompt_hash"] == "hp1"
    assert pairs[1]["chosen"] == [{"role": "assistant", "content": "Green is a color."}]  # conversational stays so
    assert all(PreferencePair.model_validate(p) for p in pairs)
    report = validate_file(tmp_path / "pairs.jsonl")
    assert report.ok and report.kind == "pairs"
    kto = load_records(tmp_path / "kto.jsonl", "unpaired")
    assert all(isinstance(r, UnpairedExample) for r in kto)
    assert [(r.completion_id, r.label) for r in kto if r.prompt_id == "p1"] == [("r0", True), ("r2", False)]
    assert result.balance is not None and (result.balance.desirable, result.balance.undesirable) == (2, 2)
    assert "desirable 2 (50.0%), undesirable 2 (50.0%)" in "\n".join(result.lines())


def test_build_pairs_from_pairwise_judgements_uses_mean_win_probability(tmp_path: Path) -> None:
    judge = JudgeInfo(type="llm", name="judge:m", model="m")

    def pairwise(a: str, b: str, p: float | None, **details: object) -> Judgement:
        return Judgement(id=f"p:{a}-vs-{b}", prompt_id="p", prompt="Q?", kind="pairwise", judge=judge,
                         responses=[JudgedResponse(id=a, text=f"text of {a}"), JudgedResponse(id=b, text=f"{b} says")],
                         score=p, label=None if p is None else "a" if p > 0.5 else "b", details=dict(details))

    path = write(tmp_path / "j.jsonl", [
        pairwise("r0", "r1", 0.8), pairwise("r0", "r2", 0.9), pairwise("r1", "r2", 0.3),
        pairwise("r1", "r3", None, unparsed=True),  # ignored, never a win for either
    ])
    build_pairs(path, tmp_path / "pairs.jsonl", strategy="all-pairs")
    rows = [json.loads(line) for line in (tmp_path / "pairs.jsonl").read_text().splitlines()]
    scores = {r["chosen_id"]: r["chosen_score"] for r in rows} | {r["rejected_id"]: r["rejected_score"] for r in rows}
    assert scores == pytest.approx({"r0": 0.85, "r1": 0.25, "r2": 0.4})
    assert [(r["chosen_id"], r["rejected_id"]) for r in rows] == [("r0", "r1"), ("r0", "r2"), ("r2", "r1")]


def test_mixed_labelers_need_a_choice_and_cli_reports_balance(tmp_path: Path) -> None:
    other = JudgeInfo(type="llm", name="judge:m")
    path = write(tmp_path / "j.jsonl", [pointwise("p", "r0", "Yes, it is.", 0.9), pointwise("p", "r1", "No.", 0.1),
                                        pointwise("p", "r0", "Yes, it is.", 3.0, judge=other)])
    with pytest.raises(ConfigError, match="several labelers .*--judge"):
        build_pairs(path, tmp_path / "pairs.jsonl")
    runner = CliRunner()
    out = runner.invoke(app, ["pairs", "build", str(path), "-o", str(tmp_path / "pairs.jsonl"), "--judge", "concise",
                              "--unpaired", str(tmp_path / "kto.jsonl"), "--min-margin", "0.5"])
    assert out.exit_code == 0, out.output
    assert "wrote 1 pairs from 1 prompts" in out.output
    assert "desirable 1 (50.0%), undesirable 1 (50.0%)" in out.output
    assert "desirable_weight=1.0 undesirable_weight=1.0" in out.output
    too_far = runner.invoke(app, ["pairs", "build", str(path), "-o", str(tmp_path / "p2.jsonl"), "--judge", "concise",
                                  "--min-margin", "0.9"])
    assert "wrote 0 pairs" in too_far.output and "1 below the margin" in too_far.output


def test_default_keeps_each_prompts_four_widest_pairs_and_zero_keeps_all(tmp_path: Path) -> None:
    # 6 distinct answers of one prompt: 15 pairs, margins from 0.1 to 0.5 (0.1 steps)
    texts = ["one apple", "two bananas here", "three cherries now", "four dates today", "five figs fresh", "six"]
    path = write(tmp_path / "j.jsonl", [pointwise("p", f"r{i}", text, i / 10) for i, text in enumerate(texts)])
    result = build_pairs(path, tmp_path / "pairs.jsonl")
    rows = [json.loads(line) for line in (tmp_path / "pairs.jsonl").read_text().splitlines()]
    assert result.pairs == 4
    # the widest first: 0.5 (r5-r0), then the two of 0.4, then one of 0.3
    assert [round(r["margin"], 2) for r in rows] == [0.5, 0.4, 0.4, 0.3]
    assert build_pairs(path, tmp_path / "all.jsonl", max_pairs_per_prompt=0).pairs == 15
    out = CliRunner().invoke(app, ["pairs", "build", str(path), "-o", str(tmp_path / "cli.jsonl")])
    assert out.exit_code == 0, out.output
    assert "wrote 4 pairs from 1 prompts" in out.output
    out = CliRunner().invoke(app, ["pairs", "build", str(path), "-o", str(tmp_path / "cli-all.jsonl"),
                                   "--max-pairs-per-prompt", "0"])
    assert "wrote 15 pairs from 1 prompts" in out.output
