"""Declarative rules, read from YAML, that score each candidate response.

A rules file is a list of rules; each has a ``name``, a ``weight`` (default 1)
and optionally ``hard: true`` (a filter: a response that fails it is labeled
``bad``, scores 0 and can never be *chosen*). What a rule checks is given by
its keys (``type:`` may name the group too, but is not needed)::

    rules:
      - name: short                 # length: chars, words, tokens, sentences
        max_words: 40
        weight: 0.5
      - name: no_preamble           # regex: must_match / must_not_match (str or list), ignore_case
        must_not_match: '^\\s*(Sure|Certainly)\\b'
      - name: mentions_source       # keywords: must_include / must_not_include, ignore_case (default true)
        must_include: [source]
      - name: valid_json            # json: true, or {schema: {...} | path.json, strip_code_fence: bool}
        json: {schema: {type: object, required: [answer]}}
      - name: no_refusal            # refusal: true, or {phrases: [...]} to add phrases
        refusal: true
        hard: true
      - name: not_repetitive        # repetition: true, or {n: 3, max_fraction: 0.1}
        repetition: {n: 3, max_fraction: 0.1}
      - name: english               # language: a code (en, fr, ru, zh, ...): checks the script
        language: en
      - name: plain_prose           # format: no_markdown, no_lists, single_paragraph, ends_with: ".!?"
        no_markdown: true
      - name: positivity            # python: path/to/file.py:function or module:function
        python: checks.py:positivity
        threshold: 0.5              # a float result passes at or above this (bool results pass when true)

Scores are in [0, 1] for built-in checks (1 = fully satisfied): pass/fail
checks give 1 or 0; length bounds decay as ``bound/actual`` above a maximum and
``actual/bound`` below a minimum; keyword inclusion is the share found;
repetition is ``1 - repeated n-gram share``. A Python function returns a
float (used as is) or a bool (1 or 0). A response's total score is the
weighted mean of its rule scores, or 0 if it fails a hard rule; every rule's
score is kept in the judgement's ``details["rules"]``.

Relative paths (``python:`` files, JSON schema files) are looked up beside the
rules file first, then in the working directory. Token lengths use the
``tokenizer:`` named at the top of the file, or else the ``num_tokens`` the
teacher recorded for the candidate.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import json
import math
import numbers
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from align.config import read_yaml
from align.data.records import content_hash
from align.errors import AlignError, ConfigError
from align.label import json_schema, text_checks


class RuleError(AlignError):
    """A user's rule function failed on a record (fatal only with ``--strict``)."""


@dataclass(frozen=True)
class ResponseView:
    """What a rule sees: the prompt and response as text, and where they came from."""

    prompt: str
    response: str
    record_id: str
    num_tokens: int | None = None


@dataclass(frozen=True)
class Outcome:
    score: float
    passed: bool
    measured: dict[str, Any] = field(default_factory=dict)


Check = Callable[[ResponseView], Outcome]

# Which keys define which kind of rule; options refine a rule but do not define one.
GROUP_KEYS: dict[str, tuple[str, ...]] = {
    "length": ("min_chars", "max_chars", "min_words", "max_words", "min_tokens", "max_tokens",
               "min_sentences", "max_sentences"),
    "regex": ("must_match", "must_not_match"),
    "keywords": ("must_include", "must_not_include"),
    "json": ("json",),
    "refusal": ("refusal",),
    "repetition": ("repetition",),
    "language": ("language",),
    "format": ("no_markdown", "no_lists", "single_paragraph", "ends_with"),
    "python": ("python",),
}
OPTION_KEYS = {"ignore_case": ("regex", "keywords"), "threshold": ("python",)}
COMMON_KEYS = ("name", "type", "weight", "hard", "description")
ALL_KEYS = tuple(k for keys in GROUP_KEYS.values() for k in keys) + tuple(OPTION_KEYS) + COMMON_KEYS
TOP_LEVEL_KEYS = ("rules", "name", "description", "tokenizer")


