"""Did the student move? The diagnosis rules on synthetic figures, then on real tiny DPO runs: random labels are
memorised and said so, a learnable preference is not."""

from __future__ import annotations

import json
import logging
import math
import random
import statistics
from pathlib import Path

import pytest

from align.train.diagnosis import DRIFT_BUDGET, chance_spread, diagnose, gain_needed, training_fit
from align.train.heldout import (margin_accuracy, margin_in_standard_errors, pairwise_accuracy,
                                 reward_gap_in_standard_errors, standard_errors_above_zero)


def _steps(accuracies: list[float], margins: list[float] | None = None) -> list[dict]:
    """metrics.jsonl rows as TRL's DPO logs them, with an eval row and the closing summary among them."""
    margins = margins or [0.0] * len(accuracies)
    rows: list[dict] = [{"step": 0, "eval_loss": 0.69, "eval_rewards/accuracies": 0.1}]
    rows += [{"step": i + 1, "loss": 0.69 - 0.05 * i, "rewards/accuracies": a, "rewards/margins": m}
             for i, (a, m) in enumerate(zip(accuracies, margins))]
    return rows + [{"step": len(accuracies), "train_loss": 0.5}]


MEMORISING = _steps([0.25, 0.5, 0.5, 0.75, 0.75, 1.0, 1.0, 1.0], [0.0, 0.1, 0.2, 0.4, 0.6, 0.8, 0.9, 0.9])
BEFORE = {"rewards/accuracies": 0.5, "rewards/margins": 0.0, "logps/chosen": -60.0, "logps/rejected": -80.0}


def test_a_run_that_fits_its_pairs_but_not_the_heldout_ones_is_told_it_memorised() -> None:
    after = {"rewards/accuracies": 0.52, "rewards/margins": 0.01, "logps/chosen": -61.0, "logps/rejected": -82.0}
    result = diagnose(BEFORE, after, MEMORISING, heldout={"pairs": 25}, completion_tokens={"chosen": 20, "rejected": 30})
    assert result.verdict == "memorised"
    assert len(result.warnings) == 1
    warning = result.warnings[0]
    assert "fit its training pairs (reward accuracy 1.00" in warning and "0.50 -> 0.52 on 25 held-out pairs" in warning
    assert "it memorised" in warning and "align eval" in warning and "learning rate" in warning
    assert result.figures["train"]["fit"] and result.figures["heldout"]["moved"] is False


def test_a_run_whose_heldout_accuracy_rises_past_chance_gets_no_warning() -> None:
    after = {"rewards/accuracies": 0.9, "rewards/margins": 0.6, "logps/chosen": -59.0, "logps/rejected": -85.0}
    result = diagnose(BEFORE, after, MEMORISING, heldout={"pairs": 40}, completion_tokens={"chosen": 20, "rejected": 30})
    assert result.verdict == "generalised" and result.warnings == []
    assert "carries over" in result.notes[0]


def test_without_heldout_figures_there_is_no_verdict_but_a_note() -> None:
    result = diagnose({}, {}, MEMORISING)
    assert result.verdict == "unknown" and result.warnings == []
    assert "no held-out reward accuracy" in result.notes[0] and "eval_split" in result.notes[0]
    assert diagnose({}, {}, []).notes == []  # nothing logged at all: nothing to say


def test_a_run_that_has_not_fit_anything_is_not_called_memorised() -> None:
    flat = _steps([0.25, 0.5, 0.5, 0.25, 0.5, 0.5, 0.5, 0.25], [0.0] * 8)
    result = diagnose(BEFORE, {**BEFORE, "rewards/accuracies": 0.5}, flat, heldout={"pairs": 25})
    assert result.verdict == "barely moved" and result.warnings == []
    assert "barely moved" in result.notes[0]


