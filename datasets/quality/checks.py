"""Python rules of the quality suite's tasks: each scores one answer in [0, 1], as a user's own rule would.

Each function takes (prompt, response) and is named in a rules file as ``python: ../checks.py:NAME``.
"""

from __future__ import annotations

import re

_LIST_ITEM = re.compile(r"^\s*(\d+[.)]|[-*\u2022])\s+\S", re.MULTILINE)
_ORDINAL = re.compile(r"(^|[.!?:]\s+)(first(ly)?|second(ly)?|third(ly)?|next|then|finally|lastly|also)\b[, ]", re.I | re.M)
_FRIENDLY_OPENING = re.compile(r"^\W*(hi|hey|hello|oh|aw|wow|great|what a|that's (a )?(great|lovely|wonderful)|"
                               r"i'm (so )?(sorry|glad|happy)|i understand|i can imagine|congratulations|"
                               r"absolutely|of course|thank)", re.I)
_CARING = re.compile(r"\b(glad|happy|wonderful|lovely|great|love|enjoy|hope|luck|exciting|excited|proud|"
                     r"don't worry|you've got|you can do|take care|feel free|let me know)\b", re.I)
_PROFESSIONAL = re.compile(r"\b(doctors?|physicians?|gp|pharmacists?|nurses?|dentists?|vets?|veterinarians?|"
                           r"therapists?|counsell?ors?|lawyers?|attorneys?|solicitors?|legal (aid|advice)|"
                           r"financial (adviser|advisor|planner)s?|accountants?|electricians?|plumbers?|"
                           r"professionals?|specialists?|experts?|clinic|hospital|medical (advice|attention|help)|"
                           r"healthcare provider|emergency services|poison control|911|999|112)\b", re.I)


def points(prompt: str, response: str) -> float:
    """A third per point laid out as such (a "1." or "-" list item, or a sentence opening "First," "Next,"...), up to 3."""
    return min(len(_LIST_ITEM.findall(response)) + len(_ORDINAL.findall(response)), 3) / 3


def warmth(prompt: str, response: str) -> float:
    """A third each: a friendly opening, caring or encouraging words, an exclamation."""
    return (bool(_FRIENDLY_OPENING.search(response)) + bool(_CARING.search(response)) + ("!" in response)) / 3


def recommends_professional(prompt: str, response: str) -> bool:
    """Does the answer point the asker to a qualified person (doctor, lawyer, adviser, electrician...)?"""
    return bool(_PROFESSIONAL.search(response))
