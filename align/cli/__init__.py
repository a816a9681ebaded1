"""The `align` command line. Thin: parse arguments, call a stage function, print its result.

Heavy libraries (torch, transformers) are imported inside the commands, so
``align --help`` answers at once.
"""

from __future__ import annotations

import logging
import os
import sys

import typer

from align.cli import argilla, data, evaluate, export, generate, label, pipeline, serve, train

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
app.add_typer(train.app, name="train")
app.add_typer(argilla.app, name="argilla")
app.command(name="export")(export.export)
app.add_typer(pipeline.app, name="pipeline")
app.command(name="serve")(serve.serve)
app.command(name="eval", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})(evaluate.evaluate)


def main() -> None:
    from align.errors import AlignError

    # align's own messages at INFO; libraries keep their defaults (WARNING).
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("align: %(message)s"))
    logger = logging.getLogger("align")
    logger.addHandler(handler)
    # Under `accelerate launch`, only the main process talks.
    logger.setLevel(logging.INFO if os.environ.get("RANK", "0") == "0" else logging.WARNING)
    logger.propagate = False
    try:
        app()
    except AlignError as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        sys.exit(2)
