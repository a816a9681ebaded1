"""Judgements -> DPO pairs (TRL's ``prompt``/``chosen``/``rejected``) and KTO rows (``prompt``/``completion``/``label``).

**Scores.** A pointwise judgement gives its response's score. From pairwise
judgements a response's score is its mean probability of winning over the
comparisons it was in (a soft Borda count; a human label counts as 1, 0 or
0.5 for a/b/tie). Unparsed verdicts are ignored. A response that failed a hard
rule (``details.failed_hard``, ``details.filtered``) or was called
``both_bad`` is *filtered*: never chosen, always undesirable.

**Pairs.** Candidate pairs of one prompt are *eligible* when the chosen one is
not filtered, scores strictly higher than the rejected one and by at least
``min_margin`` (so a tie can never become a pair), and the two texts are not
near-duplicates. Strategies:

* ``best-worst``: the eligible pair with the largest margin (the best against
  the worst, unless they are near-duplicates); one per prompt.
* ``all-pairs``: every eligible pair, largest margin first; ``max_pairs_per_prompt`` (default 4, 0: no cap)
  keeps each prompt's widest.
* ``random-pair``: one eligible pair drawn at random, seeded per prompt id
  (the same seed gives the same pairs whatever the file order).

**Near-duplicates.** Texts are normalised (lower case, punctuation dropped,
whitespace collapsed) and compared by the Jaccard index of their word sets;
at or above ``near_duplicate`` (default 0.9) the two count as the same answer
said twice, and a pair of them teaches nothing but noise.

**KTO rows.** ``by="rank"``: per prompt, the top-scoring responses are
desirable and the bottom-scoring ones (and filtered ones) undesirable; the
middle and prompts whose scores all tie give nothing. ``by="threshold"``:
score >= ``desirable_min`` is desirable, score <= ``undesirable_max`` (default:
below ``desirable_min``) or filtered is undesirable. An undesirable row that
near-duplicates a desirable one of the same prompt is dropped (contradiction).
The class balance comes with the weights that keep KTO's
``desirable_weight*n_D / (undesirable_weight*n_U)`` in [1, 4/3] (:func:`kto_class_weights`).

Every row carries its provenance: ``prompt_id``, ``prompt_hash``,
``chosen_id``/``rejected_id`` (or ``completion_id``), the scores, ``margin``
and the ``judges``' names.
"""

from __future__ import annotations

import random
import re
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from align.data.io import write_records
from align.data.records import Judgement, PreferencePair, UnpairedExample, to_plain
from align.data.validate import load_records
from align.errors import ConfigError, DataError

Strategy = Literal["best-worst", "all-pairs", "random-pair"]
STRATEGIES: tuple[str, ...] = ("best-worst", "all-pairs", "random-pair")
# The defaults of `align pairs build`, the pipeline and build_pairs, in one place. All pairs (not only the best
# against the worst) because a short run on few prompts otherwise repeats a handful of pairs until it has
# learnt them by heart: on the quality suite, 48 prompts gave 34-48 best-worst pairs (5 epochs in 40 steps of 4,
# held-out reward accuracy no better than chance) and 156-271 pairs from all pairs of 4 candidates (about one
# epoch). But all pairs of 8 candidates (align generate's default) are 686-1251 per task, most of them between
# two middling answers; each prompt keeps its 4 of largest margin (152-192 pairs on the suite, one epoch of 40
# steps of 4), so every prompt's best and worst answers are in them. 0 or None keeps every pair.
DEFAULT_STRATEGY: Strategy = "all-pairs"
DEFAULT_MIN_MARGIN = 0.0
DEFAULT_MAX_PAIRS_PER_PROMPT = 4
TIE_EPSILON = 1e-9  # score differences this small are ties (float noise)

# ----------------------------------------------------------------------------- KTO class balance (KTO paper, Eq. 8)

KTO_RATIO_RANGE = (1.0, 4.0 / 3.0)


