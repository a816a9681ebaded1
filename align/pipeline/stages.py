"""The stage runners but train's (:mod:`align.pipeline.chain`): each calls its stage with the pipeline's settings and
hands on the files it wrote by name."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from align.config import load_config
from align.data.io import write_json
from align.data.pairs import build_pairs
from align.data.select import select_sft
from align.label.stages import LabelConfig, run_label
from align.pipeline.config import PipelineConfig, _eval_settings, _evaluates_intermediate
from align.pipeline.links import _original_model, _train_links
from align.pipeline.manifest import Manifest, PipelineWaiting, StageOutput

log = logging.getLogger(__name__)


def _generate(config: PipelineConfig, output: Path) -> StageOutput:
    from align.generate import generate

    settings = {"seed": config.seed, **config.generate, "output": output}
    result = generate(**settings)
    return StageOutput({"candidates": Path(result.output)},
                       {k: v for k, v in vars(result).items() if isinstance(v, (int, float, str))})


def _label(config: PipelineConfig, candidates: Path, output: Path) -> StageOutput:
    if config.label.argilla is not None:
        return _label_with_people(config, candidates, output)
    settings = config.label.model_dump(exclude={"argilla"})
    result = run_label(LabelConfig(**settings, candidates=candidates, output=output))
    return StageOutput({"judgements": Path(result.output)}, {"written": result.written, "labels": dict(result.labels)})


def _label_with_people(config: PipelineConfig, candidates: Path, output: Path) -> StageOutput:
    from align.argilla.loop import label_with_people
    from align.argilla.settings import resolve_settings

    people = config.label.argilla
    assert people is not None
    suggestions = None
    if config.label.rules or config.label.judge_model:
        auto = config.label.model_copy(update={"argilla": None})
        suggestions = _label(config.model_copy(update={"label": auto}), candidates,
                             output.with_name("judgements_auto.jsonl")).files["judgements"]
    result = label_with_people(candidates, people.dataset, output,
                               resolve_settings(workspace=people.workspace), target=people.target,
                               wait_seconds=people.wait_seconds, judgements_path=suggestions, task=people.task,
                               only_uncertain=people.only_uncertain, min_confidence=people.min_confidence,
                               min_submitted=people.min_submitted)
    for line in result.lines():
        log.info("%s", line)
    if result.pulled is None:  # not done: too few answers yet
        raise PipelineWaiting(result.lines()[-1])
    return StageOutput({"judgements": Path(result.pulled.output)},
                       {"submitted": result.submitted, "target": result.target})


def _pairs(config: PipelineConfig, judgements: Path, output: Path, unpaired: Path) -> StageOutput:
    result = build_pairs(judgements, output, seed=config.seed, unpaired=unpaired,
                         **config.pairs.model_dump())
    for line in result.lines():
        log.info("%s", line)
    assert result.unpaired_output is not None  # asked for above: KTO trains on it
    return StageOutput({"pairs": Path(result.output), "unpaired": Path(result.unpaired_output)},
                       {"pairs": result.pairs, "prompts": result.prompts})


def _select(config: PipelineConfig, judgements: Path, output: Path) -> StageOutput:
    result = select_sft(judgements, output, **config.select.model_dump())
    for line in result.lines():
        log.info("%s", line)
    return StageOutput({"sft": Path(result.output)}, {"rows": result.rows, "prompts": result.prompts,
                                                      "prompts_without_answer": result.prompts_without_answer})


def _eval_stage(config: PipelineConfig, manifest: Manifest, output_dir: Path) -> StageOutput:
    """The trained student (a chain's last link) against the original model; with ``intermediate: true``, each
    earlier link against it too, in ``eval/<link>/``, all on the same reference answers."""
    original = _original_model(config)
    if not _evaluates_intermediate(config):
        return _eval(config, manifest.output("train", "run_dir"), output_dir, reference=original)
    shared = {"reference_answers": config.eval.get("reference_answers") or output_dir / "responses_original.jsonl"}
    files: dict[str, Path] = {}
    intermediate: dict[str, Any] = {}
    for link in _train_links(config)[:-1]:
        output = _eval(config, manifest.output("train", f"{link.name}/run_dir"), output_dir / link.name,
                       reference=original, **shared)
        files.update({f"{link.name}/{name}": path for name, path in output.files.items()})
        intermediate[link.name] = output.summary
    final = _eval(config, manifest.output("train", "run_dir"), output_dir, reference=original, **shared)
    return StageOutput({**final.files, **files}, {**final.summary, "intermediate": intermediate})


def _eval(config: PipelineConfig, train_run: Path, output_dir: Path, *, reference: str, **shared: Any) -> StageOutput:
    from align.eval import EvalConfig, run_eval

    # The student is the train stage's run dir: the model layer loads the weights it holds, and eval reads the
    # run's beta from it. The reference is where training started.
    settings = {"seed": config.seed, "reference": reference,
                **_eval_settings(config), **shared, "model": str(train_run), "output_dir": output_dir}
    result = run_eval(load_config(EvalConfig, None, (), defaults=settings))
    m = result.metrics
    return StageOutput({name: Path(path) for name, path in result.files.items()}, {
        k: m.get(k) for k in _EVAL_SUMMARY_KEYS})


# What the manifest's eval summary keeps of metrics.json: the raw and the length-controlled win rate with their
# intervals, ties, and the KL per token (metrics.json has the rest).
_EVAL_SUMMARY_KEYS = ("win_rate", "win_rate_ci_low", "win_rate_ci_high", "lc_win_rate", "lc_win_rate_ci_low",
                      "lc_win_rate_ci_high", "ties", "kl_per_token")


def _export_stage(config: PipelineConfig, manifest: Manifest, output_dir: Path) -> StageOutput:
    """Each format of ``export.quantize`` into ``export/<format>/``; an export already whole there (it is written
    whole or not at all) is kept, so a stopped stage carries on where it was. Then the serve check and the
    benchmarks, if asked for."""
    from align.export import quantize_run

    settings = config.export
    train_run = manifest.output("train", "run_dir")
    files: dict[str, Path] = {}
    summary: dict[str, Any] = {}
    for fmt in settings.quantize:
        folder = output_dir / fmt
        if not (folder / "export.json").exists():
            quantize_run(str(train_run), fmt, folder, calibration=settings.calibration, merge=settings.merge)
        report = json.loads((folder / "export.json").read_text())
        files[fmt] = folder
        summary[fmt] = {"size_bytes": report["size_bytes"], "kl_per_token": report["check"]["kl_per_token"],
                        "next_token_agreement": report["check"]["next_token_agreement"]}
        if settings.serve_check:
            summary[fmt]["serve_check"] = _serve_check(folder, config)
    if settings.tasks:
        from align.eval.retention import RetentionConfig, run_retention

        rows = run_retention(RetentionConfig(tasks=settings.tasks, model=str(train_run),
                                             reference=_original_model(config),
                                             quantized=[str(files[f]) for f in settings.quantize],
                                             output_dir=output_dir / "retention"))
        files["retention"] = output_dir / "retention" / "retention.json"
        summary["retention"] = [{k: r.get(k) for k in ("task", "model", "value", "stderr", "ratio")} for r in rows]
    write_json(output_dir / "exports.json", summary)
    return StageOutput({**files, "summary": output_dir / "exports.json"}, summary)


def _serve_check(folder: Path, config: PipelineConfig) -> dict[str, Any]:
    """Serve ``folder`` with align's own server on a free local port and ask it the first eval prompt, greedily:
    the export loads, serves and answers (what it says is in the summary to read)."""
    import time

    import httpx

    from align.data.io import iter_rows
    from align.export.quantize import GENERAL_PROMPTS
    from align.generate.serving import ServeConfig, build_server
    from align.models.tokens import chat_messages

    prompts = config.eval.get("prompts")
    prompt = next((row["prompt"] for _, row in iter_rows(prompts)), GENERAL_PROMPTS[0]) if prompts else \
        GENERAL_PROMPTS[0]
    server = build_server(ServeConfig(model=str(folder), port=0, engine="align", served_model_name="export")).start()
    try:
        started = time.monotonic()
        response = httpx.post(server.base_url + "/chat/completions", timeout=300, json={
            "model": "export", "messages": chat_messages(prompt), "max_tokens": 64, "temperature": 0})
        response.raise_for_status()
        answer = response.json()["choices"][0]["message"]["content"]
        return {"prompt": prompt, "answer": answer, "seconds": round(time.monotonic() - started, 2)}
    finally:
        server.stop()
