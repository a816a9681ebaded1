"""`align label ...` and `align pairs ...`: rules, LLM judge, agreement, pair building."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from align.cli.options import text_or_file_option
from align.data.pairs import DEFAULT_MAX_PAIRS_PER_PROMPT, DEFAULT_MIN_MARGIN, DEFAULT_STRATEGY

app = typer.Typer(help="Label candidates automatically: rules, an LLM judge; agreement between labelers.",
                  no_args_is_help=True)
pairs_app = typer.Typer(help="Build DPO pairs and KTO rows from judgements.", no_args_is_help=True)


def _echo(lines: list[str]) -> None:
    for line in lines:
        typer.echo(line)


@app.command()
def rules(
    candidates: Path = typer.Argument(..., help="Candidates JSONL from `align generate`."),
    rules_file: Path = typer.Option(..., "--rules", help="Rules YAML (see configs/rules/)."),
    output: Path = typer.Option(..., "-o", "--output", help="Judgements JSONL (appended; a rerun resumes)."),
    strict: bool = typer.Option(False, "--strict", help="Stop at the first rule function that raises."),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Score every candidate with declarative rules: one pointwise judgement per response."""
    from align.label.stages import label_rules

    _echo(label_rules(candidates, rules_file, output, strict=strict, progress=progress).lines())


