"""Held-out reward accuracy with ties counted half: the rules alone, then on real KTO and DPO runs."""

from __future__ import annotations

import random

import pytest

from align.train.heldout import figures_at_reference, margin_accuracy, mean_of_batch_means, pairwise_accuracy


def _brute_force(rewards, desirable, tol):
    pairs = [(a, b) for a, da in zip(rewards, desirable) if da for b, db in zip(rewards, desirable) if not db]
    return sum(1.0 if a - b > tol else 0.5 if abs(a - b) <= tol else 0.0 for a, b in pairs) / len(pairs)


def test_pairwise_accuracy_by_hand() -> None:
    assert pairwise_accuracy([0.0] * 5, [True, False, True, True, False]) == 0.5  # before training: all tie
    assert pairwise_accuracy([2.0, 1.0, -1.0], [True, True, False]) == 1.0
    assert pairwise_accuracy([-2.0, 1.0], [True, False]) == 0.0
    # desirable 1.0 beats -1 and ties 1.0; desirable 0.0 beats -1, loses to 1.0: (1 + 0.5 + 1 + 0) / 4
    assert pairwise_accuracy([1.0, 0.0, -1.0, 1.0], [True, True, False, False]) == 0.625
    assert pairwise_accuracy([1e-7, -1e-7], [True, False], tie_tolerance=1e-5) == 0.5  # float noise is a tie
    assert pairwise_accuracy([1.0, 2.0], [True, True]) is None
    with pytest.raises(ValueError):
        pairwise_accuracy([1.0], [True, False])


def test_margin_accuracy_by_hand() -> None:
    assert margin_accuracy([0.0, 0.0, 0.0]) == 0.5  # before training: every pair ties
    assert margin_accuracy([1e-6, -2e-6, 3e-7], tie_tolerance=1e-5) == 0.5  # float noise is a tie
    assert margin_accuracy([0.2, -0.1, 0.0, 0.3]) == 0.625
    assert margin_accuracy([]) is None


@pytest.mark.parametrize("tol", [0.0, 0.15])
def test_pairwise_accuracy_equals_counting_every_pair(tol: float) -> None:
    rng = random.Random(0)
    for _ in range(50):
        n = rng.randint(2, 30)
        rewards = [round(rng.uniform(-1, 1), 1) for _ in range(n)]  # coarse values: many ties
        desirable = [rng.random() < 0.6 for _ in range(n)]
        if all(desirable) or not any(desirable):
            continue
        assert pairwise_accuracy(rewards, desirable, tol) == pytest.approx(_brute_force(rewards, desirable, tol))


def test_figures_at_the_reference_are_what_trl_logs_of_a_policy_that_is_its_reference() -> None:
    # TRL averages each eval batch's mean: batches [1, 2, 3] and [10] give (2 + 10) / 2, not the rows' mean 4
    assert mean_of_batch_means([1.0, 2.0, 3.0, 10.0], 3) == 6.0
    assert mean_of_batch_means([1.0, 2.0, 3.0, 10.0], 3, keep=[False, True, False, False]) == 2.0  # no kept row: out
    assert mean_of_batch_means([1.0], 3, keep=[False]) is None
    dpo = figures_at_reference("dpo", {"ref_chosen_logps": [-4.0, -6.0], "ref_rejected_logps": [-9.0, -7.0]}, 8)
    assert dpo == {"rewards/chosen": 0.0, "rewards/rejected": 0.0, "rewards/margins": 0.0, "rewards/accuracies": 0.5,
                   "logps/chosen": -5.0, "logps/rejected": -8.0}
    kto = figures_at_reference("kto", {"ref_logps": [-4.0, -9.0, -6.0]}, 8, desirable=[True, False, True],
                               estimates_kl=True)
    assert kto == {"kl": 0.0, "rewards/chosen": 0.0, "logps/chosen": -5.0, "rewards/rejected": 0.0,
                   "logps/rejected": -9.0, "rewards/margins": 0.0, "rewards/accuracies": 0.5}
    # one class only: no margin or accuracy, as TRL logs none and pairwise_accuracy gives None
    assert "rewards/accuracies" not in figures_at_reference("kto", {"ref_logps": [-4.0]}, 8, desirable=[True])


def _question(i: int) -> list[dict]:
    return [{"role": "user", "content": f"Question {i}: is it {['red', 'blue', 'green'][i % 3]}?"}]


