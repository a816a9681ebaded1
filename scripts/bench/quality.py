"""The quality suite: does a default align run make a student better on prompts it never saw, beside controls?

For each preference task of ``datasets/quality/tasks.yaml`` (a user-style rules file, training prompts and
disjoint held-out prompts):

1. the bundled model, prompted with the task's hint, writes 8 candidates per training prompt (up to 48); the rules
   label them; ``align pairs build`` with its defaults makes DPO pairs and KTO rows, and ``align data select``
   with its defaults keeps the best answer per prompt as SFT rows;
2. students train for a fixed budget (40 optimizer steps of 4, LoRA, 2 CPU cores):
   - ``align-dpo``: ``align train dpo`` with its defaults (3 seeds; one with ``--quick``),
   - ``align-kto``: ``align train kto`` with its defaults on the unpaired rows of the same candidates,
   - ``random``: align's DPO defaults on the same pairs with chosen/rejected swapped by a fair coin,
   - ``trl-dpo``: plain TRL ``DPOTrainer`` with its defaults (LoRA r=16 on all linear layers, as align's),
   - ``align-sft``: ``align train sft`` with its defaults on the selected best answers (the teacher's own, curated),
   - ``align-orpo``, ``align-simpo``: ``align train orpo`` / ``simpo`` with their defaults on the DPO pairs
     (no reference model);
   - ``align-rounds``: ``align pipeline run`` with ``rounds: 2`` of 20 DPO steps each (the same 40 in all): round 1
     on the teacher's candidates as above, round 2 on candidates half the teacher's and half round 1's student's;
3. ``align eval`` puts each student against the reference (the model it started from) on the held-out
   prompts, greedy and sampled (K answers per prompt at temperature 1), and the task's rules score every
   answer: score before -> after with a prompt-clustered bootstrap 95% interval, answers improved/worsened,
   length ratio, length-cap hits and KL(student || reference) per token.

Every step writes its files under ``--work`` and is skipped when they exist, so a stopped run carries on.
Results: a table on stdout, ``scripts/bench/results/quality[-quick].json`` and a reward-vs-KL plot beside it.
``--methods`` trains and evaluates only the methods named; the table and JSON still show the run's other methods
(all, or --quick's) wherever their evaluations are already in the work dir, so that running some methods later
completes the table, with the random control beside them, instead of replacing it.

    flock /tmp/align-cpu.lock .venv/bin/python scripts/bench/quality.py            # everything, ~3 h on 2 cores
    flock /tmp/align-cpu.lock .venv/bin/python scripts/bench/quality.py --quick    # 2 tasks, DPO vs random, ~13 min
    flock /tmp/align-cpu.lock .venv/bin/python scripts/bench/quality.py --methods align-dpo,align-kto,random,trl-dpo
    flock /tmp/align-cpu.lock .venv/bin/python scripts/bench/quality.py --methods align-sft,align-orpo,align-simpo

``--set``/``--pairs`` try other training and pair settings beside the defaults (``--set kto.beta=0.2``: KTO's
only; unprefixed ones apply to DPO, KTO and the random control), ``--candidates N`` another number
of teacher candidates per prompt (its own files beside the default 8's), ``--samples-per-prompt K`` more sampled
answers per held-out prompt (narrower intervals where one answer's score is mostly chance; its own eval folders).
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import random
import sys
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
TASKS_FILE = REPO / "datasets" / "quality" / "tasks.yaml"
RESULTS = REPO / "scripts" / "bench" / "results"
MODEL = "bundled:smollm2-135m-instruct"

STEPS, BATCH = 40, 4  # the fixed training budget of every method
CANDIDATES, CANDIDATE_TOKENS = 8, 64  # align generate's default count
# The count the suite had first (align's default until 8 was measured better): its files and hashes keep the plain
# names, so the runs cached then keep theirs; any other count is named (candidates-8.jsonl).
UNNAMED_CANDIDATES = 4
EVAL_TOKENS = 96  # longer than the candidates: a student that rambles shows as length-cap hits


@dataclass(frozen=True)
class Method:
    """How one method of the suite trains: which align trainer (``align.train.<trainer>``; None: plain TRL's
    DPOTrainer), on which file of its data folder, and whether a variant's ``--set`` settings apply to it."""

    trainer: str | None
    data: str  # in the pairs folder (Variant.pairs_tag), or for sft.jsonl the selection folder (Variant.select_tag)
    variant_applies: bool
    rounds: int = 1  # > 1: align's on-policy rounds (the pipeline's ``rounds``), the budget's steps split among them


