"""`align eval` on a tiny model: a model against itself is a fair coin with zero KL; statistics are honest."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from align.eval.stats import LOSS, TIE, WIN, bootstrap_ci, compare_scores, summarise_outcomes, win_rate_of
from tests.clihelp import run_align

REPO = Path(__file__).resolve().parent.parent


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


def test_reference_against_itself_is_a_coin_flip_with_zero_kl(tiny_model_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "eval"
    rules = tmp_path / "rules.yaml"
    rules.write_text("rules:\n  - name: short\n    max_chars: 60\n  - name: no_digits\n    must_not_match: '[0-9]'\n")
    code, stdout, err = run_align(capsys, "eval", "--model", tiny_model_dir, "--reference", tiny_model_dir,
                                  "--prompts", REPO / "datasets" / "prompts" / "concise_heldout.jsonl",
                                  "--judge", rules, "-o", out, "max_new_tokens=12")
    assert code == 0, err
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("win_rate", "win_rate_ci_low", "win_rate_ci_high", "ties", "kl_per_token", "kl_per_sequence",
                "mean_length_reference", "mean_length_model", "rules"):
        assert key in metrics, key
    assert metrics["win_rate_ci_low"] <= 0.5 <= metrics["win_rate_ci_high"]
    assert abs(metrics["kl_per_token"]) < 1e-4 and abs(metrics["kl_per_sequence"]) < 1e-3
    assert metrics["wins"] + metrics["ties"] + metrics["losses"] == 40
    # different seeds for the two sides: a model against itself is not 40 identical ties
    assert metrics["ties"] < 40
    assert set(metrics["rules"]) == {"short", "no_digits"}
    for role in ("model", "reference"):  # meeting every rule is bounded by the per-rule pass rates
        per_rule = [stats[f"{role}_pass"] for stats in metrics["rules"].values()]
        assert 1 - sum(1 - p for p in per_rule) - 1e-9 <= metrics[f"rule_pass_rate_{role}"] <= min(per_rule) + 1e-9
    report = (out / "report.md").read_text()
    assert "win rate" in report and "KL" in report and "meets every rule" in report
    for png in ("win_rate.png", "reward_vs_kl.png", "length_hist.png"):
        assert (out / png).stat().st_size > 1000
    assert "report:" in stdout


def test_eval_needs_a_judge(tiny_model_dir: Path, tmp_path: Path, capsys) -> None:
    code, _, err = run_align(capsys, "eval", "--model", tiny_model_dir, "--reference", tiny_model_dir,
                             "--prompts", REPO / "datasets" / "prompts" / "concise_heldout.jsonl", "-o", tmp_path)
    assert code != 0 and "give a judge" in err
