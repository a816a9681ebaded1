"""Rounds of on-policy training (``rounds: N``): round k > 1 generates with round k-1's student, labels and pairs as
round 1 did, and trains on from round k-1's weights.

Layout: round 1 is the pipeline as it always was, in the run dir itself (so a run dir from before rounds is round 1
of a longer run, and ``rounds: 1`` writes exactly what the pipeline always wrote); round k > 1 lives in
``round-k/`` with a ``manifest.json`` of its own, the same stages and the same file names. A round's stages are
skipped or rerun as round 1's are, by their inputs' SHA-256 and their settings hash; a later round's inputs include
the previous round's weights, so a change that retrains round k reruns every round after it, and nothing before.

What differs in a round after the first:

* prompts: ``prompts_per_round`` P draws the prompts in disjoint slices of P in file order (round k the k-th slice,
  written to ``round-k/prompts.jsonl``; round 1 the first P, as ``max_prompts: P``) while the file lasts, then from
  the top again; unset, every round answers the same prompts (the generate section's, with its ``max_prompts``);
* candidates: ``teacher_share`` of each prompt's ``num_candidates`` (rounded half up) from the teacher (the generate
  section as it is), the rest from the previous round's student (its run dir, through the transformers backend,
  without the teacher's system prompt: the student answers as it will be used), merged per prompt into
  ``candidates.jsonl`` (teacher's first, ids ``<prompt>-c<i>`` by place, each tagged with its ``source``). Both
  draw with seeds derived from the seed, the round and the source, so a round that repeats prompts draws anew;
* people: a round's Argilla dataset is ``<dataset>-round-k`` (records from one round are not answered in another);
* training starts from the previous round's student; a DPO/KTO link that sets no ``reference`` is anchored to
  round 1's reference (``reference: original``) or to the weights it starts from (``previous``);
* eval scores the round's student against the original model (eval/, on round 1's reference answers) and against
  the previous round's student (eval/previous/, on that round's own eval answers): no answer is sampled twice.
"""

from __future__ import annotations

import logging
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from align.data.io import atomic_path, dumps, write_records
from align.data.records import Candidate, CandidateSet, content_hash
from align.errors import ConfigError
from align.pipeline.chain import RoundStart
from align.pipeline.config import PipelineConfig, _evaluates_intermediate
from align.pipeline.files import _round_dir
from align.pipeline.hashes import stage_settings_hash
from align.pipeline.links import _original_model, _train_links
from align.pipeline.manifest import Manifest, StageOutput

log = logging.getLogger(__name__)

# The generate settings the student's part of a round takes from the generate section: how to sample and how fast,
# not who answers (model, backend, server) nor the teacher's system prompt.
_STUDENT_GENERATE_KEYS = frozenset({"prompts", "max_prompts", "num_candidates", "temperature", "top_p", "top_k",
                                    "max_new_tokens", "greedy_first", "mix", "logprobs", "batch_size", "device",
                                    "num_threads", "progress"})


@dataclass
class Round:
    """One round: its number (from 1), its folder and manifest, and the rounds it builds on."""

    index: int
    dir: Path
    manifest: Manifest
    previous: Round | None = None
    first: Round | None = None  # round 1 (None in round 1 itself)

    @classmethod
    def open(cls, run_dir: Path, index: int, previous: Round | None = None) -> Round:
        folder = _round_dir(run_dir, index)
        folder.mkdir(parents=True, exist_ok=True)
        first = None if previous is None else (previous.first or previous)
        return cls(index, folder, Manifest(folder), previous, first)

    @property
    def name(self) -> str:
        return f"round-{self.index}"

    def stage_name(self, stage: str) -> str:
        """How the stage is called in the lists of stages run and skipped: round 1's plainly, as always."""
        return stage if self.index == 1 else f"{self.name}/{stage}"


