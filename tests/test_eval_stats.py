"""`align eval`'s statistics with K answers per prompt: intervals resample prompts, score differences are paired."""

from __future__ import annotations

import random

import pytest

from align.eval.stats import (
    LOSS,
    TIE,
    WIN,
    bootstrap_ci,
    clustered_bootstrap_ci,
    implicit_reward_summary,
    prompt_score_difference,
    summarise_outcomes,
    summarise_prompt_outcomes,
    summarise_score_differences,
    win_rate_of,
)
from align.train.heldout import margin_accuracy, reward_tie_tolerance


def _outcomes(n: int, seed: int) -> list[float]:
    rng = random.Random(seed)
    return [rng.choice([WIN, WIN, TIE, LOSS]) for _ in range(n)]


@pytest.mark.parametrize("k", [2, 3, 8])
def test_a_clustered_bootstrap_of_k_identical_copies_of_each_prompt_gives_the_same_interval_as_k_1(k: int) -> None:
    outcomes = _outcomes(30, seed=k)
    once = summarise_outcomes(outcomes, seed=5)
    copies = summarise_prompt_outcomes([[o] * k for o in outcomes], seed=5)
    assert (copies.rate, copies.ci_low, copies.ci_high) == (once.rate, once.ci_low, once.ci_high)
    assert (copies.wins, copies.ties, copies.losses) == (k * once.wins, k * once.ties, k * once.losses)


def test_with_one_answer_per_prompt_the_clustered_bootstrap_is_the_plain_one() -> None:
    outcomes = _outcomes(25, seed=1)
    for seed in range(5):
        assert clustered_bootstrap_ci([[o] for o in outcomes], win_rate_of, seed=seed) == \
            bootstrap_ci(outcomes, seed=seed)


def test_answers_that_agree_within_a_prompt_are_not_counted_as_independent_prompts() -> None:
    # 13 prompts the student always wins, 7 it always loses, 4 answers each: 80 comparisons but 20 prompts.
    per_prompt = [[WIN] * 4] * 13 + [[LOSS] * 4] * 7
    clustered = summarise_prompt_outcomes(per_prompt)
    naive = summarise_outcomes([o for prompt in per_prompt for o in prompt])  # as if 80 prompts
    assert clustered.rate == naive.rate == pytest.approx(0.65)
    assert clustered.ci_high - clustered.ci_low > 1.5 * (naive.ci_high - naive.ci_low)
    assert clustered.ci_low < 0.5 < clustered.ci_high  # 13 vs 7 prompts is no clear win
    assert naive.ci_low > 0.5  # what treating the answers as prompts would wrongly claim


def test_no_prompts_give_the_uninformative_interval() -> None:
    assert clustered_bootstrap_ci([], win_rate_of) is None
    empty = summarise_prompt_outcomes([])
    assert (empty.rate, empty.ci_low, empty.ci_high, empty.n) == (0.5, 0.0, 1.0, 0)
    nothing = summarise_score_differences([None, None])
    assert (nothing.mean, nothing.ci_low, nothing.ci_high, nothing.prompts) == (None, None, None, 0)


def test_a_prompts_score_difference_pairs_the_kth_answers_and_skips_missing_scores() -> None:
    assert prompt_score_difference([0.5, None, 1.0], [0.25, 0.5, None]) == pytest.approx(0.25)
    assert prompt_score_difference([1.0, 0.0], [0.5, 0.5]) == pytest.approx(0.0)
    assert prompt_score_difference([None], [0.3]) is None
    with pytest.raises(ValueError, match="paired"):
        prompt_score_difference([0.1, 0.2], [0.1])


def test_the_score_difference_interval_excludes_zero_when_every_prompt_improves() -> None:
    rng = random.Random(0)
    diffs = [rng.uniform(0.01, 0.5) for _ in range(16)]
    summary = summarise_score_differences(diffs)
    assert summary.mean == pytest.approx(sum(diffs) / 16)
    assert 0 < summary.ci_low <= summary.mean <= summary.ci_high
    assert (summary.improved, summary.worsened, summary.unchanged, summary.prompts) == (16, 0, 0, 16)


def test_the_score_difference_interval_covers_zero_when_prompts_go_both_ways() -> None:
    diffs = [0.4, -0.3, 0.2, -0.5, 0.1, -0.1, 0.3, -0.2]
    summary = summarise_score_differences(diffs)
    assert summary.ci_low < 0 < summary.ci_high
    assert (summary.improved, summary.worsened) == (4, 4)


def test_swapping_student_and_reference_negates_the_difference_and_swaps_improved_and_worsened() -> None:
    diffs = [0.3, -0.1, 0.0, 0.2, 0.5, -0.4, 0.0]
    forward, backward = summarise_score_differences(diffs), summarise_score_differences([-d for d in diffs])
    assert backward.mean == pytest.approx(-forward.mean)
    assert (backward.improved, backward.worsened, backward.unchanged) == \
        (forward.worsened, forward.improved, forward.unchanged) == (2, 3, 2)


def test_a_model_against_itself_scores_a_difference_of_exactly_zero() -> None:
    scores = [[0.2, 0.7], [1.0, 0.0], [0.5, 0.5]]
    diffs = [prompt_score_difference(s, s) for s in scores]
    summary = summarise_score_differences(diffs)
    assert (summary.mean, summary.ci_low, summary.ci_high) == (0.0, 0.0, 0.0)
    assert (summary.improved, summary.worsened, summary.unchanged) == (0, 0, 3)


@pytest.mark.parametrize("beta", [0.1, 1.0])
def test_eval_counts_implicit_reward_ties_as_training_does(beta: float) -> None:
    # before training every margin is 0 up to float noise: both read 0.5, not eval's old 0 (ties as losses)
    noise = reward_tie_tolerance(beta) / 2
    margins = [0.0, noise, -noise, 1.0, -1.0, 2.0]
    summary = implicit_reward_summary(margins, beta)
    assert summary["accuracy"] == margin_accuracy(margins, tie_tolerance=reward_tie_tolerance(beta)) == 0.5 + 0.5 / 6
    assert summary["ties"] == 3 and summary["margin"] == pytest.approx(2.0 / 6)
    assert implicit_reward_summary([0.0] * 4, beta)["accuracy"] == 0.5
