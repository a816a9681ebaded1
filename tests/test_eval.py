"""`align eval` on a tiny model: a model against itself ties everywhere with zero KL; statistics are honest."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from align.eval.stats import LOSS, TIE, WIN, bootstrap_ci, compare_scores, summarise_outcomes, win_rate_of
from tests.clihelp import run_align

REPO = Path(__file__).resolve().parent.parent
HELDOUT = REPO / "datasets" / "prompts" / "concise_heldout.jsonl"
RULES = "rules:\n  - name: short\n    max_chars: 60\n  - name: no_digits\n    must_not_match: '[0-9]'\n"


def test_ties_are_counted_apart_and_intervals_cover_the_rate() -> None:
    outcomes = [WIN] * 30 + [LOSS] * 10 + [TIE] * 20
    summary = summarise_outcomes(outcomes)
    assert (summary.wins, summary.ties, summary.losses) == (30, 20, 10)
    assert summary.rate == pytest.approx(0.75)
    assert summary.ci_low < 0.75 < summary.ci_high
    assert summary.ci_low > 0.5  # 30 vs 10 is a clear win
    assert win_rate_of([TIE, TIE]) == 0.5
    low, high = bootstrap_ci([WIN, LOSS] * 5)
    assert low < 0.5 < high


def test_compare_scores() -> None:
    assert compare_scores(0.9, 0.1) == WIN and compare_scores(0.1, 0.9) == LOSS
    assert compare_scores(0.5, 0.5) == TIE and compare_scores(None, 0.2) == LOSS and compare_scores(None, None) == TIE


def test_reference_against_itself_ties_on_every_prompt_with_zero_kl(tiny_model_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "eval"
    rules = tmp_path / "rules.yaml"
    rules.write_text("rules:\n  - name: short\n    max_chars: 60\n  - name: no_digits\n    must_not_match: '[0-9]'\n")
    code, stdout, err = run_align(capsys, "eval", "--model", tiny_model_dir, "--reference", tiny_model_dir,
                                  "--prompts", REPO / "datasets" / "prompts" / "concise_heldout.jsonl",
                                  "--judge", rules, "-o", out, "max_new_tokens=12")
    assert code == 0, err
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("win_rate", "win_rate_ci_low", "win_rate_ci_high", "ties", "kl_per_token", "kl_per_sequence",
                "mean_length_reference", "mean_length_model", "rules",
                "lc_win_rate", "lc_win_rate_ci_low", "lc_win_rate_ci_high"):
        assert key in metrics, key
    # equal answers, equal lengths: length control has nothing to remove, it is the raw rate and interval
    assert (metrics["lc_win_rate"], metrics["lc_win_rate_ci_low"], metrics["lc_win_rate_ci_high"]) == \
        (metrics["win_rate"], metrics["win_rate_ci_low"], metrics["win_rate_ci_high"]) == (0.5, 0.5, 0.5)
    assert metrics["lc_length_unit"] == "tokens" and metrics["lc_length_slope"] is None
    assert metrics["win_rate_ci_low"] <= 0.5 <= metrics["win_rate_ci_high"]
    assert abs(metrics["kl_per_token"]) < 1e-4 and abs(metrics["kl_per_sequence"]) < 1e-3
    assert metrics["wins"] + metrics["ties"] + metrics["losses"] == 40
    # common random numbers: a model against itself draws the very same answers, so every prompt ties
    assert metrics["ties"] == 40 and metrics["score_diff"] == 0
    answers = {role: {r["prompt_id"]: r["responses"][0]["text"]
                      for r in map(json.loads, (out / f"responses_{role}.jsonl").open())}
               for role in ("model", "reference")}
    assert answers["model"] == answers["reference"] and len(set(answers["model"].values())) > 1
    assert set(metrics["rules"]) == {"short", "no_digits"}
    assert metrics["samples_per_prompt"] == 1 and metrics["decoding"] == "sample" and metrics["kl_caveat"] is None
    assert metrics["score_diff_ci_low"] <= 0 <= metrics["score_diff_ci_high"]
    assert metrics["improved"] + metrics["worsened"] + metrics["unchanged"] == 40
    for role in ("model", "reference"):  # meeting every rule is bounded by the per-rule pass rates
        per_rule = [stats[f"{role}_pass"] for stats in metrics["rules"].values()]
        assert 1 - sum(1 - p for p in per_rule) - 1e-9 <= metrics[f"rule_pass_rate_{role}"] <= min(per_rule) + 1e-9
    report = (out / "report.md").read_text()
    assert "win rate" in report and "KL" in report and "meets every rule" in report
    assert "| length-controlled win rate (at equal tokens) | **0.500** (95% CI 0.500 - 0.500)" in report
    assert "one sample each" in report and "score difference" in report
    for png in ("win_rate.png", "reward_vs_kl.png", "length_hist.png"):
        assert (out / png).stat().st_size > 1000
    assert "report:" in stdout and "score difference (student - reference)" in stdout
    assert "length-controlled win rate (at equal tokens): 0.500 (95% CI 0.500-0.500)" in stdout


def test_kl_reads_the_log_probs_the_student_recorded_as_it_answered(tiny_model_dir: Path, tmp_path: Path) -> None:
    """The student's side of the KL comes from the log-probs generation stored with each answer, not from a second
    forward pass: shifting every stored log-prob by 0.25 shifts the KL per token by 0.25. Answers stored without
    log-probs are scored by a forward pass, back to a model's zero KL against itself."""
    from align.eval import EvalConfig, run_eval

    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(HELDOUT.read_text().splitlines(keepends=True)[:6]))
    config = EvalConfig(model=str(tiny_model_dir), reference=str(tiny_model_dir), prompts=prompts,
                        output_dir=tmp_path / "eval", judge=rules, max_new_tokens=8)
    assert abs(run_eval(config).metrics["kl_per_token"]) < 1e-4
    answers = tmp_path / "eval" / "responses_model.jsonl"
    rows = [json.loads(line) for line in answers.read_text().splitlines()]

    def rewrite(change) -> float:
        answers.write_text("".join(json.dumps({**row, "responses": [change(r) for r in row["responses"]]}) + "\n"
                                   for row in rows))
        return run_eval(config).metrics["kl_per_token"]  # a rerun keeps the answers file it finds

    shifted = rewrite(lambda r: {**r, "logprobs": [{**t, "logprob": t["logprob"] + 0.25} for t in r["logprobs"]]})
    assert shifted == pytest.approx(0.25, abs=1e-4)
    assert abs(rewrite(lambda r: {**r, "logprobs": None})) < 1e-4


