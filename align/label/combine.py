"""Rules and the judge together: rules filter and, when clear, decide; the judge breaks the rest.

The rule, for two responses x and y of one prompt (rule scores s_x, s_y):

1. Both fail a hard rule -> ``both_bad`` (no pair can come of it).
2. Exactly one fails a hard rule -> the other wins (P = 1), decided by the rules.
3. ``|s_x - s_y| >= rules_margin`` -> the higher rule score wins (P = 1), decided by the rules.
4. Otherwise the judge decides (its debiased probability, confidence, flags).

Rules are cheap and exact where they speak; the judge is only asked about the
pairs they leave open, which also saves its compute. A ``rules_margin`` above
1 makes the rules pure filters (the judge decides every pair that passes
them); 0 lets any rule difference decide.

Pointwise: a response that fails a hard rule is labeled ``bad`` without
asking the judge; the others get the judge's score.
"""

from __future__ import annotations

from dataclasses import dataclass

from align.label.rules import RuleResult

DEFAULT_RULES_MARGIN = 0.2


@dataclass(frozen=True)
class RulesDecision:
    label: str        # "a" | "b" | "both_bad"
    score: float      # P(x better): 1, 0, or 0.5 for both_bad
    decided_by: str   # "rules-filter" | "rules-score"


def decide_by_rules(x: RuleResult, y: RuleResult, rules_margin: float = DEFAULT_RULES_MARGIN) -> RulesDecision | None:
    """The rules' verdict on x versus y, or None when the judge must decide."""
    if x.filtered and y.filtered:
        return RulesDecision("both_bad", 0.5, "rules-filter")
    if x.filtered != y.filtered:
        return RulesDecision("b" if x.filtered else "a", 0.0 if x.filtered else 1.0, "rules-filter")
    if x.score is None or y.score is None:
        return None
    if abs(x.score - y.score) >= rules_margin:
        return RulesDecision("a" if x.score > y.score else "b", 1.0 if x.score > y.score else 0.0, "rules-score")
    return None