# --set settings are DPO/KTO ones and apply to those trainers only: the same name can mean something else
# elsewhere (SimPO's beta is 2.0 on mean log-probs, ORPO's beta is its lambda), so SFT, ORPO and SimPO always
# train with align's defaults, and a variant that changes DPO settings shares their runs with the defaults.
REGISTRY = {
    "align-dpo": Method("dpo", "pairs.jsonl", True),
    "align-kto": Method("kto", "unpaired.jsonl", True),
    "random": Method("dpo", "pairs_random.jsonl", True),
    "trl-dpo": Method(None, "pairs.jsonl", False),
    "align-sft": Method("sft", "sft.jsonl", False),
    "align-orpo": Method("orpo", "pairs.jsonl", False),
    "align-simpo": Method("simpo", "pairs.jsonl", False),
    # DPO in 2 on-policy rounds of 20 steps: round 1 on the teacher's candidates (as align-dpo's), round 2 on
    # candidates half from the teacher, half from round 1's student; the data is the pipeline's own
    "align-rounds": Method("dpo", "pairs.jsonl", True, rounds=2),
}
# Rounds after the first: the share of each prompt's candidates the prompted teacher writes. The student answers
# without the task's hint, so with none of the teacher's its candidates may hold no answer the rules like.
ROUND_TEACHER_SHARE = 0.5
METHODS = tuple(REGISTRY)
# --quick keeps its one question (and its ~13 min): the three reference-free methods would add 6 trainings of ~5 min
QUICK_TASKS, QUICK_METHODS = ("concise", "caution"), ("align-dpo", "random")

log = logging.getLogger("quality")


TRAIN_PROMPTS, HELDOUT_PROMPTS = 48, 24  # per task, at most (some tasks have fewer)
SAMPLES_PER_PROMPT = 2  # sampled answers per held-out prompt and model, beside one greedy answer
FULL_SEEDS, QUICK_SEEDS = (0, 1, 2), (0,)  # align-dpo's seeds; --quick's runs are a subset of the full run's
SEEDED = ("align-dpo",)  # the methods trained with every seed (issue 15: one seed is enough for the others)


def sampled_eval(samples: int) -> str:
    """The folder of a student's sampled eval, and the stem of the reference's shared sampled answers: another K
    has its own (eval refuses to resume answers made with another K), the suite's own keeps the plain name."""
    return "sample" if samples == SAMPLES_PER_PROMPT else f"sample-{samples}"


@dataclass(frozen=True)
class Task:
    name: str
    kind: str
    rules: Path
    train_prompts: Path
    heldout_prompts: Path | None
    heldout_every: int | None
    teacher_system_prompt: str | None


@dataclass(frozen=True)
class Variant:
    """Settings under test on top of align's defaults (none: the defaults themselves), for choosing defaults."""

    # align train dpo/kto key=value (also the random control's); "kto.beta" or "dpo.beta": that trainer only
    train: tuple[tuple[str, Any], ...] = ()
    pairs: tuple[tuple[str, Any], ...] = ()  # build_pairs keyword arguments
    candidates: int = CANDIDATES  # the teacher's candidates per training prompt

    def settings_for(self, trainer: str) -> dict[str, Any]:
        """The variant's training settings that ``trainer`` (dpo or kto) takes: the unprefixed ones and its own."""
        settings = {}
        for key, value in self.train:
            prefix, dot, name = key.rpartition(".")
            if dot and prefix not in VARIANT_TRAINERS:
                raise SystemExit(f"--set {key}: a prefix names one of {', '.join(VARIANT_TRAINERS)}")
            if prefix in ("", trainer):
                settings[name] = value
        return settings

    @property
    def is_defaults(self) -> bool:
        return not self.train and not self.pairs and self.candidates == CANDIDATES

    @property
    def candidates_suffix(self) -> str:
        """Tells the files of another candidate count apart (candidates-8.jsonl); the suite's first count keeps the
        plain names, and every hash below takes the count only when it is not that one, so the runs cached
        before the count could change keep their names."""
        return "" if self.candidates == UNNAMED_CANDIDATES else f"-{self.candidates}"

    def _with_count(self, settings: dict[str, Any]) -> dict[str, Any]:
        return settings if self.candidates == UNNAMED_CANDIDATES else {**settings, "candidates": self.candidates}

    @functools.cached_property
    def effective(self) -> dict[str, Any]:
        """The settings each step takes effect with: align's defaults overlaid with the variant's."""
        from align.data.pairs import DEFAULT_MAX_PAIRS_PER_PROMPT, DEFAULT_MIN_MARGIN, DEFAULT_STRATEGY
        from align.train import load_train_config
        from align.train.config import PASSES_PER_BATCH_ATTR, build_trl_args

        pairs = {"strategy": DEFAULT_STRATEGY, "min_margin": DEFAULT_MIN_MARGIN,
                 "max_pairs_per_prompt": DEFAULT_MAX_PAIRS_PER_PROMPT, **dict(self.pairs)}
        # no cap (0 or None, every pair) is named as before the cap became a default, so those runs keep their names
        effective: dict[str, Any] = {"pairs": {k: v for k, v in pairs.items()
                                               if k != "max_pairs_per_prompt" or v}}
        for method in ("dpo", "kto", "sft", "orpo", "simpo"):
            settings = self.settings_for(method) if method in VARIANT_TRAINERS else {}
            config = load_train_config(method, {"data": "-", "output_dir": "-", **settings})
            args = build_trl_args(config, "-", on_gpu=False, bf16_ok=False)
            trl_args = json.loads(args.to_json_string())
            _fold_micro_batches(trl_args, getattr(args, PASSES_PER_BATCH_ATTR, None))
            # TRL's keys are in trl_args; which rows to read (the data, its split and limit) is the suite's
            own = set(type(config).model_fields) - {"data", "output_dir", "split", "limit", "eval_data_split"}
            effective[method] = {"align": config.model_dump(mode="json", include=own),
                                 "trl": {k: v for k, v in trl_args.items() if k not in ("output_dir", "logging_dir")}}
        effective["select"] = select_defaults()
        return effective

    # Runs are named by the settings they take effect with, so that a variant equal to align's defaults (once
    # they have been changed to it) shares its runs with the defaults' instead of training again; the pairs and
    # each trainer have their own hash, so a DPO setting does not retrain KTO.

    @property
    def tag(self) -> str:
        """Names a variant's results file: a hash of what a variant can change (the pairs, DPO, KTO), the same
        content as before SFT/ORPO/SimPO joined, so earlier variants' files keep their names."""
        from align.data.records import content_hash

        return "settings-" + content_hash(
            self._with_count({key: self.effective[key] for key in ("pairs", *VARIANT_TRAINERS)}), 8)

    @property
    def pairs_tag(self) -> str:
        from align.data.records import content_hash

        return "pairs-" + content_hash(self._with_count(self.effective["pairs"]), 8)

    @property
    def select_tag(self) -> str:
        """The SFT rows' folder: they come from the judgements, not the pairs, so a pairs setting does not retrain
        SFT."""
        from align.data.records import content_hash

        return "select-" + content_hash(self._with_count(self.effective["select"]), 8)

    def train_tag(self, method: str) -> str:
        from align.data.records import content_hash

        spec = REGISTRY[method]
        if spec.trainer is None:
            return "trl-defaults"
        if spec.rounds > 1:
            return content_hash({"train": self.effective[spec.trainer], "pairs": self.effective["pairs"],
                                 "rounds": spec.rounds, "teacher_share": ROUND_TEACHER_SHARE}, 8)
        return content_hash(self.effective[spec.trainer], 8)


