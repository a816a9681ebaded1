"""Run the real `align` entry point in-process (same error handling and exit codes as the console script)."""

from __future__ import annotations

import sys

import pytest


def run_align(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    from align.cli import main

    argv = sys.argv
    sys.argv = ["align", *map(str, args)]
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        sys.argv = argv
    out, err = capsys.readouterr()
    return code, out, err
