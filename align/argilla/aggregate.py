"""Several people's answers to one record -> one verdict, and how much they (and the auto-labeler) agree.

Pure functions, no server. Labels are compared per item: a record for the
pairwise and single tasks, a pair of responses for rankings (each
annotator's ranks say which of the two is better, or a tie).

Fleiss' kappa (Fleiss 1971) generalises Scott's pi to any number of raters:
kappa = (P_bar - P_e) / (1 - P_e), with P_bar the mean share of agreeing
rater pairs per item and P_e the chance agreement from the overall label
frequencies. Items may have different numbers of raters (people skip
records); each item's P_i uses its own count, the usual generalisation.
Cohen's kappa between two annotators comes from :mod:`align.label.agreement`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import combinations
from typing import Any

from align.label.agreement import cohen_kappa, percent_agreement


def majority(labels: Sequence[Hashable]) -> tuple[Hashable | None, list[Hashable]]:
    """The most frequent label, or (None, the tied labels) when several share the top count."""
    if not labels:
        return None, []
    counts = Counter(labels)
    top = max(counts.values())
    leaders = sorted((label for label, n in counts.items() if n == top), key=str)
    return (leaders[0], []) if len(leaders) == 1 else (None, leaders)


def fleiss_kappa(items: Sequence[Sequence[Hashable]]) -> float:
    """Fleiss' kappa over items rated by at least two raters each; nan when undefined.

    ``items[i]`` holds the labels item i received (one per rater). Items with
    fewer than two ratings say nothing about agreement and are ignored.
    """
    rated = [list(labels) for labels in items if len(labels) >= 2]
    if not rated:
        return float("nan")
    totals: Counter = Counter()
    p_items = []
    for labels in rated:
        counts = Counter(labels)
        totals.update(counts)
        n = len(labels)
        p_items.append((sum(c * c for c in counts.values()) - n) / (n * (n - 1)))
    p_bar = sum(p_items) / len(p_items)
    all_ratings = sum(totals.values())
    p_e = sum((c / all_ratings) ** 2 for c in totals.values())
    if p_e == 1.0:
        return float("nan")  # everyone used one label: agreement is perfect but kappa is undefined
    return (p_bar - p_e) / (1.0 - p_e)


def rank_verdicts(ranks: Mapping[str, float]) -> dict[tuple[str, str], str]:
    """Ranks (1 = best) -> a verdict per pair of options in sorted order: first, second or tie."""
    out = {}
    for x, y in combinations(sorted(ranks), 2):
        out[(x, y)] = "tie" if ranks[x] == ranks[y] else "first" if ranks[x] < ranks[y] else "second"
    return out


def _nan_to_none(value: float | None) -> float | None:
    return None if value is None or value != value else round(value, 4)


@dataclass
class AgreementReport:
    unit: str                       # what an item is: "records" or "response pairs"
    items: int = 0                  # items with at least one human answer
    multi_rated: int = 0            # ...with two or more annotators
    ties: int = 0                   # records whose majority was a tie between labels
    fleiss_kappa: float | None = None
    observed_agreement: float | None = None  # P_bar: share of agreeing annotator pairs
    cohen: list[dict[str, Any]] = field(default_factory=list)  # per pair of annotators
    suggestion_items: int = 0
    suggestion_agreement: float | None = None
    suggestion_kappa: float | None = None
    suggestion_confusion: dict[str, int] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items()}

    def lines(self) -> list[str]:
        def fmt(x: float | None) -> str:
            return "n/a" if x is None else f"{x:.3f}"

        out = [f"agreement between annotators ({self.unit}): {self.multi_rated} of {self.items} items have 2+ "
               f"annotators; Fleiss' kappa {fmt(self.fleiss_kappa)}, observed agreement "
               f"{fmt(self.observed_agreement)}"]
        for c in self.cohen:
            out.append(f"  {c['annotators'][0]} vs {c['annotators'][1]}: {c['items']} shared items, "
                       f"agreement {fmt(c['agreement'])}, Cohen's kappa {fmt(c['kappa'])}")
        if self.ties:
            out.append(f"  ties (no majority): {self.ties}")
        if self.suggestion_items:
            out.append(f"auto-label suggestions vs people: {self.suggestion_items} items, agreement "
                       f"{fmt(self.suggestion_agreement)}, Cohen's kappa {fmt(self.suggestion_kappa)}")
        else:
            out.append("auto-label suggestions vs people: no item has both")
        return out


def agreement_report(unit: str, votes: Mapping[Hashable, Mapping[str, Hashable]],
                     consensus: Mapping[Hashable, Hashable | None],
                     suggestions: Mapping[Hashable, Hashable]) -> AgreementReport:
    """``votes[item][annotator] = label``; ``consensus[item]`` the aggregated label (None on a tie);
    ``suggestions[item]`` the auto-labeler's label."""
    report = AgreementReport(unit, items=len(votes))
    multi = [list(by_annotator.values()) for by_annotator in votes.values() if len(by_annotator) >= 2]
    report.multi_rated = len(multi)
    report.ties = sum(label is None for label in consensus.values())
    if multi:
        report.fleiss_kappa = _nan_to_none(fleiss_kappa(multi))
        agreeing = [sum(a == b for a, b in combinations(labels, 2)) / (len(labels) * (len(labels) - 1) / 2)
                    for labels in multi]
        report.observed_agreement = _nan_to_none(sum(agreeing) / len(agreeing))
    annotators = sorted({a for by_annotator in votes.values() for a in by_annotator})
    for x, y in combinations(annotators, 2):
        shared = [item for item, by in votes.items() if x in by and y in by]
        if shared:
            lx, ly = [votes[i][x] for i in shared], [votes[i][y] for i in shared]
            report.cohen.append({"annotators": [x, y], "items": len(shared),
                                 "agreement": _nan_to_none(percent_agreement(lx, ly)),
                                 "kappa": _nan_to_none(cohen_kappa(lx, ly))})
    paired = sorted((item for item in suggestions if consensus.get(item) is not None), key=str)
    if paired:
        auto, human = [suggestions[i] for i in paired], [consensus[i] for i in paired]
        report.suggestion_items = len(paired)
        report.suggestion_agreement = _nan_to_none(percent_agreement(auto, human))
        report.suggestion_kappa = _nan_to_none(cohen_kappa(auto, human))
        report.suggestion_confusion = {f"{a}|{h}": n for (a, h), n in sorted(Counter(zip(auto, human)).items(),
                                                                           key=str)}
    return report
