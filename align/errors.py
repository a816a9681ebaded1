"""Errors that reach users: each says what was wrong, where, and what to do."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


class AlignError(Exception):
    """Base class for errors the CLI prints as one clear message (no traceback)."""


@dataclass(frozen=True)
class Location:
    """Where a record lives: a file plus a 1-based line (text formats) or row (columnar)."""

    path: str
    line: int | None = None
    row: int | None = None

    def __str__(self) -> str:
        if self.line is not None:
            return f"{self.path}:{self.line}"
        if self.row is not None:
            return f"{self.path} row {self.row}"
        return self.path


@dataclass(frozen=True)
class Problem:
    """One thing wrong with one record: where, which field, and why."""

    location: Location
    field: str | None
    message: str

    def __str__(self) -> str:
        where = str(self.location)
        return f"{where}: field '{self.field}': {self.message}" if self.field else f"{where}: {self.message}"


class DataError(AlignError):
    """Bad input data. Carries every problem found (validate reports them all)."""

    def __init__(self, problems: list[Problem] | Problem):
        self.problems = problems if isinstance(problems, list) else [problems]
        if len(self.problems) == 1:
            super().__init__(str(self.problems[0]))
        else:
            super().__init__(f"{len(self.problems)} problems:\n" + "\n".join(f"  {p}" for p in self.problems))

    @classmethod
    def at(cls, path: str | Path, message: str, line: int | None = None,
           field: str | None = None, row: int | None = None) -> "DataError":
        return cls(Problem(Location(str(path), line, row), field, message))


class ConfigError(AlignError):
    """A config file or override that cannot be used as given."""


class BusyError(AlignError):
    """Another align process is writing the same output or run dir; this one stops before writing anything."""


class DiskFullError(AlignError):
    """The disk (or a quota or file-size limit) refused a write; what was written before is intact."""
