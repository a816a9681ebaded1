"""The train stage: one stage, or a chain of links each starting from the weights of the link before, each link
recorded in the manifest under ``train/<n>-<method>`` so a chain stopped part-way carries on at its first unfinished
link."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from align.pipeline.config import PipelineConfig, _is_chain
from align.pipeline.files import _remove
from align.pipeline.hashes import _hash_input, stage_settings_hash
from align.pipeline.links import TrainLink, _link_config, _link_reference, _train_config, _train_links
from align.pipeline.manifest import Manifest, StageOutput, _run_recorded

if TYPE_CHECKING:
    from align.train.config import TrainConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RoundStart:
    """Where a round after the first trains from: its first link starts from the previous round's student
    (``run_dir``; ``weights`` are hashed as an input), and each DPO/KTO link named in ``references`` is anchored
    to that spec ("base": the weights the link starts from) as the pipeline's ``reference`` (``mode``) chose it.
    ``settings_hash`` gives a link's settings hash in this round (round-only settings included)."""

    run_dir: Path
    weights: Path
    mode: str
    references: dict[str, str] = field(default_factory=dict)
    settings_hash: Callable[[str], str] | None = None


def _train_stage(config: PipelineConfig, manifest: Manifest, given: dict[str, Path], train_dir: Path, *,
                 forced: bool, start: RoundStart | None = None) -> StageOutput:
    if _is_chain(config):
        return _train_chain(config, manifest, given, train_dir, forced=forced, start=start)
    _forget_other_links(manifest, [], train_dir)
    if start is None:
        return _train(config, given["data"], train_dir)
    # A round after the first: one stage, from the previous round's student.
    link = _train_links(config)[0]
    train_config = _link_config(config, link, given["data"], train_dir, start=start.run_dir,
                                reference=start.references.get(link.name))
    reference, reference_model = _link_reference(link, train_config, None,
                                                 round_reference=start.mode if link.name in start.references else None)
    log.info("train: running from %s; reference: %s", train_config.model, reference)
    output = _run_train(train_config)
    return StageOutput(output.files, {"started_from": train_config.model, "reference": reference,
                                      "reference_model": reference_model, **output.summary})


def _train(config: PipelineConfig, data: Path, output_dir: Path) -> StageOutput:
    return _run_train(_train_config(config, data, output_dir))


def _run_train(train_config: TrainConfig) -> StageOutput:
    from align.train.run import train

    # A run stopped part-way continues from its last checkpoint.
    result = train(train_config, resume=True)
    # Held-out figures before -> after and align.train.diagnosis's warnings (memorised, drifted), so the manifest
    # says whether the student moved, not only that training ran.
    heldout = {key: [result.eval_before.get(key), result.eval_after[key]]
               for key in ("rewards/accuracies", "rewards/margins") if key in result.eval_after}
    # The run says where its weights are (adapter/ for LoRA, model/ for a full fine-tune); eval reads it from here.
    return StageOutput({"weights": Path(result.weights), "run_dir": Path(result.run_dir)},
                       {"steps": result.steps, "final_loss": result.final_loss, "ref_cache": result.ref_cache,
                        "heldout": heldout, "warnings": result.warnings})


def _train_chain(config: PipelineConfig, manifest: Manifest, data: dict[str, Path], train_dir: Path, *,
                 forced: bool, start: RoundStart | None = None) -> StageOutput:
    """Each link in turn, from the weights of the link before. A finished link whose settings and inputs are
    unchanged is skipped, so a chain stopped part-way carries on at its first unfinished link."""
    links = _train_links(config)
    _forget_other_links(manifest, links, train_dir)
    files: dict[str, Path] = {}
    previous: tuple[TrainLink, StageOutput] | None = None
    for link in links:
        output = _train_link(config, manifest, link, data[link.data], train_dir / link.name, previous, forced=forced,
                             start=start)
        files.update({f"{link.name}/{name}": path for name, path in output.files.items()})
        previous = (link, output)
    assert previous is not None  # check_sections refuses an empty chain
    last = previous[1]
    return StageOutput({"weights": last.files["weights"], "run_dir": last.files["run_dir"], **files},
                       {"links": [manifest.stages[link.key]["summary"] for link in links]})


def _train_link(config: PipelineConfig, manifest: Manifest, link: TrainLink, data: Path, output_dir: Path,
                previous: tuple[TrainLink, StageOutput] | None, *, forced: bool,
                start: RoundStart | None = None) -> StageOutput:
    """One link, recorded in the manifest under its own key; ``previous``: the link before it and what it wrote;
    ``start``: in a round after the first, where the round's first link starts and what each link is anchored to."""
    # A later link starts from the run dir of the link before: align.train loads its weights (an adapter merged
    # into its base), and a LoRA link's adapter names that earlier adapter as its base (align.train.start). A
    # round's first link starts from the previous round's student the same way.
    start_dir = previous[1].files["run_dir"] if previous else (start.run_dir if start else None)
    start_weights = previous[1].files["weights"] if previous else (start.weights if start else None)
    round_reference = start.references.get(link.name) if start else None
    train_config = _link_config(config, link, data, output_dir, start=start_dir, reference=round_reference)
    inputs = {"data": _hash_input(data, link.key)}
    if start_weights is not None:
        inputs["start"] = _hash_input(start_weights, link.key)
    settings_hash = (start.settings_hash if start and start.settings_hash else
                     lambda key: stage_settings_hash(config, key))(link.key)
    if not forced and manifest.is_current(link.key, inputs, settings_hash):
        log.info("train link %s: up to date, skipped", link.name)
        return manifest.stage_output(link.key)
    if _starts_over(manifest.stages.get(link.key), inputs, settings_hash, forced=forced):
        _remove(output_dir)
    reference, reference_model = _link_reference(link, train_config, previous[0] if previous else None,
                                                 round_reference=start.mode if round_reference else None)
    log.info("train link %s: running from %s; reference: %s", link.name, train_config.model, reference)

    def run() -> StageOutput:
        output = _run_train(train_config)
        return StageOutput(output.files, {"link": link.name, "method": link.method,
                                          "started_from": train_config.model, "reference": reference,
                                          "reference_model": reference_model, **output.summary})

    return _run_recorded(manifest, link.key, inputs, settings_hash, run)


def _starts_over(record: dict[str, Any] | None, inputs: dict[str, str], settings_hash: str, *, forced: bool) -> bool:
    """Whether a link's folder is emptied before it runs. A link stopped part-way resumes from its checkpoint only
    with the same settings and inputs (one from other weights or data would carry them on); a finished link that
    runs again has changed; a folder the manifest knows nothing of is not trusted."""
    if record is None or forced or record["status"] == "done":
        return True
    return record["inputs"] != inputs or record["settings_hash"] != settings_hash


def _forget_other_links(manifest: Manifest, links: list[TrainLink], train_dir: Path) -> None:
    """Drop the manifest entries and train/ folders of links this config does not have (a changed or shorter
    chain, or one stage where there was a chain), so that neither names weights this config did not train."""
    keep = {link.key for link in links}
    for key in [key for key in manifest.stages if key.startswith("train/") and key not in keep]:
        manifest.forget(key)
    if links and train_dir.is_dir():  # a single stage's folder is train/ itself, cleared as a stage's is
        names = {link.name for link in links}
        for child in train_dir.iterdir():
            if child.name not in names:
                _remove(child)
