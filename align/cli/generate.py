"""`align generate`: the teacher writes N candidate responses per prompt (issue 3 fills this in)."""

from __future__ import annotations

import typer


def generate() -> None:
    """Write N candidate responses per prompt with a teacher model."""
    raise typer.Exit("align generate is not implemented yet")
