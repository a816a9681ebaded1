"""`align pipeline run`: the whole loop from one config (thin wrapper over align.pipeline)."""

from __future__ import annotations

from pathlib import Path

import typer

app = typer.Typer(help="Run generate -> label -> pairs [-> select] -> train -> eval from one config.",
                  no_args_is_help=True)


@app.command("run", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def run(
    ctx: typer.Context,
    config: Path = typer.Argument(..., help="Pipeline YAML (see configs/quickstart.yaml)."),
    from_stage: str = typer.Option(None, "--from", help="Rerun from this stage: generate, label, pairs, select (SFT links only), "
                                   "train, eval."),
    from_round: int = typer.Option(1, "--round", help="With --from: rerun from that stage of this round (and in "
                                   "every round after it); default 1."),
) -> None:
    """Run (or finish) a pipeline; finished stages with unchanged inputs are skipped.

    Extra key=value arguments override the config (e.g. seed=1 train.max_steps=10 rounds=3)."""
    from align.eval.report import summary_lines
    from align.pipeline import load_pipeline_config, run_pipeline
    from align.pipeline.summary import read_summary
    from align.pipeline.summary import summary_lines as rounds_lines

    result = run_pipeline(load_pipeline_config(config, list(ctx.args)), from_stage=from_stage, from_round=from_round)
    if result.waiting:
        typer.echo(f"stopped before the end: {result.waiting}")
        typer.echo(f"stages run: {', '.join(result.ran) or 'none'}; run the same command again to carry on")
        if result.rounds_summary:
            typer.echo(f"rounds finished so far: {result.rounds_summary}")
        return
    m = result.eval_metrics
    typer.echo("")
    typer.echo(f"stages run: {', '.join(result.ran) or 'none'}; skipped (up to date): {', '.join(result.skipped) or 'none'}")
    for link in result.links:
        typer.echo(f"train link {link['link']}: from {link['started_from']}; reference: {link['reference']}")
    for name, metrics in result.intermediate.items():
        typer.echo(f"link {name} against the original model:")
        for line in summary_lines(metrics):
            typer.echo(f"  {line}")
    if result.intermediate:
        typer.echo("the last link against the original model:")
    if result.rounds:
        typer.echo(f"round {result.rounds[-1]['round']} against the original model:")
    for line in summary_lines(m):
        typer.echo(line)
    typer.echo(f"report: {result.report}")
    if result.rounds_summary:
        typer.echo("")
        for line in rounds_lines(read_summary(Path(result.run_dir))):
            typer.echo(line)
        typer.echo(f"rounds summary: {result.rounds_summary} (and .json, .png)")