def prompt_slice(available: int, per_round: int, index: int) -> tuple[int, int]:
    """The prompts round ``index`` (from 1) answers, as [start, stop) of the ``available`` prompts: disjoint slices
    of ``per_round`` in order while they last, then from the first slice again (the last ``available % per_round``
    prompts are never drawn)."""
    slices = available // per_round
    if slices == 0:
        raise ConfigError(f"prompts_per_round is {per_round}, but the generate prompts hold only {available}: "
                          f"lower it to at most {available}")
    start = (index - 1) % slices * per_round
    return start, start + per_round


def teacher_candidates(num_candidates: int, share: float) -> int:
    """How many of a prompt's candidates the teacher writes in a round after the first (``share`` of them, rounded
    half up: 0.5 of 3 is 2); the previous round's student writes the rest."""
    return min(num_candidates, math.floor(share * num_candidates + 0.5))


def round_config(config: PipelineConfig, index: int) -> PipelineConfig:
    """The config a round's stages run with: round 1 answers the first ``prompts_per_round`` prompts (as
    ``max_prompts``); a later round's people answer in an Argilla dataset of the round's own."""
    update: dict[str, Any] = {}
    if index == 1 and config.prompts_per_round is not None:
        limit = config.generate.get("max_prompts")
        update["generate"] = {**config.generate, "max_prompts": config.prompts_per_round if limit is None
                              else min(int(limit), config.prompts_per_round)}
    if index > 1 and config.label.argilla is not None:
        people = config.label.argilla.model_copy(update={"dataset": f"{config.label.argilla.dataset}-round-{index}"})
        update["label"] = config.label.model_copy(update={"argilla": people})
    return config.model_copy(update=update) if update else config


def round_settings_hash(config: PipelineConfig, index: int, stage: str) -> str:
    """A stage's (or a train link's) settings hash in round ``index``: round 1's is the pipeline's as it always was
    (``prompts_per_round`` enters it as ``max_prompts``); a later round's adds the round and the round-only settings
    that stage reads, so changing one of those reruns no stage of round 1."""
    settings = stage_settings_hash(round_config(config, index), stage)
    if index == 1:
        return settings
    extra: dict[str, Any] = {}
    if stage == "generate":
        extra = {"teacher_share": config.teacher_share}
    elif stage == "train" or stage.startswith("train/"):
        if any(name in _round_references(config) for name in _stage_links(config, stage)):
            extra = {"reference": config.reference}
    return content_hash({"settings": settings, "round": index, **extra}, 32)


def _stage_links(config: PipelineConfig, stage: str) -> list[str]:
    """The links a train stage key covers: the whole train stage, or one link and those before it (its hash
    covers them)."""
    names = [link.name for link in _train_links(config)]
    if stage == "train":
        return names
    return names[:names.index(stage.removeprefix("train/")) + 1]


def _round_references(config: PipelineConfig) -> set[str]:
    """The links whose reference the pipeline's ``reference`` decides: DPO/KTO links that set none."""
    from align.train.config import REFERENCE_METHODS

    return {link.name for link in _train_links(config)
            if link.method in REFERENCE_METHODS and "reference" not in link.settings}


def round_start(config: PipelineConfig, round_: Round) -> RoundStart:
    """Where round k > 1 trains from (the previous round's student) and the reference of each DPO/KTO link."""
    assert round_.previous is not None and round_.first is not None
    previous = round_.previous.manifest
    references: dict[str, str] = {}
    links = _train_links(config)
    for link in links:
        if link.name not in _round_references(config):
            continue
        if config.reference == "previous":
            references[link.name] = "base"  # the weights it starts from: for the first link, the previous student
        elif link.index == 1:
            references[link.name] = _original_model(config)
        else:  # round 1 anchored this link to the link before it there
            references[link.name] = str(round_.first.manifest.output("train", f"{links[link.index - 2].name}/run_dir"))
    return RoundStart(previous.output("train", "run_dir"), previous.output("train", "weights"), config.reference,
                      references, lambda key: round_settings_hash(config, round_.index, key))


