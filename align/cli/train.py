"""`align train dpo|kto|sft|orpo|simpo|distill` and `align export`: thin wrappers over align.train."""

from __future__ import annotations

import os
from pathlib import Path

import typer

app = typer.Typer(help="Train a student with DPO, KTO, SFT, ORPO, SimPO or distillation on TRL (LoRA by default; "
                       "key=value sets any TRL option).",
                  no_args_is_help=True)
_EXTRA = {"allow_extra_args": True, "ignore_unknown_options": True}


def _run(method: str, ctx: typer.Context, config: Path | None, model: str | None, data: str | None,
         output_dir: str | None, reference: str | None, resume: bool) -> None:
    from align.train import load_train_config
    from align.train.run import train

    settings = {"model": model, "data": data, "output_dir": output_dir, "reference": reference}
    train_config = load_train_config(method, config, list(ctx.args), **{k: v for k, v in settings.items() if v})
    result = train(train_config, resume=resume)
    if os.environ.get("RANK", "0") != "0":
        return
    typer.echo(f"{method.upper()} finished: {result.steps} steps in {result.seconds:.0f} s, "
               f"final loss {result.final_loss if result.final_loss is None else round(result.final_loss, 4)}")
    typer.echo(f"reference: {result.reference}")
    if result.ref_cache:
        cache = result.ref_cache
        along = cache["rows"] - cache["reused"] - cache["computed"]
        typer.echo(f"reference log-probs: {cache['reused']} of {cache['rows']} rows reused from the cache, "
                   f"{cache['computed']} computed" + (f", {along} whose answers came with those" if along else ""))
    # What an accuracy means before training, when every implicit reward is 0 and ties
    accuracy_note = {"dpo": "share of pairs with chosen reward > rejected; ties count half, so 0.5 before",
                     "kto": "share of (desirable, undesirable) rows in reward order; ties count half, so 0.5 before",
                     "orpo": "share of pairs whose chosen answer has the higher mean log-prob",
                     "simpo": "share of pairs whose chosen answer has the higher mean log-prob"}
    keys = ("loss", "mean_token_accuracy") if method == "sft" else ("rewards/accuracies", "rewards/margins", "kl")
    for key in keys:
        if key in result.eval_after:
            before = result.eval_before.get(key)
            note = f"  ({accuracy_note[method]})" if key == "rewards/accuracies" and method in accuracy_note else ""
            typer.echo(f"held-out {key}: " + (f"{before:.3f} -> " if before is not None else "")
                       + f"{result.eval_after[key]:.3f}" + note)
    typer.echo(f"run dir: {result.run_dir} (weights in {result.weights}, curves in {result.plot})")


def _command(method: str):
    def command(
        ctx: typer.Context,
        config: Path = typer.Option(None, "--config", "-c", help="YAML config (TRL names: beta, max_length, ...)."),
        model: str = typer.Option(None, "--model", help="Student: hub id, folder, run dir or bundled:NAME."),
        data: str = typer.Option(None, "--data", help=_DATA_HELP[method]),
        output_dir: str = typer.Option(None, "--output-dir", "-o", help="Run dir."),
        reference: str = typer.Option(None, "--reference", help="DPO/KTO: 'base' (default) or a model/run spec."),
        resume: bool = typer.Option(False, "--resume", help="Continue from the run dir's last checkpoint."),
    ) -> None:
        _run(method, ctx, config, model, data, output_dir, reference, resume)

    command.__doc__ = f"{_TITLE[method]}. Extra key=value arguments set config keys (e.g. max_steps=8)."
    return command


_TITLE = {"dpo": "DPO training", "kto": "KTO training",
          "sft": "SFT: learn the given answers (loss on completion tokens only); no reference model",
          "orpo": "ORPO training (TRL's experimental ORPOTrainer); no reference model",
          "simpo": "SimPO training (TRL's experimental CPOTrainer, loss_type simpo, cpo_alpha 0); no reference model"}
_DATA_HELP = {"dpo": "Pairs; any `align data convert` input.",
              "kto": "Unpaired rows (pairs are unpaired for you); any `align data convert` input.",
              "sft": "Prompt/completion rows (`align data select`) or conversations (`messages`).",
              "orpo": "Pairs; any `align data convert` input.", "simpo": "Pairs; any `align data convert` input."}
for _method in ("dpo", "kto", "sft", "orpo", "simpo"):
    app.command(_method, context_settings=_EXTRA)(_command(_method))


@app.command("distill", context_settings=_EXTRA)
def distill(
    ctx: typer.Context,
    config: Path = typer.Option(None, "--config", "-c",
                                help="YAML config (TRL GKD names: beta, lmbda, temperature, ...)."),
    model: str = typer.Option(None, "--model", help="Student: hub id, folder, run dir or bundled:NAME."),
    teacher: str = typer.Option(None, "--teacher", help="Teacher model; unset: the data's stored top-k log-probs."),
    teacher_system_prompt: str = typer.Option(None, "--teacher-system-prompt",
                                              help="Seen by the teacher only: text, or @file."),
    data: str = typer.Option(None, "--data",
                             help="Prompts, candidates (align generate), pairs or prompt/completion rows."),
    output_dir: str = typer.Option(None, "--output-dir", "-o", help="Run dir."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the run dir's last checkpoint."),
) -> None:
    """Knowledge distillation: the student learns the teacher's token distributions (GKD; forward/reverse KL,
    JSD). With method=dpo in the config, a DPO run plus a KD term on the chosen answers.

    Extra key=value arguments set config keys (e.g. max_steps=8 lmbda=0.5)."""
    from align.train.distill import load_distill_config
    from align.train.distill.preference import PreferenceDistillConfig, train_with_distillation
    from align.train.distill.run import distill as run_distill

    settings = {"model": model, "teacher": teacher, "teacher_system_prompt": teacher_system_prompt, "data": data,
                "output_dir": output_dir}
    loaded = load_distill_config(config, list(ctx.args), **{k: v for k, v in settings.items() if v})
    if isinstance(loaded, PreferenceDistillConfig):
        result = train_with_distillation(loaded, resume=resume)
        if os.environ.get("RANK", "0") == "0":
            typer.echo(f"DPO + KD finished: {result.steps} steps in {result.seconds:.0f} s, final loss "
                       f"{_round(result.final_loss)}")
            typer.echo(f"run dir: {result.run_dir} (weights in {result.weights}, curves in {result.plot})")
        return
    result = run_distill(loaded, resume=resume)
    if os.environ.get("RANK", "0") != "0":
        return
    typer.echo(f"distillation finished: {result.steps} steps in {result.seconds:.0f} s, final loss "
               f"{_round(result.final_loss)}")
    typer.echo(f"teacher: {result.teacher}")
    for key, label in (("kl_per_token", "KL(teacher||student) per token"), ("token_agreement", "token agreement"),
                       ("exact_match", "greedy exact match")):
        if key in result.eval_after:
            typer.echo(f"held-out {label}: {result.eval_before[key]:.4f} -> {result.eval_after[key]:.4f}")
    typer.echo(f"run dir: {result.run_dir} (weights in {result.weights}, curves in {result.plot})")


def _round(value: float | None) -> float | None:
    return value if value is None else round(value, 4)
