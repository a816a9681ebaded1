"""The labeling stages: a candidates file in, a judgements file out (plus a review file).

Both stages are resumable: judgements are appended one line each as they
are made, and a rerun skips every judgement id already in the output (or in
the review file), so a stopped run carries on where it stopped. A rerun with
different settings (another rules file, model, rubric...) into the same file
is refused rather than mixing two labelers in one file.

What gets judged: every candidate with text, except those the teacher marked
``empty`` or ``duplicate_of`` another (they can only make empty or tied pairs).

:func:`run_label` is the stage as one call (``LabelConfig`` -> ``LabelResult``): the rules alone
(:func:`label_rules`) or the judge after them (:func:`label_judge`). The pipeline's ``label``
section is :class:`LabelSettings`, so it can set every setting the stage has.
"""

from __future__ import annotations

import inspect
import logging
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path
from typing import Any, ClassVar

from pydantic import Field, field_validator
from tqdm.auto import tqdm

from align.config import StrictConfig, text_or_file
from align.data.io import JsonlAppender, iter_rows, sort_finished_jsonl
from align.data.records import Candidate, CandidateSet, JudgedResponse, Judgement, JudgeInfo, content_hash, text_of
from align.data.validate import load_records
from align.errors import ConfigError
from align.label.combine import DEFAULT_RULES_MARGIN, decide_by_rules
from align.label.judge import Backend, Judge, JudgeSettings, Mode, Scale, make_backend, render_prompt
from align.label.routing import mark_for_review
from align.label.rules import ResponseView, RuleResult, RuleSet, load_rules

log = logging.getLogger(__name__)

_ERRORS_SHOWN_PER_RULE = 5

# make_backend's own defaults (batch size, answer cut, concurrency), so LabelSettings cannot drift from them.
_BACKEND_DEFAULTS = {name: p.default for name, p in inspect.signature(make_backend).parameters.items()}


@dataclass
class LabelResult:
    output: str
    review: str | None = None
    prompts: int = 0
    written: int = 0
    routed: int = 0
    already_done: int = 0
    not_judged: int = 0  # empty or duplicate candidates
    rule_errors: Counter = field(default_factory=Counter)  # rule name -> records it raised on
    labels: Counter = field(default_factory=Counter)
    decided_by: Counter = field(default_factory=Counter)
    unparsed: int = 0
    position_inconsistent: int = 0
    longer_preferred: int = 0  # decisive judge verdicts that went to the longer answer...
    length_decisive: int = 0   # ...out of decisive judge verdicts between answers of different length

    def lines(self) -> list[str]:
        out = [f"wrote {self.written} judgements to {self.output}"
               + (f" ({self.already_done} already there, skipped)" if self.already_done else "")]
        if self.labels:
            out.append("  labels: " + ", ".join(f"{k} {v}" for k, v in sorted(self.labels.items())))
        if self.decided_by:
            out.append("  decided by: " + ", ".join(f"{k} {v}" for k, v in sorted(self.decided_by.items())))
        if self.not_judged:
            out.append(f"  not judged: {self.not_judged} empty or duplicate candidates")
        if self.unparsed:
            out.append(f"  unparsed judge answers: {self.unparsed} (kept with their raw text, never a win)")
        if self.position_inconsistent:
            out.append(f"  position-inconsistent verdicts: {self.position_inconsistent}")
        if self.length_decisive:
            share = self.longer_preferred / self.length_decisive
            out.append(f"  length: the judge preferred the longer answer in {self.longer_preferred} of "
                       f"{self.length_decisive} decisive pairs ({share:.0%})")
        if self.review:
            out.append(f"  routed to review: {self.routed} -> {self.review}")
        for rule, count in sorted(self.rule_errors.items()):
            out.append(f"  rule '{rule}' raised on {count} records (skipped for them; --strict makes this fatal)")
        return out


