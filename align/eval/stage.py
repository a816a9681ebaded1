"""`align eval`: did the student get better on held-out prompts, and what did it cost?

Both the student and the reference answer every held-out prompt (sampled at
temperature 1, the policy as trained, with different seeds so that a model
compared with itself is a fair coin). Then:

* win rate of the student against the reference, by the rules or the LLM judge
  (both orders), ties counted apart, with a bootstrap 95% interval over prompts;
* per-rule mean scores and pass rates, and the share of answers meeting every rule,
  before (reference) and after (student);
* KL(student || reference), estimated on the student's own samples:
  E_y~student [log p_student(y|x) - log p_reference(y|x)], per sequence and per token;
* response length (tokens, words) and how often the length cap was hit;
* implicit-reward accuracy and margin on held-out pairs, when given.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from align.config import StrictConfig
from align.data.io import atomic_path, write_json
from align.data.records import CandidateSet, text_of
from align.data.validate import read_records
from align.eval.logprobs import completion_logprobs
from align.eval.stats import compare_scores, mean, summarise_outcomes

log = logging.getLogger(__name__)


class EvalConfig(StrictConfig):
    model: str
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
    seed: int = 0
    batch_size: int = Field(32, ge=1)
    report_to: list[Literal["wandb"]] = Field(default_factory=list)
    teacher: str | None = Field(None, description="a teacher: the student's KL to it and agreement (align.eval.teacher)")
    teacher_system_prompt: str | None = Field(None, description="seen by the teacher only: text or @file")

    @model_validator(mode="after")
    def _one_judge(self) -> "EvalConfig":
        if self.judge is None and self.judge_model is None:
            raise ValueError("give a judge: --judge RULES.yaml or --judge-model MODEL")
        return self


@dataclass
class EvalResult:
    output_dir: str
    metrics: dict[str, Any] = field(default_factory=dict)
    report: str = ""


def run_eval(config: EvalConfig) -> EvalResult:
    from align.generate import generate

    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    rules = _load_rules(config.judge) if config.judge else None
    sampled = {}
    for role, spec, seed in (("model", config.model, config.seed), ("reference", config.reference, config.seed + 1)):
        path = out / f"responses_{role}.jsonl"
        log.info("sampling the %s's answers (%s) -> %s", role, spec, path)
        # Resumable like every stage: a rerun keeps what is already written.
        generate(model=spec, prompts=config.prompts, output=path, num_candidates=1, greedy_first=False,
                 temperature=config.temperature, top_p=config.top_p, top_k=0, max_new_tokens=config.max_new_tokens,
                 seed=seed, logprobs=0, batch_size=config.batch_size)
        sampled[role] = {row.prompt_id: row for row in read_records(path, "candidates")}
    prompt_ids = sorted(set(sampled["model"]) & set(sampled["reference"]))

    metrics: dict[str, Any] = {"model": config.model, "reference": config.reference, "prompts": len(prompt_ids),
                               "temperature": config.temperature, "max_new_tokens": config.max_new_tokens}
    outcomes, per_prompt = _judge(config, rules, sampled, prompt_ids, metrics)
    win = summarise_outcomes(outcomes, seed=config.seed)
    metrics.update(win_rate=win.rate, win_rate_ci_low=win.ci_low, win_rate_ci_high=win.ci_high,
                   wins=win.wins, ties=win.ties, losses=win.losses,
                   win_rate_ties_as_half=(win.wins + 0.5 * win.ties) / win.n if win.n else None)
    metrics.update(_lengths(sampled, prompt_ids))
    kl = _kl(config, sampled["model"], prompt_ids)
    metrics.update(kl_per_token=kl["per_token"], kl_per_sequence=kl["per_sequence"])
    for pid, value in zip(prompt_ids, kl["sequences"]):
        per_prompt[pid]["log_ratio"] = value
    if config.pairs:
        metrics["implicit_reward"] = _implicit_reward(config)
    if config.teacher:
        from align.eval.teacher import teacher_metrics

        metrics["teacher"] = teacher_metrics(config, out)

    write_json(out / "metrics.json", metrics)
    with atomic_path(out / "per_prompt.jsonl") as tmp:
        tmp.write_text("".join(json.dumps({"prompt_id": k, **v}) + "\n" for k, v in sorted(per_prompt.items())))
    from align.eval.report import write_report

    report = write_report(out, metrics, per_prompt, sampled, prompt_ids)
    if config.teacher:
        from align.eval.teacher import add_to_report

        add_to_report(report, metrics["teacher"])
    if config.report_to:
        _log_wandb(config, metrics, out)
    return EvalResult(str(out), metrics, str(report))


def _load_rules(path: Path) -> Any:
    from align.label.rules import load_rules

    return load_rules(path)


def _judge(config: EvalConfig, rules: Any, sampled: dict[str, dict[str, CandidateSet]], prompt_ids: list[str],
           metrics: dict[str, Any]) -> tuple[list[float], dict[str, dict[str, Any]]]:
    per_prompt: dict[str, dict[str, Any]] = {pid: {} for pid in prompt_ids}
    outcomes: list[float] = []
    if rules is not None:
        from align.label.rules import ResponseView

        rule_stats: dict[str, dict[str, list[float]]] = {}
        for pid in prompt_ids:
            scores = {}
            for role in ("model", "reference"):
                row = sampled[role][pid]
                response = row.responses[0]
                result = rules.evaluate(ResponseView(text_of(row.prompt), response.text, response.id,
                                                     response.num_tokens))
                scores[role] = result.score
                per_prompt[pid][f"{role}_score"] = result.score
                per_prompt[pid][f"{role}_meets_every_rule"] = bool(result.rules) and all(
                    o["passed"] for o in result.rules.values())
                for name, outcome in result.rules.items():
                    stats = rule_stats.setdefault(name, {"model_score": [], "reference_score": [],
                                                         "model_pass": [], "reference_pass": []})
                    stats[f"{role}_score"].append(outcome["score"])
                    stats[f"{role}_pass"].append(1.0 if outcome["passed"] else 0.0)
            outcome = compare_scores(scores["model"], scores["reference"])
            per_prompt[pid]["outcome"] = outcome
            outcomes.append(outcome)
        metrics["judge"] = f"rules:{config.judge}"
        metrics["rules"] = {name: {k: mean(v) for k, v in stats.items()} for name, stats in rule_stats.items()}
        metrics["rule_score_model"] = mean([v["model_score"] for v in per_prompt.values()
                                            if v.get("model_score") is not None])
        metrics["rule_score_reference"] = mean([v["reference_score"] for v in per_prompt.values()
                                                if v.get("reference_score") is not None])
        metrics["pass_rate_model"] = mean([1.0 if (v.get("model_score") or 0) > 0 else 0.0 for v in per_prompt.values()])
        metrics["pass_rate_reference"] = mean([1.0 if (v.get("reference_score") or 0) > 0 else 0.0
                                               for v in per_prompt.values()])
        # Hard rules are filters that almost every answer passes; an answer that meets every rule is the
        # stricter headline that can actually move.
        for role in ("model", "reference"):
            metrics[f"rule_pass_rate_{role}"] = mean([1.0 if v[f"{role}_meets_every_rule"] else 0.0
                                                      for v in per_prompt.values()])
        for name, stats in metrics["rules"].items():  # flat keys too, for dashboards
            metrics[f"rule/{name}/model"] = stats["model_score"]
            metrics[f"rule/{name}/reference"] = stats["reference_score"]
        return outcomes, per_prompt
    return _judge_with_model(config, sampled, prompt_ids, metrics, per_prompt)


def _judge_with_model(config: EvalConfig, sampled: dict[str, dict[str, CandidateSet]], prompt_ids: list[str],
                      metrics: dict[str, Any], per_prompt: dict[str, dict[str, Any]]) -> tuple[list[float], dict]:
    from align.eval.judging import pairwise_outcomes

    results = pairwise_outcomes(config, [(sampled["model"][pid], sampled["reference"][pid]) for pid in prompt_ids])
    outcomes = []
    for pid, (outcome, detail) in zip(prompt_ids, results):
        per_prompt[pid].update(outcome=outcome, **detail)
        outcomes.append(outcome)
    metrics["judge"] = f"llm:{config.judge_model}"
    metrics["judge_unparsed"] = sum(1 for d in per_prompt.values() if d.get("unparsed"))
    metrics["judge_position_inconsistent"] = sum(1 for d in per_prompt.values() if d.get("position_inconsistent"))
    return outcomes, per_prompt


def _lengths(sampled: dict[str, dict[str, CandidateSet]], prompt_ids: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for role in ("model", "reference"):
        responses = [sampled[role][pid].responses[0] for pid in prompt_ids]
        out[f"mean_length_{role}"] = mean([float(r.num_tokens or 0) for r in responses])
        out[f"mean_words_{role}"] = mean([float(len(r.text.split())) for r in responses])
        out[f"hit_length_cap_{role}"] = mean([1.0 if r.finish_reason == "length" else 0.0 for r in responses])
    return out


def _response_ids(tokenizer: Any, response: Any) -> list[int]:
    if response.logprobs and all("token_id" in t for t in response.logprobs):
        return [int(t["token_id"]) for t in response.logprobs]
    return tokenizer.encode(response.text, add_special_tokens=False)


def _prompt_ids(tokenizer: Any, prompt: Any) -> list[int]:
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else [m.model_dump() for m in prompt]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def _kl(config: EvalConfig, model_rows: dict[str, CandidateSet], prompt_ids: list[str]) -> dict[str, Any]:
    """Monte-Carlo KL(student || reference) on the student's own samples (unbiased at temperature 1)."""
    from align.models import load_model, load_tokenizer

    tokenizer = load_tokenizer(config.model)
    prompts = [_prompt_ids(tokenizer, model_rows[pid].prompt) for pid in prompt_ids]
    completions = [_response_ids(tokenizer, model_rows[pid].responses[0]) for pid in prompt_ids]
    log.info("scoring the student's %d samples under the student and the reference", len(prompts))
    student = completion_logprobs(load_model(config.model, merge_adapter=True), prompts, completions)
    reference = completion_logprobs(load_model(config.reference, merge_adapter=True), prompts, completions)
    sequences = [s - r for (s, _), (r, _) in zip(student, reference)]
    tokens = sum(n for _, n in student)
    caveat = None if config.temperature == 1.0 and config.top_p == 1.0 else \
        "samples were not drawn at temperature 1 / top_p 1: this is a log-ratio on decoded samples, not an unbiased KL"
    return {"per_sequence": mean(sequences), "per_token": sum(sequences) / tokens if tokens else None,
            "sequences": sequences, "caveat": caveat}


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
    return {"pairs": len(rows), "beta": beta, "accuracy": mean([1.0 if m > 0 else 0.0 for m in margins]),
            "ties": sum(1 for m in margins if m == 0), "margin": mean(margins)}


def _run_beta(model: str) -> float:
    path = Path(model) / "trl_args.json"
    if path.exists():
        return float(json.loads(path.read_text()).get("beta", 0.1))
    return 0.1


def _log_wandb(config: EvalConfig, metrics: dict[str, Any], out: Path) -> None:
    import os

    import wandb

    if not os.environ.get("WANDB_API_KEY") and not os.environ.get("WANDB_MODE"):
        os.environ["WANDB_MODE"] = "offline"
    run = wandb.init(project=os.environ.get("WANDB_PROJECT", "align"), job_type="eval", dir=str(out),
                     config=config.model_dump(mode="json"))
    run.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
    for png in sorted(out.glob("*.png")):
        run.log({png.stem: wandb.Image(str(png))})
    run.finish()
