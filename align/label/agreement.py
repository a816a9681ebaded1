"""Agreement between two labelers (judge vs rules, judge vs people) on the items both labeled.

Items are compared as pairs when either file is pairwise: a pairwise
judgement's verdict is kept; a pointwise file gives a verdict for every two
responses of a prompt from their scores (higher wins, equal is a tie). Each
pair is keyed by prompt id and its two response ids in sorted order, and its
verdict is written relative to that order (``first``, ``second``, ``tie``,
``both_bad``), so A/B presentation does not matter. When both files are
pointwise, items are responses and verdicts are their labels (good/bad).

Cohen's kappa corrects the raw agreement for what two labelers with the same
label frequencies would reach by chance: kappa = (p_o - p_e) / (1 - p_e)
(Cohen 1960). scikit-learn is not a dependency, so it is computed here.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from itertools import combinations
from typing import Any

from align.data.records import Judgement

ItemKey = tuple[str, ...]


def percent_agreement(a: Sequence[Hashable], b: Sequence[Hashable]) -> float:
    if len(a) != len(b) or not a:
        raise ValueError("need two equally long, non-empty label lists")
    return sum(x == y for x, y in zip(a, b)) / len(a)


def cohen_kappa(a: Sequence[Hashable], b: Sequence[Hashable]) -> float:
    """Cohen's kappa of two label lists; nan when chance agreement is already 1 (one label only)."""
    p_o = percent_agreement(a, b)
    n = len(a)
    count_a, count_b = Counter(a), Counter(b)
    p_e = sum(count_a[k] * count_b[k] for k in count_a) / (n * n)
    if p_e == 1.0:
        return float("nan")
    return (p_o - p_e) / (1.0 - p_e)


def _pair_key(prompt_id: str, first: str, second: str) -> tuple[ItemKey, bool]:
    """The sorted key, and whether (first, second) had to be swapped to get it."""
    if first <= second:
        return (prompt_id, first, second), False
    return (prompt_id, second, first), True


def _relative(label: str | None, swapped: bool) -> str | None:
    if label in ("tie", "both_bad"):
        return label
    if label not in ("a", "b"):
        return None  # unparsed or unlabeled: not an item
    winner_is_first_shown = label == "a"
    return "first" if winner_is_first_shown != swapped else "second"


def pair_verdicts(judgements: Iterable[Judgement]) -> dict[ItemKey, str]:
    """Every pair verdict a file implies (see the module docstring)."""
    verdicts: dict[ItemKey, str] = {}
    scores: dict[str, dict[str, float]] = defaultdict(dict)
    for j in judgements:
        if j.kind == "pairwise":
            key, swapped = _pair_key(j.prompt_id, j.responses[0].id, j.responses[1].id)
            verdict = _relative(j.label, swapped)
            if verdict is not None:
                verdicts[key] = verdict
        elif j.score is not None:
            scores[j.prompt_id][j.responses[0].id] = j.score
    for prompt_id, by_response in scores.items():
        for first, second in combinations(sorted(by_response), 2):
            s1, s2 = by_response[first], by_response[second]
            verdicts[(prompt_id, first, second)] = "tie" if s1 == s2 else "first" if s1 > s2 else "second"
    return verdicts


def response_labels(judgements: Iterable[Judgement]) -> dict[ItemKey, str]:
    return {(j.prompt_id, j.responses[0].id): j.label for j in judgements if j.kind == "pointwise" and j.label}


@dataclass
class AgreementResult:
    unit: str  # "pairs" | "responses"
    items: int
    only_in_a: int
    only_in_b: int
    agreement: float | None
    kappa: float | None
    confusion: Counter = field(default_factory=Counter)  # (label in A, label in B) -> count

    def summary(self) -> dict[str, Any]:
        return {"unit": self.unit, "shared_items": self.items, "only_in_a": self.only_in_a,
                "only_in_b": self.only_in_b, "agreement": self.agreement, "kappa": self.kappa,
                "confusion": {f"{a}|{b}": n for (a, b), n in sorted(self.confusion.items())}}


def compare(a: list[Judgement], b: list[Judgement]) -> AgreementResult:
    """Agreement and kappa on the items both labelers judged."""
    pointwise_only = all(j.kind == "pointwise" for j in a + b)
    view = response_labels if pointwise_only else pair_verdicts
    labels_a, labels_b = view(a), view(b)
    shared = sorted(set(labels_a) & set(labels_b))
    la, lb = [labels_a[k] for k in shared], [labels_b[k] for k in shared]
    result = AgreementResult("responses" if pointwise_only else "pairs", len(shared),
                             len(set(labels_a) - set(labels_b)), len(set(labels_b) - set(labels_a)),
                             None, None, Counter(zip(la, lb)))
    if shared:
        result.agreement = percent_agreement(la, lb)
        result.kappa = cohen_kappa(la, lb)
    return result
