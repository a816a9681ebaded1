"""`align label ...` and `align pairs ...`: rules, LLM judge, agreement, pair building (issue 4 fills this in)."""

from __future__ import annotations

import typer

app = typer.Typer(help="Label candidates automatically: rules, an LLM judge; agreement between labelers.",
                  no_args_is_help=True)
pairs_app = typer.Typer(help="Build DPO pairs and KTO rows from judgements.", no_args_is_help=True)