@app.command()
def judge(
    candidates: Path = typer.Argument(..., help="Candidates JSONL from `align generate`."),
    model: str = typer.Option(None, "--model", help="Judge model: bundled:..., a folder, a hub id, or the "
                                                    "served model's name with --base-url. Default: the bundled model."),
    output: Path = typer.Option(..., "-o", "--output", help="Judgements JSONL (appended; a rerun resumes)."),
    mode: str = typer.Option("pairwise", "--mode", help="pairwise (A vs B, both orders) or pointwise."),
    scale: str = typer.Option("10", "--scale", help="Pointwise scale: 10 (ratings 1-10) or good-bad."),
    rubric: str = typer.Option(None, "--rubric", help="The judge's instructions, as text or @file."),
    rules_file: Path = typer.Option(None, "--rules", help="Rules YAML: filters and clear rule differences decide "
                                                          "first, the judge decides the rest."),
    rules_margin: float = typer.Option(0.2, "--rules-margin", help="Rule-score gap at which rules decide a pair."),
    length_penalty: float = typer.Option(0.0, "--length-penalty", help="Move verdicts against the longer answer "
                                                                        "(0 = only report the length preference)."),
    tie_margin: float = typer.Option(0.05, "--tie-margin", help="|P - 0.5| at or below this is a tie."),
    base_url: str = typer.Option(None, "--base-url", help="OpenAI-compatible server (e.g. http://host:8000/v1)."),
    api_key_env: str = typer.Option(None, "--api-key-env", help="Environment variable holding the API key."),
    batch_size: int = typer.Option(8, "--batch-size", help="Questions per forward pass (local model)."),
    max_response_tokens: int = typer.Option(512, "--max-response-tokens", help="Cut longer responses (local)."),
    concurrency: int = typer.Option(4, "--concurrency", help="Parallel requests (HTTP judge)."),
    route_below: float = typer.Option(None, "--route-below", help="Send verdicts below this confidence (and "
                                                                  "unparsed or position-inconsistent ones) to --review."),
    review: Path = typer.Option(None, "--review", help="JSONL for human review (the Argilla loop reads it)."),
    strict: bool = typer.Option(False, "--strict", help="Stop at the first rule function that raises."),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Judge candidates with an LLM: pairwise in both orders (debiased) or pointwise."""
    from align.errors import ConfigError
    from align.label.judge import JudgeSettings, make_backend
    from align.label.stages import label_judge
    from align.models import DEFAULT_MODEL

    if mode not in ("pairwise", "pointwise"):
        raise ConfigError(f"--mode {mode!r}: use pairwise or pointwise")
    if scale not in ("10", "good-bad"):
        raise ConfigError(f"--scale {scale!r}: use 10 or good-bad")
    if base_url and not model:
        raise ConfigError("--base-url needs --model: the model name the server serves")
    backend = make_backend(model or DEFAULT_MODEL, base_url=base_url, api_key_env=api_key_env, batch_size=batch_size,
                           max_response_tokens=max_response_tokens, concurrency=concurrency)
    settings = JudgeSettings(mode=mode, scale=scale,  # type: ignore[arg-type]
                             rubric=text_or_file_option(rubric, "--rubric", "rubric"), tie_margin=tie_margin,
                             length_penalty=length_penalty)
    result = label_judge(candidates, output, backend=backend, settings=settings, rules_path=rules_file,
                         rules_margin=rules_margin, route_below=route_below, review=review, strict=strict,
                         progress=progress)
    _echo(result.lines())


@app.command()
def agreement(
    a: Path = typer.Argument(..., help="Judgements from one labeler."),
    b: Path = typer.Argument(..., help="Judgements from another labeler."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Agreement and Cohen's kappa between two labelers on the items both judged."""
    from align.data.validate import load_records
    from align.label.agreement import compare

    result = compare(load_records(a, "judgements"), load_records(b, "judgements"))
    if as_json:
        typer.echo(json.dumps(result.summary(), indent=1))
        return
    typer.echo(f"shared {result.unit}: {result.items} (only in A: {result.only_in_a}, only in B: {result.only_in_b})")
    if not result.items:
        typer.echo("nothing to compare: the two files share no items")
        return
    kappa = "undefined (one label only)" if result.kappa != result.kappa else f"{result.kappa:.3f}"
    typer.echo(f"agreement: {result.agreement:.1%}   Cohen's kappa: {kappa}")
    for (label_a, label_b), count in sorted(result.confusion.items()):
        typer.echo(f"  A {label_a:<9} B {label_b:<9} {count}")


@pairs_app.command()
def build(
    judgements: Path = typer.Argument(..., help="Judgements JSONL (rules, judge, or people)."),
    output: Path = typer.Option(..., "-o", "--output", help="Pairs file (prompt/chosen/rejected)."),
    strategy: str = typer.Option(DEFAULT_STRATEGY, "--strategy", help="best-worst, all-pairs or random-pair."),
    min_margin: float = typer.Option(DEFAULT_MIN_MARGIN, "--min-margin", help="Smallest score gap for a pair (ties never pair)."),
    near_duplicate: float = typer.Option(0.9, "--near-duplicate", help="Word-set Jaccard at which two answers "
                                                                         "count as the same (no pair)."),
    seed: int = typer.Option(0, "--seed", help="Seed for random-pair."),
    max_pairs_per_prompt: int = typer.Option(DEFAULT_MAX_PAIRS_PER_PROMPT, "--max-pairs-per-prompt",
                                             help="all-pairs keeps each prompt's widest N (0: every pair)."),
    judge_name: str = typer.Option(None, "--judge", help="Use this labeler's judgements when a file mixes several."),
    unpaired: Path = typer.Option(None, "--unpaired", help="Also write KTO rows (prompt/completion/label) here."),
    unpaired_by: str = typer.Option("rank", "--unpaired-by", help="rank (top vs bottom per prompt) or threshold."),
    desirable_min: float = typer.Option(None, "--desirable-min", help="threshold: desirable at or above this."),
    undesirable_max: float = typer.Option(None, "--undesirable-max", help="threshold: undesirable at or below "
                                                                          "this (default: below --desirable-min)."),
) -> None:
    """Build DPO pairs (and optionally KTO rows, with the class balance) from judgements."""
    from align.data.pairs import build_pairs

    result = build_pairs(judgements, output, strategy=strategy, min_margin=min_margin, near_duplicate=near_duplicate,
                         seed=seed, max_pairs_per_prompt=max_pairs_per_prompt, judge=judge_name, unpaired=unpaired,
                         unpaired_by=unpaired_by, desirable_min=desirable_min, undesirable_max=undesirable_max)
    _echo(result.lines())