class LabelSettings(StrictConfig):
    """How the label stage labels: by a rules file, by an LLM judge, or both (the rules settle what they can,
    the judge the rest). mode, scale, rubric, tie_margin and length_penalty are the judge's settings
    (:class:`align.label.judge.JudgeSettings`, with its defaults); the rest are ``align label judge``'s options
    of the same names."""

    rules: Path | None = Field(None, description="rules YAML (align label rules format)")
    judge_model: str | None = Field(None, description="an LLM judge: bundled:..., a folder, a hub id, or the "
                                                      "served model's name with judge_base_url")
    judge_base_url: str | None = Field(None, description="an OpenAI-compatible server for the judge")
    judge_api_key_env: str | None = Field(None, description="the environment variable holding its API key")
    mode: Mode = JudgeSettings.mode
    scale: Scale = JudgeSettings.scale
    rubric: str | None = Field(JudgeSettings.rubric, description="the judge's instructions: text or @file")
    tie_margin: float = Field(JudgeSettings.tie_margin, ge=0.0, le=0.5,
                              description="|P - 0.5| at or below this is a tie")
    length_penalty: float = Field(JudgeSettings.length_penalty, ge=0.0,
                                  description="moves verdicts against the longer answer (0: only report it)")
    rules_margin: float = Field(DEFAULT_RULES_MARGIN, description="rule-score gap at which rules decide a pair")
    max_response_tokens: int = Field(_BACKEND_DEFAULTS["max_response_tokens"], ge=1,
                                     description="a local judge reads at most this much of each answer")
    batch_size: int = Field(_BACKEND_DEFAULTS["batch_size"], ge=1,
                            description="questions per forward pass (local judge)")
    concurrency: int = Field(_BACKEND_DEFAULTS["concurrency"], ge=1,
                             description="parallel requests (HTTP judge)")

    # Settings that change how fast the labels come, not which labels: the judge leaves them out of its
    # config hash, so a labeling resumed with another batch size or concurrency carries on in the same file.
    SPEED_ONLY: ClassVar[frozenset[str]] = frozenset({"batch_size", "concurrency"})

    @field_validator("scale", mode="before")
    @classmethod
    def _scale_as_text(cls, value: Any) -> Any:
        return str(value) if isinstance(value, int) and not isinstance(value, bool) else value  # YAML's `scale: 10`

    @field_validator("rubric")
    @classmethod
    def _read_rubric(cls, value: str | None) -> str | None:
        return text_or_file(value, "rubric")

    def judge_settings(self) -> JudgeSettings:
        return JudgeSettings(mode=self.mode, scale=self.scale, rubric=self.rubric, tie_margin=self.tie_margin,
                             length_penalty=self.length_penalty)


class LabelConfig(LabelSettings):
    """The label stage's config: its settings, the candidates it reads and the judgements file it writes."""

    candidates: Path
    output: Path
    progress: bool = True


def run_label(config: LabelConfig) -> LabelResult:
    """Label ``config.candidates`` into ``config.output``: with the judge when there is one (after the rules,
    if given), else with the rules alone."""
    if config.judge_model:
        backend = make_backend(config.judge_model, base_url=config.judge_base_url,
                               api_key_env=config.judge_api_key_env, batch_size=config.batch_size,
                               max_response_tokens=config.max_response_tokens, concurrency=config.concurrency)
        return label_judge(config.candidates, config.output, backend=backend, settings=config.judge_settings(),
                           rules_path=config.rules, rules_margin=config.rules_margin, progress=config.progress)
    if config.rules:
        return label_rules(config.candidates, config.rules, config.output, progress=config.progress)
    raise ConfigError("label: give `rules` (a rules YAML) and/or `judge_model`")


def judgeable(candidates: CandidateSet, result: LabelResult | None = None) -> list[Candidate]:
    """The responses a labeler judges (not empty, not a duplicate of another); the rest are counted in ``result``."""
    keep = [c for c in candidates.responses if c.text.strip() and not c.empty and c.duplicate_of is None]
    if result is not None:
        result.not_judged += len(candidates.responses) - len(keep)
    return keep


def _done_ids(paths: list[Path], config_hash: str) -> set[str]:
    """Judgement ids already written by this labeler; another labeler's file is refused."""
    done: set[str] = set()
    for path in paths:
        if not path.exists():
            continue
        for location, row in iter_rows(path, tolerate_torn_tail=True):
            found = (row.get("judge") or {}).get("config_hash") if isinstance(row, dict) else None
            if found != config_hash:
                raise ConfigError(f"{location}: this file was labeled by another labeler or with other settings "
                                  f"(judge {(row.get('judge') or {}).get('name')!r}); write to a new file, or delete "
                                  "it to start over")
            done.add(row["id"])
    return done


def _rule_view(candidates: CandidateSet, response: Candidate) -> ResponseView:
    return ResponseView(text_of(candidates.prompt), response.text, f"{candidates.prompt_id}:{response.id}",
                        response.num_tokens)


def _error_reporter(result: LabelResult) -> Any:
    def report(rule: str, record_id: str, message: str) -> None:
        result.rule_errors[rule] += 1
        if result.rule_errors[rule] <= _ERRORS_SHOWN_PER_RULE:
            log.warning("rule '%s' raised on record %s (%s); skipped for this record", rule, record_id, message)

    return report


def _judgement(candidates: CandidateSet, responses: list[Candidate], judge: JudgeInfo, **fields: Any) -> Judgement:
    ids = "-vs-".join(r.id for r in responses)
    return Judgement(id=f"{candidates.prompt_id}:{ids}", prompt_id=candidates.prompt_id, prompt=candidates.prompt,
                     prompt_hash=candidates.prompt_hash, kind="pointwise" if len(responses) == 1 else "pairwise",
                     responses=[JudgedResponse(id=r.id, text=r.text, reasoning=r.reasoning) for r in responses], judge=judge, **fields)


