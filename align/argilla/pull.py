"""Pull people's answers from Argilla back into judgements.

Only *submitted* responses count; drafts are unfinished and discarded ones
are a person saying "I won't answer this". Several annotators on one record
become one judgement by majority (a tie between labels is kept, with no
label, and reported); each person's answer, rationale and time stay in
``details["votes"]``. A ranking becomes one pointwise judgement per
response, scored from its mean rank (1 = best, 0 = worst), which is what
pair building and :mod:`align.label.agreement` read.

The output is a pure function of the server's state: sorted by id, times
taken from the responses (not the clock), written atomically, so pulling
twice gives the same file.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path
from typing import Any

from align.argilla.aggregate import AgreementReport, agreement_report, majority, rank_verdicts
from align.argilla.remote import iter_records, question_names, require_dataset, usernames
from align.argilla.schema import ALIGN_METADATA, PREFERENCE, QUALITY, RANKING, RATIONALE, response_field
from align.argilla.settings import ArgillaSettings, connect
from align.data.io import atomic_path, write_records
from align.data.records import JudgedResponse, Judgement, JudgeInfo
from align.errors import AlignError


@dataclass
class Vote:
    annotator: str
    value: Any  # a label, or {response field: rank} for rankings
    rationale: str | None
    submitted_at: str


@dataclass
class RemoteRecord:
    """A record as pulled: align's provenance, its texts, the submitted votes and the suggestion."""

    record_id: str
    prompt_id: str
    prompt: Any
    responses: list[JudgedResponse]
    votes: list[Vote]
    suggestion: dict[str, Any] | None


@dataclass
class PullResult:
    dataset: str
    output: str
    task: str
    records: int = 0
    answered: int = 0
    judgements: int = 0
    responses: Counter = field(default_factory=Counter)  # status -> count
    foreign: int = 0  # records align did not push (no provenance)
    labels: Counter = field(default_factory=Counter)
    agreement: AgreementReport | None = None

    def summary(self) -> dict[str, Any]:
        return {"dataset": self.dataset, "task": self.task, "records": self.records, "answered": self.answered,
                "judgements": self.judgements, "responses": dict(sorted(self.responses.items())),
                "foreign_records": self.foreign, "labels": dict(sorted(self.labels.items())),
                "agreement": self.agreement.summary() if self.agreement else None}

    def lines(self) -> list[str]:
        statuses = ", ".join(f"{k} {v}" for k, v in sorted(self.responses.items())) or "none"
        out = [f"wrote {self.judgements} judgements to {self.output} from {self.answered} answered of "
               f"{self.records} records in '{self.dataset}' ({self.task})",
               f"  responses: {statuses} (only submitted ones count)"]
        if self.labels:
            out.append("  labels: " + ", ".join(f"{k} {v}" for k, v in sorted(self.labels.items())))
        if self.foreign:
            out.append(f"  records not pushed by align (no provenance), ignored: {self.foreign}")
        if self.agreement:
            out.extend(self.agreement.lines())
        return out


MAIN_QUESTION = {"pairwise": PREFERENCE, "single": QUALITY, "ranking": RANKING}


def task_of(questions: list[str]) -> str:
    for name, task in ((PREFERENCE, "pairwise"), (QUALITY, "single"), (RANKING, "ranking")):
        if name in questions:
            return task
    raise AlignError(f"this dataset's questions {questions} are not one of align's tasks "
                     "(was it created by `align argilla push`?)")


def _vote_value(task: str, values: dict[str, Any]) -> Any:
    if task == "ranking":
        # The REST API keeps each option's rank (the SDK would drop it); equal ranks are ties.
        return {v["value"]: v["rank"] for v in values[RANKING]["value"]}
    return values[MAIN_QUESTION[task]]["value"]


def parse_record(task: str, raw: dict[str, Any], names: dict[str, str], users: dict[str, str],
                 counts: Counter) -> RemoteRecord | None:
    provenance = (raw.get("metadata") or {}).get(ALIGN_METADATA)
    if not provenance:
        return None
    meta = json.loads(provenance)
    texts = [raw["fields"][response_field(task, i)] for i in range(len(meta["response_ids"]))]
    votes = []
    for response in raw.get("responses") or []:
        counts[response["status"]] += 1
        values = response.get("values") or {}
        if response["status"] != "submitted" or MAIN_QUESTION[task] not in values:
            continue
        rationale = (values.get(RATIONALE) or {}).get("value") or None
        votes.append(Vote(users.get(response["user_id"], response["user_id"]), _vote_value(task, values), rationale,
                          response["updated_at"]))
    main = MAIN_QUESTION[task]
    suggestion = next(({"value": s["value"], "agent": s.get("agent"), "score": s.get("score")}
                       for s in raw.get("suggestions") or [] if names.get(str(s["question_id"])) == main), None)
    if suggestion and task == "ranking":
        suggestion["value"] = [v["value"] for v in suggestion["value"]]  # best first
    return RemoteRecord(raw["external_id"], meta["prompt_id"], meta.get("prompt", raw["fields"]["prompt"]),
                        [JudgedResponse(id=i, text=t) for i, t in zip(meta["response_ids"], texts)],
                        sorted(votes, key=lambda v: v.annotator), suggestion)


def _vote_details(votes: list[Vote]) -> list[dict[str, Any]]:
    return [{"annotator": v.annotator, "value": v.value, "submitted_at": v.submitted_at,
             **({"rationale": v.rationale} if v.rationale else {})} for v in votes]


