"""`align pipeline run` with ``rounds: N`` (issue 18): round k > 1 answers its prompts with round k-1's student (and
the teacher's share), trains on from round k-1's weights and is scored against the original model and the previous
round's student; a run killed in round 2's training carries on to the same result; a round-2-only change reruns
nothing of round 1; stop_when stops; ``rounds: 1`` is the pipeline as it was; the summary has a row per round."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml

from align.data.io import sha256_of
from align.errors import ConfigError
from align.pipeline import StopWhen, check_sections, load_pipeline_config, run_pipeline, stage_settings_hash
from align.pipeline.rounds import merge_candidates, prompt_slice, round_config, round_settings_hash, teacher_candidates
from align.pipeline.summary import round_row, stop_reason
from tests.test_pipeline import _config, kill_when_written

REPO = Path(__file__).resolve().parent.parent
STAGES = ("generate", "label", "pairs", "train", "eval")
ROUND_2 = tuple(f"round-2/{stage}" for stage in STAGES)
# test_pipeline's config (12 prompts, tiny model, rules, 10 DPO steps) in two rounds of 6 prompts, each prompt's 4
# candidates half from the teacher, half from the previous round's student.
ROUNDS = {"rounds": 2, "prompts_per_round": 6, "teacher_share": 0.5}


def _rounds_config(folder: Path, tiny_model_dir: Path, **top: Any) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = _config(folder, tiny_model_dir)
    config = yaml.safe_load(path.read_text())
    config.update(top)
    path.write_text(yaml.safe_dump(config))
    return path


def _stages(run: Path) -> dict[str, Any]:
    return json.loads((run / "manifest.json").read_text())["stages"]


def _adapter(run_dir: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


def _texts(candidates: Path) -> dict[str, list[tuple[str, str]]]:
    """Each prompt's candidates as (source, text): what was generated, without the paths that name the models."""
    rows = [json.loads(line) for line in candidates.read_text().splitlines()]
    return {row["prompt_id"]: [(r.get("source", ""), r["text"]) for r in row["responses"]] for row in rows}


_FIGURES = ("win_rate", "win_rate_ci_low", "win_rate_ci_high", "lc_win_rate", "kl_per_token", "rule_score_model",
            "mean_length_model", "hit_length_cap_model")


