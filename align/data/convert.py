"""The `align data convert` stage: someone else's preference file -> TRL-shaped JSONL."""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from align.data.formats import (CONVERTERS, EARLY_DIVERGENCE, FORMATS, OUTPUT_TYPES, RANK_BY, SKIP_REASONS,
                                ConvertOptions, FieldError, SkipRow, explain_format, pairs_to_unpaired, trl_kind)
from align.data.io import DEFAULT_SPLIT, Malformed, iter_rows, write_records
from align.data.validate import parse_row
from align.errors import DataError, Location, Problem

_EARLY_REASONS = ("diverged-early", "no-shared-turn")


class ConvertError(DataError):
    """Bad rows that stopped a conversion: every problem found, then what was (not) written and how to get past."""

    def __init__(self, problems: list[Problem], hint: str):
        super().__init__(problems)
        self.hint = hint

    def __str__(self) -> str:
        return f"{super().__str__()}\n{self.hint}"


@dataclass
class ConvertResult:
    input: str
    output: str
    format: str
    detected: bool
    kind: str
    count: int
    why: str = ""  # what decided the detected format
    rows_read: int = 0
    skipped: int = 0  # invalid rows dropped with skip_invalid
    skipped_by_reason: Counter = field(default_factory=Counter)  # well-formed rows with no pair, by SKIP_REASONS key
    events: Counter = field(default_factory=Counter)  # e.g. diverged-early: rows that diverged early and were written
    early_divergence: str = "pairs"
    duplicates_dropped: int = 0
    labels: Counter = field(default_factory=Counter)

    @property
    def diverged_early(self) -> int:
        """Rows whose chosen and rejected diverge before the final assistant turn, written or skipped."""
        return self.events["diverged-early"] + sum(self.skipped_by_reason[r] for r in _EARLY_REASONS)

    def lines(self) -> list[str]:
        """The summary `align data convert` prints."""
        out = []
        if self.detected:
            out.append(f"detected format: {self.format}, from the first row: {self.why}")
        wrote = f"read {_n(self.rows_read, 'row')}, wrote {self.count} {self.kind} to {self.output}"
        if self.labels:
            wrote += " (" + ", ".join(f"{str(k).lower()}: {v}" for k, v in sorted(self.labels.items(), reverse=True)) + ")"
        out.append(wrote)
        if self.diverged_early:
            fates = []
            if self.events["diverged-early"]:
                fates.append(f"{self.events['diverged-early']} written as pairs with the shared turns as prompt and "
                             "the diverging multi-turn tails as chosen/rejected (--early-divergence skip drops them)")
            if self.skipped_by_reason["diverged-early"]:
                fates.append(f"{self.skipped_by_reason['diverged-early']} skipped (--early-divergence skip; "
                             "--early-divergence pairs keeps them as multi-turn pairs)")
            if self.skipped_by_reason["no-shared-turn"]:
                fates.append(f"{self.skipped_by_reason['no-shared-turn']} skipped: they differ from the first turn, "
                             "so there is no shared prompt")
            out.append(f"{_n(self.diverged_early, 'row')} where chosen and rejected diverge before the final "
                       "assistant turn: " + "; ".join(fates))
        others = {r: n for r, n in self.skipped_by_reason.items() if r not in _EARLY_REASONS and n}
        if others:
            out.append(f"skipped {_n(sum(others.values()), 'row')} with no pair: "
                       + "; ".join(f"{n} where {SKIP_REASONS[r]}" for r, n in sorted(others.items())))
        if self.events["tied-scores"]:
            out.append(f"{_n(self.events['tied-scores'], 'pair')} with score_chosen equal to score_rejected "
                       "(kept, as published)")
        if self.duplicates_dropped:
            out.append(f"dropped {self.duplicates_dropped} repeated completions (same prompt and text as an earlier row)")
        if self.skipped:
            out.append(f"skipped {self.skipped} invalid rows")
        return out


def _n(count: int, word: str) -> str:
    return f"{count} {word}" if count == 1 else f"{count} {word}s"