def test_fit_reads_the_last_quarter_of_the_training_steps() -> None:
    fit = training_fit(MEMORISING)
    assert (fit.accuracy, fit.margin, fit.steps) == (1.0, 0.9, 2)  # steps 7 and 8; eval and summary rows ignored
    assert not training_fit(_steps([1.0, 1.0, 1.0, 0.5], [0.5] * 4)).fit  # the last step alone decides on 4 steps
    # KTO logs no accuracy: a margin of ln 3 (the implicit reward model's 3 to 1) counts as fit
    kto = [{"step": i, "loss": 0.5, "rewards/margins": m, "kl": 0.0} for i, m in enumerate([0.1, 0.5, 1.0, 1.2])]
    assert training_fit(kto).accuracy is None and training_fit(kto).fit
    assert training_fit([{"step": 0, "eval_loss": 0.7}]) is None


def test_kto_runs_are_judged_on_their_margins_and_pairwise_heldout_accuracy() -> None:
    # KTO's training log, as TRL writes it: no accuracy, per-class rewards and their difference, the KL estimate
    kto = [{"step": i + 1, "loss": 0.5, "kl": 0.0, "rewards/chosen": m / 2, "rewards/rejected": -m / 2,
            "rewards/margins": m, "logps/chosen": -40.0, "logps/rejected": -50.0} for i, m in enumerate([0.1, 0.6, 1.5, 2.0])]
    after = {"rewards/accuracies": 0.55, "rewards/margins": 0.1}
    result = diagnose(BEFORE, after, kto, heldout={"desirable": 6, "undesirable": 10})
    assert result.verdict == "memorised"
    assert "margin 2.00 at the last logged step" in result.warnings[0]
    assert "on 16 held-out rows (6 desirable / 10 undesirable)" in result.warnings[0]


def test_a_heldout_margin_that_fell_is_not_generalisation() -> None:
    after = {"rewards/accuracies": 0.9, "rewards/margins": -0.2}  # most pairs a little right, a few far wrong
    assert diagnose(BEFORE, after, MEMORISING, heldout={"pairs": 40}).verdict == "memorised"


def test_the_bar_is_what_chance_reaches_one_time_in_twenty() -> None:
    # On the 5 pairs a 24-pair file holds out, 4 of 5 right is chance (1 time in 5.3) and does not count.
    assert gain_needed({"pairs": 5}) == pytest.approx(1.645 * 0.5 / math.sqrt(5))
    assert diagnose(BEFORE, {"rewards/accuracies": 0.8, "rewards/margins": 0.2}, MEMORISING,
                    heldout={"pairs": 5}).verdict == "memorised"
    assert diagnose(BEFORE, {"rewards/accuracies": 1.0, "rewards/margins": 0.2}, MEMORISING,
                    heldout={"pairs": 5}).verdict == "generalised"
    assert gain_needed({"pairs": 5000}) == 0.05  # on many pairs the floor holds
    assert gain_needed({}) == 0.05  # size unknown: the floor alone


def test_a_heldout_margin_clear_of_chance_counts_where_the_accuracy_alone_would_not() -> None:
    # The quality suite's warm task: 0.50 -> 0.62 on 32 pairs is under the accuracy's chance bar (+0.15)
    after = {"rewards/accuracies": 0.62, "rewards/margins": 0.16}
    assert diagnose(BEFORE, after, MEMORISING, heldout={"pairs": 32}).verdict == "memorised"
    clear = diagnose(BEFORE, {**after, "rewards/margin_z": 2.4}, MEMORISING, heldout={"pairs": 32})
    assert clear.verdict == "generalised" and clear.warnings == []
    assert clear.figures["heldout"]["rewards/margin_z"] == 2.4 and "it is 2.40" in clear.notes[0]
    within = diagnose(BEFORE, {**after, "rewards/margin_z": 1.2}, MEMORISING, heldout={"pairs": 32})
    assert within.verdict == "memorised" and "1.645 standard errors above 0; it is 1.20" in within.warnings[0]
    # a margin clear of chance is not enough when the accuracy barely rose (a few pairs far right, most not)
    few = {"rewards/accuracies": 0.53, "rewards/margins": 0.3, "rewards/margin_z": 3.0}
    assert diagnose(BEFORE, few, MEMORISING, heldout={"pairs": 32}).verdict == "memorised"


