"""Small pure functions for honest numbers: win rates with ties apart, bootstrap intervals."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

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


def bootstrap_ci(outcomes: Sequence[float], *, resamples: int = 2000, level: float = 0.95,
                 seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the win rate, resampling prompts with replacement."""
    if not outcomes:
        return 0.0, 1.0
    rng = random.Random(seed)
    n = len(outcomes)
    stats = sorted(win_rate_of([outcomes[rng.randrange(n)] for _ in range(n)]) for _ in range(resamples))
    tail = (1 - level) / 2
    return stats[int(tail * (resamples - 1))], stats[int((1 - tail) * (resamples - 1))]


def summarise_outcomes(outcomes: Sequence[float], *, seed: int = 0) -> WinRate:
    low, high = bootstrap_ci(outcomes, seed=seed)
    return WinRate(wins=sum(o == WIN for o in outcomes), ties=sum(o == TIE for o in outcomes),
                   losses=sum(o == LOSS for o in outcomes), rate=win_rate_of(outcomes), ci_low=low, ci_high=high)


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