VARIANT_TRAINERS = ("dpo", "kto")  # the trainers a variant's --set settings apply to


def select_defaults() -> dict[str, Any]:
    """``align data select``'s defaults (align.data.select.select_sft's keyword defaults: the best answer per
    prompt, no score floor, reasoning dropped), as the SFT rows are made with them."""
    import inspect

    from align.data.select import select_sft

    return {name: p.default for name, p in inspect.signature(select_sft).parameters.items()
            if p.kind is inspect.Parameter.KEYWORD_ONLY}


def _fold_micro_batches(trl_args: dict[str, Any], passes: int | None) -> None:
    """Name a run by the batch its optimizer steps on, not by the passes it is computed in: align's CPU
    micro-batches give the whole batch's loss and gradients (tests/test_train_equivalence.py), so a default that
    starts splitting a batch (as the sigmoid + sft loss did) is the same run and keeps its name and cache."""
    if passes and passes > 1:
        trl_args["per_device_train_batch_size"] *= passes
        trl_args["gradient_accumulation_steps"] //= passes


@dataclass(frozen=True)
class Student:
    task: str
    method: str
    seed: int
    variant: Variant = Variant()

    @property
    def name(self) -> str:
        return f"{self.method}-{self.variant.train_tag(self.method)}-s{self.seed}"

    def folder(self, work: Path) -> Path:
        """Where the student's training data for these settings is (the pairs, or for SFT the selected answers),
        and the students trained on it."""
        data = self.variant.select_tag if REGISTRY[self.method].data == "sft.jsonl" else self.variant.pairs_tag
        return work / self.task / data

    def evaluated(self, work: Path, samples: int = SAMPLES_PER_PROMPT) -> bool:
        """Whether both of its evaluations (sampled, ``samples`` answers per prompt, and greedy) are in the work dir."""
        return all((self.folder(work) / "eval" / self.name / d / "metrics.json").exists()
                   for d in (sampled_eval(samples), "greedy"))


def load_tasks(path: Path = TASKS_FILE) -> list[Task]:
    import yaml

    base = path.parent
    tasks = []
    for name, spec in yaml.safe_load(path.read_text())["tasks"].items():
        hint = spec.get("teacher_system_prompt")
        if hint and hint.startswith("@"):
            hint = "@" + str((base / hint[1:]).resolve())
        tasks.append(Task(name, spec["kind"], (base / spec["rules"]).resolve(),
                          (base / spec["train_prompts"]).resolve(),
                          (base / spec["heldout_prompts"]).resolve() if spec.get("heldout_prompts") else None,
                          spec.get("heldout_every"), hint))
    return tasks


# ----------------------------------------------------------------------------- data per task


def split_prompts(task: Task, folder: Path) -> tuple[Path, Path]:
    """The task's training and held-out prompt files (held-out prompts never train)."""
    rows = [json.loads(line) for line in task.train_prompts.read_text().splitlines() if line.strip()]
    if task.heldout_every:
        heldout = [r for i, r in enumerate(rows, 1) if i % task.heldout_every == 0]
        train = [r for i, r in enumerate(rows, 1) if i % task.heldout_every]
    else:
        heldout = [json.loads(line) for line in task.heldout_prompts.read_text().splitlines() if line.strip()]
        train = rows
    overlap = {r["prompt"] for r in train} & {r["prompt"] for r in heldout}
    if overlap:
        raise SystemExit(f"task {task.name}: {len(overlap)} held-out prompts are also training prompts")
    paths = folder / "train_prompts.jsonl", folder / "heldout_prompts.jsonl"
    for path, chosen in zip(paths, (train[:TRAIN_PROMPTS], heldout[:HELDOUT_PROMPTS])):
        if not path.exists():
            path.write_text("".join(json.dumps(r) + "\n" for r in chosen))
    return paths


