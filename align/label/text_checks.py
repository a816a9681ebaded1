"""Small pure measurements of a response's text, used by the rule checks.

They are heuristics and say so: sentences end at ``.``, ``!`` or ``?``
followed by a space or the end; a refusal is one of a list of stock phrases;
a language is its script (plus, for English, a share of common function words).
"""

from __future__ import annotations

import re
import unicodedata

_WORD = re.compile(r"\b\w[\w'’-]*\b", re.UNICODE)
_SENTENCE_END = re.compile(r"[.!?…]+(?=\s|$)")


def words(text: str) -> list[str]:
    return _WORD.findall(text)


def sentence_count(text: str) -> int:
    """Sentences, counting a trailing fragment without final punctuation as one."""
    stripped = text.strip()
    if not stripped:
        return 0
    parts = [p for p in _SENTENCE_END.split(stripped) if p.strip()]
    return max(len(parts), 1)


def repeated_ngram_fraction(text: str, n: int) -> float:
    """The share of word n-grams that already occurred earlier in the text (0 = no repetition)."""
    tokens = [w.lower() for w in words(text)]
    grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    if not grams:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)


_MARKDOWN = re.compile(
    r"(^\s{0,3}#{1,6}\s)"          # heading
    r"|(\*\*[^*\n]+\*\*)|(__[^_\n]+__)"  # bold
    r"|(^\s*```)|(`[^`\n]+`)"     # code fence, inline code
    r"|(\[[^\]\n]+\]\([^)\n]+\))"  # link
    r"|(^\s*\|.*\|\s*$)"          # table row
    r"|(^\s*>\s)",                # quote
    re.MULTILINE)
_LIST_ITEM = re.compile(r"^\s*(?:[-*+•]|\d{1,3}[.)])\s+\S", re.MULTILINE)


def has_markdown(text: str) -> bool:
    return bool(_MARKDOWN.search(text))


def has_list(text: str) -> bool:
    return bool(_LIST_ITEM.search(text))


DEFAULT_REFUSALS = (
    "i can't help", "i cannot help", "i can't assist", "i cannot assist", "i'm sorry, but", "i am sorry, but",
    "as an ai", "i'm unable to", "i am unable to", "i'm not able to", "i am not able to", "i won't be able",
    "i cannot provide", "i can't provide", "i must decline", "i cannot comply", "i can't comply",
    "i'm not comfortable", "i cannot fulfill", "i can't fulfill",
)


def _normalise_quotes(text: str) -> str:
    return text.replace("’", "'").replace("‘", "'")


def refusal_phrase(text: str, phrases: tuple[str, ...] = DEFAULT_REFUSALS) -> str | None:
    """The first stock refusal phrase found in the text (case-insensitive), or None."""
    lowered = _normalise_quotes(text).lower()
    for phrase in phrases:
        if _normalise_quotes(phrase).lower() in lowered:
            return phrase
    return None


# Unicode names of letters start with their script's name ("LATIN SMALL LETTER A").
_SCRIPT_PREFIXES = {
    "latin": ("LATIN",), "cyrillic": ("CYRILLIC",), "greek": ("GREEK",), "arabic": ("ARABIC",),
    "hebrew": ("HEBREW",), "devanagari": ("DEVANAGARI",), "thai": ("THAI",), "hangul": ("HANGUL",),
    "cjk": ("CJK", "HIRAGANA", "KATAKANA"),
}
LANGUAGE_SCRIPTS = {
    "en": "latin", "fr": "latin", "de": "latin", "es": "latin", "it": "latin", "pt": "latin", "nl": "latin",
    "pl": "latin", "sv": "latin", "tr": "latin", "vi": "latin", "id": "latin",
    "ru": "cyrillic", "uk": "cyrillic", "bg": "cyrillic", "el": "greek", "ar": "arabic", "fa": "arabic",
    "he": "hebrew", "hi": "devanagari", "th": "thai", "ko": "hangul", "zh": "cjk", "ja": "cjk",
}
_ENGLISH_FUNCTION_WORDS = frozenset(
    "the a an of to in is are was were be and or but it that this for on with as at by from not no you i "
    "he she we they his her its their can will would should do does has have had there what which who".split())


def script_share(text: str, script: str) -> float | None:
    """The share of letters written in ``script``; None when the text has no letters."""
    prefixes = _SCRIPT_PREFIXES[script]
    letters = [ch for ch in text if ch.isalpha()]
    if not letters:
        return None
    inside = sum(1 for ch in letters if unicodedata.name(ch, "").startswith(prefixes))
    return inside / len(letters)


def english_function_word_share(text: str) -> float:
    tokens = [w.lower() for w in words(text)]
    if not tokens:
        return 0.0
    return sum(1 for w in tokens if w in _ENGLISH_FUNCTION_WORDS) / len(tokens)