@dataclass
class Rule:
    name: str
    kind: str
    check: Check
    weight: float = 1.0
    hard: bool = False


@dataclass
class RuleResult:
    """One response's verdict: the total, the label and every rule's own outcome."""

    score: float | None
    label: str | None  # "good" | "bad" (failed a hard rule) | None (every rule errored)
    rules: dict[str, dict[str, Any]]
    failed_hard: list[str]
    errors: dict[str, str]

    @property
    def filtered(self) -> bool:
        return bool(self.failed_hard)

    def details(self) -> dict[str, Any]:
        out: dict[str, Any] = {"rules": self.rules, "failed_hard": self.failed_hard}
        if self.errors:
            out["errors"] = self.errors
        return out


@dataclass
class RuleSet:
    name: str
    rules: list[Rule]
    config_hash: str
    path: str = ""
    tokenizer: Any = None

    def evaluate(self, view: ResponseView, *, strict: bool = False,
                 on_error: Callable[[str, str, str], None] | None = None) -> RuleResult:
        """Run every rule. A rule that raises is skipped (and reported via ``on_error``), or fatal if ``strict``."""
        if self.tokenizer is not None and view.num_tokens is None:
            view = ResponseView(view.prompt, view.response, view.record_id,
                                len(self.tokenizer.encode(view.response, add_special_tokens=False)))
        outcomes: dict[str, dict[str, Any]] = {}
        errors: dict[str, str] = {}
        failed_hard: list[str] = []
        weighted, total_weight = 0.0, 0.0
        for rule in self.rules:
            try:
                outcome = rule.check(view)
            except Exception as exc:  # a user's function may raise anything; say which rule and record
                message = f"{type(exc).__name__}: {exc}"
                if strict:
                    raise RuleError(f"rule '{rule.name}' failed on record {view.record_id}: {message}") from exc
                errors[rule.name] = message
                if on_error:
                    on_error(rule.name, view.record_id, message)
                continue
            outcomes[rule.name] = {"score": round(outcome.score, 6), "passed": outcome.passed, **outcome.measured}
            if rule.hard and not outcome.passed:
                failed_hard.append(rule.name)
            weighted += rule.weight * outcome.score
            total_weight += rule.weight
        if not outcomes:
            return RuleResult(None, None, outcomes, failed_hard, errors)
        if failed_hard:
            score, label = 0.0, "bad"
        else:
            score, label = (weighted / total_weight if total_weight > 0 else 1.0), "good"
        return RuleResult(round(score, 6), label, outcomes, failed_hard, errors)


# ----------------------------------------------------------------------------- loading


def load_rules(path: str | Path) -> RuleSet:
    """Read and check a rules file; every mistake is a :class:`ConfigError` naming the rule and line."""
    data, lines = read_yaml(path)
    where = str(path)
    for key in data:
        if key not in TOP_LEVEL_KEYS:
            raise ConfigError(f"{_at(where, lines, (key,))}: unknown key '{key}'{_did_you_mean(key, TOP_LEVEL_KEYS)}")
    specs = data.get("rules")
    if not isinstance(specs, list) or not specs:
        raise ConfigError(f"{_at(where, lines, ('rules',))}: expected 'rules:' with a list of rules")
    base = Path(path).resolve().parent
    rules, names = [], set()
    for i, spec in enumerate(specs):
        rule = _build_rule(spec, i, base, where, lines)
        if rule.name in names:
            raise ConfigError(f"{_at(where, lines, ('rules', str(i)))}: rule '{rule.name}' is defined twice")
        names.add(rule.name)
        rules.append(rule)
    tokenizer = None
    if data.get("tokenizer"):
        from align.models import load_tokenizer

        tokenizer = load_tokenizer(str(data["tokenizer"]))
    name = str(data.get("name") or Path(path).stem)
    return RuleSet(name, rules, content_hash(data), where, tokenizer)