def test_eval_needs_a_judge(tiny_model_dir: Path, tmp_path: Path, capsys) -> None:
    code, _, err = run_align(capsys, "eval", "--model", tiny_model_dir, "--reference", tiny_model_dir,
                             "--prompts", REPO / "datasets" / "prompts" / "concise_heldout.jsonl", "-o", tmp_path)
    assert code != 0 and "give a judge" in err


def _eval_against_itself(tiny_model_dir: Path, tmp_path: Path, capsys, *args: str) -> tuple[dict, str]:
    """``align eval`` of the tiny model against itself on the held-out prompts with RULES: (metrics.json, stdout)."""
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    code, stdout, err = run_align(capsys, "eval", "--model", tiny_model_dir, "--reference", tiny_model_dir,
                                  "--prompts", HELDOUT, "--judge", rules, "-o", tmp_path / "eval", *args)
    assert code == 0, err
    return json.loads((tmp_path / "eval" / "metrics.json").read_text()), stdout


def test_k_samples_per_prompt_are_compared_kth_with_kth_and_paired_by_prompt(tiny_model_dir: Path, tmp_path: Path,
                                                                             capsys) -> None:
    out = tmp_path / "eval"
    metrics, stdout = _eval_against_itself(tiny_model_dir, tmp_path, capsys, "--samples-per-prompt", "2",
                                           "max_new_tokens=12")
    assert metrics["samples_per_prompt"] == 2 and metrics["prompts"] == 40
    assert metrics["wins"] + metrics["ties"] + metrics["losses"] == 80
    assert metrics["win_rate_ci_low"] <= 0.5 <= metrics["win_rate_ci_high"]
    assert abs(metrics["kl_per_token"]) < 1e-4 and metrics["kl_caveat"] is None  # a model against itself
    rows = [json.loads(line) for line in (out / "per_prompt.jsonl").read_text().splitlines()]
    answers = {role: {r["prompt_id"]: r for r in map(json.loads, (out / f"responses_{role}.jsonl").open())}
               for role in ("model", "reference")}
    assert sorted(r["prompt_id"] for r in rows) == sorted(answers["model"]) == sorted(answers["reference"])
    for row in rows:
        assert len(row["outcomes"]) == len(row["model_scores"]) == len(row["reference_scores"]) == 2
        assert len(row["log_ratios"]) == 2
        model_texts = [a["text"] for a in answers["model"][row["prompt_id"]]["responses"]]
        assert len(model_texts) == 2
        for outcome, m, r in zip(row["outcomes"], row["model_scores"], row["reference_scores"]):
            assert outcome == compare_scores(m, r)  # the k-th answers of the two sides, not any other pairing
        assert row["score_diff"] == pytest.approx(sum(row["model_scores"]) / 2 - sum(row["reference_scores"]) / 2)
        # the k-th length difference belongs to the k-th comparison (a model against itself: all 0)
        assert row["length_diffs"] == [m["num_tokens"] - r["num_tokens"] for m, r in
                                       zip(answers["model"][row["prompt_id"]]["responses"],
                                           answers["reference"][row["prompt_id"]]["responses"])]
    diffs = [row["score_diff"] for row in rows]
    assert metrics["score_diff"] == pytest.approx(sum(diffs) / 40)
    assert metrics["score_diff"] == pytest.approx(metrics["rule_score_model"] - metrics["rule_score_reference"])
    assert metrics["score_diff_ci_low"] <= metrics["score_diff"] <= metrics["score_diff_ci_high"]
    assert (metrics["improved"], metrics["worsened"]) == (sum(d > 1e-9 for d in diffs), sum(d < -1e-9 for d in diffs))
    assert metrics["lc_win_rate_ci_low"] <= metrics["lc_win_rate"] <= metrics["lc_win_rate_ci_high"]
    lengths = [a["num_tokens"] for rows_ in answers["model"].values() for a in rows_["responses"]]
    assert metrics["mean_length_model"] == pytest.approx(sum(lengths) / 80)  # over all K answers
    assert "2 samples each" in (out / "report.md").read_text()
    assert "prompts improved/worsened" in stdout