@pytest.fixture(scope="module")
def two_rounds(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """One uninterrupted two-round run, in process; what later tests compare with is read now."""
    import torch

    torch.set_num_threads(1)
    folder = tmp_path_factory.mktemp("two-rounds")
    config = _rounds_config(folder, tiny_model_dir, **ROUNDS)
    result = run_pipeline(load_pipeline_config(config))
    run = folder / "run"
    return SimpleNamespace(
        folder=folder, config=config, run=run, result=result, round_1=_stages(run), round_2=_stages(run / "round-2"),
        adapter=_adapter(run / "round-2" / "train"), candidates=_texts(run / "round-2" / "candidates.jsonl"),
        metrics=json.loads((run / "round-2" / "eval" / "metrics.json").read_text()),
        previous=json.loads((run / "round-2" / "eval" / "previous" / "metrics.json").read_text()))


def test_round_2_answers_the_next_prompts_with_the_students_and_the_teachers_candidates_and_trains_on(
        two_rounds: SimpleNamespace, tiny_model_dir: Path) -> None:
    from align.models import resolve_model

    run, second = two_rounds.run, two_rounds.run / "round-2"
    assert two_rounds.result.ran == [*STAGES, *ROUND_2] and two_rounds.result.stopped is None
    # Disjoint prompts: round 1 the first 6 (as max_prompts), round 2 the next 6 (its own prompts file).
    first_ids = {json.loads(line)["prompt_id"] for line in (run / "candidates.jsonl").read_text().splitlines()}
    assert first_ids == {f"p{i}" for i in range(6)}
    assert [json.loads(line)["id"] for line in (second / "prompts.jsonl").read_text().splitlines()] == [
        f"p{i}" for i in range(6, 12)]
    assert two_rounds.round_2["generate"]["inputs"] == {"prompts": sha256_of(second / "prompts.jsonl"),
                                                        "student": sha256_of(run / "train" / "adapter")}
    # Each prompt: 2 teacher candidates, then 2 from round 1's student, numbered by place.
    rows = [json.loads(line) for line in (second / "candidates.jsonl").read_text().splitlines()]
    assert {row["prompt_id"] for row in rows} == {f"p{i}" for i in range(6, 12)}
    for row in rows:
        responses = row["responses"]
        assert [r["id"] for r in responses] == [f"{row['prompt_id']}-c{i}" for i in range(4)]
        assert [r["source"] for r in responses] == ["teacher", "teacher", "student", "student"]
        assert {r["model"] for r in responses[2:]} == {str(run / "train")}
        assert {r["model"] for r in responses[:2]} == {str(tiny_model_dir)}
        assert row["teacher"]["round"] == 2 and set(row["teacher"]) == {"round", "teacher", "student"}
    # Training went on from round 1's student, anchored to the original model (reference: original).
    train = two_rounds.round_2["train"]
    assert train["inputs"] == {"data": sha256_of(second / "pairs.jsonl"), "start": sha256_of(run / "train" / "adapter")}
    assert train["summary"]["started_from"] == str(run / "train")
    assert train["summary"]["reference_model"] == str(tiny_model_dir)
    assert yaml.safe_load((second / "train" / "config.yaml").read_text())["reference"] == str(tiny_model_dir)
    source = resolve_model(str(second / "train"))
    assert source.base_adapters == (str((run / "train" / "adapter").resolve()),)
    # Eval: against the original model on round 1's reference answers, and against round 1's student on the
    # answers round 1's eval sampled from it; nothing was sampled twice.
    assert two_rounds.metrics["reference"] == str(tiny_model_dir)
    assert two_rounds.previous["reference"] == str(run / "train")
    assert two_rounds.previous["model"] == two_rounds.metrics["model"]
    for copy, original in ((second / "eval" / "responses_reference.jsonl", run / "eval" / "responses_reference.jsonl"),
                           (second / "eval" / "previous" / "responses_reference.jsonl",
                            run / "eval" / "responses_model.jsonl"),
                           (second / "eval" / "previous" / "responses_model.jsonl",
                            second / "eval" / "responses_model.jsonl")):
        assert copy.read_bytes() == original.read_bytes(), copy
    assert set(two_rounds.round_2["eval"]["inputs"]) == {"weights", "prompts", "previous", "answers_original",
                                                         "answers_previous"}
    assert two_rounds.round_2["eval"]["summary"]["previous"]["lc_win_rate"] == two_rounds.previous["lc_win_rate"]


def test_the_summary_has_a_row_per_round_in_json_markdown_and_a_plot(two_rounds: SimpleNamespace) -> None:
    run = two_rounds.run
    summary = json.loads((run / "rounds_summary.json").read_text())
    assert [row["round"] for row in summary["rounds"]] == [1, 2] and summary["stopped"] is None
    assert summary["rounds"] == two_rounds.result.rounds
    first, second = summary["rounds"]
    assert first["vs_previous_win_rate"] is None and second["vs_previous_win_rate"] == two_rounds.previous["win_rate"]
    for key in ("win_rate", "win_rate_ci_low", "win_rate_ci_high", "lc_win_rate", "lc_win_rate_ci_low",
                "lc_win_rate_ci_high", "kl_per_token"):
        assert second[key] == two_rounds.metrics[key], key
    assert second["rule_score"] == two_rounds.metrics["rule_score_model"]
    assert second["mean_length"] == two_rounds.metrics["mean_length_model"]
    assert second["hit_length_cap"] == two_rounds.metrics["hit_length_cap_model"]
    assert second["vs_previous_kl_per_token"] == two_rounds.previous["kl_per_token"]
    assert second["pairs"] == two_rounds.round_2["pairs"]["summary"]["pairs"]
    assert summary["original"]["rule_score"] == json.loads((run / "eval" / "metrics.json").read_text())[
        "rule_score_reference"]
    table = (run / "rounds_summary.md").read_text()
    assert [line.split("|")[1].strip() for line in table.splitlines() if line.startswith("| ")][1:] == [
        "original", "1", "2"]
    assert "All 2 rounds ran" in table
    assert (run / "rounds_summary.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_stop_when_no_gain_stops_after_the_round_whose_interval_contains_one_half(two_rounds: SimpleNamespace) -> None:
    run = two_rounds.run
    previous = run / "round-2" / "eval" / "previous" / "metrics.json"
    metrics = json.loads(previous.read_text())
    # Round 2's win rate against round 1's student, made unsure (the tiny model's is whatever it is).
    previous.write_text(json.dumps({**metrics, "win_rate": 0.55, "win_rate_ci_low": 0.4, "win_rate_ci_high": 0.7}))
    try:
        result = run_pipeline(load_pipeline_config(two_rounds.config, ["rounds=3", "stop_when.no_gain=true"]))
    finally:
        previous.write_text(json.dumps(metrics))
    assert result.ran == [] and not (run / "round-3").exists()
    assert result.stopped is not None and "round 2's held-out win rate against round 1's student" in result.stopped
    summary = json.loads((run / "rounds_summary.json").read_text())
    assert [row["round"] for row in summary["rounds"]] == [1, 2] and summary["planned_rounds"] == 3
    assert summary["stopped"] == result.stopped
    assert "Stopped after round 2 of 3: no gain" in (run / "rounds_summary.md").read_text()


@pytest.mark.reliability
def test_a_run_killed_in_round_2s_training_carries_on_to_the_uninterrupted_result(
        two_rounds: SimpleNamespace, tiny_model_dir: Path, tmp_path: Path) -> None:
    import torch

    config = _rounds_config(tmp_path, tiny_model_dir, **ROUNDS)
    run, second = tmp_path / "run", tmp_path / "run" / "round-2"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    cmd = [sys.executable, "-m", "align", "pipeline", "run", str(config)]
    kill_when_written(cmd, env, second / "train" / "checkpoints" / "checkpoint-4" / "trainer_state.json")
    round_1, before = _stages(run), _stages(second)
    assert [round_1[stage]["status"] for stage in STAGES] == ["done"] * 5
    assert [before[stage]["status"] for stage in STAGES[:4]] == ["done", "done", "done", "running"]
    mtimes = {path: path.stat().st_mtime_ns for path in (
        run / "candidates.jsonl", run / "train" / "adapter" / "adapter_model.safetensors",
        second / "candidates.jsonl", second / "candidates_student.jsonl", second / "judgements.jsonl")}

    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert _stages(run) == round_1, "round 1 was redone"
    after = _stages(second)
    for stage in ("generate", "label", "pairs"):
        assert after[stage] == before[stage], f"round 2's {stage} was redone"
    assert {path: path.stat().st_mtime_ns for path in mtimes} == mtimes
    assert after["train"]["status"] == after["eval"]["status"] == "done" and after["train"]["summary"]["steps"] == 10
    log = [json.loads(line) for line in (second / "train" / "metrics.jsonl").read_text().splitlines()]
    assert sorted({row["step"] for row in log if "loss" in row}) == list(range(1, 11))  # from its checkpoint
    assert f"skipped (up to date): {', '.join([*STAGES, *ROUND_2[:3]])}" in done.stdout
    assert "rounds summary:" in done.stdout and "| 2 |" in done.stdout

    # The same candidates, weights and eval figures as the run that was never stopped.
    assert _texts(second / "candidates.jsonl") == two_rounds.candidates
    weights = _adapter(second / "train")
    assert weights.keys() == two_rounds.adapter.keys()
    assert all(torch.equal(weights[name], two_rounds.adapter[name]) for name in weights)
    metrics = json.loads((second / "eval" / "metrics.json").read_text())
    previous = json.loads((second / "eval" / "previous" / "metrics.json").read_text())
    assert {k: metrics[k] for k in _FIGURES} == {k: two_rounds.metrics[k] for k in _FIGURES}
    assert {k: previous[k] for k in _FIGURES} == {k: two_rounds.previous[k] for k in _FIGURES}

    again = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert again.returncode == 0 and "stages run: none" in again.stdout


def test_a_change_to_round_2_only_settings_reruns_no_stage_of_round_1(two_rounds: SimpleNamespace,
                                                                       tiny_model_dir: Path) -> None:
    import torch

    torch.set_num_threads(1)
    run, second = two_rounds.run, two_rounds.run / "round-2"
    # reference: previous anchors round 2 to round 1's student: only round 2's train (and its eval) read it.
    changed = run_pipeline(load_pipeline_config(two_rounds.config, ["reference=previous"]))
    assert changed.ran == ["round-2/train", "round-2/eval"]
    assert changed.skipped == [*STAGES, *ROUND_2[:3]]
    assert _stages(run) == two_rounds.round_1
    after = _stages(second)
    assert all(after[stage] == two_rounds.round_2[stage] for stage in ("generate", "label", "pairs"))
    assert after["train"]["summary"]["reference_model"] == str(run / "train")
    assert yaml.safe_load((second / "train" / "config.yaml").read_text())["reference"] == "base"

    # --from eval --round 2: round 2's eval alone.
    again = run_pipeline(load_pipeline_config(two_rounds.config, ["reference=previous"]), from_stage="eval",
                         from_round=2)
    assert again.ran == ["round-2/eval"]

    # teacher_share is read by round 2's generate only: round 1's settings hashes stay, round 2's generate moves
    # (and with its candidates, everything after it in round 2).
    base, other = (load_pipeline_config(two_rounds.config, overrides) for overrides in ([], ["teacher_share=1"]))
    for stage in STAGES:
        assert round_settings_hash(other, 1, stage) == round_settings_hash(base, 1, stage), stage
    assert round_settings_hash(other, 2, "generate") != round_settings_hash(base, 2, "generate")
    for stage in ("label", "pairs", "train", "eval"):
        assert round_settings_hash(other, 2, stage) == round_settings_hash(base, 2, stage), stage


def test_rounds_1_is_the_pipeline_as_it_was_and_its_run_dir_carries_on_as_round_1(tiny_model_dir: Path,
                                                                                tmp_path: Path) -> None:
    import torch

    torch.set_num_threads(1)
    config = _config(tmp_path, tiny_model_dir, max_steps=2, save_steps=10)  # no round settings at all
    run = tmp_path / "run"
    first = run_pipeline(load_pipeline_config(config))  # no rounds key: the pipeline as it always ran
    layout = sorted(path.name for path in run.iterdir())
    assert layout == [".lock", "candidates.jsonl", "eval", "judgements.jsonl", "manifest.json", "pairs.jsonl",
                      "train", "unpaired.jsonl"]  # .lock: one pipeline per run dir at a time (since d78cbd3)
    assert first.rounds == [] and first.rounds_summary is None and first.stopped is None
    stages = _stages(run)
    plain = load_pipeline_config(config)
    assert {stage: stages[stage]["settings_hash"] for stage in STAGES} == {
        stage: stage_settings_hash(plain, stage) for stage in STAGES}

    # rounds: 1 said aloud is the same pipeline: nothing to do, nothing new written.
    same = run_pipeline(load_pipeline_config(config, ["rounds=1"]))
    assert same.ran == [] and same.skipped == list(STAGES)
    assert sorted(path.name for path in run.iterdir()) == layout and _stages(run) == stages
    assert same.eval_metrics == first.eval_metrics

    # A run dir from before rounds is round 1 of a longer run: round 2 runs, round 1 is not touched.
    longer = run_pipeline(load_pipeline_config(config, ["rounds=2"]))
    assert longer.skipped == list(STAGES) and longer.ran == list(ROUND_2)
    assert _stages(run) == stages
    assert [row["round"] for row in longer.rounds] == [1, 2] and (run / "rounds_summary.md").exists()


# Pure parts: which prompts a round draws, how candidates are shared, when rounds stop, what merging writes.

def test_each_round_draws_the_next_prompts_while_the_file_lasts_then_starts_over() -> None:
    assert [prompt_slice(120, 40, k) for k in (1, 2, 3, 4)] == [(0, 40), (40, 80), (80, 120), (0, 40)]
    assert [prompt_slice(10, 4, k) for k in (1, 2, 3)] == [(0, 4), (4, 8), (0, 4)]  # 8-9 are never drawn
    with pytest.raises(ConfigError, match="prompts_per_round is 5, but the generate prompts hold only 4"):
        prompt_slice(4, 5, 1)


def test_the_teachers_share_of_candidates_is_rounded_half_up() -> None:
    assert [teacher_candidates(3, share) for share in (0, 0.33, 0.5, 0.67, 1)] == [0, 1, 2, 2, 3]
    assert [teacher_candidates(4, share) for share in (0.1, 0.125, 0.5)] == [0, 1, 2]


def _row(k: int, **figures: Any) -> dict[str, Any]:
    return round_row(k, f"round-{k}", {"win_rate": 0.7, "kl_per_token": 0.1, **figures.pop("metrics", {})},
                     figures.pop("previous", None))


def test_stop_when_fires_on_an_interval_containing_one_half_or_a_kl_past_the_budget() -> None:
    no_gain, budget = StopWhen(no_gain=True), StopWhen(kl_per_token=0.15)
    unsure = {"win_rate": 0.6, "win_rate_ci_low": 0.45, "win_rate_ci_high": 0.75}
    sure = {"win_rate": 0.7, "win_rate_ci_low": 0.55, "win_rate_ci_high": 0.85}
    assert "contains 0.5" in stop_reason(_row(2, previous=unsure), no_gain)
    assert stop_reason(_row(2, previous=sure), no_gain) is None
    assert stop_reason(_row(2, previous=unsure), StopWhen()) is None  # not asked
    assert stop_reason(_row(1), no_gain) is None  # round 1 has no previous student
    assert stop_reason(_row(2, previous={"win_rate": None, "win_rate_ci_low": None}), no_gain) is None
    assert "past the budget 0.15" in stop_reason(_row(3, metrics={"kl_per_token": 0.2}), budget)
    assert "round 2 is the last within it" in stop_reason(_row(3, metrics={"kl_per_token": 0.2}), budget)
    assert stop_reason(_row(3, metrics={"kl_per_token": 0.15}), budget) is None


def test_merging_renumbers_tags_and_flags_duplicates_across_sources(tmp_path: Path) -> None:
    from align.data.validate import load_records

    def part(name: str, texts: list[str]) -> Path:
        path = tmp_path / f"{name}.jsonl"
        path.write_text(json.dumps({"prompt_id": "q", "prompt": "Hi?", "prompt_hash": "h", "teacher": {"model": name},
                                    "responses": [{"id": f"q-c{i}", "text": t} for i, t in enumerate(texts)]}) + "\n")
        return path

    output = tmp_path / "candidates.jsonl"
    assert merge_candidates([("teacher", "T", part("teacher", ["Hello."])),
                             ("student", "S", part("student", ["Hey", "Hello. "]))], output, 2) == 1
    (merged,) = load_records(output, "candidates")
    assert [(r.id, r.source, r.model, r.duplicate_of) for r in merged.responses] == [
        ("q-c0", "teacher", "T", None), ("q-c1", "student", "S", None), ("q-c2", "student", "S", "q-c0")]
    assert merged.teacher == {"round": 2, "teacher": {"model": "teacher"}, "student": {"model": "student"}}


def test_round_only_settings_leave_round_1_and_the_shipped_configs_as_they_were(tmp_path: Path) -> None:
    quickstart = load_pipeline_config(REPO / "configs" / "quickstart.yaml")
    for overrides in (["rounds=3"], ["rounds=3", "teacher_share=0.5", "reference=previous", "stop_when.no_gain=true",
                                     "stop_when.kl_per_token=0.2"]):
        config = load_pipeline_config(REPO / "configs" / "quickstart.yaml", overrides)
        for stage in STAGES:
            assert round_settings_hash(config, 1, stage) == stage_settings_hash(quickstart, stage), (overrides, stage)
    # prompts_per_round is round 1's max_prompts: its generate stage (only) moves.
    sliced = load_pipeline_config(REPO / "configs" / "quickstart.yaml", ["prompts_per_round=40"])
    assert round_config(sliced, 1).generate["max_prompts"] == 40
    assert round_settings_hash(sliced, 1, "generate") != stage_settings_hash(quickstart, "generate")
    assert round_settings_hash(sliced, 1, "train") == stage_settings_hash(quickstart, "train")
    # People answer each round in a dataset of its own; round 1 keeps the dataset's name.
    people = load_pipeline_config(REPO / "configs" / "quickstart.yaml",
                                  ["label.argilla.dataset=d", "label.argilla.target=3", "rounds=2"])
    assert round_config(people, 1).label.argilla.dataset == "d"
    assert round_config(people, 2).label.argilla.dataset == "d-round-2"


def test_the_shipped_rounds_config_is_the_quickstart_in_three_rounds() -> None:
    config = load_pipeline_config(REPO / "configs" / "quickstart-rounds.yaml")
    check_sections(config)
    quickstart = load_pipeline_config(REPO / "configs" / "quickstart.yaml")
    assert (config.rounds, config.prompts_per_round, teacher_candidates(3, config.teacher_share)) == (3, 40, 1)
    assert config.label == quickstart.label and config.pairs == quickstart.pairs and config.eval == quickstart.eval
    assert {k: v for k, v in config.generate.items() if k != "max_prompts"} == {
        k: v for k, v in quickstart.generate.items() if k != "max_prompts"}


@pytest.mark.parametrize(("overrides", "message"), [
    (["teacher_share=1.5"], "teacher_share"),
    (["reference=first"], "reference"),
    (["rounds=0"], "rounds"),
    (["stop_when.kl=0.1"], "kl"),
])
def test_bad_round_settings_are_refused_with_their_field(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_pipeline_config(REPO / "configs" / "quickstart.yaml", overrides)
