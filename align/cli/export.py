"""`align export`: a run as a standalone model folder, or a quantised copy of it."""

from __future__ import annotations

import json
from pathlib import Path

import typer


def export(
    run: str = typer.Argument(..., help="Training run dir, adapter folder or model (folder, hub id, bundled:NAME)."),
    output: Path = typer.Option(..., "-o", "--output", help="Folder for the exported model (must not exist)."),
    merge: bool = typer.Option(None, "--merge/--keep-adapter", show_default=False,
                               help="Merge a LoRA run's adapter into the base weights, or keep it apart. Default: "
                                    "apart, except --quantize at 8 bits (a 4-bit GGUF keeps it apart at 16 bits: "
                                    "merged, 4-bit rounding erases most of the alignment)."),
    quantize: str = typer.Option(None, "--quantize", help="Write a quantised copy: q8_0, q4_0, q4_1 (GGUF, CPU); "
                                                          "bnb-4bit, gptq-w4a16, fp8 (GPU). 'list' says more."),
    calibration: str = typer.Option(None, "--calibration", help="--quantize: prompts to calibrate and check on "
                                                                "(default: the run's own training data)."),
) -> None:
    """Export a trained run as a model folder (`save_pretrained` + tokenizer), or quantised (--quantize)."""
    from align.export import describe_formats, export_run, quantize_run

    if quantize == "list":
        typer.echo(describe_formats().replace("; ", "\n"))
        return
    if not quantize:
        out = export_run(run, output, merge=bool(merge))
        typer.echo(f"exported {run} to {out}")
        return
    out = quantize_run(run, quantize, output, calibration=calibration, merge=merge)
    report = json.loads((out / "export.json").read_text())
    check = report["check"]
    adapter = f" + LoRA adapter {report['adapter']['gguf']}" if report["adapter"] else ""
    typer.echo(f"exported {run} as {report['format']} to {out / (report['file'] or '')}{adapter}: "
               f"{report['size_bytes'] / 1e6:.1f} MB ({report['size_bytes'] / report['float_size_bytes']:.2f}x the "
               f"float weights' {report['float_size_bytes'] / 1e6:.1f} MB)")
    typer.echo(f"check on {check['prompts']} prompts ({report['calibration']['from']}): KL {check['kl_per_token']} "
               f"per token, next-token agreement {check['next_token_agreement']}")
    typer.echo(f"smoke answer: {check['smoke']['answer'][:200]!r}")