def random_labels(pairs: Path, output: Path, seed: int = 0) -> None:
    """The control: the same pairs, chosen and rejected swapped by a fair coin per pair (seeded)."""
    rng = random.Random(seed)
    rows = []
    for line in pairs.read_text().splitlines():
        row = json.loads(line)
        if rng.random() < 0.5:
            row["chosen"], row["rejected"] = row["rejected"], row["chosen"]
        rows.append(json.dumps(row) + "\n")
    output.write_text("".join(rows))


def prepare_task(task: Task, work: Path, variant: Variant, samples: int = SAMPLES_PER_PROMPT) -> dict[str, Any]:
    """The task's data (candidates, labels, DPO pairs, KTO rows, SFT rows, random labels) and the reference's answers
    to its held-out prompts, before any of its students trains; the figures the progress line shows."""
    from align.data.pairs import build_pairs
    from align.generate import generate
    from align.label.stages import label_rules

    folder = work / task.name
    folder.mkdir(parents=True, exist_ok=True)
    train_prompts, heldout_prompts = split_prompts(task, folder)
    candidates = folder / f"candidates{variant.candidates_suffix}.jsonl"
    generate(model=MODEL, prompts=train_prompts, output=candidates, num_candidates=variant.candidates,
             system_prompt=task.teacher_system_prompt, temperature=1.0, top_p=0.95, max_new_tokens=CANDIDATE_TOKENS,
             seed=0, progress=False)
    judgements = folder / f"judgements{variant.candidates_suffix}.jsonl"
    if not judgements.exists():
        label_rules(candidates, task.rules, judgements)
    data = folder / variant.pairs_tag
    data.mkdir(exist_ok=True)
    pairs, unpaired = data / "pairs.jsonl", data / "unpaired.jsonl"
    # align's defaults, as `align pairs build` has them, unless the variant says otherwise
    built = build_pairs(judgements, pairs, unpaired=unpaired, **dict(variant.pairs))
    random_labels(pairs, data / "pairs_random.jsonl")
    sft_rows = select_answers(judgements, folder / variant.select_tag / "sft.jsonl")
    write_reference_answers(task, work, samples)
    scores = [json.loads(line)["score"] or 0.0 for line in judgements.read_text().splitlines()]
    return {"task": task.name, "pairs": built.pairs, "unpaired": built.balance.desirable + built.balance.undesirable
            if built.balance else 0, "sft_rows": sft_rows, "candidate_score": sum(scores) / len(scores),
            "heldout": str(heldout_prompts)}


def select_answers(judgements: Path, output: Path) -> int:
    """SFT rows as ``align data select judgements.jsonl -o sft.jsonl`` writes them (its defaults: the best answer
    per prompt); kept when already written. Returns the number of rows."""
    from align.data.select import select_sft

    if not output.exists():
        output.parent.mkdir(parents=True, exist_ok=True)
        return select_sft(judgements, output).rows
    return sum(1 for line in output.read_text().splitlines() if line.strip())


# ----------------------------------------------------------------------------- training


def train_student(student: Student, work: Path) -> str:
    method = REGISTRY[student.method]
    folder = student.folder(work)
    run_dir = folder / "runs" / student.name
    if (run_dir / "run.json").exists() or (run_dir / "adapter" / "adapter_config.json").exists():
        return str(run_dir)
    if method.trainer is None:
        _train_plain_trl(folder / method.data, run_dir, student.seed)
        return str(run_dir)
    import align.train
    from align.train.config import REFERENCE_METHODS

    budget: dict[str, Any] = {"max_steps": STEPS // method.rounds, "per_device_train_batch_size": BATCH,
                              "seed": student.seed, "save_strategy": "no"}
    if method.trainer in REFERENCE_METHODS:
        budget["ref_cache_dir"] = str(work / "ref-cache")
    if method.variant_applies:
        budget.update(student.variant.settings_for(method.trainer))
    if method.rounds > 1:
        _train_rounds(student, work, budget, run_dir)
        return str(run_dir)
    getattr(align.train, method.trainer)(model=MODEL, data=str(folder / method.data), output_dir=str(run_dir),
                                         **budget)
    return str(run_dir)


def _train_rounds(student: Student, work: Path, budget: dict[str, Any], run_dir: Path) -> None:
    """``align pipeline run`` with ``rounds`` (config: :func:`rounds_config`); ``run_dir`` becomes a link to the
    last round's training run, so the student is evaluated, and found trained, like any other."""
    from align.pipeline import Manifest, run_pipeline

    result = run_pipeline(rounds_config(student, work, budget))
    last = Path(result.rounds[-1]["dir"]) if result.rounds else Path(result.run_dir)
    trained = Manifest(last).output("train", "run_dir")
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    if not run_dir.is_symlink():
        run_dir.symlink_to(trained.resolve(), target_is_directory=True)


