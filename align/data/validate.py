"""Checking rows against the record types, with every problem located."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from align.data.io import Malformed, iter_rows
from align.data.records import RECORD_TYPES, detect_kind, is_conversational
from align.errors import DataError, Location, Problem

R = TypeVar("R", bound=BaseModel)


def _field_path(loc: tuple[Any, ...]) -> str | None:
    """pydantic's ``('chosen', 0, 'content')`` -> ``chosen[0].content``."""
    out = ""
    for part in loc:
        # Union branches show up as type names ('str', 'list[Message]'); they are not fields.
        if isinstance(part, str) and (part in ("str", "function-after") or "[" in part or part.startswith("list")):
            continue
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or None


def problems_from(exc: ValidationError, location: Location) -> list[Problem]:
    """One :class:`Problem` per distinct field, in a user's words rather than pydantic's."""
    problems, seen = [], set()
    for err in exc.errors():
        field_name = _field_path(err["loc"])
        if field_name in seen:
            continue  # a Union field fails once per branch; report it once
        seen.add(field_name)
        message = err["msg"].removeprefix("Value error, ")
        if err["type"] == "missing":
            message = "missing"
        elif err["type"] in ("string_type", "list_type", "bool_type", "float_type", "int_type", "dict_type"):
            message = f"{message}, got {type(err.get('input')).__name__}"
        problems.append(Problem(location, field_name, message))
    return problems


def parse_row(model: type[R], row: Any, location: Location) -> R:
    if isinstance(row, Malformed):
        raise DataError(Problem(location, None, str(row)))
    if not isinstance(row, dict):
        raise DataError(Problem(location, None, f"expected a JSON object, got {type(row).__name__}"))
    try:
        return model.model_validate(row)
    except ValidationError as exc:
        raise DataError(problems_from(exc, location)) from None


def read_records(path: str | Path, kind: str, *, tolerate_torn_tail: bool = False) -> Iterator[R]:
    """Typed records from a file; the first bad row raises :class:`DataError` at its line."""
    model = RECORD_TYPES[kind]
    for location, row in iter_rows(path, tolerate_torn_tail=tolerate_torn_tail):
        yield parse_row(model, row, location)  # type: ignore[misc]


def load_records(path: str | Path, kind: str, *, max_problems: int = 20) -> list[Any]:
    """All records of a file, or a :class:`DataError` listing (up to ``max_problems``) every bad row."""
    report = validate_rows(iter_rows(path, yield_malformed=True), kind=kind, max_problems=max_problems, keep=True)
    if report.problems:
        raise DataError(report.problems)
    if report.total == 0:
        raise DataError.at(path, f"no records: expected {kind}")
    return report.records


@dataclass
class ValidationReport:
    path: str
    kind: str | None
    total: int = 0
    valid: int = 0
    forms: Counter = field(default_factory=Counter)
    labels: Counter = field(default_factory=Counter)
    problems: list[Problem] = field(default_factory=list)
    problem_count: int = 0
    records: list[Any] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.problem_count == 0 and self.total > 0

    def summary_lines(self) -> list[str]:
        lines = [f"{self.path}: {self.total} records, kind: {self.kind or 'unknown'}"]
        if self.forms:
            lines.append("  forms: " + ", ".join(f"{k} {v}" for k, v in sorted(self.forms.items())))
        if self.labels:
            lines.append("  labels: " + ", ".join(f"{k} {v}" for k, v in sorted(self.labels.items(), key=str)))
        lines.append(f"  valid: {self.valid}, with problems: {self.total - self.valid}")
        return lines


def validate_rows(rows: Iterable[tuple[Location, Any]], *, kind: str | None = None, max_problems: int = 20,
                  keep: bool = False, path: str = "") -> ValidationReport:
    """Check every row (the kind is detected from the first row if not given).

    Keeps going after a bad row so a user sees all problems at once; stores at
    most ``max_problems`` of them but counts them all.
    """
    report = ValidationReport(path=path, kind=kind)
    for location, row in rows:
        report.path = report.path or location.path
        report.total += 1
        if report.kind is None and not isinstance(row, Malformed):
            report.kind = detect_kind(row) if isinstance(row, dict) else None
            if report.kind is None:
                keys = sorted(row) if isinstance(row, dict) else type(row).__name__
                raise DataError(Problem(location, None, f"cannot tell what kind of records these are (keys: {keys}); "
                                        "expected prompts, candidates, judgements, pairs, unpaired or sft rows"))
        try:
            record = parse_row(RECORD_TYPES[report.kind or "prompts"], row, location)
        except DataError as exc:
            report.problem_count += len(exc.problems)
            room = max_problems - len(report.problems)
            report.problems.extend(exc.problems[: max(room, 0)])
            continue
        report.valid += 1
        first = getattr(record, "prompt", None)
        report.forms["conversational" if is_conversational(first) else "text"] += 1
        if report.kind == "unpaired":
            report.labels[record.label] += 1
        if keep:
            report.records.append(record)
    return report


def validate_file(path: str | Path, *, kind: str | None = None, max_problems: int = 20) -> ValidationReport:
    return validate_rows(iter_rows(path, yield_malformed=True), kind=kind, max_problems=max_problems, path=str(path))
