"""The `align` command line. Thin: parse arguments, call a stage function, print its result.

Heavy libraries (torch, transformers) are imported inside the commands, so
``align --help`` answers at once.
"""

from __future__ import annotations

import logging
import sys

import typer

from align.cli import data, generate, label

app = typer.Typer(
    name="align",
    help="Teacher candidates -> preferences (rules, LLM judge, people in Argilla) -> DPO/KTO student -> evaluation.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.add_typer(data.app, name="data")
app.command(name="generate")(generate.generate)
app.add_typer(label.app, name="label")
app.add_typer(label.pairs_app, name="pairs")


def main() -> None:
    from align.errors import AlignError

    logging.basicConfig(level=logging.INFO, format="align: %(message)s", stream=sys.stderr)
    try:
        app()
    except AlignError as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        sys.exit(2)