def test_greedy_answers_of_a_model_against_itself_all_tie_and_its_kl_carries_a_caveat(
        tiny_model_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "eval"
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    args = ["eval", "--model", tiny_model_dir, "--reference", tiny_model_dir, "--prompts", HELDOUT,
            "--judge", rules, "-o", out, "max_new_tokens=12"]
    code, stdout, err = run_align(capsys, *args, "--greedy")
    assert code == 0, err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["decoding"] == "greedy" and metrics["temperature"] == 0.0
    assert (metrics["ties"], metrics["wins"], metrics["losses"]) == (40, 0, 0)  # different seeds, same answers
    assert (metrics["score_diff"], metrics["improved"], metrics["worsened"]) == (0.0, 0, 0)
    assert "greedy" in metrics["kl_caveat"] and "not an unbiased KL" in metrics["kl_caveat"]
    report = (out / "report.md").read_text()
    assert "one greedy answer each" in report and "KL caveat" in report
    assert "not an unbiased KL" in stdout
    # The answers are resumed on a rerun: asking for other ones in the same folder says so, in eval's words.
    code, _, err = run_align(capsys, *args, "--samples-per-prompt", "2")
    assert code != 0 and "1 greedy answer" in err and "2 sampled answer(s)" in err and "--output-dir" in err


def test_kl_false_skips_the_reference_pass_and_says_so(tiny_model_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "eval"
    metrics, stdout = _eval_against_itself(tiny_model_dir, tmp_path, capsys, "max_new_tokens=6", "--greedy", "kl=false")
    assert (metrics["kl_per_token"], metrics["kl_per_sequence"]) == (None, None)
    assert metrics["kl_caveat"] == "not measured (kl: false)" and "not measured" in stdout
    rows = [json.loads(line) for line in (out / "per_prompt.jsonl").read_text().splitlines()]
    assert rows and all(row["log_ratios"] == [] for row in rows)  # no answer was scored under the reference
    assert metrics["score_diff"] == 0.0  # the rest of eval is unchanged: a model against itself ties


def test_greedy_with_several_samples_per_prompt_is_refused(tiny_model_dir: Path, tmp_path: Path, capsys) -> None:
    code, _, err = run_align(capsys, "eval", "--model", tiny_model_dir, "--reference", tiny_model_dir,
                             "--prompts", HELDOUT, "--judge", tmp_path / "rules.yaml", "-o", tmp_path / "eval",
                             "--greedy", "--samples-per-prompt", "3")
    assert code != 0 and "greedy decoding gives one answer per prompt" in err


def test_the_llm_judge_compares_the_kth_answers_and_reports_no_score_difference(tiny_model_dir: Path,
                                                                                 tmp_path: Path, capsys) -> None:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(HELDOUT.read_text().splitlines(keepends=True)[:3]))
    out = tmp_path / "eval"
    code, stdout, err = run_align(capsys, "eval", "--model", tiny_model_dir, "--reference", tiny_model_dir,
                                  "--prompts", prompts, "--judge-model", tiny_model_dir, "-o", out,
                                  "--samples-per-prompt", "2", "max_new_tokens=8")
    assert code == 0, err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["judge"].startswith("llm:") and metrics["wins"] + metrics["ties"] + metrics["losses"] == 6
    assert "score_diff" not in metrics and "score difference" not in stdout
    rows = [json.loads(line) for line in (out / "per_prompt.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(len(r["outcomes"]) == len(r["judgements"]) == 2 for r in rows)
    assert all("p_model_better" in j for r in rows for j in r["judgements"])


def test_two_evals_sharing_reference_answers_answer_once_and_score_the_same_reference(
        tiny_model_dir: Path, tmp_path: Path) -> None:
    from align.eval import EvalConfig, run_eval

    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    shared = tmp_path / "reference.jsonl"
    metrics = []
    for name in ("first", "second"):
        config = EvalConfig(model=str(tiny_model_dir), reference=str(tiny_model_dir), prompts=HELDOUT,
                            output_dir=tmp_path / name, judge=rules, max_new_tokens=8, reference_answers=shared)
        result = run_eval(config)
        metrics.append(result.metrics)
        assert not (tmp_path / name / "responses_reference.jsonl").exists()
        assert result.answers == {"model": str(tmp_path / name / "responses_model.jsonl"), "reference": str(shared)}
    rows = [json.loads(line) for line in shared.read_text().splitlines()]
    assert len(rows) == len({r["prompt_id"] for r in rows}) == 40  # answered once, no duplicate from the second
    assert metrics[0]["rule_score_reference"] == metrics[1]["rule_score_reference"]


def test_the_eval_result_names_every_file_eval_wrote(tiny_model_dir: Path, tmp_path: Path) -> None:
    # The pipeline chains these names; a file eval writes and the result leaves out would have to be guessed.
    from align.eval import EvalConfig, run_eval

    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    out = tmp_path / "eval"
    result = run_eval(EvalConfig(model=str(tiny_model_dir), reference=str(tiny_model_dir), prompts=HELDOUT,
                                 output_dir=out, judge=rules, max_new_tokens=8))
    files = {name: Path(path) for name, path in result.files.items()}
    assert set(files) == {"metrics", "report", "per_prompt", "answers_model", "answers_reference"}
    # Everything in the folder is named, except the plots, which the named report links.
    written = {path for path in out.iterdir() if path.suffix != ".png"}
    assert set(files.values()) == written
    assert json.loads(files["metrics"].read_text()) == json.loads(json.dumps(result.metrics))
    assert len(files["per_prompt"].read_text().splitlines()) == result.metrics["prompts"]
    report = files["report"].read_text()
    assert all(f"]({png.name})" in report for png in out.glob("*.png"))