def round_prompts(config: PipelineConfig, round_: Round, path: Path) -> Path:
    """The prompts file round k > 1 answers: with ``prompts_per_round``, its slice of the generate prompts, written
    to ``path`` (rewritten only when it changes); otherwise the generate prompts themselves."""
    from align.generate.stage import read_prompts

    prompts = Path(config.generate.get("prompts", ""))
    if config.prompts_per_round is None:
        return prompts
    records = read_prompts(prompts)[: config.generate.get("max_prompts")]
    start, stop = prompt_slice(len(records), config.prompts_per_round, round_.index)
    if round_.index > len(records) // config.prompts_per_round:
        log.info("%s answers prompts %d-%d again: %s holds %d prompts, %d rounds of %d", round_.name, start + 1,
                 stop, prompts, len(records), len(records) // config.prompts_per_round, config.prompts_per_round)
    text = "".join(dumps(record) + "\n" for record in records[start:stop])
    if not path.exists() or path.read_text(encoding="utf-8") != text:
        with atomic_path(path) as tmp:
            tmp.write_text(text, encoding="utf-8")
    return path


def check_prompts_per_round(config: PipelineConfig) -> None:
    """``prompts_per_round`` larger than the prompts fails before anything runs."""
    from align.generate.stage import read_prompts

    if config.prompts_per_round is None:
        return
    prompts = Path(config.generate.get("prompts", ""))
    if not prompts.exists():
        raise ConfigError(f"stage generate: input {prompts} does not exist")
    prompt_slice(len(read_prompts(prompts)[: config.generate.get("max_prompts")]), config.prompts_per_round, 1)


def generate_round(config: PipelineConfig, round_: Round, prompts: Path, student: Path,
                   paths: dict[str, Path]) -> StageOutput:
    """Round k > 1's candidates: the teacher's share and the previous round's student's rest, merged per prompt."""
    from align.config import load_config
    from align.generate import GenerateConfig, generate
    from align.generate.plan import derive_seed

    section = {key: value for key, value in config.generate.items() if key != "overwrite"}
    if config.prompts_per_round is not None:
        section.pop("max_prompts", None)  # the round's prompts file is already its slice
    full = load_config(GenerateConfig, None, (), defaults={**section, "prompts": prompts,
                                                           "output": paths["candidates"]})
    n = full.num_candidates
    share = teacher_candidates(n, config.teacher_share)
    seed = section.get("seed", config.seed)
    parts: list[tuple[str, str, Path, Any]] = []
    # The merged list's i-th candidate is sampled as the generate section samples its i-th (greedy first, mix).
    for source, lo, hi in (("teacher", 0, share), ("student", share, n)):
        if hi == lo:
            continue
        settings = section if source == "teacher" else {
            key: value for key, value in section.items() if key in _STUDENT_GENERATE_KEYS} | {"model": str(student)}
        settings = {**settings, "prompts": prompts, "output": paths[f"candidates_{source}"], "num_candidates": hi - lo,
                    "greedy_first": False, "mix": [full.sampling_for(i).model_dump() for i in range(lo, hi)],
                    "seed": derive_seed(seed, round_.name, source)}
        log.info("%s: %d candidate(s) per prompt from the %s %s", round_.name, hi - lo, source, settings.get(
            "model", full.model))
        parts.append((source, str(settings.get("model", full.model)), paths[f"candidates_{source}"],
                      generate(**settings)))
    written = merge_candidates([(source, model, path) for source, model, path, _ in parts], paths["candidates"],
                               round_.index)
    return StageOutput({"candidates": paths["candidates"], **{f"candidates_{source}": path
                                                               for source, _, path, _ in parts}},
                       {"round": round_.index, "prompts": written, "teacher_candidates": share,
                        "student_candidates": n - share, "student": str(student),
                        "generated": sum(result.generated for *_, result in parts),
                        "tokens": sum(result.tokens for *_, result in parts)})


def merge_candidates(parts: list[tuple[str, str, Path]], output: Path, round_index: int) -> int:
    """Each prompt's candidates from every part ((source, model, candidates file), in order) as one candidate set:
    renumbered by their place (``<prompt>-c<i>``), tagged with ``source`` and ``model``, and flagged as duplicates
    across parts too. Written atomically; returns the number of prompts."""
    from align.data.validate import read_records
    from align.generate.plan import candidate_id

    rows = [{row.prompt_id: row for row in read_records(path, "candidates")} for _, _, path in parts]
    merged = []
    for prompt_id, first in rows[0].items():
        if any(prompt_id not in part for part in rows):
            raise ConfigError(f"{parts[0][2]}: prompt {prompt_id!r} has no candidates from every source; "
                              "rerun the pipeline to finish generating")
        responses: list[Candidate] = []
        seen: dict[str, str] = {}
        for (source, model, _), part in zip(parts, rows):
            for candidate in part[prompt_id].responses:
                new_id = candidate_id(prompt_id, len(responses))
                key = candidate.text.strip()
                duplicate_of = seen.get(key) if key else None
                if key and duplicate_of is None:
                    seen[key] = new_id
                responses.append(candidate.model_copy(update={"id": new_id, "duplicate_of": duplicate_of,
                                                              "source": source, "model": model}))
        teacher = ({**first.teacher, "source": parts[0][0], "round": round_index} if len(parts) == 1 else
                   {"round": round_index, **{source: part[prompt_id].teacher
                                             for (source, _, _), part in zip(parts, rows)}})
        merged.append(CandidateSet(prompt_id=prompt_id, prompt=first.prompt, prompt_hash=first.prompt_hash,
                                   responses=responses, teacher=teacher, created_at=first.created_at))
    write_records(output, merged)
    return len(merged)


def eval_round(config: PipelineConfig, round_: Round, output_dir: Path) -> StageOutput:
    """Round k > 1's student against the original model (``eval/``, on round 1's reference answers) and against
    the previous round's student (``eval/previous/``, on that round's eval answers and this round's own)."""
    from align.pipeline.stages import _eval, _eval_stage

    assert round_.previous is not None and round_.first is not None
    output_dir.mkdir(parents=True, exist_ok=True)
    if not config.eval.get("reference_answers"):  # else every round already shares the answers it names
        original = _output(round_.first.manifest, "answers_reference")
        shared = "responses_original.jsonl" if _evaluates_intermediate(config) else "responses_reference.jsonl"
        if original is not None:
            _copy_missing(original, output_dir / shared)
    final = _eval_stage(config, round_.manifest, output_dir)
    previous_dir = output_dir / "previous"
    _copy_missing(final.files["answers_model"], previous_dir / "responses_model.jsonl")
    previous_answers = _output(round_.previous.manifest, "answers_model")
    if previous_answers is not None:
        _copy_missing(previous_answers, previous_dir / "responses_reference.jsonl")
    # The previous student is named as its own eval named it, so its answers' settings hash matches and none is
    # sampled again.
    against = _eval(config, round_.manifest.output("train", "run_dir"), previous_dir,
                    reference=str(round_.previous.manifest.output("train", "run_dir")), reference_answers=None)
    return StageOutput({**final.files, **{f"previous/{name}": path for name, path in against.files.items()}},
                       {**final.summary, "previous": against.summary})


def eval_inputs(round_: Round) -> dict[str, Path]:
    """What round k > 1's eval reads besides the student and the prompts: the previous round's student, and the
    answers it shares (round 1's reference answers, the previous round's student's answers)."""
    assert round_.previous is not None and round_.first is not None
    inputs = {"previous": round_.previous.manifest.output("train", "weights")}
    for name, path in (("answers_original", _output(round_.first.manifest, "answers_reference")),
                       ("answers_previous", _output(round_.previous.manifest, "answers_model"))):
        if path is not None:
            inputs[name] = path
    return inputs


def _output(manifest: Manifest, name: str) -> Path | None:
    """An eval answers file a round's manifest names (None in a run dir from before eval named its answers)."""
    record = manifest.stages.get("eval") or {}
    path = (record.get("outputs") or {}).get(name)
    return Path(path) if record.get("status") == "done" and path and Path(path).exists() else None


def _copy_missing(source: Path, target: Path) -> None:
    """Copy ``source`` to ``target`` unless it is there already (a copy is never half-written)."""
    if target.exists():
        return
    with atomic_path(target) as tmp:
        shutil.copyfile(source, tmp)
