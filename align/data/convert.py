"""The `align data convert` stage: someone else's preference file -> TRL-shaped JSONL."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from align.data.formats import (CONVERTERS, FORMATS, OUTPUT_TYPES, FieldError, detect_format, pairs_to_unpaired,
                                trl_kind)
from align.data.io import Malformed, iter_rows, write_records
from align.data.validate import parse_row
from align.errors import DataError, Location, Problem


@dataclass
class ConvertResult:
    input: str
    output: str
    format: str
    detected: bool
    kind: str
    count: int
    skipped: int = 0
    duplicates_dropped: int = 0
    labels: Counter = field(default_factory=Counter)


def convert_file(input_path: str | Path, output_path: str | Path, *, fmt: str = "auto", to: str | None = None,
                 skip_invalid: bool = False, max_problems: int = 20) -> ConvertResult:
    """Convert a whole file; on any bad row (unless ``skip_invalid``) write nothing and raise.

    ``to="unpaired"`` turns pairs into KTO rows (chosen -> desirable,
    rejected -> undesirable).
    """
    if fmt != "auto" and fmt not in FORMATS:
        raise DataError.at(input_path, f"unknown format {fmt!r}: use one of auto, {', '.join(FORMATS)}")
    if to not in (None, "pairs", "unpaired"):
        raise DataError.at(input_path, f"unknown target {to!r}: use pairs or unpaired")
    rows = iter_rows(input_path, yield_malformed=True)
    first = next(rows, None)
    if first is None:
        raise DataError.at(input_path, "no records")
    if isinstance(first[1], Malformed):
        raise DataError(Problem(first[0], None, str(first[1])))
    detected = fmt == "auto"
    if detected:
        fmt = detect_format(first[1]) or ""
        if not fmt:
            keys = sorted(first[1]) if isinstance(first[1], dict) else type(first[1]).__name__
            raise DataError(Problem(first[0], None, f"cannot detect the format (keys: {keys}); "
                                    f"pass --format with one of {', '.join(FORMATS)}"))
    result = ConvertResult(str(input_path), str(output_path), fmt, detected, kind="", count=0)
    problems: list[Problem] = []
    input_kinds: list[str] = []  # the kind of the first converted row; every other row must match

    def converted() -> Iterator[dict[str, Any]]:
        for location, row in _chain(first, rows):
            try:
                yield from _convert_row(fmt, row, location, input_kinds)
            except DataError as exc:
                if skip_invalid:
                    result.skipped += 1
                    continue
                problems.extend(exc.problems)
                if len(problems) >= max_problems:
                    break
        if problems:
            raise DataError(problems[:max_problems])

    out: Iterator[dict[str, Any]] = converted()
    if to == "unpaired":
        out = _to_unpaired(out, result)
    if to == "pairs":
        out = _require_pairs(out, result)
    write_records(output_path, (_count(row, result) for row in out))
    result.kind = "unpaired" if to == "unpaired" else (input_kinds[0] if input_kinds else "")
    return result


def _chain(first: tuple[Location, Any], rest: Iterator[tuple[Location, Any]]) -> Iterator[tuple[Location, Any]]:
    yield first
    yield from rest


def _convert_row(fmt: str, row: Any, location: Location, input_kinds: list[str]) -> list[dict[str, Any]]:
    if isinstance(row, Malformed):
        raise DataError(Problem(location, None, str(row)))
    if not isinstance(row, dict):
        raise DataError(Problem(location, None, f"expected a JSON object, got {type(row).__name__}"))
    try:
        outputs = CONVERTERS[fmt](row)
    except FieldError as exc:
        raise DataError(Problem(location, exc.field, exc.message)) from None
    checked = []
    for out in outputs:
        kind = trl_kind(out)
        if not input_kinds:
            input_kinds.append(kind)
        elif kind != input_kinds[0]:
            raise DataError(Problem(location, None, f"row is {kind} but earlier rows were {input_kinds[0]}; "
                                    "a file must hold one kind"))
        checked.append(parse_row(OUTPUT_TYPES[kind], out, location).to_json())
    return checked


def _to_unpaired(rows: Iterator[dict[str, Any]], result: ConvertResult) -> Iterator[dict[str, Any]]:
    pairs_seen = [0]

    def pairs_only() -> Iterator[dict[str, Any]]:
        for row in rows:
            if "chosen" not in row:
                raise DataError.at(result.input, "--to unpaired needs pairs (prompt/chosen/rejected) as input")
            pairs_seen[0] += 1
            yield row

    emitted = 0
    for row in pairs_to_unpaired(pairs_only()):
        emitted += 1
        yield row
    result.duplicates_dropped = 2 * pairs_seen[0] - emitted


def _require_pairs(rows: Iterator[dict[str, Any]], result: ConvertResult) -> Iterator[dict[str, Any]]:
    for row in rows:
        if "chosen" not in row:
            raise DataError.at(result.input, "cannot turn unpaired rows into pairs: an unpaired row has no "
                                             "partner; build pairs from judgements with `align pairs build`")
        yield row


def _count(row: dict[str, Any], result: ConvertResult) -> dict[str, Any]:
    result.count += 1
    if "label" in row:
        result.labels[row["label"]] += 1
    return row