def _at(path: str, lines: dict[tuple[str, ...], int], key: tuple[str, ...]) -> str:
    while key and key not in lines:
        key = key[:-1]
    return f"{path}:{lines[key]}" if key in lines else path


def _did_you_mean(word: str, options: tuple[str, ...] | list[str]) -> str:
    close = difflib.get_close_matches(word, options, n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _build_rule(spec: Any, index: int, base: Path, path: str, lines: dict[tuple[str, ...], int]) -> Rule:
    here = _at(path, lines, ("rules", str(index)))
    if not isinstance(spec, dict):
        raise ConfigError(f"{here}: rule {index + 1} must be a mapping of keys, got {type(spec).__name__}")
    name = spec.get("name")
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"{here}: rule {index + 1} needs a 'name'")

    def fail(message: str, key: str | None = None) -> ConfigError:
        at = _at(path, lines, ("rules", str(index), key)) if key else here
        return ConfigError(f"{at}: rule '{name}': {message}")

    for key in spec:
        if key not in ALL_KEYS:
            raise fail(f"unknown key '{key}'{_did_you_mean(key, ALL_KEYS)}; a rule checks one of: "
                       + ", ".join(GROUP_KEYS), key)
    kinds = [kind for kind, keys in GROUP_KEYS.items() if any(k in spec for k in keys)]
    declared = spec.get("type")
    if declared is not None and declared not in GROUP_KEYS:
        raise fail(f"unknown rule type '{declared}'{_did_you_mean(str(declared), list(GROUP_KEYS))}; "
                   f"known types: {', '.join(GROUP_KEYS)}", "type")
    if not kinds:
        raise fail("says nothing to check: give one of " + ", ".join(f"{k} ({GROUP_KEYS[k][0]}...)" for k in GROUP_KEYS))
    if len(kinds) > 1:
        raise fail(f"mixes {' and '.join(kinds)} checks; split it into one rule per kind")
    kind = kinds[0]
    if declared is not None and declared != kind:
        raise fail(f"type '{declared}' does not match its keys, which are {kind} checks", "type")
    for option, allowed in OPTION_KEYS.items():
        if option in spec and kind not in allowed:
            raise fail(f"'{option}' applies to {' or '.join(allowed)} rules, not {kind}", option)
    weight = spec.get("weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight < 0 or not math.isfinite(weight):
        raise fail(f"weight must be a number >= 0, got {weight!r}", "weight")
    hard = spec.get("hard", False)
    if not isinstance(hard, bool):
        raise fail(f"hard must be true or false, got {hard!r}", "hard")
    try:
        check = _BUILDERS[kind](spec, base)
    except _SpecError as exc:
        raise fail(exc.message, exc.key) from None
    return Rule(name=name, kind=kind, check=check, weight=float(weight), hard=hard)


class _SpecError(Exception):
    def __init__(self, message: str, key: str | None = None):
        super().__init__(message)
        self.message, self.key = message, key


def _int(spec: dict[str, Any], key: str) -> int | None:
    value = spec.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _SpecError(f"{key} must be a whole number >= 0, got {value!r}", key)
    return value


def _strings(spec: dict[str, Any], key: str) -> list[str]:
    value = spec.get(key)
    if value is None:
        return []
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items or not all(isinstance(v, str) and v for v in items):
        raise _SpecError(f"{key} must be a non-empty string or list of strings, got {value!r}", key)
    return items


def _flag(spec: dict[str, Any], key: str, default: bool = False) -> bool:
    value = spec.get(key, default)
    if not isinstance(value, bool):
        raise _SpecError(f"{key} must be true or false, got {value!r}", key)
    return value


def _options(spec: dict[str, Any], key: str, allowed: dict[str, type | tuple[type, ...]]) -> dict[str, Any]:
    """A check written as ``key: true`` or ``key: {option: value}``."""
    value = spec[key]
    if value is True:
        return {}
    if not isinstance(value, dict):
        raise _SpecError(f"{key} must be true or a mapping of options ({', '.join(allowed)}), got {value!r}", key)
    for option, option_value in value.items():
        if option not in allowed:
            raise _SpecError(f"{key}: unknown option '{option}'{_did_you_mean(option, list(allowed))}", key)
        if not isinstance(option_value, allowed[option]) or isinstance(option_value, bool) and allowed[option] is not bool:
            raise _SpecError(f"{key}.{option} has the wrong type ({type(option_value).__name__})", key)
    return value


# ----------------------------------------------------------------------------- built-in checks


def _bound_score(actual: int, low: int | None, high: int | None) -> float:
    """1 inside [low, high]; decays proportionally outside, so 'a bit too long' beats 'far too long'."""
    if high is not None and actual > high:
        return high / actual if actual else 0.0
    if low is not None and actual < low:
        return actual / low if low else 1.0
    return 1.0


def _length(spec: dict[str, Any], base: Path) -> Check:
    bounds: dict[str, tuple[int | None, int | None]] = {}
    for unit in ("chars", "words", "tokens", "sentences"):
        low, high = _int(spec, f"min_{unit}"), _int(spec, f"max_{unit}")
        if low is not None and high is not None and low > high:
            raise _SpecError(f"min_{unit} ({low}) is above max_{unit} ({high})", f"min_{unit}")
        if low is not None or high is not None:
            bounds[unit] = (low, high)

    def check(view: ResponseView) -> Outcome:
        scores, measured = [], {}
        for unit, (low, high) in bounds.items():
            if unit == "chars":
                actual = len(view.response.strip())
            elif unit == "words":
                actual = len(text_checks.words(view.response))
            elif unit == "sentences":
                actual = text_checks.sentence_count(view.response)
            else:
                if view.num_tokens is None:
                    raise ValueError("token length needs 'tokenizer:' in the rules file or num_tokens in the candidates")
                actual = view.num_tokens
            measured[unit] = actual
            scores.append(_bound_score(actual, low, high))
        score = min(scores)
        return Outcome(score, score == 1.0, measured)

    return check


def _regex(spec: dict[str, Any], base: Path) -> Check:
    flags = re.IGNORECASE if _flag(spec, "ignore_case") else 0
    compiled: dict[str, list[re.Pattern[str]]] = {}
    for key in ("must_match", "must_not_match"):
        compiled[key] = []
        for pattern in _strings(spec, key):
            try:
                compiled[key].append(re.compile(pattern, flags))
            except re.error as exc:
                raise _SpecError(f"bad regex {pattern!r} in {key}: {exc}", key) from None

    def check(view: ResponseView) -> Outcome:
        missing = [p.pattern for p in compiled["must_match"] if not p.search(view.response)]
        present = [p.pattern for p in compiled["must_not_match"] if p.search(view.response)]
        passed = not missing and not present
        measured = {k: v for k, v in (("missing", missing), ("matched", present)) if v}
        return Outcome(1.0 if passed else 0.0, passed, measured)

    return check


def _keywords(spec: dict[str, Any], base: Path) -> Check:
    flags = re.IGNORECASE if _flag(spec, "ignore_case", default=True) else 0

    def pattern(word: str) -> re.Pattern[str]:
        # Word boundaries only where the keyword itself starts/ends with a word character.
        left = r"\b" if re.match(r"\w", word) else ""
        right = r"\b" if re.search(r"\w$", word) else ""
        return re.compile(left + re.escape(word) + right, flags)

    include = [(w, pattern(w)) for w in _strings(spec, "must_include")]
    exclude = [(w, pattern(w)) for w in _strings(spec, "must_not_include")]

    def check(view: ResponseView) -> Outcome:
        found = [w for w, p in include if p.search(view.response)]
        banned = [w for w, p in exclude if p.search(view.response)]
        scores = []
        if include:
            scores.append(len(found) / len(include))
        if exclude:
            scores.append(0.0 if banned else 1.0)
        passed = len(found) == len(include) and not banned
        measured: dict[str, Any] = {}
        if include:
            measured["missing"] = [w for w, _ in include if w not in found]
        if banned:
            measured["banned"] = banned
        return Outcome(min(scores), passed, measured)

    return check


_FENCE = re.compile(r"^\s*```[\w-]*\s*\n(.*?)\n?```\s*$", re.DOTALL)


def _json(spec: dict[str, Any], base: Path) -> Check:
    options = _options(spec, "json", {"schema": (dict, str), "strip_code_fence": bool})
    schema = options.get("schema")
    if isinstance(schema, str):
        schema_path = _find_file(schema, base)
        if schema_path is None:
            raise _SpecError(f"JSON schema file {schema!r} not found (looked beside the rules file and in "
                             "the working directory)", "json")
        try:
            schema = json.loads(schema_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise _SpecError(f"JSON schema file {schema_path} is not valid JSON ({exc})", "json") from None
    if schema is not None:
        problems = json_schema.unsupported_keywords(schema)
        if problems:
            raise _SpecError("JSON schema uses what this JSON Schema subset does not check: " + "; ".join(problems)
                             + " (see align/label/json_schema.py for the supported keywords)", "json")
    strip_fence = options.get("strip_code_fence", False)

    def check(view: ResponseView) -> Outcome:
        text = view.response.strip()
        fenced = _FENCE.match(text) if strip_fence else None
        if fenced:
            text = fenced.group(1)
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            return Outcome(0.0, False, {"error": f"not JSON: {exc.msg} at column {exc.colno}"})
        if schema is not None:
            errors = json_schema.schema_errors(value, schema)
            if errors:
                return Outcome(0.0, False, {"error": "; ".join(errors[:3])})
        return Outcome(1.0, True)

    return check


def _refusal(spec: dict[str, Any], base: Path) -> Check:
    options = _options(spec, "refusal", {"phrases": list})
    phrases = text_checks.DEFAULT_REFUSALS + tuple(str(p) for p in options.get("phrases", []))

    def check(view: ResponseView) -> Outcome:
        phrase = text_checks.refusal_phrase(view.response, phrases)
        return Outcome(0.0 if phrase else 1.0, phrase is None, {"refusal": phrase} if phrase else {})

    return check


def _repetition(spec: dict[str, Any], base: Path) -> Check:
    options = _options(spec, "repetition", {"n": int, "max_fraction": (int, float)})
    n = options.get("n", 3)
    max_fraction = float(options.get("max_fraction", 0.1))
    if n < 1 or not 0 <= max_fraction <= 1:
        raise _SpecError("repetition needs n >= 1 and max_fraction in [0, 1]", "repetition")

    def check(view: ResponseView) -> Outcome:
        fraction = text_checks.repeated_ngram_fraction(view.response, n)
        return Outcome(1.0 - fraction, fraction <= max_fraction, {"repeated_fraction": round(fraction, 4)})

    return check


def _language(spec: dict[str, Any], base: Path) -> Check:
    code = spec["language"]
    if code not in text_checks.LANGUAGE_SCRIPTS:
        raise _SpecError(f"unknown language {code!r}; known: {', '.join(sorted(text_checks.LANGUAGE_SCRIPTS))}",
                         "language")
    script = text_checks.LANGUAGE_SCRIPTS[code]

    def check(view: ResponseView) -> Outcome:
        share = text_checks.script_share(view.response, script)
        if share is None:
            return Outcome(0.0, False, {"script_share": None})
        measured: dict[str, Any] = {"script_share": round(share, 3)}
        passed = share >= 0.9
        if code == "en" and len(text_checks.words(view.response)) >= 8:
            # Latin script alone cannot tell English from French; English prose is full of function words.
            function_share = text_checks.english_function_word_share(view.response)
            measured["function_word_share"] = round(function_share, 3)
            passed = passed and function_share >= 0.1
        return Outcome(1.0 if passed else 0.0, passed, measured)

    return check


def _format(spec: dict[str, Any], base: Path) -> Check:
    no_markdown, no_lists = _flag(spec, "no_markdown"), _flag(spec, "no_lists")
    single_paragraph = _flag(spec, "single_paragraph")
    ends_with = spec.get("ends_with")
    if ends_with is not None and (not isinstance(ends_with, str) or not ends_with):
        raise _SpecError(f"ends_with must be a string of allowed final characters, e.g. '.!?', got {ends_with!r}",
                         "ends_with")

    def check(view: ResponseView) -> Outcome:
        text = view.response.strip()
        broken = []
        if no_markdown and text_checks.has_markdown(text):
            broken.append("markdown")
        if no_lists and text_checks.has_list(text):
            broken.append("list")
        if single_paragraph and re.search(r"\n\s*\n", text):
            broken.append("paragraphs")
        if ends_with and (not text or text.rstrip("\"')]”’")[-1:] not in ends_with):
            broken.append("ending")
        return Outcome(0.0 if broken else 1.0, not broken, {"broken": broken} if broken else {})

    return check


# ----------------------------------------------------------------------------- users' Python functions


def _find_file(name: str, base: Path) -> Path | None:
    for candidate in (base / name, Path.cwd() / name, Path(name)):
        if candidate.is_file():
            return candidate
    return None


def load_function(reference: str, base: Path) -> Callable[..., Any]:
    """``path/to/file.py:function`` or ``package.module:function`` -> the function."""
    target, sep, attribute = reference.rpartition(":")
    if not sep or not target or not attribute:
        raise _SpecError(f"python: expected 'path/to/file.py:function' or 'module:function', got {reference!r}",
                         "python")
    if target.endswith(".py") or "/" in target or "\\" in target:
        file = _find_file(target, base)
        if file is None:
            raise _SpecError(f"python file {target!r} not found (looked in {base} and {Path.cwd()})", "python")
        module_name = f"_align_rules_{content_hash(str(file.resolve()), 12)}"
        module_spec = importlib.util.spec_from_file_location(module_name, file)
        if module_spec is None or module_spec.loader is None:
            raise _SpecError(f"cannot import {file}", "python")
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[module_name] = module  # dataclasses and pickling look modules up by name
        try:
            module_spec.loader.exec_module(module)
        except Exception as exc:
            sys.modules.pop(module_name, None)
            raise _SpecError(f"importing {file} failed: {type(exc).__name__}: {exc}", "python") from None
    else:
        try:
            module = importlib.import_module(target)
        except Exception as exc:
            raise _SpecError(f"cannot import module {target!r}: {type(exc).__name__}: {exc}", "python") from None
    function = getattr(module, attribute, None)
    if function is None:
        available = [n for n, v in vars(module).items() if callable(v) and not n.startswith("_")]
        raise _SpecError(f"no function {attribute!r} in {target}{_did_you_mean(attribute, available)}", "python")
    if not callable(function):
        raise _SpecError(f"{reference} is not a function", "python")
    return function


def _python(spec: dict[str, Any], base: Path) -> Check:
    reference = spec["python"]
    if not isinstance(reference, str):
        raise _SpecError(f"python must be a 'file.py:function' or 'module:function' string, got {reference!r}", "python")
    function = load_function(reference, base)
    threshold = spec.get("threshold", 0.5)
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
        raise _SpecError(f"threshold must be a number, got {threshold!r}", "threshold")

    def check(view: ResponseView) -> Outcome:
        value = function(view.prompt, view.response)
        if isinstance(value, bool):
            return Outcome(1.0 if value else 0.0, value)
        if isinstance(value, numbers.Real) and math.isfinite(float(value)):
            return Outcome(float(value), float(value) >= threshold)
        raise TypeError(f"{reference} returned {value!r}; a rule function must return a finite float or a bool")

    return check


_BUILDERS: dict[str, Callable[[dict[str, Any], Path], Check]] = {
    "length": _length, "regex": _regex, "keywords": _keywords, "json": _json, "refusal": _refusal,
    "repetition": _repetition, "language": _language, "format": _format, "python": _python,
}