def kto_weight_ratio(n_desirable: int, n_undesirable: int, desirable_weight: float = 1.0,
                     undesirable_weight: float = 1.0) -> float:
    """``desirable_weight*n_D / (undesirable_weight*n_U)``; KTO (Ethayarajh et al. 2024,
    https://arxiv.org/abs/2402.01306, Eq. 8) recommends keeping it in [1, 4/3]."""
    if n_undesirable <= 0 or undesirable_weight <= 0:
        raise ValueError("KTO needs undesirable examples and a positive undesirable_weight")
    return desirable_weight * n_desirable / (undesirable_weight * n_undesirable)


def kto_class_weights(n_desirable: int, n_undesirable: int) -> tuple[float, float]:
    """``(desirable_weight, undesirable_weight)`` for TRL's ``KTOConfig`` that put the ratio in [1, 4/3].

    Both stay 1.0 when the data is already in range. Otherwise
    ``undesirable_weight`` stays 1.0 and ``desirable_weight`` is set so the
    ratio lands at 7/6, the middle of the range (rounded to 4 places, which
    the range's width absorbs).
    """
    if n_desirable <= 0 or n_undesirable <= 0:
        raise ValueError(f"KTO needs both classes, got {n_desirable} desirable and {n_undesirable} undesirable")
    low, high = KTO_RATIO_RANGE
    if low <= kto_weight_ratio(n_desirable, n_undesirable) <= high:
        return 1.0, 1.0
    return round((low + high) / 2 * n_undesirable / n_desirable, 4), 1.0


# ----------------------------------------------------------------------------- near-duplicates

_PUNCTUATION = re.compile(r"[^\w\s]", re.UNICODE)


def normalise_text(text: str) -> str:
    return " ".join(_PUNCTUATION.sub(" ", text.lower()).split())


def jaccard(a: str, b: str) -> float:
    """Jaccard index of the two texts' normalised word sets (1.0 for two empty texts)."""
    set_a, set_b = set(normalise_text(a).split()), set(normalise_text(b).split())
    if not set_a and not set_b:
        return 1.0
    return len(set_a & set_b) / len(set_a | set_b)


def near_duplicates(a: str, b: str, threshold: float) -> bool:
    return normalise_text(a) == normalise_text(b) or jaccard(a, b) >= threshold


# ----------------------------------------------------------------------------- scores per response


@dataclass
class ScoredResponse:
    id: str
    text: str
    score: float
    filtered: bool
    position: int  # first-seen order, for stable tie-breaking
    reasoning: str | None = None  # the teacher's reasoning, when it was given apart from the answer


@dataclass
class PromptGroup:
    prompt_id: str
    prompt: Any
    prompt_hash: str | None
    responses: list[ScoredResponse]
    judges: list[str]


def _pairwise_probability(j: Judgement) -> float | None:
    if j.details.get("unparsed") or j.label == "both_bad":
        return None
    if j.score is not None:
        return j.score
    return {"a": 1.0, "b": 0.0, "tie": 0.5}.get(j.label or "")


def _filtered_ids(j: Judgement) -> set[str]:
    if j.kind == "pointwise":
        return {j.responses[0].id} if j.details.get("failed_hard") else set()
    if j.label == "both_bad":
        return {r.id for r in j.responses}
    return set(j.details.get("filtered") or {})


