"""The length-controlled win rate (issue 18): the judge's verdicts fitted on the answers' length difference,
read at equal lengths, with the raw win rate's prompt-resampling interval. Pure functions, synthetic judges."""

from __future__ import annotations

import math
import random
from collections.abc import Callable

import pytest

from align.eval.stats import (
    LOSS,
    TIE,
    WIN,
    fit_length_logistic,
    lc_fit,
    lc_win_rate_of,
    length_feature,
    sigmoid,
    summarise_length_controlled,
    summarise_prompt_outcomes,
)

Judge = Callable[[random.Random, float], float]


def _synthetic(seed: int, judge: Judge, *, prompts: int = 40, k: int = 2, gap: float = 15.0,
               spread: float = 20.0) -> tuple[list[list[float]], list[list[float]]]:
    """Per prompt K outcomes and K length differences (student - reference, in tokens), the student mostly
    longer (mean gap ``gap``), each verdict drawn by ``judge`` from the length difference."""
    rng = random.Random(seed)
    outcomes, diffs = [], []
    for _ in range(prompts):
        d = [float(round(rng.gauss(gap, spread))) for _ in range(k)]
        diffs.append(d)
        outcomes.append([judge(rng, x) for x in d])
    return outcomes, diffs


def _likes_length(rng: random.Random, d: float) -> float:
    """A judge whose verdicts depend on length only: at equal lengths a coin flip."""
    return WIN if rng.random() < sigmoid(2.5 * math.tanh(d / 20)) else LOSS


def _likes_quality(rng: random.Random, d: float) -> float:
    """A judge blind to length that prefers the student 7 to 3."""
    return WIN if rng.random() < 0.7 else (TIE if rng.random() < 0.2 else LOSS)


def test_with_answers_of_equal_length_the_lc_win_rate_and_its_interval_are_the_raw_ones() -> None:
    rng = random.Random(3)
    outcomes = [[rng.choice([WIN, WIN, TIE, LOSS]) for _ in range(3)] for _ in range(25)]
    raw = summarise_prompt_outcomes(outcomes, seed=7)
    for gap in (0.0, 12.0):  # equal lengths, or one constant gap: no variation for a slope to fit
        lc = summarise_length_controlled(outcomes, [[gap] * 3 for _ in outcomes], seed=7)
        assert (lc.rate, lc.ci_low, lc.ci_high) == (raw.rate, raw.ci_low, raw.ci_high)
        assert lc.slope is None


def test_degenerate_verdicts_give_the_raw_rate() -> None:
    diffs = [3.0, -20.0, 41.0, 7.0, -2.0]
    assert lc_fit([(d, TIE) for d in diffs]) == (0.5, None)  # all ties: nothing decisive, as the raw rate
    assert lc_fit([]) == (0.5, None)
    # all wins (or all losses) over varying gaps: length and quality cannot be told apart, the rate stays raw
    assert lc_fit([(d, WIN) for d in diffs]) == (1.0, None)
    assert lc_fit([(d, LOSS) for d in diffs] + [(9.0, TIE)]) == (0.0, None)
    assert length_feature([5.0, 5.0, 5.0]) is None and length_feature([]) is None


def test_ties_are_left_out_of_the_fit_as_the_raw_rate_leaves_them_out() -> None:
    outcomes, diffs = _synthetic(0, _likes_length)
    comparisons = [(d, o) for ds, os in zip(diffs, outcomes) for d, o in zip(ds, os)]
    with_ties = comparisons + [(float(d), TIE) for d in range(-80, 200, 7)]
    assert lc_win_rate_of(with_ties) == lc_win_rate_of(comparisons)


def test_wins_explained_entirely_by_length_fall_to_a_coin_flip() -> None:
    # The student is longer on 30 of 40 prompts by 1-60 tokens and wins exactly there: a raw 0.75.
    rng = random.Random(1)
    diffs = [float(rng.randint(1, 60)) for _ in range(30)] + [-float(rng.randint(1, 60)) for _ in range(10)]
    outcomes = [[WIN if d > 0 else LOSS] for d in diffs]
    raw = summarise_prompt_outcomes(outcomes)
    lc = summarise_length_controlled(outcomes, [[d] for d in diffs])
    assert raw.rate == 0.75
    assert lc.rate == pytest.approx(0.5, abs=0.05) and lc.slope > 0  # separable: finite, thanks to the ridge
    assert lc.ci_low <= lc.rate <= lc.ci_high


@pytest.mark.parametrize("seed", range(3))
def test_a_judge_that_only_likes_length_moves_the_lc_rate_towards_half_below_the_raw_rate(seed: int) -> None:
    # 200 comparisons: with 80 the fit's noise (0.34-0.67 over 20 seeds, mean 0.50) can overshoot 0.5
    outcomes, diffs = _synthetic(seed, _likes_length, prompts=100)
    raw = summarise_prompt_outcomes(outcomes, seed=seed)
    lc = summarise_length_controlled(outcomes, diffs, seed=seed)
    assert raw.rate > 0.6  # the longer student "wins"
    assert lc.rate < raw.rate and abs(lc.rate - 0.5) < abs(raw.rate - 0.5)
    assert lc.ci_low < 0.5 < raw.ci_low  # once length is controlled the win is no longer clear
    assert lc.slope > 1
    assert lc.ci_low <= lc.rate <= lc.ci_high


