"""After training: did the student learn the preference, or only its training pairs?

Read from what every run already has: TRL's training log (``metrics.jsonl``) and the held-out figures measured
before and after training (:mod:`align.train.heldout`: reward accuracy with ties counted half, TRL's mean
margins and log-probs). Each rule is a small pure function; :func:`diagnose` runs them all.

- memorised: the student fit its training pairs, yet on the held-out ones neither its reward accuracy nor its
  margin rose past chance (or the margin did not rise, or the accuracy rose under ``MIN_GAIN``).
- drift: the held-out answers' log-probs moved more than ``DRIFT_BUDGET`` nats per token from the start.

A figure that is missing (nothing held out, a loss that logs no margins, no token counts) skips its rule and
at most leaves a note: nothing is guessed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

# The training pairs count as fit when the last quarter of the logged steps has a mean TRL reward accuracy of at
# least 0.75 (3 pairs in 4 ordered right; TRL counts chosen > rejected strictly, so it starts near 0.5 or below)
# or a mean reward margin of at least ln 3 = 1.10: the margin at which the implicit Bradley-Terry model,
# sigmoid(margin), prefers the chosen answer 3 to 1, i.e. the same bar in the units KTO logs (it logs no accuracy).
# The last quarter rather than the last step: a step sees one batch of 1-8 pairs, whose accuracy jumps by 1/batch.
FIT_ACCURACY = 0.75
FIT_MARGIN = math.log(3)

# Held-out accuracy moved when it rose by at least max(MIN_GAIN, Z * chance spread), the chance spread being how
# far a score that moved by luck alone scatters on this held-out set: 0.5/sqrt(n) for n DPO pairs, the
# Mann-Whitney null spread for KTO's pairwise accuracy. Z is a one-sided 95% bar: a student that learned nothing
# that carries over clears it 1 time in 20, so a memorising run is caught 19 times in 20 however small the
# held-out set (on 5 pairs, the auto slice of a 24-pair file, only a perfect score clears it; on 40 pairs, +0.13).
# From about 270 DPO pairs on, the floor takes over: a gain under 0.05 is not what fitting the training pairs
# should buy. Pairs are treated as independent (several pairs of one prompt are not quite), so the bar errs low.
# The accuracy counts signs only. The held-out margin (``rewards/margin_z``: the mean DPO margin, or KTO's mean
# desirable minus undesirable reward, in standard errors; align.train.heldout) uses each example's size too, so
# it can clear the same one-sided 95% bar with less data. Each prompt counts once (its pairs share answers), so
# on few prompts it is no sure cure: on the quality suite's warm task align's DPO students gained on held-out
# prompts (align eval, interval above 0) with held-out accuracy 0.50 -> 0.59-0.63 on 32 pairs of 8 prompts,
# under the +0.15 chance bar; the margin cleared one seed of three (2.0 standard errors), not the other two
# (0.95, 1.42). A run counts as moved when its accuracy rose by MIN_GAIN or more and either figure clears the bar
# (so a student that learned nothing passes a little more often than 1 time in 20: the two mostly move together).
MIN_GAIN = 0.05
Z_ONE_SIDED_95 = 1.645

# Drift budget, in nats per completion token: the mean change of the held-out answers' log-probs from the start
# of training, per token, for the chosen (desirable) and the rejected (undesirable) answers. 0.5 nats/token
# scales every token's probability by e^0.5 = 1.65 on average. For scale: the quickstart's students (README)
# already halved their answers' length at a KL(student||reference) of 0.08-0.19 nats per token on their own
# answers. Past 0.5 the student is far from its reference; DPO pushing rejected answers down this hard usually
# drags other text with it (chosen answers fall too, lengths jump, text degenerates).
DRIFT_BUDGET = 0.5


@dataclass
class TrainingFit:
    """The last quarter of the logged training steps: mean TRL reward accuracy and margin (None: not logged)."""

    accuracy: float | None
    margin: float | None
    steps: int

    @property
    def fit(self) -> bool:
        return ((self.accuracy is not None and self.accuracy >= FIT_ACCURACY)
                or (self.margin is not None and self.margin >= FIT_MARGIN))

    def text(self) -> str:
        parts = ([f"reward accuracy {self.accuracy:.2f}"] if self.accuracy is not None else []) + \
                ([f"margin {self.margin:.2f}"] if self.margin is not None else [])
        when = f"over the last {self.steps} logged steps" if self.steps > 1 else "at the last logged step"
        return f"{', '.join(parts)} {when}"


@dataclass
class Diagnosis:
    """``verdict``: generalised | memorised | barely moved | unknown. ``warnings`` are for the user to act on."""

    verdict: str = "unknown"
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def training_fit(metrics: Sequence[Mapping[str, Any]]) -> TrainingFit | None:
    """Mean ``rewards/accuracies`` and ``rewards/margins`` over the last quarter of the logged training steps.

    ``metrics``: the rows of ``metrics.jsonl``; training steps are the rows with a ``loss`` (eval rows log
    ``eval_loss``, the closing summary ``train_loss``). None when no step was logged.
    """
    steps = [m for m in metrics if isinstance(m.get("loss"), (int, float))]
    if not steps:
        return None
    tail = steps[-max(1, len(steps) // 4):]

    def tail_mean(key: str) -> float | None:
        return _mean([float(m[key]) for m in tail if isinstance(m.get(key), (int, float))])

    return TrainingFit(tail_mean("rewards/accuracies"), tail_mean("rewards/margins"), len(tail))


def chance_spread(heldout: Mapping[str, int]) -> float | None:
    """Standard deviation of a held-out reward accuracy that moved by chance alone (ties ignored).

    ``heldout``: ``{"pairs": n}`` (DPO: a coin flip per pair, 0.5/sqrt(n)) or ``{"desirable": a,
    "undesirable": b}`` (KTO's pairwise accuracy is a ROC AUC: the Mann-Whitney null spread
    sqrt((a + b + 1) / (12ab))). None when the size is unknown or a class is empty.
    """
    if heldout.get("pairs"):
        return 0.5 / math.sqrt(heldout["pairs"])
    a, b = heldout.get("desirable", 0), heldout.get("undesirable", 0)
    if a and b:
        return math.sqrt((a + b + 1) / (12 * a * b))
    return None


def gain_needed(heldout: Mapping[str, int]) -> float:
    """The rise in held-out accuracy that chance alone reaches 1 time in 20 (never under MIN_GAIN)."""
    spread = chance_spread(heldout)
    return max(MIN_GAIN, Z_ONE_SIDED_95 * spread) if spread is not None else MIN_GAIN


def heldout_moved(before: Mapping[str, float], after: Mapping[str, float], heldout: Mapping[str, int]) -> bool | None:
    """Whether the held-out rewards moved past chance: the margin rose, the accuracy rose by ``MIN_GAIN`` or more,
    and either the accuracy's rise or the margin in standard errors clears the one-sided 95% bar. None without
    accuracies."""
    acc_before, acc_after = before.get("rewards/accuracies"), after.get("rewards/accuracies")
    if acc_before is None or acc_after is None:
        return None
    gain = acc_after - acc_before
    margin_before, margin_after = before.get("rewards/margins"), after.get("rewards/margins")
    if gain < MIN_GAIN or (margin_before is not None and margin_after is not None and margin_after <= margin_before):
        return False
    margin_z = after.get("rewards/margin_z")
    return gain >= gain_needed(heldout) or (margin_z is not None and margin_z >= Z_ONE_SIDED_95)


def drift_per_token(before: Mapping[str, float], after: Mapping[str, float],
                    tokens: Mapping[str, float]) -> dict[str, float]:
    """Signed change of the held-out answers' mean log-prob per completion token, from before to after training.

    ``before``/``after``: held-out eval metrics with ``logps/chosen`` and ``logps/rejected`` (TRL: mean summed
    log-prob of an answer); ``tokens``: mean completion tokens of the held-out ``chosen``/``rejected`` answers.
    Sides with a figure missing are left out.
    """
    out = {}
    for side in ("chosen", "rejected"):
        key = f"logps/{side}"
        if key in before and key in after and tokens.get(side):
            out[side] = (after[key] - before[key]) / tokens[side]
    return out


def _units(heldout: Mapping[str, int]) -> str:
    if heldout.get("pairs"):
        return f"{heldout['pairs']} held-out pairs"
    if heldout.get("desirable") or heldout.get("undesirable"):
        return (f"{heldout.get('desirable', 0) + heldout.get('undesirable', 0)} held-out rows "
                f"({heldout.get('desirable', 0)} desirable / {heldout.get('undesirable', 0)} undesirable)")
    return "the held-out data"


def diagnose(eval_before: Mapping[str, float], eval_after: Mapping[str, float],
             metrics: Sequence[Mapping[str, Any]], *, heldout: Mapping[str, int] | None = None,
             completion_tokens: Mapping[str, float] | None = None, reference_free: bool = False) -> Diagnosis:
    """Every rule over one run's figures (see the module docstring).

    ``heldout``: the held-out set's size (see :func:`chance_spread`); ``completion_tokens``: mean tokens of its
    chosen/rejected answers (see :func:`drift_per_token`); ``reference_free``: ORPO/SimPO, which have no reference
    model (and no KL term or beta holding the student near one), so the drift advice names what they do have.
    """
    heldout = heldout or {}
    result = Diagnosis()
    fit = training_fit(metrics)
    if fit is not None:
        result.figures["train"] = {"rewards/accuracies": fit.accuracy, "rewards/margins": fit.margin,
                                   "last_steps": fit.steps, "fit": fit.fit}
    moved = heldout_moved(eval_before, eval_after, heldout)
    if moved is not None:
        needed = gain_needed(heldout)
        result.figures["heldout"] = {
            "rewards/accuracies": [eval_before["rewards/accuracies"], eval_after["rewards/accuracies"]],
            "rewards/margins": [eval_before.get("rewards/margins"), eval_after.get("rewards/margins")],
            "rewards/margin_z": eval_after.get("rewards/margin_z"),
            "size": dict(heldout), "gain_needed": round(needed, 4), "moved": moved}
        went = f"{eval_before['rewards/accuracies']:.2f} -> {eval_after['rewards/accuracies']:.2f}"
        margins = ""
        if "rewards/margins" in eval_before and "rewards/margins" in eval_after:
            margins = f" (margin {eval_before['rewards/margins']:.3f} -> {eval_after['rewards/margins']:.3f})"
        where = f"on {_units(heldout)}{margins}"
        margin_z = eval_after.get("rewards/margin_z")
        bar = (f"+{needed:.2f} accuracy, or a margin {Z_ONE_SIDED_95} standard errors above 0"
               + (f"; it is {margin_z:.2f}" if margin_z is not None else ""))
        if moved:
            result.verdict = "generalised"
            result.notes.append(f"held-out reward accuracy went {went} {where}, past what chance gives ({bar}): "
                                "the preference carries over to prompts it did not train on")
        elif fit is not None and fit.fit:
            result.verdict = "memorised"
            result.warnings.append(
                f"the student fit its training pairs ({fit.text()}) but held-out reward accuracy went {went} "
                f"{where}, no more than chance moves it (a real gain needs {bar}): it memorised. Give it "
                "more or more varied data, fewer steps or a lower learning rate, and check with `align eval` on "
                "held-out prompts")
        elif fit is not None:
            result.verdict = "barely moved"
            result.notes.append(f"the student has not fit its training pairs yet ({fit.text()}) and held-out "
                                f"reward accuracy went {went} {where}: it has barely moved; more steps or a higher "
                                "learning rate if it should have")
    elif fit is not None and fit.fit:
        result.notes.append(f"the student fit its training pairs ({fit.text()}), but no held-out reward accuracy "
                            "tells learning the preference from memorising the pairs: set eval_split (a fraction "
                            "of the prompts) or eval_data")

    drift = drift_per_token(eval_before, eval_after, completion_tokens or {})
    if drift:
        result.figures["drift_per_token"] = {side: round(v, 4) for side, v in drift.items()}
        worst = max(drift, key=lambda side: abs(drift[side]))
        if abs(drift[worst]) > DRIFT_BUDGET:
            sides = ", ".join(f"{side} {v:+.2f}" for side, v in drift.items())
            anchor, remedy = (("the model it started from (no reference model holds it back)", "fewer steps or a "
                               "lower learning rate") if reference_free else
                              ("its reference", "a larger beta, fewer steps or a lower learning rate"))
            result.warnings.append(
                f"the held-out answers' log-probs moved {abs(drift[worst]):.2f} nats per token from the start of "
                f"training ({sides}; budget {DRIFT_BUDGET}): the student has drifted far from {anchor}, which "
                f"shows as answers much longer or shorter or degenerate. Use {remedy}, and compare lengths and KL "
                "with `align eval`")
    return result