def group_scores(judgements: Iterable[Judgement], judge: str | None = None) -> list[PromptGroup]:
    """Per prompt, every judged response with one score (see the module docstring)."""
    judgements = list(judgements)
    names = sorted({j.judge.name for j in judgements})
    if judge is not None:
        if judge not in names:
            raise ConfigError(f"no judgements by {judge!r}; the file has: {', '.join(names)}")
        judgements = [j for j in judgements if j.judge.name == judge]
    elif len(names) > 1:
        raise ConfigError(f"the judgements come from several labelers ({', '.join(names)}); pick one with --judge")
    prompts: dict[str, dict[str, Any]] = {}
    for j in judgements:
        entry = prompts.setdefault(j.prompt_id, {"prompt": j.prompt, "hash": getattr(j, "prompt_hash", None),
                                                 "texts": {}, "reasoning": {}, "scores": defaultdict(list),
                                                 "filtered": set(),
                                                 "judges": set()})
        entry["judges"].add(j.judge.name)
        for r in j.responses:
            entry["texts"].setdefault(r.id, r.text)
            if r.reasoning:
                entry["reasoning"].setdefault(r.id, r.reasoning)
        entry["filtered"] |= _filtered_ids(j)
        if j.kind == "pointwise":
            if j.score is not None:
                entry["scores"][j.responses[0].id].append(j.score)
            continue
        p = _pairwise_probability(j)
        if p is not None:
            entry["scores"][j.responses[0].id].append(p)
            entry["scores"][j.responses[1].id].append(1.0 - p)
    groups = []
    for prompt_id, entry in prompts.items():
        order = list(entry["texts"])
        responses = sorted((ScoredResponse(rid, entry["texts"][rid], sum(s) / len(s), rid in entry["filtered"],
                                           order.index(rid), entry["reasoning"].get(rid))
                            for rid, s in entry["scores"].items()),
                           key=lambda r: r.position)
        groups.append(PromptGroup(prompt_id, to_plain(entry["prompt"]), entry["hash"], responses,
                                  sorted(entry["judges"])))
    return groups


# ----------------------------------------------------------------------------- choosing pairs


@dataclass
class SelectionCounts:
    ties: int = 0              # two responses with equal scores (never a pair)
    below_margin: int = 0      # a real difference, smaller than min_margin
    near_duplicates: int = 0   # eligible by score, but the same answer twice
    filtered_chosen: int = 0   # the better one failed a hard rule


def eligible_pairs(responses: list[ScoredResponse], min_margin: float, near_duplicate: float,
                   counts: SelectionCounts | None = None) -> list[tuple[ScoredResponse, ScoredResponse]]:
    """(chosen, rejected) pairs that may be used, largest margin first (ties broken by input order)."""
    counts = counts or SelectionCounts()
    out = []
    for i, a in enumerate(responses):
        for b in responses[i + 1:]:
            if abs(a.score - b.score) <= TIE_EPSILON:
                counts.ties += 1
                continue
            chosen, rejected = (a, b) if a.score > b.score else (b, a)
            if chosen.filtered:
                counts.filtered_chosen += 1
            elif chosen.score - rejected.score < min_margin:
                counts.below_margin += 1
            elif near_duplicates(chosen.text, rejected.text, near_duplicate):
                counts.near_duplicates += 1
            else:
                out.append((chosen, rejected))
    out.sort(key=lambda p: (-(p[0].score - p[1].score), p[0].position, p[1].position))
    return out


def select_pairs(responses: list[ScoredResponse], strategy: str, *, min_margin: float = 0.0,
                 near_duplicate: float = 0.9, rng: random.Random | None = None, max_pairs: int | None = None,
                 counts: SelectionCounts | None = None) -> list[tuple[ScoredResponse, ScoredResponse]]:
    pairs = eligible_pairs(responses, min_margin, near_duplicate, counts)
    if not pairs:
        return []
    if strategy == "best-worst":
        return pairs[:1]
    if strategy == "random-pair":
        return [(rng or random.Random(0)).choice(pairs)]
    if strategy == "all-pairs":
        return pairs[:max_pairs] if max_pairs else pairs
    raise ConfigError(f"unknown strategy {strategy!r}: use one of {', '.join(STRATEGIES)}")


