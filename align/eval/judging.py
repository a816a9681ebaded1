"""Student vs reference with the LLM judge of the labeling stage: both orders, debiased, ties apart."""

from __future__ import annotations

from typing import Any

from align.eval.stats import LOSS, TIE, WIN


def pairwise_outcomes(config: Any, items: list[tuple[str, str, str]]) -> list[tuple[float, dict]]:
    """One (outcome, details) per (prompt, student's answer, reference's answer), in order; an
    unparsable verdict is a tie, flagged, never a win."""
    from align.label.judge import Judge, JudgeSettings, make_backend

    backend = make_backend(config.judge_model, base_url=config.judge_base_url,
                           api_key_env=config.judge_api_key_env if config.judge_base_url else None)
    judge = Judge(backend, JudgeSettings(mode="pairwise"))
    results = []
    for verdict in judge.compare(items):
        detail: dict[str, Any] = {"p_model_better": verdict.score, "judge_label": verdict.label}
        if verdict.details.get("unparsed"):
            detail["unparsed"] = True
        if verdict.details.get("position_inconsistent"):
            detail["position_inconsistent"] = True
        outcome = {"a": WIN, "b": LOSS}.get(verdict.label or "", TIE)
        results.append((outcome, detail))
    return results
