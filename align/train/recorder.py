"""One training run's dir, written the same way by every recipe (DPO/KTO, distillation).

A recipe builds its trainer and measures what it measures; the recorder writes where and under which
names, so every run dir reads alike:

- ``config.yaml`` (the validated config), ``data.json`` (the data's path, SHA-256 and rows used),
  ``trl_args.json`` (every TRL/transformers argument, defaults included);
- ``metrics.jsonl``, every logged step (:class:`align.train.tracking.MetricsFileCallback`);
- ``eval_before.json``, measured once before the first step (a resumed run reads it back instead of
  measuring a student that has already trained);
- ``checkpoints/``, resumed from the last one that finished saving;
- ``adapter/`` (LoRA) or ``model/`` (a full fine-tune), with the tokenizer;
- ``curves.png`` and ``run.json`` (the recipe's result, plus library versions).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from align.config import dump_config
from align.data.io import ExclusiveLock, write_json
from align.train.checkpoints import last_complete_checkpoint, prepare_run_dir
from align.train.tracking import MetricsFileCallback, configure_wandb, read_metrics


class RunRecorder:
    """Writes one run dir; see the module docstring for its files."""

    def __init__(self, output_dir: str | Path, *, resume: bool, report_to: list[str] | None,
                 started: float | None = None):
        # Refuses a dir that already holds a run unless resuming, or that another process is training in; done
        # before any model is loaded. Other ranks of a distributed run write nothing here and take no lock.
        self.lock = (ExclusiveLock(Path(output_dir) / ".lock", f"run dir {output_dir}")
                     if os.environ.get("RANK", "0") == "0" else None)
        self.run_dir = prepare_run_dir(output_dir, resume)
        self.resume = resume
        self.started = time.time() if started is None else started
        configure_wandb(list(report_to or []), str(self.run_dir))

    def metrics_callback(self) -> MetricsFileCallback:
        return MetricsFileCallback(self.run_dir / "metrics.jsonl")

    def record_setup(self, config: Any, data: dict[str, Any], trl_args: Any) -> None:
        """What the run was asked to do: config, data (with hashes) and the trainer's full arguments. A local
        data path is also recorded resolved: the config keeps it as given, relative to wherever training ran."""
        dump_config(config, self.run_dir / "config.yaml")
        train = data.get("train") or {}
        if isinstance(train.get("path"), str) and Path(train["path"]).exists():
            data = {**data, "train": {**train, "resolved": str(Path(train["path"]).resolve())}}
        write_json(self.run_dir / "data.json", data)
        write_json(self.run_dir / "trl_args.json", json.loads(trl_args.to_json_string()))

    def eval_before(self, measure: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """Held-out figures before the first step: measured once; a resumed run reads them back."""
        path = self.run_dir / "eval_before.json"
        if path.exists():
            return json.loads(path.read_text())
        metrics = measure()
        write_json(path, metrics)
        return metrics

    def record_eval_after(self, metrics: dict[str, Any]) -> None:
        write_json(self.run_dir / "eval_after.json", metrics)

    def train(self, trainer: Any) -> Any:
        """``trainer.train()``, from the last complete checkpoint when resuming."""
        checkpoint = last_complete_checkpoint(self.run_dir) if self.resume else None
        return trainer.train(resume_from_checkpoint=checkpoint)

    def save_weights(self, trainer: Any, *, adapter: bool) -> Path:
        """The trained weights: ``adapter/`` for LoRA, ``model/`` for a full fine-tune."""
        weights = self.run_dir / ("adapter" if adapter else "model")
        trainer.save_model(str(weights))
        return weights

    def metrics(self) -> list[dict[str, Any]]:
        return read_metrics(self.run_dir / "metrics.jsonl")

    def seconds(self) -> float:
        return round(time.time() - self.started, 1)

    def finish(self, trainer: Any, tokenizer: Any, result: Any, metrics: list[dict[str, Any]], *, title: str,
               **extra: Any) -> None:
        """On the main process: the tokenizer beside the weights, the curves plot (its path set on ``result.plot``)
        and ``run.json`` (``result``'s fields, then ``extra``, then library versions)."""
        if not trainer.accelerator.is_main_process:
            return
        import torch
        import transformers
        import trl

        from align.plots import plot_training_curves

        tokenizer.save_pretrained(str(result.weights))
        plot = plot_training_curves(metrics, self.run_dir / "curves.png", title=title)
        result.plot = str(plot) if plot else None
        write_json(self.run_dir / "run.json", {**asdict(result), **extra, "versions": {
            "torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__}})
        self.release()

    def release(self) -> None:
        """Let another process (or a later run in this one) write the run dir; a run that fails lets go when
        the recorder is collected or the process ends."""
        if self.lock is not None:
            self.lock.release()


def final_loss(metrics: list[dict[str, Any]]) -> float | None:
    """The last logged training loss (None before any was logged)."""
    losses = [m["loss"] for m in metrics if "loss" in m]
    return losses[-1] if losses else None