def test_a_student_that_wins_while_shorter_gains_from_length_control() -> None:
    # The same judge likes length, yet the student wins 6 of 10 while mostly *shorter*: it is better than that.
    def judge(rng: random.Random, d: float) -> float:
        return WIN if rng.random() < sigmoid(1.0 + 2.5 * math.tanh(d / 20)) else LOSS

    outcomes, diffs = _synthetic(5, judge, gap=-15.0)
    raw, lc = summarise_prompt_outcomes(outcomes), summarise_length_controlled(outcomes, diffs)
    assert lc.rate > raw.rate
    assert lc.ci_low <= lc.rate <= lc.ci_high


@pytest.mark.parametrize("seed", range(4))
def test_a_judge_blind_to_length_leaves_the_rate_about_where_it_was(seed: int) -> None:
    outcomes, diffs = _synthetic(seed, _likes_quality)
    raw = summarise_prompt_outcomes(outcomes, seed=seed)
    lc = summarise_length_controlled(outcomes, diffs, seed=seed)
    assert lc.rate == pytest.approx(raw.rate, abs=0.08)
    assert lc.ci_low > 0.5  # a real win survives length control
    assert lc.ci_low <= lc.rate <= lc.ci_high


def test_the_interval_is_deterministic_under_a_seed_and_moves_with_it() -> None:
    outcomes, diffs = _synthetic(2, _likes_length)
    first = summarise_length_controlled(outcomes, diffs, seed=11)
    assert summarise_length_controlled(outcomes, diffs, seed=11) == first
    other = summarise_length_controlled(outcomes, diffs, seed=12)
    assert other.rate == first.rate and (other.ci_low, other.ci_high) != (first.ci_low, first.ci_high)


def test_the_fit_recovers_a_known_intercept_and_slope() -> None:
    rng = random.Random(0)
    features = [math.tanh(rng.gauss(0.3, 1.0)) for _ in range(4000)]
    wins = [WIN if rng.random() < sigmoid(0.4 + 1.5 * x) else LOSS for x in features]
    a, b = fit_length_logistic(features, wins)
    assert a == pytest.approx(0.4, abs=0.12) and b == pytest.approx(1.5, abs=0.2)
    # the maximum: the penalised log-likelihood's gradient vanishes there
    residuals = [sigmoid(a + b * x) - y for x, y in zip(features, wins)]
    assert abs(sum(residuals)) < 1e-6
    assert abs(sum(r * x for r, x in zip(residuals, features)) + 1e-2 * b) < 1e-6


def test_an_intercept_only_fit_is_the_share_of_wins() -> None:
    # features all 0 (equal lengths): sigmoid(a) is wins / (wins + losses) exactly, the raw rate
    a, b = fit_length_logistic([0.0] * 10, [WIN] * 7 + [LOSS] * 3)
    assert sigmoid(a) == pytest.approx(0.7, abs=1e-12) and b == 0.0


def test_lengths_must_pair_with_outcomes() -> None:
    with pytest.raises(ValueError, match="one length difference per comparison"):
        summarise_length_controlled([[WIN, LOSS]], [[3.0]])
    with pytest.raises(ValueError):
        fit_length_logistic([0.1, 0.2], [WIN])


def test_length_differences_pair_the_kth_answers_in_tokens_else_in_words_for_all() -> None:
    from align.data.records import Candidate, CandidateSet
    from align.eval.stage import _length_differences

    def answers(*given: tuple[str, int | None]) -> CandidateSet:
        return CandidateSet(prompt_id="p", prompt="q?", prompt_hash="h",
                            responses=[Candidate(id=f"c{i}", text=t, num_tokens=n) for i, (t, n) in enumerate(given)])

    sampled = {"model": {"p": answers(("a b c", 7), ("a", 2))}, "reference": {"p": answers(("a", 3), ("a b", 5))}}
    assert _length_differences(sampled, ["p"]) == ("tokens", [[4.0, -3.0]])
    sampled["reference"]["p"].responses[1].num_tokens = None  # no made-up 0 tokens: words, for every answer
    assert _length_differences(sampled, ["p"]) == ("words", [[2.0, -1.0]])


def test_the_summary_puts_the_lc_rate_beside_the_raw_one_and_reads_metrics_written_before_it() -> None:
    from align.eval.report import summary_lines

    metrics = {"win_rate": 0.7, "win_rate_ci_low": 0.6, "win_rate_ci_high": 0.8, "wins": 14, "ties": 2,
               "losses": 6, "kl_per_token": 0.01, "kl_per_sequence": 0.5, "mean_length_reference": 40.0,
               "mean_length_model": 60.0, "hit_length_cap_reference": 0.0, "hit_length_cap_model": 0.1}
    before = summary_lines(metrics)  # an older metrics.json: no LC keys, no LC line, no error
    assert not any("length-controlled" in line for line in before)
    lines = summary_lines({**metrics, "lc_win_rate": 0.55, "lc_win_rate_ci_low": 0.41, "lc_win_rate_ci_high": 0.68,
                           "lc_length_slope": 1.9, "lc_length_unit": "tokens"})
    assert lines[0] == before[0]
    assert lines[1] == "length-controlled win rate (at equal tokens): 0.550 (95% CI 0.410-0.680)"
