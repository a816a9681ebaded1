"""Small pure functions for honest numbers: win rates with ties apart, bootstrap intervals.

Several answers to one prompt are not independent evidence: a prompt that the student finds easy
makes all of its K answers win together. So every interval here resamples *prompts* (clusters)
with replacement and keeps all the comparisons of a drawn prompt together; with one answer per
prompt this is the ordinary bootstrap.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from statistics import fmean

WIN, TIE, LOSS = 1.0, 0.5, 0.0


@dataclass(frozen=True)
class WinRate:
    wins: int
    ties: int
    losses: int
    rate: float  # wins / (wins + losses): ties are counted apart, not as half a win
    ci_low: float
    ci_high: float

    @property
    def n(self) -> int:
        return self.wins + self.ties + self.losses


def win_rate_of(outcomes: Sequence[float]) -> float:
    """Share of decisive comparisons the model won; 0.5 when there were none (nothing to tell apart)."""
    wins = sum(1 for o in outcomes if o == WIN)
    losses = sum(1 for o in outcomes if o == LOSS)
    return wins / (wins + losses) if wins + losses else 0.5


def clustered_bootstrap_ci(clusters: Sequence[Sequence[float]], statistic: Callable[[Sequence[float]], float], *,
                           resamples: int = 2000, level: float = 0.95,
                           seed: int = 0) -> tuple[float, float] | None:
    """Percentile bootstrap interval of ``statistic`` over the values of all clusters (one per prompt):
    each resample draws as many clusters as there are, with replacement, and keeps a drawn cluster's
    values together. None when there are no clusters."""
    if not clusters:
        return None
    rng = random.Random(seed)
    n = len(clusters)
    stats = sorted(statistic([v for _ in range(n) for v in clusters[rng.randrange(n)]]) for _ in range(resamples))
    tail = (1 - level) / 2
    return stats[int(tail * (resamples - 1))], stats[int((1 - tail) * (resamples - 1))]


def bootstrap_ci(outcomes: Sequence[float], *, resamples: int = 2000, level: float = 0.95,
                 seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the win rate, one comparison per prompt, resampling prompts."""
    return clustered_bootstrap_ci([[o] for o in outcomes], win_rate_of, resamples=resamples, level=level,
                                  seed=seed) or (0.0, 1.0)


def summarise_prompt_outcomes(per_prompt: Sequence[Sequence[float]], *, seed: int = 0) -> WinRate:
    """Win rate over every comparison (the k-th answers of each prompt), with the interval clustered by prompt."""
    outcomes = [o for prompt in per_prompt for o in prompt]
    low, high = clustered_bootstrap_ci(per_prompt, win_rate_of, seed=seed) or (0.0, 1.0)
    return WinRate(wins=sum(o == WIN for o in outcomes), ties=sum(o == TIE for o in outcomes),
                   losses=sum(o == LOSS for o in outcomes), rate=win_rate_of(outcomes), ci_low=low, ci_high=high)


def summarise_outcomes(outcomes: Sequence[float], *, seed: int = 0) -> WinRate:
    """One comparison per prompt."""
    return summarise_prompt_outcomes([[o] for o in outcomes], seed=seed)


@dataclass(frozen=True)
class ScoreDifference:
    """Student minus reference on a scalar score, per prompt then averaged over prompts."""

    mean: float | None
    ci_low: float | None
    ci_high: float | None
    improved: int  # prompts whose mean difference is above zero
    worsened: int  # ... below zero
    unchanged: int
    prompts: int  # prompts with at least one pair of scores


def prompt_score_difference(model_scores: Sequence[float | None],
                            reference_scores: Sequence[float | None]) -> float | None:
    """One prompt's difference: the mean over its k of (student's k-th score - reference's k-th score).
    A pair with a missing score is left out; None when no pair is left."""
    if len(model_scores) != len(reference_scores):
        raise ValueError(f"{len(model_scores)} student scores but {len(reference_scores)} reference scores: "
                         "the k-th answers are paired, so both sides need the same number")
    diffs = [m - r for m, r in zip(model_scores, reference_scores) if m is not None and r is not None]
    return sum(diffs) / len(diffs) if diffs else None


def summarise_score_differences(per_prompt: Sequence[float | None], *, seed: int = 0,
                                tie_margin: float = 1e-9) -> ScoreDifference:
    """Mean of the prompts' differences with a paired bootstrap 95% interval that resamples prompts
    (each prompt's difference already averages its K answers, so its answers stay together)."""
    diffs = [d for d in per_prompt if d is not None]
    interval = clustered_bootstrap_ci([[d] for d in diffs], fmean, seed=seed)
    low, high = interval if interval else (None, None)
    return ScoreDifference(mean=mean(diffs), ci_low=low, ci_high=high,
                           improved=sum(1 for d in diffs if d > tie_margin),
                           worsened=sum(1 for d in diffs if d < -tie_margin),
                           unchanged=sum(1 for d in diffs if abs(d) <= tie_margin), prompts=len(diffs))


def compare_scores(model_score: float | None, reference_score: float | None, *, tie_margin: float = 1e-9) -> float:
    """One comparison from two scalar scores (a missing score loses; two missing tie)."""
    if model_score is None and reference_score is None:
        return TIE
    if model_score is None:
        return LOSS
    if reference_score is None:
        return WIN
    if abs(model_score - reference_score) <= tie_margin:
        return TIE
    return WIN if model_score > reference_score else LOSS


def mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def implicit_reward_summary(margins: Sequence[float], beta: float) -> dict[str, float | int | None]:
    """Accuracy, ties and mean of held-out implicit-reward margins (chosen - rejected), per pair.

    The accuracy is training's held-out accuracy (``align.train.heldout.margin_accuracy``, ties
    half, same tolerance), so a run's "after" figure and `align eval`'s read the same.
    """
    from align.train.heldout import margin_accuracy, reward_tie_tolerance

    tolerance = reward_tie_tolerance(beta)
    return {"accuracy": margin_accuracy(margins, tie_tolerance=tolerance),
            "ties": sum(1 for m in margins if abs(m) <= tolerance), "margin": mean(margins)}
