"""`align pipeline run CONFIG.yaml`: generate -> label -> pairs [-> select] -> train -> eval, from one config.

Every stage writes into the run dir and records itself in ``manifest.json``:
its inputs (with SHA-256), the hash of its settings, its outputs by name, timings
and library versions. A later stage takes its inputs from those named outputs
(eval scores the weights the train stage says it wrote, adapter or full model),
so a rerun that skips a stage still chains the same files. A rerun skips a
finished stage whose inputs and settings are unchanged; a stage that was stopped
part-way is run again and carries on from what it had written (each stage is
resumable on its own); ``--from STAGE`` reruns that stage and everything after it.

``train`` is one stage (a mapping) or a chain of them (a list, e.g. SFT then DPO): each link starts from the
weights of the link before it, and a DPO/KTO link's reference is that link's model unless it sets ``reference``.
Each link is recorded in the manifest under ``train/<n>-<method>`` like a stage of its own, so a chain stopped
part-way carries on at its first unfinished link; a changed link reruns with every link after it. The chain's
SFT links read rows that the ``select`` stage picks from the judgements (:func:`align.data.select.select_sft`);
that stage runs only when some link is SFT. Eval scores the last link against the original model (the first
link's ``model``) and, with ``eval: {intermediate: true}``, every earlier link against it too.

``rounds: N`` runs the stages N times, on-policy: round 1 is the pipeline above, in the run dir; round k > 1, in
``round-k/`` with its own manifest, generates with round k-1's student (``teacher_share`` of each prompt's
candidates from the teacher), on the next ``prompts_per_round`` prompts or the same ones, labels and pairs them as
round 1 did, trains on from round k-1's weights (anchored to round 1's reference, or with ``reference: previous`` to
the previous student) and evaluates against the original model and the previous round's student. A summary over the
rounds (``rounds_summary.json/.md/.png``) ends it, or ``stop_when`` earlier (no sure gain, a KL budget).

The package, one job a module: :mod:`~align.pipeline.config` (the sections), :mod:`~align.pipeline.checks` (every
section checked before anything runs), :mod:`~align.pipeline.links` (the train section as links),
:mod:`~align.pipeline.manifest` (stage records), :mod:`~align.pipeline.hashes` (settings and input hashes),
:mod:`~align.pipeline.files` (where stages write), :mod:`~align.pipeline.stages` (the stage runners),
:mod:`~align.pipeline.chain` (the train stage and its chain), :mod:`~align.pipeline.rounds` (what a round after the
first does differently), :mod:`~align.pipeline.summary` (the rows over rounds and ``stop_when``) and
:mod:`~align.pipeline.run` (``run_pipeline``).
"""

from align.pipeline.checks import check_sections
from align.pipeline.config import (
    STAGES,
    LabelSection,
    PairSettings,
    PeopleSettings,
    PipelineConfig,
    SelectSettings,
    StopWhen,
    load_pipeline_config,
)
from align.pipeline.hashes import stage_settings_hash
from align.pipeline.links import TrainLink
from align.pipeline.manifest import Manifest, PipelineWaiting, StageOutput, StageRecord
from align.pipeline.run import PipelineResult, run_pipeline
from align.pipeline.stages import _label  # noqa: F401  (tests import it from align.pipeline)

__all__ = [
    "STAGES", "LabelSection", "Manifest", "PairSettings", "PeopleSettings", "PipelineConfig", "PipelineResult",
    "PipelineWaiting", "SelectSettings", "StageOutput", "StageRecord", "StopWhen", "TrainLink", "check_sections",
    "load_pipeline_config", "run_pipeline", "stage_settings_hash",
]
