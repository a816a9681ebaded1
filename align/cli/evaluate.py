"""`align eval`: student vs reference on held-out prompts (thin wrapper over align.eval)."""

from __future__ import annotations

from pathlib import Path

import typer


def evaluate(
    ctx: typer.Context,
    model: str = typer.Option(..., "--model", help="Student: training run dir, any model spec, or the URL of an "
                                                  "OpenAI-compatible server serving it (align serve, vLLM)."),
    reference: str = typer.Option(None, "--reference", help="Reference model (usually the student's starting point)."),
    prompts: Path = typer.Option(None, "--prompts", help="Held-out prompts (JSONL)."),
    tasks: str = typer.Option(None, "--tasks", help="Instead of prompts: benchmarks through lm-evaluation-harness "
                                                    "(comma-separated task names or YAMLs; everyday_mc is shipped) "
                                                    "on the student, --reference and each --quantized export."),
    quantized: list[str] = typer.Option(None, "--quantized", help="--tasks: a quantised export of the student "
                                                                  "(repeatable): its quantisation loss."),
    limit: int = typer.Option(None, "--limit", min=1, help="--tasks: questions per task (default: all)."),
    judge: Path = typer.Option(None, "--judge", help="Rules YAML used as the judge."),
    judge_model: str = typer.Option(None, "--judge-model", help="LLM judge (pairwise, both orders)."),
    pairs: Path = typer.Option(None, "--pairs", help="Held-out pairs for implicit-reward accuracy."),
    teacher: str = typer.Option(None, "--teacher", help="Teacher: the student's per-token KL to it and agreement."),
    teacher_system_prompt: str = typer.Option(None, "--teacher-system-prompt",
                                              help="Seen by the teacher only: text, or @file."),
    samples_per_prompt: int = typer.Option(None, "--samples-per-prompt", min=1,
                                           help="Answers per prompt and model (default 1); the k-th are compared "
                                                "and the intervals resample prompts."),
    greedy: bool = typer.Option(False, "--greedy",
                                help="One greedy answer per prompt and model (KL is then only a log-ratio)."),
    output_dir: Path = typer.Option(..., "-o", "--output-dir", help="Report dir."),
    config: Path = typer.Option(None, "--config", "-c", help="YAML with any of these settings."),
) -> None:
    """Win rate (with a 95% interval), rule scores, KL and length drift of a student against its reference.

    Extra key=value arguments set any other setting (max_new_tokens=64, seed=1, ...)."""
    from align.config import load_config
    from align.eval import EvalConfig, run_eval
    from align.eval.report import summary_lines

    if tasks:
        _retention(ctx, model, reference, tasks, quantized, limit, output_dir, config)
        return
    settings = {"model": model, "reference": reference, "prompts": prompts, "judge": judge,
                "judge_model": judge_model, "pairs": pairs, "output_dir": output_dir, "teacher": teacher,
                "teacher_system_prompt": teacher_system_prompt, "samples_per_prompt": samples_per_prompt,
                "decoding": "greedy" if greedy else None}
    result = run_eval(load_config(EvalConfig, config, list(ctx.args), updates=settings))
    m = result.metrics
    for line in summary_lines(m):
        typer.echo(line)
    if "teacher" in m:
        t = m["teacher"]
        typer.echo(f"KL(teacher||student): {t['kl_per_token']:.4f} per token; token agreement "
                   f"{t['token_agreement']:.3f}; greedy exact match {t['exact_match']:.3f}")
    typer.echo(f"report: {result.report}")


def _retention(ctx: typer.Context, model: str, reference: str | None, tasks: str, quantized: list[str] | None,
               limit: int | None, output_dir: Path, config: Path | None) -> None:
    from align.config import load_config
    from align.eval.retention import RetentionConfig, markdown, run_retention

    settings = {"model": model, "reference": reference, "tasks": [t for t in tasks.split(",") if t],
                "quantized": quantized or None, "limit": limit, "output_dir": output_dir}
    rows = run_retention(load_config(RetentionConfig, config, list(ctx.args), updates=settings))
    typer.echo(markdown(rows), nl=False)
    typer.echo(f"report: {output_dir / 'retention.md'}")