def split_unpaired(responses: list[ScoredResponse], by: str, *, desirable_min: float | None = None,
                   undesirable_max: float | None = None,
                   near_duplicate: float = 0.9) -> tuple[list[ScoredResponse], list[ScoredResponse]]:
    """(desirable, undesirable) responses of one prompt (see the module docstring)."""
    if not responses:
        return [], []
    if by == "rank":
        usable = [r for r in responses if not r.filtered]
        top = max((r.score for r in usable), default=0.0)
        bottom = min(r.score for r in responses)
        spread = bool(usable) and top - bottom > TIE_EPSILON
        desirable = [r for r in usable if abs(r.score - top) <= TIE_EPSILON] if spread else []
        undesirable = [r for r in responses if r.filtered or (spread and abs(r.score - bottom) <= TIE_EPSILON)]
    elif by == "threshold":
        if desirable_min is None:
            raise ConfigError("--unpaired-by threshold needs --desirable-min")
        desirable = [r for r in responses if not r.filtered and r.score >= desirable_min]
        undesirable = [r for r in responses if r.filtered or (
            r.score <= undesirable_max if undesirable_max is not None else r.score < desirable_min)]
    else:
        raise ConfigError(f"unknown --unpaired-by {by!r}: use rank or threshold")
    undesirable = [u for u in undesirable if not any(near_duplicates(u.text, d.text, near_duplicate)
                                                     for d in desirable)]
    return desirable, undesirable


# ----------------------------------------------------------------------------- rows in TRL's shapes


def prompt_messages(prompt: Any) -> Any:
    """Candidates answer prompts through the teacher's chat template, so a text prompt is one user turn.

    Keeping it as text would make TRL train on raw ``prompt + answer`` text, without
    the chat template the student is later prompted with.
    """
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt


def completion_messages(text: str) -> Any:
    return [{"role": "assistant", "content": text}]


def pair_row(group: PromptGroup, chosen: ScoredResponse, rejected: ScoredResponse, strategy: str) -> dict[str, Any]:
    row = {"prompt": prompt_messages(group.prompt), "chosen": completion_messages(chosen.text),
           "rejected": completion_messages(rejected.text), "prompt_id": group.prompt_id,
           "prompt_hash": group.prompt_hash, "chosen_id": chosen.id, "rejected_id": rejected.id,
           "chosen_score": round(chosen.score, 6), "rejected_score": round(rejected.score, 6),
           "margin": round(chosen.score - rejected.score, 6), "judges": group.judges, "strategy": strategy}
    return PreferencePair.model_validate({k: v for k, v in row.items() if v is not None}).to_json()


def unpaired_row(group: PromptGroup, response: ScoredResponse, label: bool) -> dict[str, Any]:
    row = {"prompt": prompt_messages(group.prompt), "completion": completion_messages(response.text), "label": label,
           "prompt_id": group.prompt_id, "prompt_hash": group.prompt_hash, "completion_id": response.id,
           "score": round(response.score, 6), "filtered": response.filtered, "judges": group.judges}
    return UnpairedExample.model_validate({k: v for k, v in row.items() if v is not None}).to_json()


# ----------------------------------------------------------------------------- the stage


@dataclass
class UnpairedBalance:
    desirable: int
    undesirable: int
    desirable_weight: float | None
    undesirable_weight: float | None

    @property
    def ratio(self) -> float | None:
        if not self.undesirable or self.desirable_weight is None or self.undesirable_weight is None:
            return None
        return kto_weight_ratio(self.desirable, self.undesirable, self.desirable_weight, self.undesirable_weight)

    def lines(self) -> list[str]:
        total = self.desirable + self.undesirable
        if not total:
            return ["  no unpaired rows"]
        out = [f"  desirable {self.desirable} ({self.desirable / total:.1%}), "
               f"undesirable {self.undesirable} ({self.undesirable / total:.1%})"]
        if self.desirable_weight is None:
            out.append("  KTO needs both classes: no weights suggested")
        else:
            raw = kto_weight_ratio(self.desirable, self.undesirable) if self.undesirable else float("inf")
            out.append(f"  KTO weights: desirable_weight={self.desirable_weight} "
                       f"undesirable_weight={self.undesirable_weight} "
                       f"(lambda_D*n_D/(lambda_U*n_U) = {self.ratio:.3f}, in [1, 4/3]; "
                       f"with both weights 1 it would be {raw:.3f})")
        return out


