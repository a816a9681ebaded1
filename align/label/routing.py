"""Which judgements people should look at: the ones the judge was not sure about.

A judgement goes to review when its answer was unparsed, when its two
presentation orders named different winners (position-inconsistent), or when
its confidence is below the threshold. Rules-decided judgements have
confidence 1 and never go. Routed judgements are written to the review file
*instead of* the main output, with ``details["review_reason"]``, so pair
building only sees verdicts someone can stand behind; the Argilla loop reads
the review file.
"""

from __future__ import annotations

from align.data.records import Judgement


def review_reason(judgement: Judgement, min_confidence: float) -> str | None:
    """Why this judgement needs a person, or None if it can stand."""
    details = judgement.details
    if details.get("unparsed"):
        return "unparsed"
    if judgement.label == "both_bad":
        return None
    if judgement.confidence is None:
        return "no confidence"
    if details.get("position_inconsistent"):
        return "position-inconsistent"
    if judgement.confidence < min_confidence:
        return f"confidence {judgement.confidence:.3f} < {min_confidence}"
    return None


def mark_for_review(judgement: Judgement, min_confidence: float | None) -> bool:
    """True (and the reason recorded in ``details``) when the judgement should go to review."""
    if min_confidence is None:
        return False
    reason = review_reason(judgement, min_confidence)
    if reason is None:
        return False
    judgement.details["review_reason"] = reason
    return True
