"""The quality suite's method registry (scripts/bench/quality.py): which trainer each method runs on which data,
the names its runs are cached under, and how a run of some methods reports the others. Nothing trains here."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO
from tests.test_data_select import pointwise, write

sys.path.insert(0, str(REPO / "scripts" / "bench"))
import quality  # noqa: E402
from quality import METHODS, QUICK_METHODS, REGISTRY, Student, Variant, _fold_micro_batches  # noqa: E402

NEW = ("align-sft", "align-orpo", "align-simpo")
LR_VARIANT = Variant(train=(("learning_rate", 1e-4),))
PAIRS_VARIANT = Variant(pairs=(("strategy", "best-worst"),))
# align's defaults until 8 candidates with each prompt's 4 widest pairs at lr 4e-4 (DPO, KTO) were measured better
OLD_DEFAULTS = {"train": (("learning_rate", 2e-4),), "pairs": (("max_pairs_per_prompt", 0),), "candidates": 4}


def names_before_sft_orpo_simpo(variant: Variant) -> dict[str, Any]:
    """The effective settings as quality.py computed them before SFT/ORPO/SimPO joined (commit 9d9491e)."""
    from align.data.pairs import DEFAULT_MIN_MARGIN, DEFAULT_STRATEGY
    from align.train import load_train_config
    from align.train.config import PASSES_PER_BATCH_ATTR, build_trl_args

    # no per-prompt cap then: a variant that asks for none (0) is named as those runs were
    pairs = {k: v for k, v in variant.pairs if k != "max_pairs_per_prompt"}
    effective: dict[str, Any] = {"pairs": {"strategy": DEFAULT_STRATEGY, "min_margin": DEFAULT_MIN_MARGIN, **pairs}}
    for method in ("dpo", "kto"):
        config = load_train_config(method, {"data": "-", "output_dir": "-", **dict(variant.train)})
        args = build_trl_args(config, "-", on_gpu=False, bf16_ok=False)
        trl_args = json.loads(args.to_json_string())
        # CPU micro-batches (exact since 3362417) split the default DPO batch; the runs keep their whole-batch names
        _fold_micro_batches(trl_args, getattr(args, PASSES_PER_BATCH_ATTR, None))
        # the fields TrainConfig had then (split, limit and eval_data_split came with hub datasets)
        own = set(type(config).model_fields) - {"data", "output_dir", "split", "limit", "eval_data_split"}
        effective[method] = {"align": config.model_dump(mode="json", include=own),
                             "trl": {k: v for k, v in trl_args.items() if k not in ("output_dir", "logging_dir")}}
    return effective


@pytest.mark.parametrize("variant", [
    Variant(**OLD_DEFAULTS),
    Variant(**{**OLD_DEFAULTS, "train": LR_VARIANT.train}),
    Variant(**{**OLD_DEFAULTS, "pairs": (("max_pairs_per_prompt", 0), ("strategy", "best-worst"))}),
], ids=["defaults", "set", "pairs"])
def test_earlier_runs_keep_their_names_so_a_finished_run_is_reused(variant: Variant) -> None:
    from align.data.records import content_hash

    before = names_before_sft_orpo_simpo(variant)
    assert variant.pairs_tag == "pairs-" + content_hash(before["pairs"], 8)
    assert variant.train_tag("align-dpo") == variant.train_tag("random") == content_hash(before["dpo"], 8)
    assert variant.train_tag("align-kto") == content_hash(before["kto"], 8)
    assert variant.train_tag("trl-dpo") == "trl-defaults"
    assert variant.tag == "settings-" + content_hash(before, 8)  # a variant's results file keeps its name too


def test_sft_orpo_and_simpo_runs_are_named_by_their_own_settings_and_ignore_dpo_settings() -> None:
    from align.data.records import content_hash

    defaults = Variant()
    names = {Student("concise", m, 0).name for m in METHODS}
    assert len(names) == len(METHODS)  # random shares DPO's settings hash, not its run
    for method in NEW:
        trainer = REGISTRY[method].trainer
        assert defaults.train_tag(method) == content_hash(defaults.effective[trainer], 8)
        assert LR_VARIANT.train_tag(method) == defaults.train_tag(method)  # --set is for DPO/KTO
    assert LR_VARIANT.train_tag("align-dpo") != defaults.train_tag("align-dpo")
    assert len({defaults.train_tag(m) for m in ("align-dpo", "align-kto", *NEW)}) == 5
    effective = defaults.effective
    assert effective["sft"]["trl"]["completion_only_loss"] is True
    assert effective["simpo"]["trl"]["loss_type"] == "simpo" and effective["simpo"]["trl"]["beta"] == 2.0
    assert effective["orpo"]["trl"]["beta"] == 0.1
    assert effective["select"] == {"top_k": 1, "min_score": None, "near_duplicate": 0.9, "judge": None,
                                   "reasoning": "drop"}


def test_a_setting_named_for_one_trainer_trains_that_one_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import align.train

    kto_only = Variant(train=(("kto.learning_rate", 8e-4), ("kto.loss_type", "apo_zero_unpaired")))
    defaults = Variant()
    for method in ("align-dpo", "random", "align-sft"):  # DPO's runs (the random control's too) are shared
        assert kto_only.train_tag(method) == defaults.train_tag(method)
    assert kto_only.train_tag("align-kto") != defaults.train_tag("align-kto")
    assert kto_only.effective["kto"]["trl"]["learning_rate"] == 8e-4
    assert kto_only.effective["kto"]["trl"]["loss_type"] == "apo_zero_unpaired"
    assert kto_only.tag != defaults.tag  # its results file is its own
    calls: dict[str, dict[str, Any]] = {}
    for trainer in ("dpo", "kto"):
        monkeypatch.setattr(align.train, trainer,
                            lambda trainer=trainer, **settings: calls.setdefault(trainer, settings))
    for method in ("align-dpo", "align-kto"):
        quality.train_student(Student("concise", method, 0, kto_only), tmp_path)
    assert calls["kto"]["learning_rate"] == 8e-4 and calls["kto"]["loss_type"] == "apo_zero_unpaired"
    assert "learning_rate" not in calls["dpo"] and "loss_type" not in calls["dpo"]
    with pytest.raises(SystemExit, match="prefix names one of dpo, kto"):
        Variant(train=(("sft.learning_rate", 1e-4),)).settings_for("dpo")


def test_sft_reads_the_selected_answers_apart_from_the_pairs_and_orpo_simpo_read_the_pairs(tmp_path: Path) -> None:
    for variant in (Variant(), PAIRS_VARIANT):
        assert Student("list", "align-sft", 0, variant).folder(tmp_path) == tmp_path / "list" / Variant().select_tag
        for method in ("align-orpo", "align-simpo", "align-dpo"):
            assert Student("list", method, 0, variant).folder(tmp_path) == tmp_path / "list" / variant.pairs_tag
    assert Variant().pairs_tag != PAIRS_VARIANT.pairs_tag


def test_the_suite_generates_as_many_candidates_as_align_generate_does() -> None:
    from align.generate.config import GenerateConfig

    assert quality.CANDIDATES == GenerateConfig(prompts="-", output="-").num_candidates
    assert Variant(candidates=quality.CANDIDATES) == Variant() and Variant().is_defaults


def test_the_variants_measured_before_they_became_defaults_name_the_defaults_runs() -> None:
    defaults = Variant()
    # 8 candidates, each prompt's 4 widest pairs, DPO at 4e-4 (2026-12-03); its KTO at 4e-4 is KTO's old default
    dpo_measured = Variant(train=(("dpo.learning_rate", 4e-4),), pairs=(("max_pairs_per_prompt", 4),), candidates=8)
    assert (dpo_measured.pairs_tag, dpo_measured.select_tag) == (defaults.pairs_tag, defaults.select_tag)
    assert all(dpo_measured.train_tag(m) == defaults.train_tag(m) for m in METHODS if m != "align-kto")
    # KTO at 8e-4 (2026-12-04): the whole variant is the defaults, results file included
    kto_measured = Variant(train=(("kto.learning_rate", 8e-4),))
    assert kto_measured.tag == defaults.tag
    assert all(kto_measured.train_tag(m) == defaults.train_tag(m) for m in METHODS)  # its students are the defaults'
    # both rates as they were before: the runs and results file of the previous defaults (quality.json until then)
    before = Variant(train=(("learning_rate", 4e-4),))
    assert before.train_tag("align-dpo") == defaults.train_tag("align-dpo") == "cb048827"
    assert (before.tag, before.train_tag("align-kto")) == ("settings-e9df39a6", "ced3f557")


def test_another_candidate_count_has_its_own_files_and_runs(tmp_path: Path) -> None:
    four, suites = Variant(candidates=4), Variant()
    assert (suites.candidates_suffix, four.candidates_suffix) == ("-8", "")  # candidates-8.jsonl, candidates.jsonl
    assert len({four.pairs_tag, suites.pairs_tag}) == len({four.select_tag, suites.select_tag}) == 2
    assert four.tag != suites.tag and not four.is_defaults  # its own results file
    for method in ("align-dpo", "random", "align-sft"):
        assert Student("warm", method, 0, four).folder(tmp_path) != Student("warm", method, 0).folder(tmp_path)


def test_each_method_trains_with_its_trainer_on_its_data_within_the_same_budget(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import align.train

    calls: dict[str, dict[str, Any]] = {}
    for trainer in ("dpo", "kto", "sft", "orpo", "simpo"):
        def record(trainer: str = trainer, **settings: Any) -> None:
            calls[settings["output_dir"]] = {"trainer": trainer, **settings}

        monkeypatch.setattr(align.train, trainer, record)
    for method in METHODS:
        if method in ("trl-dpo", "align-rounds"):  # plain TRL; the pipeline (below)
            continue
        student = Student("concise", method, 0, LR_VARIANT)
        run_dir = quality.train_student(student, tmp_path)
        call = calls[run_dir]
        assert call["trainer"] == REGISTRY[method].trainer
        assert Path(call["data"]) == student.folder(tmp_path) / REGISTRY[method].data
        assert (call["max_steps"], call["per_device_train_batch_size"], call["seed"]) == (40, 4, 0)
        assert call["model"] == quality.MODEL and call["save_strategy"] == "no"
        reference = method in ("align-dpo", "align-kto", "random")
        assert ("ref_cache_dir" in call) == reference
        assert call.get("learning_rate") == (1e-4 if reference else None)  # the variant's setting, DPO/KTO only
    assert len(calls) == len(METHODS) - 2
    assert Path(calls[quality.train_student(Student("concise", "align-sft", 0), tmp_path)]["data"]).name == "sft.jsonl"


def test_rounds_are_the_pipeline_with_the_same_data_settings_and_total_steps(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import align.pipeline
    from align.pipeline.manifest import StageRecord

    student = Student("caution", "align-rounds", 1, LR_VARIANT)
    configs = []

    def finish(config: Any) -> Any:  # what run_pipeline leaves: round 2's manifest naming its training run
        configs.append(config)
        last = Path(config.run_dir) / "round-2"
        align.pipeline.Manifest(last).save("train", StageRecord("done", {}, "h", {"run_dir": str(last / "train")},
                                                                0.0))
        (last / "train").mkdir()
        return type("Result", (), {"rounds": [{"dir": str(last)}], "run_dir": str(config.run_dir)})()

    monkeypatch.setattr(align.pipeline, "run_pipeline", finish)
    run_dir = Path(quality.train_student(student, tmp_path))
    config = configs[0]
    assert config.rounds == 2 and config.train["max_steps"] * config.rounds == quality.STEPS
    assert config.train["per_device_train_batch_size"] == quality.BATCH and config.seed == 1
    assert config.train["method"] == "dpo" and config.train["learning_rate"] == 1e-4  # a variant applies as to DPO
    assert "seed" not in config.train and config.reference == "original" and config.teacher_share == 0.5
    task = next(t for t in quality.load_tasks() if t.name == "caution")
    generate = config.generate  # round 1's candidates: the same settings as every other method's
    assert (generate["num_candidates"], generate["max_new_tokens"], generate["temperature"]) == (8, 64, 1.0)
    assert generate["system_prompt"] == task.teacher_system_prompt and config.label.rules == task.rules
    assert Path(generate["prompts"]) == tmp_path / "caution" / "train_prompts.jsonl"
    assert Path(config.eval["reference_answers"]) == tmp_path / "caution" / "reference-greedy.jsonl"
    assert run_dir == student.folder(tmp_path) / "runs" / student.name
    assert run_dir.resolve() == (Path(config.run_dir) / "round-2" / "train").resolve()
    assert Student("caution", "align-rounds", 1).name != Student("caution", "align-dpo", 1).name


def test_sft_rows_are_the_best_answer_per_prompt_and_written_once(tmp_path: Path) -> None:
    judgements = write(tmp_path / "judgements.jsonl", [
        pointwise("p1", "a", "fine", 0.5), pointwise("p1", "b", "best", 0.9), pointwise("p1", "c", "good", 0.7),
        pointwise("p2", "a", "failed a hard rule", 1.0, failed_hard=True), pointwise("p2", "b", "only one", 0.4)])
    output = tmp_path / "select-x" / "sft.jsonl"
    assert quality.select_answers(judgements, output) == 2
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    assert [(r["prompt_id"], r["completion_id"]) for r in rows] == [("p1", "b"), ("p2", "b")]
    written = output.read_text()
    output.write_text(written + "\n")  # already there: kept as it is, not selected again
    assert quality.select_answers(judgements, output) == 2 and output.read_text() == written + "\n"


def test_methods_narrow_what_runs_not_what_the_table_reports() -> None:
    assert set(NEW) <= set(METHODS) and not set(NEW) & set(QUICK_METHODS)
    run, report = quality.plan_methods(",".join(NEW), quick=False)
    assert run == NEW and report == ("align-dpo", "align-kto", "random", "trl-dpo", "align-rounds")
    assert quality.plan_methods(None, quick=False) == (METHODS, ())
    assert quality.plan_methods(None, quick=True) == (QUICK_METHODS, ())
    assert quality.plan_methods("align-sft", quick=True) == (("align-sft",), QUICK_METHODS)
    with pytest.raises(SystemExit, match="align-sfft"):
        quality.plan_methods("align-sfft", quick=False)


def test_the_first_student_of_each_shared_reference_goes_before_those_that_reuse_it() -> None:
    """DPO's later seeds and the random control read the reference log-probs DPO's first seed computes (the
    same answers); begun beside it, they computed them again. Plain TRL's students, the longest, start first."""
    tasks = [t for t in quality.load_tasks() if t.name in ("concise", "caution")]
    students = quality.students_of(tasks, ("align-dpo", "align-kto", "random", "trl-dpo"), (0, 1, 2), Variant())
    order = [students[i] for i in quality.run_order(students)]
    assert sorted(order, key=students.index) == students  # each once
    names = [f"{s.task}/{s.method}/{s.seed}" for s in order]
    assert names == ["concise/trl-dpo/0", "caution/trl-dpo/0",
                     "concise/align-dpo/0", "concise/align-kto/0", "caution/align-dpo/0", "caution/align-kto/0",
                     "concise/align-dpo/1", "concise/align-dpo/2", "concise/random/0",
                     "caution/align-dpo/1", "caution/align-dpo/2", "caution/random/0"]
    seeded = quality.students_of(tasks[:1], ("align-dpo", "align-kto", "random"), (0, 1), Variant(),
                                 seeded=("align-dpo", "align-kto"))
    assert [f"{s.method}/{s.seed}" for s in seeded] == ["align-dpo/0", "align-dpo/1", "align-kto/0", "align-kto/1",
                                                        "random/0"]
    quick = quality.students_of(tasks, QUICK_METHODS, (0,), Variant())
    assert [f"{quick[i].task}/{quick[i].method}" for i in quality.run_order(quick)] == \
        ["concise/align-dpo", "caution/align-dpo", "concise/random", "caution/random"]


