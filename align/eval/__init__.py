"""Evaluation: win rate with intervals, per-rule scores, KL to the reference, length drift, implicit rewards."""

from align.eval.stage import EvalConfig, EvalResult, run_eval, write_answers

__all__ = ["EvalConfig", "EvalResult", "run_eval", "write_answers"]
