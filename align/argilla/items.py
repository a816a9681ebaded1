"""What gets labeled: candidate sets cut into records for a task, with the auto-labelers' suggestions.

Pure functions over align's records (no server): which responses go into
which record, each record's content-derived id, and the suggestion an
automatic judgement implies for it. Kept apart from the push so it can be
tested without Argilla.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from itertools import combinations
from typing import Any

from align.data.records import Candidate, CandidateSet, Judgement, Text, content_hash
from align.errors import AlignError
from align.label.routing import review_reason

SWAP = {"a": "b", "b": "a", "tie": "tie", "both_bad": "both_bad"}


@dataclass
class Suggestion:
    value: Any  # a label, or for ranking the response fields best first
    score: float | None
    agent: str
    uncertain: bool


@dataclass
class Item:
    """One Argilla record to be: a prompt and the responses a person compares or rates."""

    task: str
    prompt_id: str
    prompt: Text
    prompt_hash: str
    responses: list[Candidate]
    suggestion: Suggestion | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def record_id(self) -> str:
        """Derived from what the annotator sees, so pushing the same content again updates, never duplicates."""
        return content_hash({"task": self.task, "prompt": self.prompt, "responses": [r.text for r in self.responses]})


def labelable(candidates: CandidateSet) -> list[Candidate]:
    """Responses worth a person's time: not empty, not a duplicate of an earlier one (as the labelers do)."""
    return [c for c in candidates.responses if c.text.strip() and not c.empty and c.duplicate_of is None]


def choose_task(sets: list[CandidateSet], judgements: list[Judgement] | None) -> str:
    """The task the data asks for: the judgements' kind if given, else the number of responses per prompt."""
    if judgements:
        kinds = {j.kind for j in judgements}
        if kinds == {"pairwise"}:
            return "pairwise"
        if kinds == {"pointwise"} and all(len(labelable(s)) <= 1 for s in sets):
            return "single"
    counts = {len(labelable(s)) for s in sets} - {0}
    if counts == {1}:
        return "single"
    if counts == {2}:
        return "pairwise"
    if counts and min(counts) > 2:
        return "ranking"
    raise AlignError(f"cannot tell the task from the data (responses per prompt: {sorted(counts)}); "
                     "choose one with --task pairwise|single|ranking")


def build_items(sets: Iterable[CandidateSet], task: str) -> tuple[list[Item], int]:
    """Records for ``task``, in file order, and how many prompts had nothing to label for it."""
    items: list[Item] = []
    skipped = 0
    sets = list(sets)
    ranking_size = max((len(labelable(s)) for s in sets), default=0)
    for s in sets:
        responses = labelable(s)
        if task == "single":
            groups = [[r] for r in responses]
        elif task == "pairwise":
            groups = [list(pair) for pair in combinations(responses, 2)]
        else:
            # A ranking question has a fixed set of options, so every record needs the same number of responses.
            groups = [responses] if len(responses) == ranking_size and ranking_size > 2 else []
        if not groups:
            skipped += 1
        items.extend(Item(task, s.prompt_id, s.prompt, s.prompt_hash, g) for g in groups)
    return items, skipped


# ----------------------------------------------------------------------------- suggestions


def _uncertain(judgement: Judgement, min_confidence: float) -> bool:
    return "review_reason" in judgement.details or review_reason(judgement, min_confidence) is not None


class SuggestionIndex:
    """Judgements by what they judged, answering 'what does the auto-labeler say about this record?'."""

    def __init__(self, judgements: Iterable[Judgement], min_confidence: float = 0.8):
        self.min_confidence = min_confidence
        self.pairs: dict[tuple[str, str, str], Judgement] = {}
        self.points: dict[tuple[str, str], Judgement] = {}
        for j in judgements:
            ids = [r.id for r in j.responses]
            if j.kind == "pairwise":
                self.pairs.setdefault((j.prompt_id, ids[0], ids[1]), j)
            else:
                self.points.setdefault((j.prompt_id, ids[0]), j)

    def for_item(self, item: Item) -> Suggestion | None:
        ids = [r.id for r in item.responses]
        if item.task == "pairwise":
            return self._pair(item.prompt_id, ids[0], ids[1])
        if item.task == "single":
            j = self.points.get((item.prompt_id, ids[0]))
            if j is None or j.label not in ("good", "bad"):
                return None
            return Suggestion(j.label, j.confidence, j.judge.name, _uncertain(j, self.min_confidence))
        return self._ranking(item)

    def _pair(self, prompt_id: str, first: str, second: str) -> Suggestion | None:
        for key, swapped in (((prompt_id, first, second), False), ((prompt_id, second, first), True)):
            j = self.pairs.get(key)
            if j is not None and j.label in SWAP:
                return Suggestion(SWAP[j.label] if swapped else j.label, j.confidence, j.judge.name,
                                  _uncertain(j, self.min_confidence))
        x, y = self.points.get((prompt_id, first)), self.points.get((prompt_id, second))
        if x is None or y is None or x.score is None or y.score is None:
            return None
        # Pointwise scores (rules, a 1-10 judge) imply a preference; no calibrated confidence comes with it.
        label = "tie" if x.score == y.score else "a" if x.score > y.score else "b"
        return Suggestion(label, None, x.judge.name, _uncertain(x, self.min_confidence)
                          or _uncertain(y, self.min_confidence))

    def _ranking(self, item: Item) -> Suggestion | None:
        from align.argilla.schema import response_field

        ids = [r.id for r in item.responses]
        strength = _strengths(item.prompt_id, ids, self.points, self.pairs)
        if strength is None:
            return None
        scores, judges = strength
        order = sorted(range(len(ids)), key=lambda i: (-scores[i], i))
        return Suggestion([response_field("ranking", i) for i in order], None, judges[0],
                          any(_uncertain(j, self.min_confidence) for j in judges[1]))


def _strengths(prompt_id: str, ids: list[str], points: dict[tuple[str, str], Judgement],
               pairs: dict[tuple[str, str, str], Judgement]) -> tuple[list[float], tuple[str, list[Judgement]]] | None:
    """A score per response: pointwise scores if all have one, else pairwise wins (ties count half)."""
    found = [points.get((prompt_id, i)) for i in ids]
    if all(j is not None and j.score is not None for j in found):
        return [j.score for j in found], (found[0].judge.name, found)  # type: ignore[union-attr,misc]
    wins: dict[str, float] = defaultdict(float)
    used: list[Judgement] = []
    for x, y in combinations(ids, 2):
        j = pairs.get((prompt_id, x, y))
        label = j.label if j else None
        if j is None:
            j = pairs.get((prompt_id, y, x))
            label = SWAP.get(j.label) if j and j.label else None
        if j is None or label is None:
            return None  # a ranking from an incomplete tournament would be a guess
        used.append(j)
        wins[x] += {"a": 1.0, "tie": 0.5}.get(label, 0.0)
        wins[y] += {"b": 1.0, "tie": 0.5}.get(label, 0.0)
    if not used:
        return None
    return [wins[i] for i in ids], (used[0].judge.name, used)