def convert_file(input_path: str | Path, output_path: str | Path, *, fmt: str = "auto", to: str | None = None,
                 skip_invalid: bool = False, early_divergence: str = "pairs", rank_by: str = "mean",
                 split: str = DEFAULT_SPLIT, limit: int | None = None, max_problems: int = 20) -> ConvertResult:
    """Convert a whole file; on any bad row (unless ``skip_invalid``) write nothing and raise.

    ``to="unpaired"`` turns pairs into KTO rows (chosen -> desirable,
    rejected -> undesirable). Rows that are well-formed but hold no pair
    (identical chosen and rejected, no preference among rated completions) are
    skipped and counted by reason. ``early_divergence`` and ``rank_by``: see
    :class:`~align.data.formats.ConvertOptions`. ``input_path`` may also be a dataset folder or a hub id
    (``split`` picks the split); ``limit`` converts the first N records only.
    """
    if fmt != "auto" and fmt not in FORMATS:
        raise DataError.at(input_path, f"unknown format {fmt!r}: use one of auto, {', '.join(FORMATS)}")
    if to not in (None, "pairs", "unpaired"):
        raise DataError.at(input_path, f"unknown target {to!r}: use pairs or unpaired")
    if early_divergence not in EARLY_DIVERGENCE:
        raise DataError.at(input_path, f"unknown --early-divergence {early_divergence!r}: use "
                                       f"{' or '.join(EARLY_DIVERGENCE)}")
    if rank_by not in RANK_BY:
        raise DataError.at(input_path, f"unknown --rank-by {rank_by!r}: use {' or '.join(RANK_BY)}")
    if limit is not None and limit < 1:
        raise DataError.at(input_path, f"--limit must be at least 1, got {limit}")
    rows = itertools.islice(iter_rows(input_path, yield_malformed=True, split=split), limit)
    first = next(rows, None)
    if first is None:
        raise DataError.at(input_path, "no records")
    if isinstance(first[1], Malformed):
        raise DataError(Problem(first[0], None, str(first[1])))
    detected = fmt == "auto"
    why = ""
    if detected:
        found = explain_format(first[1])
        if not found:
            keys = sorted(first[1]) if isinstance(first[1], dict) else type(first[1]).__name__
            raise DataError(Problem(first[0], None, f"cannot detect the format (keys: {keys}); "
                                    f"pass --format with one of {', '.join(FORMATS)}"))
        fmt, why = found
    result = ConvertResult(str(input_path), str(output_path), fmt, detected, kind="", count=0, why=why,
                           early_divergence=early_divergence)
    options = ConvertOptions(early_divergence=early_divergence, rank_by=rank_by)
    problems: list[Problem] = []
    input_kinds: list[str] = []  # the kind of the first converted row; every other row must match

    def converted() -> Iterator[dict[str, Any]]:
        for location, row in _chain(first, rows):
            result.rows_read += 1
            options.events.clear()
            try:
                out = _convert_row(fmt, row, location, input_kinds, options)
            except SkipRow as skip:
                result.skipped_by_reason[skip.reason] += 1
                continue
            except DataError as exc:
                if skip_invalid:
                    result.skipped += 1
                    continue
                problems.extend(exc.problems)
                if len(problems) >= max_problems:
                    break
                continue
            result.events.update(options.events)
            yield from out
        if problems:
            raise ConvertError(problems[:max_problems], _hint(output_path, len(problems) >= max_problems,
                                                                  max_problems))

    out: Iterator[dict[str, Any]] = converted()
    if to == "unpaired":
        out = _to_unpaired(out, result)
    if to == "pairs":
        out = _require_pairs(out, result)
    write_records(output_path, (_count(row, result) for row in out))
    result.kind = "unpaired" if to == "unpaired" else (input_kinds[0] if input_kinds else "")
    return result


def _hint(output_path: str | Path, stopped_early: bool, max_problems: int) -> str:
    where = f"{output_path} is unchanged" if Path(output_path).exists() else f"{output_path} was not written"
    more = f"; these are the first {max_problems} problems, there may be more" if stopped_early else ""
    return (f"nothing was written ({where}{more}). Fix these rows, or pass --skip-invalid to drop rows like these "
            "and count them")


def _chain(first: tuple[Location, Any], rest: Iterator[tuple[Location, Any]]) -> Iterator[tuple[Location, Any]]:
    yield first
    yield from rest


def _convert_row(fmt: str, row: Any, location: Location, input_kinds: list[str],
                 options: ConvertOptions) -> list[dict[str, Any]]:
    if isinstance(row, Malformed):
        raise DataError(Problem(location, None, str(row)))
    if not isinstance(row, dict):
        raise DataError(Problem(location, None, f"expected a JSON object, got {type(row).__name__}"))
    try:
        outputs = CONVERTERS[fmt](row, options)
    except SkipRow:
        raise
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
