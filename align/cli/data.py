"""`align data ...`: convert other people's preference files, validate any align file, select SFT rows."""

from __future__ import annotations

from pathlib import Path

import typer

from align.data.formats import FORMATS

app = typer.Typer(help="Convert and validate data files; select SFT rows from judgements.", no_args_is_help=True)


@app.command()
def convert(
    input: str = typer.Argument(..., help="File to convert (.json, .jsonl, .parquet, .gz), a datasets folder, or a "
                                          "hub dataset id (datasets.load_dataset; its offline cache with "
                                          "HF_HUB_OFFLINE=1)."),
    output: Path = typer.Option(..., "-o", "--output", help="Where to write TRL-shaped JSONL (or .json/.parquet)."),
    format: str = typer.Option("auto", "--format", help=f"Input format: auto, {', '.join(FORMATS)}."),
    to: str = typer.Option(None, "--to", help="'unpaired' turns pairs into KTO rows (chosen: true, rejected: false)."),
    skip_invalid: bool = typer.Option(False, "--skip-invalid", help="Drop bad rows (and count them) instead of failing."),
    early_divergence: str = typer.Option(
        "pairs", "--early-divergence",
        help="Conversations whose chosen and rejected differ before the final assistant turn (HH-RLHF, implicit-"
             "prompt pairs): 'pairs' keeps them with the shared turns as prompt and the diverging multi-turn tails "
             "as chosen/rejected (TRL's extract_prompt); 'skip' drops and counts them."),
    rank_by: str = typer.Option(
        "mean", "--rank-by",
        help="UltraFeedback (raw): rank completions by the 'mean' of the aspect ratings (fine-grained score) or by "
             "the critique's 'overall' score; the pair is the best and the worst."),
    split: str = typer.Option("train", "--split", help="The split of a datasets folder or hub dataset."),
    limit: int = typer.Option(None, "--limit", help="Convert the first N records only."),
) -> None:
    """Convert HH-RLHF, UltraFeedback, distilabel, OpenAI, ShareGPT/LLaMA-Factory or TRL data into TRL's pairs,
    unpaired or SFT shape."""
    from align.data.convert import convert_file

    result = convert_file(input, output, fmt=format, to=to, skip_invalid=skip_invalid,
                          early_divergence=early_divergence, rank_by=rank_by, split=split, limit=limit)
    for line in result.lines():
        typer.echo(line)


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