def _train_held_out(method: str, rows: list[dict], tiny_model_dir, tmp_path, capsys) -> tuple[dict, str]:
    """A few brisk LoRA steps with 30% of the prompts held out, through the CLI: (run.json, stdout)."""
    import json

    from align.data.io import write_records
    from tests.clihelp import run_align

    write_records(tmp_path / "data.jsonl", rows)
    code, out, err = run_align(capsys, "train", method, "--model", tiny_model_dir, "--data", tmp_path / "data.jsonl",
                               "-o", tmp_path / "run", f"ref_cache_dir={tmp_path / 'cache'}", "max_steps=6",
                               "per_device_train_batch_size=4", "max_length=64", "eval_split=0.3",
                               "learning_rate=1e-3", "save_strategy=no")
    assert code == 0, err
    return json.loads((tmp_path / "run" / "run.json").read_text()), out


def test_kto_reports_heldout_reward_accuracy_that_rises_with_training(tiny_model_dir, tmp_path, capsys) -> None:
    """Desirable rows share one answer, undesirable another: a few LoRA steps must order held-out rows better."""
    rows = [{"prompt": _question(i),
             "completion": [{"role": "assistant", "content": "Yes, certainly." if i % 2 else "No way, never." * (1 + i % 3)}],
             "label": bool(i % 2)} for i in range(40)]
    run, out = _train_held_out("kto", rows, tiny_model_dir, tmp_path, capsys)
    assert run["eval_before"]["rewards/accuracies"] == 0.5  # policy = reference: every reward is 0, all tie
    assert run["eval_after"]["rewards/accuracies"] > 0.9
    assert run["eval_after"]["rewards/margins"] > 0
    assert "held-out rewards/accuracies: 0.500 -> " in out and "ties count half" in out
    assert "held-out rewards/margins: 0.000 -> " in out


def test_dpo_heldout_accuracy_is_half_before_training_and_rises(tiny_model_dir, tmp_path, capsys) -> None:
    """TRL's strict chosen > rejected count reads float noise before training; align's reads 0.5, then rises."""
    rows = [{"prompt": _question(i), "chosen": [{"role": "assistant", "content": "Yes, certainly."}],
             "rejected": [{"role": "assistant", "content": "No way, never." * (1 + i % 3)}]} for i in range(40)]
    run, out = _train_held_out("dpo", rows, tiny_model_dir, tmp_path, capsys)
    assert run["eval_before"]["rewards/accuracies"] == 0.5  # policy = reference: every margin is 0
    assert run["eval_after"]["rewards/accuracies"] > 0.9
    assert "held-out rewards/accuracies: 0.500 -> " in out and "ties count half" in out


_ROWS = {
    "kto": lambda i: {"prompt": _question(i), "label": bool(i % 2), "completion": [
        {"role": "assistant", "content": "Yes, certainly." if i % 2 else "No way, never." * (1 + i % 3)}]},
    "dpo": lambda i: {"prompt": _question(i), "chosen": [{"role": "assistant", "content": "Yes, certainly."}],
                      "rejected": [{"role": "assistant", "content": "No way, never." * (1 + i % 3)}]},
}


@pytest.mark.parametrize("method", ["dpo", "kto"])
def test_held_out_figures_before_training_need_no_pass_and_equal_a_measured_one(method, tiny_model_dir, tmp_path,
                                                                               capsys, monkeypatch) -> None:
    """A fresh LoRA student is its reference: its figures before training come from the reference's log-probs,
    and equal what an evaluation pass measures (forced here by denying that the policy starts as the reference)."""
    import align.train.run

    rows = [_ROWS[method](i) for i in range(40)]
    for name in ("known", "measured"):
        (tmp_path / name).mkdir()
    known, _ = _train_held_out(method, rows, tiny_model_dir, tmp_path / "known", capsys)
    monkeypatch.setattr(align.train.run, "starts_at_reference", lambda config, trainer: False)
    measured, _ = _train_held_out(method, rows, tiny_model_dir, tmp_path / "measured", capsys)
    before, passed = known["eval_before"], measured["eval_before"]
    assert "loss" in passed and "loss" not in before  # only the second ran an evaluation pass before training
    assert {"rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected"} <= set(before)
    for key, value in before.items():
        assert passed[key] == pytest.approx(value, abs=1e-4), key