def rounds_config(student: Student, work: Path, budget: dict[str, Any]) -> Any:
    """The pipeline of a rounds student: round 1 generates, labels and pairs as ``prepare_task`` does (same
    settings and seed) and trains on them; each later round's candidates come ``ROUND_TEACHER_SHARE`` from the
    prompted teacher and the rest from the previous round's student, on the same training prompts, and it trains on
    from those weights, anchored to the original model. Every round is scored greedily on the held-out prompts (the
    pipeline's eval, on the suite's shared reference answers), so its ``rounds_summary`` says what each round
    added."""
    from align.pipeline import PipelineConfig

    method = REGISTRY[student.method]
    task = next(t for t in load_tasks() if t.name == student.task)
    task_dir = work / student.task
    train = {key: value for key, value in budget.items() if key != "seed"}  # the pipeline's seed seeds every stage
    return PipelineConfig(
        run_dir=student.folder(work) / "rounds" / student.name, seed=budget["seed"], rounds=method.rounds,
        teacher_share=ROUND_TEACHER_SHARE,
        generate={"model": MODEL, "prompts": str(task_dir / "train_prompts.jsonl"),
                  "num_candidates": student.variant.candidates,
                  "system_prompt": task.teacher_system_prompt, "temperature": 1.0, "top_p": 0.95,
                  "max_new_tokens": CANDIDATE_TOKENS, "progress": False},
        label={"rules": task.rules}, pairs=dict(student.variant.pairs),
        train={"method": method.trainer, "model": MODEL, **train},
        eval={"prompts": str(task_dir / "heldout_prompts.jsonl"), "judge": str(task.rules),
              "max_new_tokens": EVAL_TOKENS, "decoding": "greedy",
              "reference_answers": str(task_dir / "reference-greedy.jsonl")})


def _train_plain_trl(pairs: Path, run_dir: Path, seed: int) -> None:
    """TRL's DPOTrainer as its docs show it: its defaults, a LoRA config like align's, the CPU switches.

    Gradient checkpointing, on by TRL's default, is off: it trades time for memory and changes no number (4 steps
    on caution's pairs gave the same losses and margins to every digit with it and without; 52 s against 48)."""
    from datasets import Dataset
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer

    from align.models import load_model, load_tokenizer

    rows = [json.loads(line) for line in pairs.read_text().splitlines()]
    rows = [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows]
    tokenizer = load_tokenizer(MODEL)
    args = DPOConfig(output_dir=str(run_dir / "checkpoints"), max_steps=STEPS, per_device_train_batch_size=BATCH,
                     seed=seed, use_cpu=True, bf16=False, report_to=[], save_strategy="no", logging_steps=1,
                     gradient_checkpointing=False)
    trainer = DPOTrainer(model=load_model(MODEL), args=args, train_dataset=Dataset.from_list(rows),
                         processing_class=tokenizer,
                         peft_config=LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"))
    trainer.train()
    trainer.save_model(str(run_dir / "adapter"))
    tokenizer.save_pretrained(str(run_dir / "adapter"))
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(h) + "\n" for h in trainer.state.log_history))


# ----------------------------------------------------------------------------- evaluation


def eval_config(task: Task, work: Path, model: str, output_dir: Path, decoding: str,
                samples: int = SAMPLES_PER_PROMPT) -> Any:
    """``align eval``'s settings for a student (``model``) on a task's held-out prompts: ``samples`` sampled answers per
    prompt, or one greedy; the reference's answers are shared by every student of the task (any variant)."""
    from align.eval import EvalConfig

    k, name = (samples, sampled_eval(samples)) if decoding == "sample" else (1, "greedy")
    # KL(student || reference) is an expectation over the student's samples: the greedy answers would give a
    # log-ratio only, which the suite does not report, so their reference pass (~6 s a student) is skipped.
    return EvalConfig(model=model, reference=MODEL, prompts=work / task.name / "heldout_prompts.jsonl",
                      output_dir=output_dir, judge=task.rules, max_new_tokens=EVAL_TOKENS, samples_per_prompt=k,
                      decoding=decoding, seed=0, reference_answers=work / task.name / f"reference-{name}.jsonl",
                      kl=decoding == "sample")


def write_reference_answers(task: Task, work: Path, samples: int = SAMPLES_PER_PROMPT) -> None:
    """The reference's sampled and greedy answers to the held-out prompts, which every student's eval reads."""
    from align.eval import write_answers

    for decoding in ("sample", "greedy"):
        write_answers(eval_config(task, work, MODEL, work / task.name, decoding, samples), "reference")


