"""`align eval`: did the student get better on held-out prompts, and what did it cost?

Both the student and the reference answer every held-out prompt ``samples_per_prompt``
(K) times (sampled at temperature 1, the policy as trained), or once greedily (``decoding: greedy``).
The student's k-th answer is compared with the reference's k-th, and the two were drawn with the
same random numbers (common random numbers: align's sampler picks each token by inverse CDF from a
uniform seeded by prompt and k, align.generate.decode). Each side is still an honest sample of its
own model, so the mean score difference estimates the same thing as with independent draws, but
where the two models agree their answers agree: a model compared with itself ties on every prompt
(score difference exactly 0), and a student that changed little is not buried under the noise of
two unrelated samples. On the quality suite, independent draws gave a student that had not moved
(KL 0.000 per token) a "gain" of +0.03 (95% CI -0.01 to +0.07).
Then:

* win rate of the student against the reference, by the rules or the LLM judge
  (both orders), ties counted apart, with a bootstrap 95% interval that resamples
  prompts (a prompt's K comparisons stay together);
* beside it the length-controlled win rate (AlpacaEval 2's idea): the judge's verdicts fitted on the
  length difference of the two answers (tokens, as mean_length), read at equal lengths, with the same
  prompt-resampling interval (align.eval.stats, summarise_length_controlled);
* with rules, the mean score difference (student minus reference, per prompt over its
  K answers, then over prompts) with a paired prompt-resampling 95% interval, and how
  many prompts improved or worsened;
* per-rule mean scores and pass rates, and the share of answers meeting every rule,
  before (reference) and after (student);
* KL(student || reference), estimated on the student's own samples:
  E_y~student [log p_student(y|x) - log p_reference(y|x)], per sequence and per token
  (with greedy answers, or temperature / top_p not 1, a log-ratio with a ``kl_caveat``); log p_student is
  what the student recorded as it answered, so only the reference scores the answers again (``kl: false`` skips
  that pass);
* response length (tokens, words) and how often the length cap was hit;
* implicit-reward accuracy (ties half, as training counts them) and margin on held-out pairs, when given.
"""

from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from align.config import StrictConfig
from align.data.io import atomic_path, file_lock, write_json
from align.data.records import CandidateSet, text_of
from align.data.validate import read_records
from align.errors import ConfigError
from align.eval.logprobs import completion_logprobs
from align.eval.stats import (
    compare_scores,
    implicit_reward_summary,
    mean,
    prompt_score_difference,
    summarise_length_controlled,
    summarise_prompt_outcomes,
    summarise_score_differences,
)

log = logging.getLogger(__name__)