@dataclass
class PairsResult:
    output: str
    prompts: int = 0
    pairs: int = 0
    prompts_without_pair: int = 0
    counts: SelectionCounts = field(default_factory=SelectionCounts)
    unpaired_output: str | None = None
    balance: UnpairedBalance | None = None

    def lines(self) -> list[str]:
        c = self.counts
        out = [f"wrote {self.pairs} pairs from {self.prompts} prompts to {self.output}",
               f"  prompts without a pair: {self.prompts_without_pair}; skipped: {c.ties} tied, "
               f"{c.below_margin} below the margin, {c.near_duplicates} near-duplicate, "
               f"{c.filtered_chosen} with a filtered better answer"]
        if self.balance is not None:
            out.append(f"wrote {self.balance.desirable + self.balance.undesirable} unpaired rows to "
                       f"{self.unpaired_output}")
            out += self.balance.lines()
        return out


def build_pairs(judgements_path: str | Path, output: str | Path, *, strategy: str = DEFAULT_STRATEGY,
                min_margin: float = DEFAULT_MIN_MARGIN, near_duplicate: float = 0.9, seed: int = 0,
                max_pairs_per_prompt: int | None = DEFAULT_MAX_PAIRS_PER_PROMPT, judge: str | None = None,
                unpaired: str | Path | None = None, unpaired_by: str = "rank", desirable_min: float | None = None,
                undesirable_max: float | None = None) -> PairsResult:
    """Read judgements, write pairs (and optionally KTO rows); both files are written atomically."""
    if strategy not in STRATEGIES:
        raise ConfigError(f"unknown strategy {strategy!r}: use one of {', '.join(STRATEGIES)}")
    if min_margin < 0:
        raise ConfigError(f"--min-margin must be >= 0, got {min_margin}")
    if not 0 < near_duplicate <= 1:
        raise ConfigError(f"--near-duplicate must be in (0, 1], got {near_duplicate}")
    if desirable_min is not None and undesirable_max is not None and undesirable_max >= desirable_min:
        raise ConfigError(f"--undesirable-max ({undesirable_max}) must be below --desirable-min ({desirable_min})")
    groups = group_scores(load_records(judgements_path, "judgements"), judge)
    result = PairsResult(str(output), prompts=len(groups))
    rows = []
    for group in groups:
        rng = random.Random(f"{seed}:{group.prompt_id}")
        chosen = select_pairs(group.responses, strategy, min_margin=min_margin, near_duplicate=near_duplicate,
                              rng=rng, max_pairs=max_pairs_per_prompt, counts=result.counts)
        result.prompts_without_pair += not chosen
        rows += [pair_row(group, c, r, strategy) for c, r in chosen]
    if unpaired is not None:
        kto_rows = []
        for group in groups:
            desirable, undesirable = split_unpaired(group.responses, unpaired_by, desirable_min=desirable_min,
                                                    undesirable_max=undesirable_max, near_duplicate=near_duplicate)
            kto_rows += [unpaired_row(group, r, True) for r in desirable]
            kto_rows += [unpaired_row(group, r, False) for r in undesirable]
        labels = Counter(row["label"] for row in kto_rows)
        weights = kto_class_weights(labels[True], labels[False]) if labels[True] and labels[False] else (None, None)
        result.balance = UnpairedBalance(labels[True], labels[False], *weights)
        result.unpaired_output = str(unpaired)
    if not groups:
        raise DataError.at(judgements_path, "no scored judgements to build pairs from")
    result.pairs = write_records(output, rows)
    if unpaired is not None:
        write_records(unpaired, kto_rows)
    return result
