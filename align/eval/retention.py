"""Capability retention: standard benchmarks (EleutherAI's lm-evaluation-harness) on a student, its reference and
its quantised exports, so that a user sees what alignment cost ("alignment tax": student / reference) and what
quantising cost ("quantisation loss": export / student).

Each model is loaded the way every align stage loads it (a run dir with its adapter, a GGUF export dequantised,
``bundled:NAME``) and handed to the harness as a model object. A task is a harness task name (its data where the
harness finds it), a task YAML path, or a task shipped in ``datasets/retention/`` (``everyday_mc``, offline).
Differences between two models are paired question by question: both answer the same questions, so the
standard error of the difference is that of the per-question differences, far tighter than two separate ones.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

from pydantic import Field

from align.config import StrictConfig
from align.data.io import write_json, write_text
from align.errors import ConfigError
from align.extras import require

log = logging.getLogger(__name__)

SHIPPED_TASKS = Path(__file__).resolve().parents[2] / "datasets" / "retention"
METRICS = ("acc", "acc_norm", "exact_match")  # the first a task reports is its headline figure


class RetentionConfig(StrictConfig):
    tasks: list[str] = Field(..., min_length=1, description="harness task names, task YAML paths or shipped tasks")
    model: str = Field(..., description="the student")
    reference: str | None = Field(None, description="the model it started from: the alignment tax")
    quantized: list[str] = Field(default_factory=list, description="quantised exports of the student")
    output_dir: Path
    limit: int | None = Field(None, ge=1, description="questions per task (default: all)")
    batch_size: int = Field(8, ge=1)
    device: str | None = None


def task_config(task: str) -> str | dict[str, Any]:
    """What the harness gets for ``task``: a config dict for a YAML file (shipped or given), its data files made
    absolute (relative to the YAML, which the harness would read relative to the working directory), else the
    name itself."""
    import yaml

    path = Path(task)
    if path.suffix not in (".yaml", ".yml"):
        shipped = SHIPPED_TASKS / f"{task}.yaml"
        if not shipped.is_file():
            return task
        path = shipped
    if not path.is_file():
        raise ConfigError(f"--tasks {task}: no such task file")
    config = yaml.safe_load(path.read_text())
    files = (config.get("dataset_kwargs") or {}).get("data_files")
    if isinstance(files, dict):
        config["dataset_kwargs"]["data_files"] = {split: str((path.parent / f).resolve()) for split, f in files.items()}
    elif isinstance(files, str):
        config["dataset_kwargs"]["data_files"] = str((path.parent / files).resolve())
    return config


def headline(results: dict[str, Any]) -> tuple[str, float, float | None]:
    """A task's first standard metric: (name, value, standard error)."""
    for metric in METRICS:
        if f"{metric},none" in results:
            stderr = results.get(f"{metric}_stderr,none")
            return metric, float(results[f"{metric},none"]), None if stderr in (None, "N/A") else float(stderr)
    raise ConfigError(f"the task reports none of {', '.join(METRICS)}: {sorted(results)}")


def paired_difference(a: list[float], b: list[float]) -> tuple[float, float]:
    """Mean of b - a over the same questions, and its standard error."""
    diffs = [y - x for x, y in zip(a, b, strict=True)]
    n = len(diffs)
    mean = sum(diffs) / n
    variance = sum((d - mean) ** 2 for d in diffs) / (n - 1) if n > 1 else 0.0
    return mean, math.sqrt(variance / n)


def evaluate_model(spec: str, tasks: list[str], *, limit: int | None, batch_size: int, device: str | None
                   ) -> dict[str, dict[str, Any]]:
    """Per task: headline metric, value, standard error, and the per-question scores (in document order)."""
    require("lm_eval", "align eval --tasks (capability retention)", extra="harness")
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    from align.models import load_model, load_tokenizer, resolve_model

    source = resolve_model(spec)
    model = load_model(source, device=device, merge_adapter=bool(source.adapter))
    harness = HFLM(pretrained=model, tokenizer=load_tokenizer(source), batch_size=batch_size)
    configs = [task_config(t) for t in tasks]
    out = simple_evaluate(model=harness, tasks=configs, limit=limit, log_samples=True,
                          bootstrap_iters=1000, random_seed=0, numpy_random_seed=0, torch_random_seed=0)
    scores: dict[str, dict[str, Any]] = {}
    names = [c["task"] if isinstance(c, dict) else c for c in configs]
    for task, name in zip(tasks, names, strict=True):
        metric, value, stderr = headline(out["results"][name])
        samples = sorted(out["samples"][name], key=lambda s: s["doc_id"])
        scores[task] = {"task": name, "metric": metric, "value": value, "stderr": stderr,
                        "per_question": [float(s[metric]) for s in samples]}
    return scores


def retention_rows(scores: dict[str, dict[str, dict[str, Any]]], roles: dict[str, str]) -> list[dict[str, Any]]:
    """One row per task and model: its score, and the ratio and paired difference to the model it is judged
    against (the student against the reference; an export against the student)."""
    against = {"student": "reference", **{r: "student" for r in roles if r.startswith("quantized")}}
    rows = []
    for role, spec in roles.items():
        for task, score in scores[role].items():
            row = {"task": task, "model": role, "spec": spec, "metric": score["metric"],
                   "value": round(score["value"], 4), "stderr": None if score["stderr"] is None
                   else round(score["stderr"], 4)}
            base = scores.get(against.get(role, ""), {}).get(task)
            if base is not None:
                diff, se = paired_difference(base["per_question"], score["per_question"])
                row.update(against=against[role], ratio=round(score["value"] / base["value"], 4)
                           if base["value"] else None, difference=round(diff, 4), difference_stderr=round(se, 4))
            rows.append(row)
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| task | model | score (± s.e.) | vs | ratio | difference (± paired s.e.) |", "|---|---|---|---|---|---|"]
    for r in rows:
        score = f"{r['metric']} {r['value']:.3f}" + (f" ± {r['stderr']:.3f}" if r["stderr"] is not None else "")
        vs = (r.get("against", ""), f"{r['ratio']:.3f}" if r.get("ratio") is not None else "",
              f"{r['difference']:+.3f} ± {r['difference_stderr']:.3f}" if "difference" in r else "")
        lines.append(f"| {r['task']} | {r['model']} ({r['spec']}) | {score} | {' | '.join(vs)} |")
    return "\n".join(lines) + "\n"


def run_retention(config: RetentionConfig) -> list[dict[str, Any]]:
    roles = {"student": config.model}
    if config.reference:
        roles = {"reference": config.reference, **roles}
    roles.update({f"quantized-{i + 1}" if len(config.quantized) > 1 else "quantized": q
                  for i, q in enumerate(config.quantized)})
    for task in config.tasks:
        task_config(task)  # a missing task file fails before any model loads
    scores = {}
    for role, spec in roles.items():
        log.info("retention: %s (%s) on %s", role, spec, ", ".join(config.tasks))
        scores[role] = evaluate_model(spec, config.tasks, limit=config.limit, batch_size=config.batch_size,
                                      device=config.device)
    rows = retention_rows(scores, roles)
    config.output_dir.mkdir(parents=True, exist_ok=True)
    write_json(config.output_dir / "retention.json", {"tasks": config.tasks, "limit": config.limit, "rows": rows,
                                                     "per_question": {r: {t: s["per_question"] for t, s in v.items()}
                                                                      for r, v in scores.items()}})
    write_text(config.output_dir / "retention.md", markdown(rows))
    return rows


__all__ = ["RetentionConfig", "headline", "paired_difference", "retention_rows", "run_retention", "task_config"]