# ----------------------------------------------------------------------------- rules


def label_rules(candidates_path: str | Path, rules_path: str | Path, output: str | Path, *, strict: bool = False,
                progress: bool = True) -> LabelResult:
    """Score every candidate with a rules file: one pointwise judgement per response."""
    ruleset = load_rules(rules_path)
    sets: list[CandidateSet] = load_records(candidates_path, "candidates")
    info = JudgeInfo(type="rules", name=ruleset.name, config_hash=ruleset.config_hash, rules_file=str(rules_path))
    result = LabelResult(str(output))
    done = _done_ids([Path(output)], ruleset.config_hash)
    report = _error_reporter(result)
    with JsonlAppender(output) as out:
        for candidates in tqdm(sets, desc="rules", unit="prompt", disable=not progress):
            result.prompts += 1
            for response in judgeable(candidates, result):
                if f"{candidates.prompt_id}:{response.id}" in done:
                    result.already_done += 1
                    continue
                verdict = ruleset.evaluate(_rule_view(candidates, response), strict=strict, on_error=report)
                judgement = _judgement(candidates, [response], info, score=verdict.score, label=verdict.label,
                                       details=verdict.details())
                out.append(judgement)
                result.written += 1
                result.labels[str(verdict.label)] += 1
    return result


# ----------------------------------------------------------------------------- LLM judge


@dataclass
class _Pending:
    """One prompt's work: judgements the rules settled, and questions still for the judge."""

    candidates: CandidateSet
    settled: list[Judgement] = field(default_factory=list)
    questions: list[tuple[list[Candidate], dict[str, Any]]] = field(default_factory=list)


def label_judge(candidates_path: str | Path, output: str | Path, *, backend: Backend, settings: JudgeSettings,
                judge_name: str | None = None, rules_path: str | Path | None = None,
                rules_margin: float = DEFAULT_RULES_MARGIN, route_below: float | None = None,
                review: str | Path | None = None, strict: bool = False, chunk_questions: int = 32,
                progress: bool = True) -> LabelResult:
    """Judge every candidate (pointwise) or every two candidates of a prompt (pairwise, both orders).

    With ``rules_path`` the rules run first and settle what they can (see
    :mod:`align.label.combine`); the judge is asked only about the rest.
    """
    if (route_below is None) != (review is None):
        raise ConfigError("--route-below and --review go together: a threshold and the file for human review")
    ruleset: RuleSet | None = load_rules(rules_path) if rules_path else None
    sets: list[CandidateSet] = load_records(candidates_path, "candidates")
    name = judge_name or f"judge:{backend.model_name}" + (f"+rules:{ruleset.name}" if ruleset else "")
    identity = {"model": backend.model_name, "mode": settings.mode, "scale": settings.scale,
                "rubric": settings.rubric, "tie_margin": settings.tie_margin,
                "length_penalty": settings.length_penalty,
                "rules": ruleset.config_hash if ruleset else None, "rules_margin": rules_margin if ruleset else None}
    config_hash = content_hash(identity)
    info = JudgeInfo(type="llm", name=name, model=backend.model_name, config_hash=config_hash, mode=settings.mode,
                     **({"rules": ruleset.name} if ruleset else {}))
    result = LabelResult(str(output), str(review) if review else None)
    done = _done_ids([Path(output)] + ([Path(review)] if review else []), config_hash)
    judge = Judge(backend, settings)
    report = _error_reporter(result)

    def plan(candidates: CandidateSet) -> _Pending:
        pending = _Pending(candidates)
        responses = judgeable(candidates, result)
        verdicts: dict[str, RuleResult] = {}
        if ruleset:
            for r in responses:
                verdicts[r.id] = ruleset.evaluate(_rule_view(candidates, r), strict=strict, on_error=report)
        groups = [[r] for r in responses] if settings.mode == "pointwise" else \
            [list(pair) for pair in combinations(responses, 2)]
        for group in groups:
            ids = "-vs-".join(r.id for r in group)
            if f"{candidates.prompt_id}:{ids}" in done:
                result.already_done += 1
                continue
            rule_details = _rule_details(group, verdicts) if ruleset else {}
            settled = _settle(group, verdicts, rules_margin, settings) if ruleset else None
            if settled is not None:
                settled_details = settled.pop("details")
                pending.settled.append(_judgement(candidates, group, info, **settled,
                                                  details={**settled_details, **rule_details}))
            else:
                pending.questions.append((group, rule_details))
        return pending

    review_out = JsonlAppender(review) if review else None
    try:
        with JsonlAppender(output) as out:
            bar = tqdm(total=len(sets), desc=f"judge ({settings.mode})", unit="prompt", disable=not progress)
            for chunk in _chunks((plan(c) for c in sets), chunk_questions):
                for judgement in _ask_judge(judge, settings, chunk, info, result):
                    _write(judgement, out, review_out, route_below, result)
                bar.update(len(chunk))
                result.prompts += len(chunk)
            bar.close()
    finally:
        if review_out:
            review_out.close()
    for path in (output, review):  # finished: in the candidates' order, whatever order the answers came in
        if path:
            sort_finished_jsonl(path, _candidates_order(sets))
    return result