def _rationale(votes: list[Vote]) -> str | None:
    given = [v for v in votes if v.rationale]
    if len(given) == 1 and len(votes) == 1:
        return given[0].rationale
    return "\n".join(f"{v.annotator}: {v.rationale}" for v in given) or None


def _label_judgement(task: str, record: RemoteRecord, judge: JudgeInfo) -> Judgement:
    labels = [v.value for v in record.votes]
    winner, tied = majority(labels)
    counts = Counter(labels)
    if task == "pairwise":
        decisive = counts["a"] + counts["b"] + counts["tie"]
        score = (counts["a"] + 0.5 * counts["tie"]) / decisive if decisive else None  # P(A better) among votes
        ids = f"{record.responses[0].id}-vs-{record.responses[1].id}"
    else:
        score = counts["good"] / len(labels)
        ids = record.responses[0].id
    details: dict[str, Any] = {"votes": _vote_details(record.votes), "argilla_record": record.record_id}
    if tied:
        details["tied"] = tied
    if record.suggestion:
        details["suggestion"] = record.suggestion
    return Judgement(id=f"{record.prompt_id}:{ids}", prompt_id=record.prompt_id, prompt=record.prompt,
                     kind="pairwise" if task == "pairwise" else "pointwise", responses=record.responses, judge=judge,
                     score=None if score is None else round(score, 6), label=winner,
                     confidence=None if winner is None else round(counts[winner] / len(labels), 6),
                     rationale=_rationale(record.votes), details=details,
                     annotator=",".join(v.annotator for v in record.votes),
                     created_at=max(v.submitted_at for v in record.votes))


def _ranking_judgements(record: RemoteRecord, judge: JudgeInfo) -> list[Judgement]:
    n = len(record.responses)
    out = []
    for i, response in enumerate(record.responses):
        name = response_field("ranking", i)
        ranks = {v.annotator: v.value[name] for v in record.votes}
        mean_rank = sum(ranks.values()) / len(ranks)
        details = {"ranks": ranks, "mean_rank": round(mean_rank, 6), "argilla_record": record.record_id,
                   "votes": _vote_details(record.votes)}
        if record.suggestion:
            details["suggestion"] = record.suggestion
        out.append(Judgement(id=f"{record.prompt_id}:{response.id}", prompt_id=record.prompt_id, prompt=record.prompt,
                             kind="pointwise", responses=[response], judge=judge,
                             score=round((n - mean_rank) / (n - 1), 6), rationale=_rationale(record.votes),
                             details=details, annotator=",".join(v.annotator for v in record.votes),
                             created_at=max(v.submitted_at for v in record.votes)))
    return out


def _agreement(task: str, records: list[RemoteRecord]) -> AgreementReport:
    votes: dict[Any, dict[str, Any]] = {}
    consensus: dict[Any, Any] = {}
    suggestions: dict[Any, Any] = {}
    for r in records:
        if task != "ranking":
            votes[r.record_id] = {v.annotator: v.value for v in r.votes}
            consensus[r.record_id] = majority([v.value for v in r.votes])[0]
            if r.suggestion:
                suggestions[r.record_id] = r.suggestion["value"]
            continue
        # A ranking is compared pair by pair: who put which response first.
        per_annotator = {v.annotator: rank_verdicts(v.value) for v in r.votes}
        options = sorted(r.votes[0].value)
        mean_ranks = {o: sum(v.value[o] for v in r.votes) / len(r.votes) for o in options}
        suggested = rank_verdicts({o: i for i, o in enumerate(r.suggestion["value"])}) if r.suggestion else {}
        for pair in combinations(options, 2):
            key = (r.record_id, *pair)
            votes[key] = {a: verdicts[pair] for a, verdicts in per_annotator.items()}
            consensus[key] = rank_verdicts(mean_ranks)[pair]
            if pair in suggested:
                suggestions[key] = suggested[pair]
    return agreement_report("records" if task != "ranking" else "response pairs", votes, consensus, suggestions)


def pull(dataset: str, output: str | Path, settings: ArgillaSettings, *,
         report: str | Path | None = None) -> PullResult:
    """Write a judgement per answered record (per response for rankings) to ``output``."""
    client = connect(settings)
    ds = require_dataset(client, dataset, settings.workspace)
    names = question_names(ds)
    task = task_of(list(names.values()))
    users = usernames(client)
    result = PullResult(dataset, str(output), task)
    answered: list[RemoteRecord] = []
    for raw in iter_records(client, ds):
        result.records += 1
        record = parse_record(task, raw, names, users, result.responses)
        if record is None:
            result.foreign += 1
        elif record.votes:
            answered.append(record)
    answered.sort(key=lambda r: r.record_id)
    judge = JudgeInfo(type="human", name=f"argilla:{dataset}", task=task)
    judgements: list[Judgement] = []
    for record in answered:
        made = _ranking_judgements(record, judge) if task == "ranking" else [_label_judgement(task, record, judge)]
        judgements.extend(made)
    judgements.sort(key=lambda j: j.id)
    result.answered = len(answered)
    result.judgements = write_records(output, judgements)
    result.labels = Counter(j.label or "no majority" for j in judgements if task != "ranking")
    result.agreement = _agreement(task, answered)
    if report is not None:
        with atomic_path(report) as tmp:
            tmp.write_text(json.dumps(result.summary(), indent=1, sort_keys=True))
    return result