@pytest.mark.parametrize("kind, prompts, per_prompt", [("dpo", 8, 4), ("dpo", 12, 3), ("kto", 8, (2, 2)),
                                                        ("kto", 12, (1, 2))])
def test_a_margin_of_rewards_that_know_nothing_clears_the_bar_one_time_in_twenty(kind: str, prompts: int,
                                                                                 per_prompt: object) -> None:
    rng = random.Random(0)
    cleared = 0
    for _ in range(4000):
        if kind == "dpo":
            keys = [f"p{i}" for i in range(prompts) for _ in range(per_prompt)]
            z = margin_in_standard_errors([rng.gauss(0, 1) for _ in keys], keys)
        else:
            good, bad = per_prompt
            rows = [(f"p{i}", label) for i in range(prompts) for label in [True] * good + [False] * bad]
            z = reward_gap_in_standard_errors([rng.gauss(0, 1) for _ in rows], [d for _, d in rows],
                                              [p for p, _ in rows])
        cleared += z is not None and z >= 1.645
    # one value per prompt: a t statistic on few values has heavier tails than the normal bar assumes (8 prompts
    # clear it about 7% of the time)
    assert 0.035 <= cleared / 4000 <= (0.085 if prompts < 10 else 0.07)


def test_margins_in_standard_errors_count_each_prompt_once() -> None:
    assert standard_errors_above_zero([1.0, 2.0, 3.0]) == pytest.approx(2.0 / (1.0 / math.sqrt(3)))
    assert standard_errors_above_zero([0.5]) is None and standard_errors_above_zero([0.2, 0.2]) is None
    # a prompt's pairs share answers: four copies of one margin are one value, not four
    margins = [1.0] * 4 + [-0.5] * 4 + [0.8] * 4
    keys = ["a"] * 4 + ["b"] * 4 + ["c"] * 4
    assert margin_in_standard_errors(margins, keys) == pytest.approx(standard_errors_above_zero([1.0, -0.5, 0.8]))
    assert margin_in_standard_errors(margins, keys) < standard_errors_above_zero(margins) / 1.8
    # KTO: each prompt's desirable mean minus its undesirable mean; a prompt with one kind only gives nothing
    rewards = [1.0, 2.0, 0.0, 0.5, -1.0, 3.0, 0.3, 0.1]
    labels = [True, True, False, True, False, True, True, False]
    keys = ["a", "a", "a", "b", "b", "c", "d", "d"]
    assert reward_gap_in_standard_errors(rewards, labels, keys) == pytest.approx(
        standard_errors_above_zero([1.5 - 0.0, 0.5 + 1.0, 0.3 - 0.1]))


@pytest.mark.parametrize("heldout", [{"pairs": 9}, {"pairs": 30}, {"desirable": 6, "undesirable": 10},
                                     {"desirable": 20, "undesirable": 20}])
def test_chance_spread_is_the_spread_of_accuracies_of_rewards_that_know_nothing(heldout: dict) -> None:
    rng = random.Random(0)
    scores = []
    for _ in range(3000):
        if "pairs" in heldout:
            scores.append(margin_accuracy([rng.gauss(0, 1) for _ in range(heldout["pairs"])]))
        else:
            labels = [True] * heldout["desirable"] + [False] * heldout["undesirable"]
            scores.append(pairwise_accuracy([rng.gauss(0, 1) for _ in labels], labels))
    assert statistics.mean(scores) == pytest.approx(0.5, abs=0.01)
    assert statistics.stdev(scores) == pytest.approx(chance_spread(heldout), rel=0.06)


