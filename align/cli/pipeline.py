"""`align pipeline run`: the whole loop from one config (thin wrapper over align.pipeline)."""

from __future__ import annotations

from pathlib import Path

import typer

app = typer.Typer(help="Run generate -> label -> pairs -> train -> eval from one config.", no_args_is_help=True)


@app.command("run", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def run(
    ctx: typer.Context,
    config: Path = typer.Argument(..., help="Pipeline YAML (see configs/quickstart.yaml)."),
    from_stage: str = typer.Option(None, "--from", help="Rerun from this stage: generate, label, pairs, train, eval."),
) -> None:
    """Run (or finish) a pipeline; finished stages with unchanged inputs are skipped.

    Extra key=value arguments override the config (e.g. seed=1 train.max_steps=10)."""
    from align.pipeline import load_pipeline_config, run_pipeline

    result = run_pipeline(load_pipeline_config(config, list(ctx.args)), from_stage=from_stage)
    if result.waiting:
        typer.echo(f"stopped before the end: {result.waiting}")
        typer.echo(f"stages run: {', '.join(result.ran) or 'none'}; run the same command again to carry on")
        return
    m = result.eval_metrics
    typer.echo("")
    typer.echo(f"stages run: {', '.join(result.ran) or 'none'}; skipped (up to date): {', '.join(result.skipped) or 'none'}")
    typer.echo(f"win rate of the student vs the reference: {m['win_rate']:.3f} "
               f"(95% CI {m['win_rate_ci_low']:.3f}-{m['win_rate_ci_high']:.3f}; "
               f"wins/ties/losses {m['wins']}/{m['ties']}/{m['losses']})")
    if "pass_rate_model" in m:
        typer.echo(f"rule score {m['rule_score_reference']:.3f} -> {m['rule_score_model']:.3f}; "
                   f"hard-rule pass rate {m['pass_rate_reference']:.3f} -> {m['pass_rate_model']:.3f}")
    typer.echo(f"KL(student||reference): {m['kl_per_token']:.4f} per token, {m['kl_per_sequence']:.3f} per sequence")
    typer.echo(f"mean length: {m['mean_length_reference']:.1f} -> {m['mean_length_model']:.1f} tokens; "
               f"hit the cap {m['hit_length_cap_reference']:.2f} -> {m['hit_length_cap_model']:.2f}")
    typer.echo(f"report: {result.report}")
