"""`align data ...`: convert other people's preference files, validate any align file, select SFT rows."""

from __future__ import annotations

from pathlib import Path

import typer

from align.data.formats import FORMATS

app = typer.Typer(help="Convert and validate data files; select SFT rows from judgements.", no_args_is_help=True)


@app.command()
def convert(
    input: Path = typer.Argument(..., help="File to convert (.json, .jsonl, .parquet, .gz, or a datasets folder)."),
    output: Path = typer.Option(..., "-o", "--output", help="Where to write TRL-shaped JSONL (or .json/.parquet)."),
    format: str = typer.Option("auto", "--format", help=f"Input format: auto, {', '.join(FORMATS)}."),
    to: str = typer.Option(None, "--to", help="'unpaired' turns pairs into KTO rows (chosen: true, rejected: false)."),
    skip_invalid: bool = typer.Option(False, "--skip-invalid", help="Drop bad rows (and count them) instead of failing."),
) -> None:
    """Convert HH-RLHF, ShareGPT/LLaMA-Factory or TRL data into TRL's pairs or unpaired shape."""
    from align.data.convert import convert_file

    result = convert_file(input, output, fmt=format, to=to, skip_invalid=skip_invalid)
    if result.detected:
        typer.echo(f"detected format: {result.format}")
    line = f"wrote {result.count} {result.kind} to {result.output}"
    if result.labels:
        line += " (" + ", ".join(f"{str(k).lower()}: {v}" for k, v in sorted(result.labels.items(), reverse=True)) + ")"
    typer.echo(line)
    if result.duplicates_dropped:
        typer.echo(f"dropped {result.duplicates_dropped} repeated completions (same prompt and text as an earlier row)")
    if result.skipped:
        typer.echo(f"skipped {result.skipped} invalid rows")


@app.command()
def validate(
    file: Path = typer.Argument(..., help="Any align data file: prompts, candidates, judgements, pairs, unpaired, sft."),
    kind: str = typer.Option(None, "--kind", help="Expected kind (detected from the first record if not given)."),
    max_problems: int = typer.Option(20, "--max-problems", help="How many problems to print at most."),
) -> None:
    """Count the records and report every problem found (exit 1 if any)."""
    from align.data.validate import validate_file

    report = validate_file(file, kind=kind, max_problems=max_problems)
    for line in report.summary_lines():
        typer.echo(line)
    for problem in report.problems:
        typer.echo(f"  problem: {problem}")
    if report.problem_count > len(report.problems):
        typer.echo(f"  ... and {report.problem_count - len(report.problems)} more problems")
    if not report.ok:
        raise typer.Exit(1)


@app.command()
def select(
    judgements: Path = typer.Argument(..., help="Judgements of the teacher's candidates (`align label ...`)."),
    output: Path = typer.Option(..., "-o", "--output", help="Where to write SFT rows (prompt/completion JSONL)."),
    top_k: int = typer.Option(1, "--top-k", help="Answers kept per prompt, best first."),
    min_score: float = typer.Option(None, "--min-score", help="Keep no answer scoring below this (rejection sampling)."),
    near_duplicate: float = typer.Option(0.9, "--near-duplicate",
                                         help="Word-set Jaccard at which two answers count as one (top-k > 1)."),
    judge_name: str = typer.Option(None, "--judge", help="Use this labeler's judgements when the file has several."),
    reasoning: str = typer.Option("drop", "--reasoning",
                                  help="keep: the teacher's reasoning as <think>...</think> before the answer; drop."),
) -> None:
    """Keep the teacher's best answer(s) per prompt by the labelers' scores, as SFT rows for `align train sft`."""
    from align.data.select import select_sft

    result = select_sft(judgements, output, top_k=top_k, min_score=min_score, near_duplicate=near_duplicate,
                        judge=judge_name, reasoning=reasoning)
    for line in result.lines():
        typer.echo(line)