class EvalConfig(StrictConfig):
    model: str = Field(..., description="the student: any model spec, or the URL of an OpenAI-compatible server "
                       "serving it (align serve, vLLM, llama.cpp), e.g. a quantised export")
    model_name: str | None = Field(None, description="with a server URL: the served model to ask (default: the "
                                   "only one the server lists)")
    api_key_env: str | None = Field(None, description="with a server URL: the variable holding its API key")
    reference: str
    prompts: Path
    output_dir: Path
    judge: Path | None = Field(None, description="rules YAML (align label rules format)")
    judge_model: str | None = Field(None, description="an LLM judge (pairwise, both orders)")
    judge_base_url: str | None = None
    judge_api_key_env: str = "OPENAI_API_KEY"
    pairs: Path | None = Field(None, description="held-out pairs for implicit-reward accuracy")
    beta: float | None = Field(None, description="DPO beta for implicit rewards (default: the run's, else 0.1)")
    max_new_tokens: int = Field(128, ge=1)
    temperature: float = Field(1.0, gt=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    # One sample per prompt at temperature 1 is noisy: on 16 held-out prompts the win rate was 0.53
    # (CI 0.27-0.79) while the mean rule score went 0.27 -> 0.51. K samples give K comparisons per prompt
    # (the interval still resamples prompts, so it does not pretend they are K times as many prompts).
    samples_per_prompt: int = Field(1, ge=1, description="answers per prompt and model; the k-th are compared")
    decoding: Literal["sample", "greedy"] = Field(
        "sample", description="sample (temperature, top_p) or greedy: one deterministic answer per prompt")
    reference_answers: Path | None = Field(
        None, description="where the reference's answers live, to share them between evals of several students "
        "against one reference (same prompts and settings): written by the first, reused by the rest")
    kl: bool = Field(True, description="score the student's answers under the reference for KL(student || "
                     "reference); false skips that pass (with greedy answers it gives only a log-ratio)")
    seed: int = 0
    batch_size: int = Field(32, ge=1)
    report_to: list[Literal["wandb"]] = Field(default_factory=list)
    teacher: str | None = Field(None, description="a teacher: the student's KL to it and agreement (align.eval.teacher)")
    teacher_system_prompt: str | None = Field(None, description="seen by the teacher only: text or @file")

    @model_validator(mode="after")
    def _one_judge(self) -> "EvalConfig":
        if self.judge is None and self.judge_model is None:
            raise ValueError("give a judge: --judge RULES.yaml or --judge-model MODEL")
        if is_server_url(self.model) and (self.pairs or self.teacher):
            raise ValueError(f"the student is served at {self.model}: pairs (implicit rewards) and teacher (KL to "
                             "a teacher) need its weights; give its folder or run dir as model for those")
        if self.decoding == "greedy" and self.samples_per_prompt > 1:
            raise ValueError(f"samples_per_prompt is {self.samples_per_prompt} but greedy decoding gives one "
                             "answer per prompt (K copies of it would fake precision): drop --greedy to sample "
                             "K answers, or set samples_per_prompt: 1")
        return self

    @property
    def greedy(self) -> bool:
        return self.decoding == "greedy"

    @property
    def sampling(self) -> tuple[float, float]:
        """(temperature, top_p) the answers are decoded with: greedy is temperature 0."""
        return (0.0, 1.0) if self.greedy else (self.temperature, self.top_p)


@dataclass
class EvalResult:
    """What eval measured, and the files it wrote there, by name (a caller never builds a path into output_dir)."""

    output_dir: str
    metrics: dict[str, Any] = field(default_factory=dict)
    report: str = ""  # report.md, which links the plots (PNG) written beside it
    metrics_file: str = ""  # metrics.json: ``metrics`` as written
    per_prompt: str = ""  # per_prompt.jsonl: each prompt's outcomes, judgements, scores and log-ratios
    # The answers that were compared, JSONL by role: "model", "reference" (``reference_answers`` when shared
    # between evals, so maybe outside output_dir) and, with a teacher, "teacher".
    answers: dict[str, str] = field(default_factory=dict)

    @property
    def files(self) -> dict[str, str]:
        """Every output by name: metrics, report, per_prompt, answers_<role>."""
        named = {"metrics": self.metrics_file, "report": self.report, "per_prompt": self.per_prompt,
                 **{f"answers_{role}": path for role, path in self.answers.items()}}
        return {name: path for name, path in named.items() if path}


def run_eval(config: EvalConfig) -> EvalResult:
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    rules = _load_rules(config.judge) if config.judge else None
    k = config.samples_per_prompt
    temperature, top_p = config.sampling
    sampled, answers = {}, {}
    for role in ("model", "reference"):
        path = write_answers(config, role)
        sampled[role] = {row.prompt_id: row for row in read_records(path, "candidates")}
        answers[role] = str(path)
    prompt_ids = sorted(set(sampled["model"]) & set(sampled["reference"]))

    metrics: dict[str, Any] = {"model": config.model, "reference": config.reference, "prompts": len(prompt_ids),
                               "temperature": temperature, "max_new_tokens": config.max_new_tokens,
                               "decoding": config.decoding, "samples_per_prompt": k}
    per_prompt = _judge(config, rules, sampled, prompt_ids, metrics)
    win = summarise_prompt_outcomes([per_prompt[pid]["outcomes"] for pid in prompt_ids], seed=config.seed)
    metrics.update(win_rate=win.rate, win_rate_ci_low=win.ci_low, win_rate_ci_high=win.ci_high,
                   wins=win.wins, ties=win.ties, losses=win.losses,
                   win_rate_ties_as_half=(win.wins + 0.5 * win.ties) / win.n if win.n else None)
    unit, diffs = _length_differences(sampled, prompt_ids)
    for pid, values in zip(prompt_ids, diffs):
        per_prompt[pid]["length_diffs"] = values
    lc = summarise_length_controlled([per_prompt[pid]["outcomes"] for pid in prompt_ids], diffs, seed=config.seed)
    metrics.update(lc_win_rate=lc.rate, lc_win_rate_ci_low=lc.ci_low, lc_win_rate_ci_high=lc.ci_high,
                   lc_length_slope=lc.slope, lc_length_unit=unit)
    metrics.update(_lengths(sampled, prompt_ids))
    metrics["identical_answers"] = _identical_share(sampled, prompt_ids)
    kl = (_kl(config, sampled["model"], prompt_ids) if config.kl
          else _unmeasured(prompt_ids, "not measured (kl: false)"))
    metrics.update(kl_per_token=kl["per_token"], kl_per_sequence=kl["per_sequence"], kl_caveat=kl["caveat"])
    for pid, values in zip(prompt_ids, kl["sequences"]):
        per_prompt[pid]["log_ratios"] = values
        per_prompt[pid]["log_ratio"] = _per_prompt(values)
    if config.pairs:
        metrics["implicit_reward"] = _implicit_reward(config)
    if config.teacher:
        from align.eval.teacher import teacher_metrics

        metrics["teacher"] = teacher_metrics(config, out)

    metrics_file, per_prompt_file = out / "metrics.json", out / "per_prompt.jsonl"
    write_json(metrics_file, metrics)
    with atomic_path(per_prompt_file) as tmp:
        tmp.write_text("".join(json.dumps({"prompt_id": k, **v}) + "\n" for k, v in sorted(per_prompt.items())))
    from align.eval.report import write_report

    report = write_report(out, metrics, per_prompt, sampled, prompt_ids)
    if config.teacher:
        from align.eval.teacher import add_to_report

        add_to_report(report, metrics["teacher"])
        answers["teacher"] = str(out / "teacher_answers.jsonl")  # where teacher_metrics writes them
    if config.report_to:
        _log_wandb(config, metrics, out)
    return EvalResult(str(out), metrics, str(report), metrics_file=str(metrics_file),
                      per_prompt=str(per_prompt_file), answers=answers)


def is_server_url(spec: str) -> bool:
    return spec.startswith(("http://", "https://"))


def _served(config: EvalConfig) -> dict[str, Any]:
    """How ``align generate`` reaches a served student: the openai backend, and the model name the server lists
    (or ``model_name``)."""
    from align.models.openai_client import OpenAIClient

    name = config.model_name
    if name is None:
        client = OpenAIClient(config.model, api_key_env=config.api_key_env)
        try:
            served = client.served_models()
        finally:
            client.close()
        if len(served) != 1:
            raise ConfigError(f"{config.model} serves {len(served)} models ({', '.join(served) or 'none listed'}): "
                              "name the one to evaluate with model_name=NAME")
        name = served[0]
    where = {"model": name, "backend": "openai", "base_url": config.model}
    return {**where, "api_key_env": config.api_key_env} if config.api_key_env else where


def _identical_share(sampled: dict[str, dict[str, CandidateSet]], prompt_ids: list[str]) -> float | None:
    """The share of compared answer pairs (student's k-th, reference's k-th) that are the same text: with greedy
    answers, how often a served or quantised student says exactly what the original says."""
    pairs = [(m.text, r.text) for pid in prompt_ids
             for m, r in zip(sampled["model"][pid].responses, sampled["reference"][pid].responses)]
    return sum(m == r for m, r in pairs) / len(pairs) if pairs else None


def _load_rules(path: Path) -> Any:
    from align.label.rules import load_rules

    return load_rules(path)


def _per_prompt(values: list[Any]) -> Any:
    """A prompt's one value (as written before K existed) or, with K answers, their mean."""
    return values[0] if len(values) == 1 else mean([float(v) for v in values])


def _judge(config: EvalConfig, rules: Any, sampled: dict[str, dict[str, CandidateSet]], prompt_ids: list[str],
           metrics: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per prompt: ``outcomes`` (the k-th answers compared, k = 0..K-1) and ``outcome``; with rules also
    the K scores per side, their means and ``score_diff``; the rules' or judge's metrics go into ``metrics``."""
    if rules is None:
        return _judge_with_model(config, sampled, prompt_ids, metrics)
    from align.label.rules import ResponseView

    per_prompt: dict[str, dict[str, Any]] = {pid: {} for pid in prompt_ids}
    rule_stats: dict[str, dict[str, list[float]]] = {}
    every_rule: dict[str, list[float]] = {"model": [], "reference": []}
    for pid in prompt_ids:
        row = per_prompt[pid]
        pairs = zip(_answers(sampled, "model", pid, config), _answers(sampled, "reference", pid, config))
        scores: dict[str, list[float | None]] = {"model": [], "reference": []}
        meets: dict[str, list[bool]] = {"model": [], "reference": []}
        for answers in pairs:
            for role, response in zip(("model", "reference"), answers):
                result = rules.evaluate(ResponseView(text_of(sampled[role][pid].prompt), response.text, response.id,
                                                     response.num_tokens))
                scores[role].append(result.score)
                meets[role].append(bool(result.rules) and all(o["passed"] for o in result.rules.values()))
                every_rule[role].append(1.0 if meets[role][-1] else 0.0)
                for name, outcome in result.rules.items():
                    stats = rule_stats.setdefault(name, {"model_score": [], "reference_score": [],
                                                         "model_pass": [], "reference_pass": []})
                    stats[f"{role}_score"].append(outcome["score"])
                    stats[f"{role}_pass"].append(1.0 if outcome["passed"] else 0.0)
        row["outcomes"] = [compare_scores(m, r) for m, r in zip(scores["model"], scores["reference"])]
        row["outcome"] = _per_prompt(row["outcomes"])
        for role in ("model", "reference"):
            present = [x for x in scores[role] if x is not None]
            row[f"{role}_scores"] = scores[role]
            row[f"{role}_score"] = (scores[role][0] if len(scores[role]) == 1 else mean(present))
            row[f"{role}_meets_every_rule"] = _per_prompt(meets[role])
        row["score_diff"] = prompt_score_difference(scores["model"], scores["reference"])
    metrics["judge"] = f"rules:{config.judge}"
    metrics["rules"] = {name: {k: mean(v) for k, v in stats.items()} for name, stats in rule_stats.items()}
    for role in ("model", "reference"):  # over all K answers of every prompt
        all_scores = [x for v in per_prompt.values() for x in v[f"{role}_scores"]]
        metrics[f"rule_score_{role}"] = mean([x for x in all_scores if x is not None])
        metrics[f"pass_rate_{role}"] = mean([1.0 if (x or 0) > 0 else 0.0 for x in all_scores])
        # Hard rules are filters that almost every answer passes; an answer that meets every rule is the
        # stricter headline that can actually move.
        metrics[f"rule_pass_rate_{role}"] = mean(every_rule[role])
    diff = summarise_score_differences([v["score_diff"] for v in per_prompt.values()], seed=config.seed)
    metrics.update(score_diff=diff.mean, score_diff_ci_low=diff.ci_low, score_diff_ci_high=diff.ci_high,
                   improved=diff.improved, worsened=diff.worsened, unchanged=diff.unchanged)
    for name, stats in metrics["rules"].items():  # flat keys too, for dashboards
        metrics[f"rule/{name}/model"] = stats["model_score"]
        metrics[f"rule/{name}/reference"] = stats["reference_score"]
    return per_prompt


def _answers(sampled: dict[str, dict[str, CandidateSet]], role: str, pid: str, config: EvalConfig) -> list[Any]:
    """The role's K answers to one prompt, in candidate order (the k-th of each side are compared)."""
    responses = sampled[role][pid].responses
    if len(responses) != config.samples_per_prompt:
        raise ConfigError(f"{config.output_dir}/responses_{role}.jsonl: prompt {pid!r} has {len(responses)} "
                          f"answers but samples_per_prompt is {config.samples_per_prompt}; use a new "
                          "--output-dir, or delete that file to answer again")
    return responses


def _check_earlier_answers(path: Path, k: int, greedy: bool) -> None:
    """A rerun resumes `path`; say so in eval's words when it holds answers made with another K or decoding."""
    if not path.exists():
        return
    with path.open(encoding="utf-8") as f:
        first = f.readline()
    try:
        responses = json.loads(first)["responses"]
    except (ValueError, KeyError, TypeError):
        return  # not ours to judge: generate says what is wrong with the file
    found_k = len(responses)
    found_greedy = bool(responses) and responses[0].get("sampling", {}).get("do_sample") is False
    if found_k != k or found_greedy != greedy:
        found = "1 greedy answer" if found_greedy else f"{found_k} sampled answer(s)"
        wanted = "1 greedy answer" if greedy else f"{k} sampled answer(s)"
        raise ConfigError(f"{path}:1: an earlier eval wrote {found} per prompt here, this one asks for {wanted}; "
                          "use a new --output-dir, or delete that file to answer again")


def _judge_with_model(config: EvalConfig, sampled: dict[str, dict[str, CandidateSet]], prompt_ids: list[str],
                      metrics: dict[str, Any]) -> dict[str, dict[str, Any]]:
    from align.eval.judging import pairwise_outcomes

    items = [(text_of(sampled["model"][pid].prompt), model.text, reference.text)
             for pid in prompt_ids
             for model, reference in zip(_answers(sampled, "model", pid, config),
                                         _answers(sampled, "reference", pid, config))]
    results = iter(pairwise_outcomes(config, items))
    per_prompt: dict[str, dict[str, Any]] = {}
    for pid in prompt_ids:
        judged = [next(results) for _ in range(config.samples_per_prompt)]
        row: dict[str, Any] = {"outcomes": [o for o, _ in judged], "outcome": _per_prompt([o for o, _ in judged])}
        if len(judged) == 1:
            row.update(judged[0][1])  # as written before K existed
        else:
            row["judgements"] = [d for _, d in judged]
        per_prompt[pid] = row
    details = [d for v in per_prompt.values() for d in v.get("judgements", [v])]
    metrics["judge"] = f"llm:{config.judge_model}"
    metrics["judge_unparsed"] = sum(1 for d in details if d.get("unparsed"))
    metrics["judge_position_inconsistent"] = sum(1 for d in details if d.get("position_inconsistent"))
    return per_prompt


def _lengths(sampled: dict[str, dict[str, CandidateSet]], prompt_ids: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for role in ("model", "reference"):  # over all K answers of every prompt
        responses = [r for pid in prompt_ids for r in sampled[role][pid].responses]
        out[f"mean_length_{role}"] = mean([float(r.num_tokens or 0) for r in responses])
        out[f"mean_words_{role}"] = mean([float(len(r.text.split())) for r in responses])
        out[f"hit_length_cap_{role}"] = mean([1.0 if r.finish_reason == "length" else 0.0 for r in responses])
    return out


def _length_differences(sampled: dict[str, dict[str, CandidateSet]],
                        prompt_ids: list[str]) -> tuple[str, list[list[float]]]:
    """Per prompt, len(student's k-th answer) - len(reference's k-th), k = 0..K-1, in the comparisons' order.
    In tokens, as mean_length; in words (as mean_words) for all when any answer has no token count, rather
    than a made-up 0 that would fake a length gap."""
    pairs = [list(zip(sampled["model"][pid].responses, sampled["reference"][pid].responses)) for pid in prompt_ids]
    if all(r.num_tokens is not None for prompt in pairs for pair in prompt for r in pair):
        return "tokens", [[float(m.num_tokens - r.num_tokens) for m, r in prompt] for prompt in pairs]
    return "words", [[float(len(m.text.split()) - len(r.text.split())) for m, r in prompt] for prompt in pairs]


def _response_ids(tokenizer: Any, response: Any) -> list[int]:
    if response.logprobs and all("token_id" in t for t in response.logprobs):
        return [int(t["token_id"]) for t in response.logprobs]
    return tokenizer.encode(response.text, add_special_tokens=False)


def write_answers(config: EvalConfig, role: Literal["model", "reference"]) -> Path:
    """The answers of ``role`` that ``config`` compares, generated unless already there (resumable like every stage:
    a rerun keeps what is written); the reference's at ``reference_answers`` when given, so that evals of several
    students, or a caller preparing them ahead, share one set."""
    from align.generate import generate

    k = config.samples_per_prompt
    temperature, top_p = config.sampling
    spec = config.model if role == "model" else config.reference
    shared = role == "reference" and config.reference_answers is not None
    path = Path(config.reference_answers) if shared else Path(config.output_dir) / f"responses_{role}.jsonl"
    log.info("%s the %s's answers (%s, %d per prompt) -> %s", "decoding" if config.greedy else "sampling",
             role, spec, k, path)
    # Every answer comes with its tokens' log-probs (for the KL); a served student's over HTTP.
    where = _served(config) if role == "model" and is_server_url(spec) else {"model": spec}
    path.parent.mkdir(parents=True, exist_ok=True)
    # Evals of several students may share the reference's answers at once: one writes, the others wait.
    with file_lock(path.with_name(path.name + ".lock")) if shared else contextlib.nullcontext():
        _check_earlier_answers(path, k, config.greedy)
        generate(**where, prompts=config.prompts, output=path, num_candidates=k, greedy_first=False,
                 temperature=temperature, top_p=top_p, top_k=0, max_new_tokens=config.max_new_tokens,
                 seed=config.seed, logprobs=0, batch_size=config.batch_size)
    return path


def _unmeasured(prompt_ids: list[str], caveat: str) -> dict[str, Any]:
    """What :func:`_kl` returns when there is no KL to give, and why."""
    return {"per_sequence": None, "per_token": None, "sequences": [[] for _ in prompt_ids], "caveat": caveat}


def _kl(config: EvalConfig, model_rows: dict[str, CandidateSet], prompt_ids: list[str]) -> dict[str, Any]:
    """Monte-Carlo KL(student || reference) on the student's own samples (unbiased at temperature 1),
    over all K answers of every prompt; ``sequences`` holds each prompt's K log-ratios."""
    from align.models import load_model, load_tokenizer, prompt_token_ids

    served = is_server_url(config.model)
    # A served student is scored on the tokens it returned, under the reference's tokenizer (a served or quantised
    # student keeps its model's tokenizer).
    tokenizer = load_tokenizer(config.reference if served else config.model)
    prompts, completions, owners = [], [], []
    recorded: list[tuple[float | None, int]] = []
    for pid in prompt_ids:
        # Rendered as generation rendered it when the answers were sampled: scored on the same ids.
        prompt = prompt_token_ids(tokenizer, model_rows[pid].prompt)
        for response in model_rows[pid].responses:
            prompts.append(prompt)
            completions.append(_response_ids(tokenizer, response))
            owners.append(pid)
            recorded.append(_recorded_logprob(response))
    # The student's log-probs of its own tokens were recorded as it generated them (eval asks generate for
    # them): a second forward pass over every answer would only repeat them, to float rounding.
    have_recorded = all(value is not None for value, _ in recorded)
    if served and not have_recorded:
        return _unmeasured(prompt_ids, f"{config.model} returned no log-probs for its tokens: no KL")
    log.info("scoring the student's %d samples under %sthe reference", len(prompts),
             "" if have_recorded else "the student and ")
    student = recorded if have_recorded else \
        completion_logprobs(load_model(config.model, merge_adapter=True), prompts, completions)
    reference = completion_logprobs(load_model(config.reference, merge_adapter=True), prompts, completions)
    flat = [s - r for (s, _), (r, _) in zip(student, reference)]
    tokens = sum(n for _, n in student)
    by_prompt: dict[str, list[float]] = {pid: [] for pid in prompt_ids}
    for pid, value in zip(owners, flat):
        by_prompt[pid].append(value)
    if config.greedy:
        caveat = "answers were greedy, not sampled: this is a log-ratio on each model's most likely answer, " \
                 "not an unbiased KL"
    elif config.temperature != 1.0 or config.top_p != 1.0:
        caveat = "samples were not drawn at temperature 1 / top_p 1: this is a log-ratio on decoded samples, " \
                 "not an unbiased KL"
    else:
        caveat = None
    return {"per_sequence": mean(flat), "per_token": sum(flat) / tokens if tokens else None,
            "sequences": [by_prompt[pid] for pid in prompt_ids], "caveat": caveat}


def _recorded_logprob(response: Any) -> tuple[float | None, int]:
    """(the log-prob of an answer, its tokens) from the per-token log-probs recorded with it (by generate, or by
    the server that answered); None where they are missing."""
    entries = response.logprobs or []
    values = [entry.get("logprob") for entry in entries]
    if not entries or any(v is None for v in values):
        return None, len(entries)
    return float(sum(values)), len(entries)


def _implicit_reward(config: EvalConfig) -> dict[str, Any]:
    """DPO's implicit reward beta*(log pi - log pi_ref) on held-out pairs: accuracy and mean margin."""
    from align.models import load_model, load_tokenizer
    from align.train.data import load_training_data
    from align.train.preflight import tokenize_like_trl

    beta = config.beta if config.beta is not None else _run_beta(config.model)
    rows = load_training_data(config.pairs, "dpo").rows
    tokenizer = load_tokenizer(config.model)
    prompts, completions = [], []
    for row in rows:
        for key in ("chosen", "rejected"):
            p, c = tokenize_like_trl(tokenizer, row["prompt"], row[key])
            prompts.append(p)
            completions.append(c)
    policy = completion_logprobs(load_model(config.model, merge_adapter=True), prompts, completions)
    reference = completion_logprobs(load_model(config.reference, merge_adapter=True), prompts, completions)
    rewards = [beta * (p - r) for (p, _), (r, _) in zip(policy, reference)]
    margins = [rewards[2 * i] - rewards[2 * i + 1] for i in range(len(rows))]
    return {"pairs": len(rows), "beta": beta, **implicit_reward_summary(margins, beta)}


def _run_beta(model: str) -> float:
    path = Path(model) / "trl_args.json"
    if path.exists():
        return float(json.loads(path.read_text()).get("beta", 0.1))
    return 0.1


def _log_wandb(config: EvalConfig, metrics: dict[str, Any], out: Path) -> None:
    import os

    from align import extras
    from align.train.tracking import configure_wandb

    configure_wandb(["wandb"], str(out))  # a missing wandb (an optional extra) says how to install it
    wandb = extras.wandb()
    run = wandb.init(project=os.environ["WANDB_PROJECT"], job_type="eval", dir=str(out),
                     config=config.model_dump(mode="json"))
    run.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
    for png in sorted(out.glob("*.png")):
        run.log({png.stem: wandb.Image(str(png))})
    run.finish()
