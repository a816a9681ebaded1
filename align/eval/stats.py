"""Small pure functions for honest numbers: win rates with ties apart, length-controlled win rates,
bootstrap intervals.

Several answers to one prompt are not independent evidence: a prompt that the student finds easy
makes all of its K answers win together. So every interval here resamples *prompts* (clusters)
with replacement and keeps all the comparisons of a drawn prompt together; with one answer per
prompt this is the ordinary bootstrap.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from statistics import fmean, pstdev
from typing import TypeVar

T = TypeVar("T")

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


def clustered_bootstrap_ci(clusters: Sequence[Sequence[T]], statistic: Callable[[Sequence[T]], float], *,
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


# --- Length-controlled win rate (in the spirit of AlpacaEval 2, Dubois et al. 2024, arXiv:2404.04475) ---
#
# A judge that likes long answers rewards a student that learned to ramble. The length-controlled (LC) win
# rate asks what the win rate would be if the two answers had been equally long: fit
#     P(student's answer wins) = sigmoid(a + b * tanh(d / sd(d))),   d = len(student) - len(reference),
# on the decisive comparisons, and report sigmoid(a), the prediction at d = 0. In this model the prediction
# at d = 0 is the same for every comparison, so "averaged over the comparisons as the raw win rate is" is
# sigmoid(a) itself. Why this feature, as AlpacaEval does:
# * d / sd(d) (scaled, *not* centred: centring would move the point where we predict away from equal
#   lengths) makes the slope free of the unit (tokens or words) and of how long the answers run;
# * tanh bounds each comparison's pull on the slope, so a few 500-token rambles do not decide the fit,
#   and a judge's taste for length saturates rather than growing without end.
# Ties are left out as the raw win rate leaves them out (wins / (wins + losses)): with equal lengths the
# intercept-only fit gives sigmoid(a) = wins / (wins + losses), the raw rate exactly. AlpacaEval's extra
# per-instruction difficulty term needs many models per prompt and is left out.
#
# Degenerate cases, where length has nothing to explain or nothing to explain it with, give the raw rate:
# no decisive comparison (0.5, as the raw rate), only wins or only losses (the intercept would run to
# +-infinity; no fit can tell length from quality), and no variation in d among the decisive comparisons
# (sd = 0: with every gap equal, a and b cannot be told apart).
# A student whose answers are all much longer *and* always win therefore keeps its raw rate: length and
# quality are confounded there, and only comparisons that go both ways can separate them.
# Pure Python like the rest of this module (numpy is no dependency of align): the interval refits on each
# of 2000 resamples, about 1-2 s for 160 comparisons on one busy core.

# A ridge on the slope only (the intercept is what we read, so it stays unpenalised): on the summed
# log-likelihood 1e-2 is negligible once the data overlap (the fit recovers known coefficients), and keeps the
# slope finite when length separates wins from losses exactly (~9-14 in the tests' separable sets).
LENGTH_L2 = 1e-2


def sigmoid(z: float) -> float:
    return 1 / (1 + math.exp(-z)) if z >= 0 else math.exp(z) / (1 + math.exp(z))


def _log1p_exp(z: float) -> float:
    """log(1 + e^z) without overflow."""
    return z + math.log1p(math.exp(-z)) if z > 0 else math.log1p(math.exp(z))


def length_feature(length_diffs: Sequence[float]) -> list[float] | None:
    """tanh(d / sd(d)) per comparison (sd over these comparisons, not centred: 0 stays 0); None when the
    differences do not vary (sd 0), so no slope can be fitted."""
    if not length_diffs:
        return None
    scale = pstdev(length_diffs)
    if scale <= 1e-12 * max(1.0, max(abs(d) for d in length_diffs)):
        return None
    return [math.tanh(d / scale) for d in length_diffs]


def fit_length_logistic(features: Sequence[float], wins: Sequence[float], *, l2: float = LENGTH_L2,
                        max_iter: int = 100, tol: float = 1e-9) -> tuple[float, float]:
    """(a, b) maximising sum_i [y_i log p_i + (1 - y_i) log(1 - p_i)] - l2/2 b^2 with p_i = sigmoid(a + b x_i),
    y_i in [0, 1]: Newton's method (2x2) with step halving. Needs both a win and a loss (y not all 0 or all 1),
    else a runs to infinity."""
    if len(features) != len(wins) or not features:
        raise ValueError(f"{len(features)} features but {len(wins)} outcomes: one of each per comparison")
    share = min(max(fmean(wins), 1e-6), 1 - 1e-6)
    a, b = math.log(share / (1 - share)), 0.0  # the intercept-only fit: exact when no slope is needed

    def at(a: float, b: float) -> tuple[float, float, float, float, float, float]:
        """The penalised negative log-likelihood, its gradient and Hessian at (a, b), in one pass."""
        nll = g0 = g1 = h00 = h01 = h11 = 0.0
        for x, y in zip(features, wins):
            z = a + b * x
            p = sigmoid(z)
            w = p * (1 - p)
            nll += _log1p_exp(z) - y * z
            g0 += p - y
            g1 += (p - y) * x
            h00 += w
            h01 += w * x
            h11 += w * x * x
        return nll + 0.5 * l2 * b * b, g0, g1 + l2 * b, h00, h01, h11 + l2

    current = at(a, b)
    for _ in range(max_iter):
        nll, g0, g1, h00, h01, h11 = current
        det = h00 * h11 - h01 * h01
        if det <= 0:
            break
        da, db = (h11 * g0 - h01 * g1) / det, (h00 * g1 - h01 * g0) / det
        if max(abs(da), abs(db)) < tol:  # converged: a step this small is below the loss's rounding
            a, b = a - da, b - db
            break
        step = 1.0
        while step > 1e-8:
            trial = at(a - step * da, b - step * db)
            if trial[0] <= nll + 1e-12 * (1 + abs(nll)):  # lower, or level to rounding near the optimum
                break
            step /= 2
        else:
            break  # no step lowers the loss: at the optimum up to rounding
        a, b, current = a - step * da, b - step * db, trial
    return a, b


def lc_fit(comparisons: Sequence[tuple[float, float]]) -> tuple[float, float | None]:
    """The length-controlled win rate of (length difference, outcome) comparisons, and the fitted length
    slope (None where the rate falls back to the raw one: see the notes above)."""
    decisive = [(d, o) for d, o in comparisons if o != TIE]
    raw = win_rate_of([o for _, o in decisive])
    if not decisive or raw in (0.0, 1.0):
        return raw, None
    features = length_feature([d for d, _ in decisive])
    if features is None:
        return raw, None
    a, b = fit_length_logistic(features, [o for _, o in decisive])
    return sigmoid(a), b


def lc_win_rate_of(comparisons: Sequence[tuple[float, float]]) -> float:
    """Win rate predicted at equal lengths; ``comparisons`` are (len(student) - len(reference), outcome)."""
    return lc_fit(comparisons)[0]


@dataclass(frozen=True)
class LengthControlledWinRate:
    rate: float
    ci_low: float
    ci_high: float
    slope: float | None  # the judge's pull towards the longer answer, per unit of tanh(d / sd); None: raw rate


def summarise_length_controlled(per_prompt_outcomes: Sequence[Sequence[float]],
                                per_prompt_length_diffs: Sequence[Sequence[float]], *,
                                seed: int = 0) -> LengthControlledWinRate:
    """LC win rate over every comparison with the raw win rate's interval: prompts resampled (a prompt's
    K comparisons together, same draws for the same seed), the whole fit (scale included) redone each time."""
    if len(per_prompt_outcomes) != len(per_prompt_length_diffs) or any(
            len(o) != len(d) for o, d in zip(per_prompt_outcomes, per_prompt_length_diffs)):
        raise ValueError("one length difference per comparison: the k-th answers' lengths pair with the k-th outcome")
    clusters = [list(zip(d, o)) for o, d in zip(per_prompt_outcomes, per_prompt_length_diffs)]
    rate, slope = lc_fit([c for cluster in clusters for c in cluster])
    low, high = clustered_bootstrap_ci(clusters, lc_win_rate_of, seed=seed) or (0.0, 1.0)
    return LengthControlledWinRate(rate=rate, ci_low=low, ci_high=high, slope=slope)


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
