"""Push candidates to Argilla for people to label, with the auto-labelers' verdicts as suggestions.

Record ids come from the content (see :attr:`Item.record_id`), and the SDK
upserts by id, so pushing again updates records (suggestions, guidelines)
instead of adding copies, keeps the answers people already gave, and a push
that died half-way (network, Ctrl-C) is finished by running it again.
"""

from __future__ import annotations

import json
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from align import extras
from align.argilla.items import Item, SuggestionIndex, build_items, choose_task
from align.argilla.remote import ensure_dataset, external_ids
from align.argilla.schema import ALIGN_METADATA, TASKS, dataset_settings, main_question, response_field
from align.argilla.settings import ArgillaSettings, ArgillaUnavailable, connect
from align.data.records import CandidateSet, Judgement, Text, is_conversational, to_plain
from align.data.validate import load_records
from align.errors import AlignError, ConfigError

if TYPE_CHECKING:
    import argilla as rg

log = logging.getLogger(__name__)

DEFAULT_BATCH = 100


@dataclass
class PushResult:
    dataset: str
    url: str
    task: str
    records: int = 0          # records this push sent
    new: int = 0              # ...of which were not on the server before
    total_on_server: int = 0  # records in the dataset afterwards
    suggestions: int = 0
    skipped_prompts: int = 0  # nothing to label for the task
    certain_left_out: int = 0  # --only-uncertain: confident verdicts not pushed
    unjudged_left_out: int = 0  # --only-uncertain: no judgement to be uncertain about
    notes: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        out = [f"pushed {self.records} {self.task} records to '{self.dataset}' at {self.url} "
               f"({self.new} new, {self.records - self.new} already there, updated)",
               f"  dataset now holds {self.total_on_server} records; {self.suggestions} with a suggestion"]
        if self.skipped_prompts:
            out.append(f"  prompts with nothing to label as {self.task}: {self.skipped_prompts}")
        if self.certain_left_out or self.unjudged_left_out:
            out.append(f"  --only-uncertain left out {self.certain_left_out} confident and "
                       f"{self.unjudged_left_out} unjudged records")
        out.extend(f"  {note}" for note in self.notes)
        return out


def render_prompt(prompt: Text) -> str:
    """The prompt as annotators read it: plain text, or each message under its role."""
    if isinstance(prompt, str):
        return prompt
    return "\n\n".join(f"**{m['role']}**: {m['content']}" for m in to_plain(prompt))


def to_record(item: Item) -> rg.Record:
    rg = extras.argilla()
    fields = {"prompt": render_prompt(item.prompt)}
    fields.update({response_field(item.task, i): r.text for i, r in enumerate(item.responses)})
    provenance = {"prompt_id": item.prompt_id, "prompt_hash": item.prompt_hash,
                  "response_ids": [r.id for r in item.responses]}
    if is_conversational(item.prompt):
        provenance["prompt"] = to_plain(item.prompt)
    suggestions = []
    if item.suggestion is not None:
        s = item.suggestion
        suggestions.append(rg.Suggestion(question_name=main_question(item.task), value=s.value,
                                         score=None if s.score is None else min(max(s.score, 0.0), 1.0),
                                         agent=s.agent, type="model"))
    return rg.Record(id=item.record_id, fields=fields, suggestions=suggestions,
                     metadata={"prompt_id": item.prompt_id, ALIGN_METADATA: json.dumps(provenance, sort_keys=True)})


def plan_push(candidates: list[CandidateSet], judgements: list[Judgement] | None, *, task: str | None = None,
              only_uncertain: bool = False, min_confidence: float = 0.8) -> tuple[list[Item], PushResult]:
    """The records a push would send (no server involved)."""
    if task is not None and task not in TASKS:
        raise ConfigError(f"--task {task!r}: use one of {', '.join(TASKS)}")
    if only_uncertain and not judgements:
        raise ConfigError("--only-uncertain needs --judgements: the verdicts whose confidence decides what people see")
    task = task or choose_task(candidates, judgements)
    items, skipped = build_items(candidates, task)
    result = PushResult(dataset="", url="", task=task, skipped_prompts=skipped)
    index = SuggestionIndex(judgements or [], min_confidence=min_confidence)
    kept = []
    for item in items:
        item.suggestion = index.for_item(item)
        if only_uncertain:
            if item.suggestion is None:
                result.unjudged_left_out += 1
                continue
            if not item.suggestion.uncertain:
                result.certain_left_out += 1
                continue
        kept.append(item)
    result.suggestions = sum(i.suggestion is not None for i in kept)
    return kept, result


def push(candidates_path: str | Path, dataset: str, settings: ArgillaSettings, *,
         judgements_path: str | Path | None = None, task: str | None = None, only_uncertain: bool = False,
         min_confidence: float = 0.8, min_submitted: int | None = None, guidelines: str | None = None,
         force: bool = False, batch_size: int = DEFAULT_BATCH) -> PushResult:
    """Create or update ``dataset`` with a record per item to label; returns what happened.

    ``min_submitted`` (default 1) and ``guidelines`` (default: the task's) apply to a new dataset; an
    existing one keeps its own unless they are given.
    """
    if min_submitted is not None and min_submitted < 1:
        raise ConfigError(f"--min-submitted {min_submitted}: must be at least 1")
    candidates: list[CandidateSet] = load_records(candidates_path, "candidates")
    judgements: list[Judgement] | None = load_records(judgements_path, "judgements") if judgements_path else None
    items, result = plan_push(candidates, judgements, task=task, only_uncertain=only_uncertain,
                              min_confidence=min_confidence)
    result.dataset, result.url = dataset, settings.api_url
    if not items:
        raise AlignError(f"nothing to push from {candidates_path}" + (" (no uncertain verdicts)" if only_uncertain
                                                                      else f" as {result.task} records"))
    sizes = {len(i.responses) for i in items}
    client = connect(settings)
    ds_settings = dataset_settings(result.task, responses=max(sizes), min_submitted=min_submitted or 1,
                                   guidelines=guidelines)
    given = {name for name, value in (("guidelines", guidelines), ("min_submitted", min_submitted)) if value}
    ds, result.notes = ensure_dataset(client, dataset, ds_settings, workspace=settings.workspace, force=force,
                                      update=given)
    before = set(external_ids(client, ds))
    # The same content twice in one file is one record (the server would reject a batch with repeated ids).
    unique = list({item.record_id: item for item in items}.values())
    records = [to_record(item) for item in unique]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds.records.log(records, batch_size=max(1, min(batch_size, len(records))))
    except Exception as exc:  # noqa: BLE001 - any failure mid-push gets the same advice
        import httpx

        if isinstance(exc, (httpx.HTTPError, OSError)):
            raise ArgillaUnavailable(f"the push to {settings.api_url} failed part-way ({type(exc).__name__}: {exc}); "
                                     "run the same command again: records already sent are updated, not "
                                     "duplicated") from None
        raise
    result.records = len(records)
    result.new = sum(r.id not in before for r in records)
    result.total_on_server = len(external_ids(client, ds))
    return result