def evaluate_student(student: Student, work: Path, samples: int = SAMPLES_PER_PROMPT) -> dict[str, Any]:
    """``align eval`` of one student against the reference, sampled (``samples`` answers per prompt) and greedy; the
    reference's answers are shared."""
    from align.eval import run_eval

    folder = student.folder(work)
    task = next(t for t in load_tasks() if t.name == student.task)
    out: dict[str, Any] = {"task": student.task, "method": student.method, "seed": student.seed}
    for decoding, name in (("sample", sampled_eval(samples)), ("greedy", "greedy")):
        eval_dir = folder / "eval" / student.name / name
        config = eval_config(task, work, str(folder / "runs" / student.name), eval_dir, decoding, samples)
        metrics = json.loads((eval_dir / "metrics.json").read_text()) if (eval_dir / "metrics.json").exists() \
            else run_eval(config).metrics
        out[decoding] = {key: metrics.get(key) for key in (
            "rule_score_reference", "rule_score_model", "score_diff", "score_diff_ci_low", "score_diff_ci_high",
            "improved", "worsened", "win_rate", "win_rate_ci_low", "win_rate_ci_high", "mean_length_model",
            "mean_length_reference", "hit_length_cap_model", "hit_length_cap_reference", "kl_per_token")}
        length = out[decoding]
        length["length_ratio"] = (length["mean_length_model"] / length["mean_length_reference"]
                                  if length["mean_length_reference"] else None)
        out[decoding]["per_prompt_diff"] = _per_prompt_diffs(eval_dir / "per_prompt.jsonl")
    out["diagnosis"] = _diagnosis(folder / "runs" / student.name)
    if REGISTRY[student.method].rounds > 1:  # what each round added, by the pipeline's own greedy evals
        from align.pipeline.summary import read_summary

        out["rounds"] = read_summary(folder / "rounds" / student.name)["rounds"]
    return out


def _per_prompt_diffs(path: Path) -> dict[str, float]:
    """prompt id -> mean (student - reference) score over that prompt's answers."""
    diffs = {}
    for line in path.read_text().splitlines():
        row = json.loads(line)
        model, reference = row.get("model_scores") or [row.get("model_score")], \
            row.get("reference_scores") or [row.get("reference_score")]
        pairs = [(m or 0.0) - (r or 0.0) for m, r in zip(model, reference)]
        diffs[row["prompt_id"]] = sum(pairs) / len(pairs)
    return diffs