def _candidates_order(sets: list[CandidateSet]) -> Callable[[dict[str, Any]], tuple[int, ...]]:
    """A judgement's place in the candidates file: its prompt's, then its responses' within the prompt (rules
    settle some of a chunk's judgements before the judge answers the rest, so they are written out of order)."""
    place = {s.prompt_id: (i, {r.id: j for j, r in enumerate(s.responses)}) for i, s in enumerate(sets)}

    def key(row: dict[str, Any]) -> tuple[int, ...]:
        prompt, responses = place.get(row.get("prompt_id"), (len(place), {}))
        return (prompt, *(responses.get(r.get("id"), len(responses)) for r in row.get("responses", [])))

    return key


def _chunks(pending: Iterator[_Pending], questions: int) -> Iterator[list[_Pending]]:
    """Group prompts so each judge call gets about ``questions`` questions (full batches, few calls)."""
    chunk: list[_Pending] = []
    count = 0
    for item in pending:
        chunk.append(item)
        count += len(item.questions)
        if count >= questions:
            yield chunk
            chunk, count = [], 0
    if chunk:
        yield chunk


def _rule_details(group: list[Candidate], verdicts: dict[str, RuleResult]) -> dict[str, Any]:
    details: dict[str, Any] = {"rule_scores": {r.id: verdicts[r.id].score for r in group}}
    filtered = {r.id: verdicts[r.id].failed_hard for r in group if verdicts[r.id].filtered}
    if filtered:
        details["filtered"] = filtered
    return details


def _settle(group: list[Candidate], verdicts: dict[str, RuleResult], rules_margin: float,
            settings: JudgeSettings) -> dict[str, Any] | None:
    """Fields of a judgement the rules decide alone, or None (see :mod:`align.label.combine`)."""
    if len(group) == 1:
        verdict = verdicts[group[0].id]
        if not verdict.filtered:
            return None
        lowest = 1.0 if settings.scale == "10" else 0.0
        return {"score": lowest, "label": "bad", "confidence": 1.0,
                "details": {"decided_by": "rules-filter", "failed_hard": verdict.failed_hard}}
    decision = decide_by_rules(verdicts[group[0].id], verdicts[group[1].id], rules_margin)
    if decision is None:
        return None
    return {"score": decision.score, "label": decision.label, "confidence": 1.0,
            "details": {"decided_by": decision.decided_by}}


def _ask_judge(judge: Judge, settings: JudgeSettings, chunk: list[_Pending], info: JudgeInfo,
               result: LabelResult) -> Iterator[Judgement]:
    asked = [(p, group, rule_details) for p in chunk for group, rule_details in p.questions]
    if settings.mode == "pairwise":
        verdicts: list[Any] = judge.compare([(render_prompt(p.candidates.prompt), g[0].text, g[1].text)
                                             for p, g, _ in asked])
    else:
        verdicts = judge.rate([(render_prompt(p.candidates.prompt), g[0].text) for p, g, _ in asked])
    by_prompt: dict[int, list[Judgement]] = {id(p): list(p.settled) for p in chunk}
    for (p, group, rule_details), verdict in zip(asked, verdicts):
        details = {**verdict.details, **rule_details}
        if rule_details:
            details["decided_by"] = "judge"
        by_prompt[id(p)].append(_judgement(p.candidates, group, info, score=verdict.score, label=verdict.label,
                                           confidence=verdict.confidence, details=details))
        _count_judge_verdict(verdict.label, details, result)
    for p in chunk:
        yield from by_prompt[id(p)]


def _count_judge_verdict(label: str | None, details: dict[str, Any], result: LabelResult) -> None:
    if details.get("unparsed"):
        result.unparsed += 1
    if details.get("position_inconsistent"):
        result.position_inconsistent += 1
    longer = (details.get("length") or {}).get("longer")
    if label in ("a", "b") and longer:
        result.length_decisive += 1
        result.longer_preferred += label == longer


def _write(judgement: Judgement, out: JsonlAppender, review_out: JsonlAppender | None, route_below: float | None,
           result: LabelResult) -> None:
    result.decided_by[judgement.details.get("decided_by", "judge")] += 1
    if review_out is not None and mark_for_review(judgement, route_below):
        review_out.append(judgement)
        result.routed += 1
        return
    out.append(judgement)
    result.written += 1
    result.labels[str(judgement.label)] += 1