def test_heldout_answers_that_drift_past_the_budget_are_flagged_and_missing_figures_skipped() -> None:
    after = {"rewards/accuracies": 0.9, "rewards/margins": 2.0, "logps/chosen": -62.0, "logps/rejected": -110.0}
    tokens = {"chosen": 20, "rejected": 30}
    result = diagnose(BEFORE, after, MEMORISING, heldout={"pairs": 40}, completion_tokens=tokens)
    assert result.figures["drift_per_token"] == {"chosen": -0.1, "rejected": -1.0}
    assert result.verdict == "generalised" and len(result.warnings) == 1
    assert "moved 1.00 nats per token" in result.warnings[0] and f"budget {DRIFT_BUDGET}" in result.warnings[0]
    assert "its reference" in result.warnings[0] and "larger beta" in result.warnings[0]
    orpo = diagnose(BEFORE, after, MEMORISING, heldout={"pairs": 40}, completion_tokens=tokens, reference_free=True)
    assert "no reference model" in orpo.warnings[0] and "beta" not in orpo.warnings[0]
    calm = {**after, "logps/rejected": -86.0}  # 6 nats over 30 tokens: 0.2 per token
    assert diagnose(BEFORE, calm, MEMORISING, heldout={"pairs": 40}, completion_tokens=tokens).warnings == []
    # no token counts, or no log-probs: no drift figure and no guess
    assert "drift_per_token" not in diagnose(BEFORE, after, MEMORISING, heldout={"pairs": 40}).figures
    no_logps = {"rewards/accuracies": 0.9, "rewards/margins": 2.0}
    assert "drift_per_token" not in diagnose(BEFORE, no_logps, MEMORISING, completion_tokens=tokens).figures


# ----------------------------------------------------------------------------- the default held-out slice


def _rows(prompts: int, per_prompt: int = 1) -> list[dict]:
    return [{"prompt": f"Question {i}?", "chosen": f" Yes {j}.", "rejected": f" No {j}."}
            for i in range(prompts) for j in range(per_prompt)]


def test_auto_holds_out_a_fifth_of_the_prompts_from_twenty_on(caplog) -> None:
    from align.train.config import TrainConfig
    from align.train.run import _split_heldout

    caplog.set_level("INFO", logger="align")
    config = TrainConfig(data="d", output_dir="o")
    assert config.eval_split == "auto"
    train, held = _split_heldout(config, _rows(24, per_prompt=2), seed=0)
    assert len({r["prompt"] for r in held}) == 5 and len(held) == 10  # round(0.2 * 24) prompts, both their pairs
    assert not {r["prompt"] for r in held} & {r["prompt"] for r in train}
    assert "held out 5 prompts (10 rows) for reward accuracy" in caplog.text and "eval_split=0 turns it off" in caplog.text
    caplog.clear()
    train, held = _split_heldout(config, _rows(20), seed=0)
    assert len(held) == 4  # the threshold: 4 held out of 20
    train, held = _split_heldout(config, _rows(19, per_prompt=3), seed=0)
    assert held == [] and len(train) == 57  # rows do not count, prompts do
    assert "19 distinct prompts, too few to hold some out" in caplog.text
    off = TrainConfig(data="d", output_dir="o", eval_split=0)
    assert _split_heldout(off, _rows(40), seed=0)[1] == []
    assert len(_split_heldout(TrainConfig(data="d", output_dir="o", eval_split=0.5), _rows(10), seed=0)[1]) == 5


def test_eval_split_says_what_it_takes() -> None:
    from align.errors import ConfigError
    from align.train import load_train_config

    base = {"data": "d", "output_dir": "o"}
    assert load_train_config("dpo", base, overrides=["eval_split=0.3"]).eval_split == 0.3
    assert load_train_config("dpo", base, overrides=["eval_split=0"]).eval_split == 0.0
    with pytest.raises(ConfigError, match=r"eval_split.*'auto' or a fraction of the prompts in \[0, 1\)"):
        load_train_config("dpo", base, overrides=["eval_split=1"])
    with pytest.raises(ConfigError, match="'auto' or a fraction"):
        load_train_config("dpo", base, overrides=["eval_split=half"])


# ----------------------------------------------------------------------------- real tiny runs