def test_students_start_as_their_task_is_prepared_best_first_and_never_queue_ahead_of_better_ones() -> None:
    """A real pool of 2 workers: ``caution`` is prepared only once a ``concise`` student has started (so that
    student did not wait for every task), and that student runs on until the ``caution`` student ranked first has
    started too: the second ``concise`` one, ready earlier, must not take the free worker first."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    started: list[str] = []
    concise_student_running, caution_student_running = threading.Event(), threading.Event()

    def prepare(task: str) -> str:
        if task == "caution":
            assert concise_student_running.wait(10), "no student started while a task was still being prepared"
        started.append(f"prepare {task}")
        return task

    def student(name: str) -> str:
        started.append(name)
        if name == "caution 1":
            caution_student_running.set()
        if name == "concise 1":
            concise_student_running.set()
            assert caution_student_running.wait(10), "the best student of the task prepared last did not start"
        return name.upper()

    finished: list[tuple[str, int | None]] = []
    jobs = [("caution", [lambda: student("caution 1")]), ("concise", [lambda: student("concise 1")]),
            ("concise", [lambda: student("concise 2")])]
    with ThreadPoolExecutor(max_workers=2) as pool:
        prepared, results = quality.schedule(
            pool, 2, {"concise": lambda: prepare("concise"), "caution": lambda: prepare("caution")}, jobs,
            lambda task, position, result: finished.append((task, position)))
    assert started == ["prepare concise", "concise 1", "prepare caution", "caution 1", "concise 2"]
    assert prepared == {"concise": "concise", "caution": "caution"}
    assert results == [["CAUTION 1"], ["CONCISE 1"], ["CONCISE 2"]]  # in the students' order, not the finishing one
    assert sorted(finished, key=str) == sorted([("concise", None), ("caution", None), ("caution", 0),
                                                ("concise", 1), ("concise", 2)], key=str)
    with pytest.raises(ValueError, match="warm"):
        quality.schedule(pool, 2, {}, [("warm", [lambda: None])], lambda *_: None)


def test_a_students_evaluation_queues_behind_the_students_not_yet_trained() -> None:
    """One worker, two students of a train and an evaluate job each: both train before either is evaluated, so a
    run ends on the short jobs; each student's results come back in its jobs' order, and the progress hears of
    the training (result None) before the evaluation."""
    from concurrent.futures import ThreadPoolExecutor

    ran: list[str] = []

    def job(name: str) -> str:
        ran.append(name)
        return name

    students = [("concise", [lambda s=s, j=j: job(f"{j} {s}") for j in ("train", "evaluate")]) for s in "ab"]
    heard: list[tuple[int | None, Any]] = []
    with ThreadPoolExecutor(max_workers=1) as pool:
        _, results = quality.schedule(pool, 1, {"concise": lambda: "ready"}, students,
                                      lambda task, position, result: heard.append((position, result)))
    assert ran == ["train a", "train b", "evaluate a", "evaluate b"]
    assert results == [["train a", "evaluate a"], ["train b", "evaluate b"]]
    assert heard == [(None, "ready"), (0, None), (1, None), (0, "evaluate a"), (1, "evaluate b")]


def fake_evaluation(student: Student, work: Path, diffs: dict[str, float], sampled: str = "sample") -> None:
    """The files `align eval` leaves for a student, with the given per-prompt score differences."""
    for decoding in (sampled, "greedy"):
        folder = student.folder(work) / "eval" / student.name / decoding
        folder.mkdir(parents=True, exist_ok=True)
        folder.joinpath("per_prompt.jsonl").write_text("".join(
            json.dumps({"prompt_id": p, "model_scores": [0.5 + d], "reference_scores": [0.5]}) + "\n"
            for p, d in diffs.items()))
        mean = sum(diffs.values()) / len(diffs)
        folder.joinpath("metrics.json").write_text(json.dumps({
            "rule_score_reference": 0.5, "rule_score_model": 0.5 + mean, "score_diff": mean,
            "score_diff_ci_low": mean - 0.05, "score_diff_ci_high": mean + 0.05, "mean_length_model": 40,
            "mean_length_reference": 50, "kl_per_token": 0.01}))


def test_new_methods_run_later_are_compared_with_the_random_control_evaluated_earlier(tmp_path: Path) -> None:
    from quality_report import summarise

    tasks = [t for t in quality.load_tasks() if t.name == "concise"]
    prompts = [f"q{i}" for i in range(12)]
    earlier = quality.students_of(tasks, ("random", "align-kto"), (0, 1, 2), Variant())
    fake_evaluation(earlier[0], tmp_path, {p: 0.0 for p in prompts})  # random: evaluated; KTO: not
    sft = Student("concise", "align-sft", 0)
    fake_evaluation(sft, tmp_path, {p: 0.2 for p in prompts})
    assert [s.method for s in earlier if s.evaluated(tmp_path)] == ["random"]
    rows = summarise([quality.evaluate_student(s, tmp_path) for s in (sft, earlier[0])])
    row = next(r for r in rows if r["method"] == "align-sft")
    assert row["gain"] == pytest.approx(0.2) and row["vs_random"] == pytest.approx(0.2)


def test_an_eval_with_more_samples_per_prompt_has_its_own_folders(tmp_path: Path) -> None:
    student = Student("warm", "align-dpo", 0)
    fake_evaluation(student, tmp_path, {"q1": 0.1, "q2": 0.3})  # the suite's K
    assert student.evaluated(tmp_path) and not student.evaluated(tmp_path, samples=8)
    assert quality.sampled_eval(quality.SAMPLES_PER_PROMPT) == "sample" and quality.sampled_eval(8) == "sample-8"
    fake_evaluation(student, tmp_path, {"q1": 0.0, "q2": 0.1}, sampled="sample-8")
    assert student.evaluated(tmp_path, samples=8)
    eight = quality.evaluate_student(student, tmp_path, samples=8)["sample"]
    assert eight["per_prompt_diff"] == pytest.approx({"q1": 0.0, "q2": 0.1})
    two = quality.evaluate_student(student, tmp_path)["sample"]
    assert two["per_prompt_diff"] == pytest.approx({"q1": 0.1, "q2": 0.3})