def _diagnosis(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / "diagnosis.json"
    return json.loads(path.read_text()) if path.exists() else None


# ----------------------------------------------------------------------------- the run


def _worker_init(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    os.environ["TQDM_DISABLE"] = "1"
    logging.basicConfig(level=logging.WARNING)


def students_of(tasks: list[Task], methods: tuple[str, ...], seeds: tuple[int, ...],
                variant: Variant, seeded: tuple[str, ...] = SEEDED) -> list[Student]:
    """One student per task and method; the ``seeded`` methods have one per seed, the others seed 0."""
    return [Student(t.name, m, s, variant) for t in tasks for m in methods
            for s in (seeds if m in seeded else (0,))]


def run_order(students: list[Student]) -> list[int]:
    """The order the workers take students in (indices into ``students``).

    Students of one task that train with one reference-based trainer share its reference log-probs through align's
    cache (DPO's later seeds and the random control, whose pairs are the same answers); begun side by side, two of
    them computed the same ones twice (~90 s a task on the full suite), so the first of each such group goes before
    the others. Plain TRL's students, the longest (~9 min), go first, so that at the end no worker
    waits for one."""
    from align.train.config import REFERENCE_METHODS

    seen: set[tuple[str, str]] = set()
    reuses = []
    for student in students:
        trainer = REGISTRY[student.method].trainer
        group = (student.task, trainer or "")
        reuses.append(trainer in REFERENCE_METHODS and group in seen)
        seen.add(group)
    return sorted(range(len(students)), key=lambda i: (reuses[i], students[i].method != "trl-dpo"))


def train_phase(student: Student, work: Path) -> dict[str, float]:
    """A student's training, as one job of the pool; the seconds it took."""
    started = time.time()
    train_student(student, work)
    return {"training": round(time.time() - started, 1)}


def evaluate_phase(student: Student, work: Path, samples: int = SAMPLES_PER_PROMPT) -> dict[str, Any]:
    """A student's evaluation, as one job of the pool; its results, with the seconds it took."""
    started = time.time()
    result = evaluate_student(student, work, samples)
    result["seconds"] = {"evaluation": round(time.time() - started, 1)}
    return result


def plan_methods(asked: str | None, quick: bool) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(methods to train and evaluate now, methods of the run's table to report only where already evaluated).

    The table's methods are the run's default list (all, or --quick's) plus those asked for; ``--methods``
    narrows what runs, not what is reported, so the new methods of an existing work dir land in one table with
    the random control (whose paired comparison needs both in the same summary)."""
    default = QUICK_METHODS if quick else METHODS
    methods = tuple(asked.split(",")) if asked else default
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise SystemExit(f"unknown methods {sorted(unknown)}: choose from {', '.join(METHODS)}")
    return methods, tuple(m for m in default if m not in methods)


def run_all(tasks: list[Task], seeds: tuple[int, ...], methods: tuple[str, ...], work: Path, jobs: int,
            variant: Variant, prepare_only: bool = False, report: tuple[str, ...] = (),
            samples: int = SAMPLES_PER_PROMPT, seeded: tuple[str, ...] = SEEDED) -> dict[str, Any]:
    """Train and evaluate ``methods``; students of ``report`` already evaluated in ``work`` join the results
    (read from their files: nothing of theirs trains or evaluates)."""
    students = students_of(tasks, methods, seeds, variant, seeded)
    # Each worker is one process with 1 thread when there are 2: on 2 cores two 2-thread torch jobs ran 10-25x
    # slower than two 1-thread ones.
    threads = 1 if jobs > 1 else (os.cpu_count() or 1)
    started = time.time()
    timings: dict[str, float] = {}
    with ProcessPoolExecutor(max_workers=jobs, initializer=_worker_init, initargs=(threads,)) as pool:
        if prepare_only:
            return {"prepared": list(pool.map(prepare_task, tasks, [work] * len(tasks), [variant] * len(tasks),
                                              [samples] * len(tasks)))}
        earlier = students_of(tasks, report, seeds, variant, seeded)
        finished = [s for s in earlier if s.evaluated(work, samples)]
        if earlier:
            missing = [f"{s.task}/{s.name}" for s in earlier if not s.evaluated(work, samples)]
            print(f"  reporting {len(finished)} students evaluated earlier in {work} beside them"
                  + (f"; not evaluated there, left out: {', '.join(missing)}" if missing else ""),
                  file=sys.stderr, flush=True)
        everyone = students + finished
        order = [*run_order(students), *range(len(students), len(everyone))]
        # the earlier students are read from their files: nothing of theirs runs again
        jobs_in_order = [(everyone[i].task, (
            [functools.partial(train_phase, everyone[i], work)] if i < len(students) else [])
            + [functools.partial(evaluate_phase, everyone[i], work, samples)]) for i in order]
        preparations = {t.name: functools.partial(prepare_task, t, work, variant, samples) for t in tasks}
        prepared, results = schedule(pool, jobs, preparations, jobs_in_order,
                                     _Progress([everyone[i] for i in order], timings))
        evaluated: list[Any] = [None] * len(everyone)
        for i, phases in zip(order, results):
            *trained, result = phases
            result["seconds"] = {**(trained[0] if trained else {}), **result["seconds"]}
            evaluated[i] = result
    for phase in ("training", "evaluation"):  # summed over workers, which run side by side
        timings[f"{phase}, worker seconds"] = sum(r.get("seconds", {}).get(phase, 0.0) for r in evaluated)
    timings["total"] = time.time() - started
    return {"prepared": [prepared[t.name] for t in tasks], "students": evaluated,
            "timings": {k: round(v, 1) for k, v in timings.items()}, "reported": sorted({s.method for s in finished})}


def schedule(pool: Any, slots: int, preparations: dict[str, Callable[[], Any]],
             students: list[tuple[str, list[Callable[[], Any]]]], on_done: Callable[[str, int | None, Any], None]
             ) -> tuple[dict[str, Any], list[list[Any]]]:
    """Every task's preparation, then each student's jobs in turn (``(task, [train, evaluate])``, students best
    first) as soon as its task is prepared; the results by task, and each student's jobs' results in the students'
    order.

    Jobs go to the pool only while it has a free worker (counting the preparations it still holds): queued any
    earlier, a student of the first task prepared would wait ahead of better ones (plain TRL's) of tasks prepared
    later, and at the end a worker idled. A student's next job (its evaluation, ~1 minute) queues behind every
    student not yet started (training, ~4-8 minutes), so the run ends on short jobs: as one job for both, the last
    task's last student trained and was evaluated alone for 4 minutes while the other worker had nothing to do.

    ``on_done(task, student, result)`` follows each preparation (student None) and each job (result None for a job
    before the student's last)."""
    unprepared = {task for task, _ in students} - set(preparations)
    if unprepared:
        raise ValueError(f"students of tasks nothing prepares: {sorted(unprepared)}")
    pending_tasks = {pool.submit(job): task for task, job in preparations.items()}
    waiting = [(i, 0) for i in range(len(students))]  # (student, its next job)
    running: dict[Any, tuple[int, int]] = {}
    prepared: dict[str, Any] = {}
    results: list[list[Any]] = [[] for _ in students]
    while pending_tasks or waiting or running:
        while len(pending_tasks) + len(running) < slots:
            ready = next(((i, job) for i, job in waiting if students[i][0] in prepared), None)
            if ready is None:
                break
            waiting.remove(ready)
            running[pool.submit(students[ready[0]][1][ready[1]])] = ready
        done, _ = wait([*pending_tasks, *running], return_when=FIRST_COMPLETED)
        for future in done:
            if future in pending_tasks:
                task = pending_tasks.pop(future)
                prepared[task] = future.result()
                on_done(task, None, prepared[task])
                continue
            i, job = running.pop(future)
            results[i].append(future.result())
            last = job + 1 == len(students[i][1])
            if not last:
                waiting.append((i, job + 1))
            on_done(students[i][0], i, results[i][-1] if last else None)
    return prepared, results


class _Progress:
    """Says what each finished job was (a task's candidates, or which student), and records when the last task
    was prepared and the last student done (the two overlap)."""

    def __init__(self, students: list[Student], timings: dict[str, float]):
        self.students, self.timings = students, timings
        self.started, self.done = time.time(), 0

    def __call__(self, task: str, position: int | None, result: Any) -> None:
        if position is None:
            self.timings["candidates, labels, pairs"] = time.time() - self.started
            print(f"  {task}: {result['pairs']} pairs, {result['unpaired']} KTO rows, {result['sft_rows']} SFT rows, "
                  f"mean candidate score {result['candidate_score']:.3f}", file=sys.stderr, flush=True)
            return
        student = self.students[position]
        if result is None:  # a job before the student's last: its training
            print(f"  trained {student.task}/{student.name}; its evaluation is queued", file=sys.stderr, flush=True)
            return
        self.done += 1
        self.timings["students (training and evaluation)"] = time.time() - self.started
        print(f"  [{self.done}/{len(self.students)}] done {student.task}/{student.name}", file=sys.stderr, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="2 tasks, align's DPO beside the random control, one seed (~13 min)")
    parser.add_argument("--tasks", help="comma-separated task names (default: all, or the quick two)")
    parser.add_argument("--methods", help=f"comma-separated, from {','.join(METHODS)} (default: all; --quick: "
                                             f"{','.join(QUICK_METHODS)}); the others of the default list are "
                                             "still reported where the work dir has them evaluated")
    parser.add_argument("--seeds", help="DPO seeds, e.g. 0,1,2")
    parser.add_argument("--every-seed", default="", metavar="METHODS",
                        help="comma-separated methods to train with every seed too, besides align-dpo "
                             "(e.g. align-kto: where one seed is too close to call)")
    parser.add_argument("--set", dest="train_set", action="append", default=[], metavar="KEY=VALUE",
                        help="a training setting to try instead of align's default (align-dpo, align-kto, random; "
                             "SFT, ORPO and SimPO keep align's defaults); kto.KEY=VALUE or dpo.KEY=VALUE: that "
                             "trainer only (dpo: also the random control's)")
    parser.add_argument("--pairs", dest="pairs_set", action="append", default=[], metavar="KEY=VALUE",
                        help="a build_pairs setting to try, e.g. strategy=all-pairs")
    parser.add_argument("--candidates", type=int, default=CANDIDATES,
                        help=f"the teacher's candidates per training prompt (default {CANDIDATES})")
    parser.add_argument("--samples-per-prompt", type=int, default=SAMPLES_PER_PROMPT,
                        help=f"sampled answers per held-out prompt and model (default {SAMPLES_PER_PROMPT}); more "
                             "narrow the intervals where one answer's score is mostly chance")
    parser.add_argument("--prepare-only", action="store_true", help="candidates, labels, pairs and SFT rows only")
    parser.add_argument("--jobs", type=int, default=2, help="worker processes (1 thread each when > 1)")
    parser.add_argument("--work", type=Path, help="work dir (default: /tmp/align-quality[-quick]); reused if present")
    parser.add_argument("--out", type=Path, help="results JSON (default: scripts/bench/results/quality[-quick].json)")
    args = parser.parse_args()

    seeds = tuple(int(x) for x in args.seeds.split(",")) if args.seeds else QUICK_SEEDS if args.quick else FULL_SEEDS
    tag = "quality-quick" if args.quick else "quality"
    work = args.work or Path("/tmp/align-quality")  # shared: --quick's runs are reused by the full run
    out = args.out or RESULTS / f"{tag}.json"
    names = args.tasks.split(",") if args.tasks else (list(QUICK_TASKS) if args.quick else None)
    tasks = [t for t in load_tasks() if names is None or t.name in names]
    methods, report = plan_methods(args.methods, args.quick)

    from quality_report import summarise, write_outputs

    variant = Variant(tuple(_key_values(args.train_set)), tuple(_key_values(args.pairs_set)), args.candidates)
    if not variant.is_defaults and not args.out:
        out = out.with_name(f"{out.stem}-{variant.tag}.json")
    if args.samples_per_prompt != SAMPLES_PER_PROMPT and not args.out:
        out = out.with_name(f"{out.stem}-{sampled_eval(args.samples_per_prompt)}.json")
    seeded = tuple(dict.fromkeys((*SEEDED, *filter(None, args.every_seed.split(",")))))
    if set(seeded) - set(METHODS):
        raise SystemExit(f"--every-seed: unknown methods {sorted(set(seeded) - set(METHODS))}")
    run = run_all(tasks, seeds, methods, work, args.jobs, variant, args.prepare_only, report, args.samples_per_prompt,
                  seeded)
    if args.prepare_only:
        return
    summary = summarise(run["students"], seed=0)
    meta = {"model": MODEL, "steps": STEPS, "batch": BATCH, "candidates": args.candidates, "seeds": list(seeds),
            "seeded_methods": list(seeded),
            "train_prompts": TRAIN_PROMPTS, "heldout_prompts": HELDOUT_PROMPTS,
            "samples_per_prompt": args.samples_per_prompt,
            "tasks": {t.name: t.kind for t in tasks}, "methods": list(methods),
            "reported_from_work_dir": run["reported"], "jobs": args.jobs,
            "variant": {"tag": variant.tag, "train": dict(variant.train), "pairs": dict(variant.pairs)},
            "cpus": os.cpu_count(), "load_before": os.getloadavg()[0], "timings_s": run["timings"],
            "date": time.strftime("%Y-%m-%d %H:%M")}
    write_outputs(out, meta, run["prepared"], run["students"], summary)


def _key_values(items: list[str]) -> list[tuple[str, Any]]:
    import yaml

    pairs = []
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"expected KEY=VALUE, got {item!r}")
        pairs.append((key, yaml.safe_load(value)))
    return sorted(pairs)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