def _preference_rows(tiny_model_dir: Path, n: int = 60) -> list[dict]:
    """One feature that generalises (chosen answers start "Sure:", rejected ones "Never:") and one that can only be
    memorised (each answer ends in a word of its own, one token each, seen in no other row)."""
    from align.models import load_tokenizer

    vocab = load_tokenizer(str(tiny_model_dir)).get_vocab()
    words = sorted(t[1:] for t in vocab if t.startswith("Ġ") and t[1:].isalpha() and t[1:].islower() and len(t) >= 7)
    words = random.Random(0).sample(words, 2 * n)
    topics = ["tea", "rain", "maps", "bread", "chess", "bikes", "owls", "glass"]
    return [{"prompt": [{"role": "user", "content": f"Say one word about {topics[i % 8]}, please ({i})."}],
             "chosen": [{"role": "assistant", "content": f"Sure: {words[2 * i]}."}],
             "rejected": [{"role": "assistant", "content": f"Never: {words[2 * i + 1]}."}]} for i in range(n)]


def _random_labels(rows: list[dict], seed: int = 1) -> list[dict]:
    """The same answers, chosen and rejected swapped for a seeded half of the rows on each side of the default
    held-out split, so that "Sure:" carries no preference and only the rows' own words are left to fit."""
    from align.train.data import AUTO_EVAL_FRACTION, split_holdout

    rows = [dict(r) for r in rows]
    held = {repr(r["prompt"]) for r in split_holdout(rows, AUTO_EVAL_FRACTION, 0)[1]}
    rng = random.Random(seed)
    for side in (True, False):
        part = [r for r in rows if (repr(r["prompt"]) in held) == side]
        for row in rng.sample(part, len(part) // 2):
            row["chosen"], row["rejected"] = row["rejected"], row["chosen"]
    return rows


def _default_run(rows: list[dict], tiny_model_dir: Path, out: Path, caplog) -> tuple[dict, dict]:
    """A DPO run with the default held-out slice (12 of the 60 prompts) and a high learning rate: 3 epochs of the
    48 training pairs. A full fine-tune: a LoRA adapter on the 2-layer, 32-wide tiny model did not memorise 48
    unrelated words in seconds (training accuracy 0.46-0.75 after 32 steps at learning rate 1e-2, measured)."""
    import align.train
    from align.data.io import write_records

    write_records(out.with_suffix(".jsonl"), rows)
    caplog.set_level("INFO", logger="align")
    result = align.train.dpo(model=str(tiny_model_dir), data=str(out.with_suffix(".jsonl")), output_dir=str(out),
                             ref_cache_dir=str(out.parent / "cache"), max_steps=36, per_device_train_batch_size=4,
                             max_length=64, learning_rate=2e-3, lora=False, save_strategy="no")
    assert "held out 12 prompts (12 rows)" in caplog.text
    run = json.loads((Path(result.run_dir) / "run.json").read_text())
    assert run["warnings"] == result.warnings
    return run, json.loads((Path(result.run_dir) / "diagnosis.json").read_text())


def test_a_run_on_random_labels_is_told_it_memorised(tiny_model_dir: Path, tmp_path: Path, caplog) -> None:
    run, diagnosis = _default_run(_random_labels(_preference_rows(tiny_model_dir)), tiny_model_dir,
                                  tmp_path / "random", caplog)
    assert diagnosis["verdict"] == "memorised"
    assert any("it memorised" in w for w in run["warnings"])
    loud = [r for r in caplog.records if r.levelno == logging.WARNING and "it memorised" in r.getMessage()]
    assert len(loud) == 1


def test_a_run_on_a_learnable_preference_is_not_called_memorised(tiny_model_dir: Path, tmp_path: Path,
                                                                  caplog) -> None:
    run, diagnosis = _default_run(_preference_rows(tiny_model_dir), tiny_model_dir, tmp_path / "good", caplog)
    assert diagnosis["verdict"] == "generalised"
    assert not any("memorised" in w for w in run["warnings"])
