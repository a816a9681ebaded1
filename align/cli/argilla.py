"""`align argilla ...`: a local Argilla, and the push/pull loop with people labeling in its UI."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from align.cli.options import text_or_file_option

app = typer.Typer(help="People label in Argilla: run a local one, push candidates with suggestions, pull answers.",
                  no_args_is_help=True)

_HOME = typer.Option(None, "--home", help="The local stack's folder (default: $ALIGN_ARGILLA_HOME or "
                                          "~/.cache/align/argilla).")
_CONFIG = typer.Option(None, "--config", help="YAML with api_url / api_key / workspace (the environment's "
                                              "ARGILLA_API_URL and ARGILLA_API_KEY win).")
_WORKSPACE = typer.Option(None, "--workspace", help="Argilla workspace (default: the user's default one).")


def _echo(lines: list[str]) -> None:
    for line in lines:
        typer.echo(line)


@app.command()
def up(home: Path = _HOME) -> None:
    """Start a local Argilla on 127.0.0.1 (installs the server into its own venv the first time)."""
    from align.argilla.local import credential_lines
    from align.argilla.local import up as start

    _echo(start(home).lines() + credential_lines())


@app.command()
def down(home: Path = _HOME) -> None:
    """Stop the local Argilla (its data stays for the next `up`)."""
    from align.argilla.local import down as stop

    stopped = stop(home)
    typer.echo(f"stopped {', '.join(stopped)}" if stopped else "nothing was running")


@app.command()
def status(home: Path = _HOME) -> None:
    """Is the local Argilla running, where, and with which processes."""
    from align.argilla.local import status as current

    result = current(home)
    _echo(result.lines())
    if result.state is not None and not result.running:
        raise typer.Exit(1)


@app.command()
def push(
    candidates: Path = typer.Argument(..., help="Candidates JSONL from `align generate`."),
    dataset: str = typer.Option(..., "--dataset", help="Argilla dataset name (created if missing)."),
    judgements: Path = typer.Option(None, "--judgements", help="Auto-labels (`align label ...`) shown as "
                                                               "suggestions with their score and labeler."),
    task: str = typer.Option(None, "--task", help="pairwise, single (good/bad) or ranking; default: from the data."),
    only_uncertain: bool = typer.Option(False, "--only-uncertain", help="Push only records whose auto-label is "
                                                                        "uncertain (see --min-confidence) or routed "
                                                                        "to review."),
    min_confidence: float = typer.Option(0.8, "--min-confidence", help="With --only-uncertain: verdicts below this "
                                                                       "confidence go to people."),
    min_submitted: int = typer.Option(None, "--min-submitted", help="Annotators per record, for overlap and "
                                                                    "agreement (new datasets: 1; an existing one "
                                                                    "keeps its own unless given)."),
    guidelines: str = typer.Option(None, "--guidelines", help="Annotation guidelines, markdown text or @file "
                                                              "(default: the task's own; kept unless given)."),
    force: bool = typer.Option(False, "--force", help="If the dataset exists with other questions, delete it "
                                                      "(and its answers) and create it again."),
    home: Path = _HOME, config: Path = _CONFIG, workspace: str = _WORKSPACE,
) -> None:
    """Push candidates as records to label; pushing the same data again updates, never duplicates."""
    from align.argilla.push import push as run_push
    from align.argilla.settings import resolve_settings

    settings = resolve_settings(config, home=home, workspace=workspace)
    _echo(run_push(candidates, dataset, settings, judgements_path=judgements, task=task,
                   only_uncertain=only_uncertain, min_confidence=min_confidence, min_submitted=min_submitted,
                   guidelines=text_or_file_option(guidelines, "--guidelines", "guidelines"), force=force).lines())


@app.command()
def pull(
    dataset: str = typer.Option(..., "--dataset", help="Argilla dataset name."),
    output: Path = typer.Option(..., "-o", "--output", help="Judgements JSONL (replaced atomically)."),
    report: Path = typer.Option(None, "--report", help="Also write the counts and agreement figures as JSON."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
    home: Path = _HOME, config: Path = _CONFIG, workspace: str = _WORKSPACE,
) -> None:
    """Pull submitted answers as judgements (majority over annotators) with agreement figures."""
    from align.argilla.pull import pull as run_pull
    from align.argilla.settings import resolve_settings

    result = run_pull(dataset, output, resolve_settings(config, home=home, workspace=workspace), report=report)
    if as_json:
        typer.echo(json.dumps(result.summary(), indent=1, sort_keys=True))
    else:
        _echo(result.lines())
