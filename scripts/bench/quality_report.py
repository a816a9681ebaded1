"""The quality suite's summary: per task and method, the held-out gain with its interval, against the controls.

Every student was scored against the *same* reference answers of its task, so two students can be compared
prompt by prompt (a paired test): ``align-dpo`` beats the random-label control when the per-prompt
difference of their gains has a bootstrap interval above zero.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

from align.eval.stats import summarise_score_differences

LENGTH_RATIO_LIMIT = 1.3  # issue 15: a student that wins by writing 30% more has not improved
HEADLINE = "sample"  # the policy as trained: answers sampled at temperature 1


def pooled_gain(students: list[dict[str, Any]], decoding: str = HEADLINE, *, seed: int = 0) -> dict[str, Any]:
    """One interval for several seeds of a method: each prompt's gain averaged over the seeds, then a
    bootstrap over prompts (the seeds share the prompts, so they are not independent samples)."""
    gain = summarise_score_differences(list(_prompt_means(students, decoding).values()), seed=seed)
    return {"gain": gain.mean, "ci_low": gain.ci_low, "ci_high": gain.ci_high, "prompts": gain.prompts,
            "improved": gain.improved, "worsened": gain.worsened}


def paired_advantage(a: list[dict[str, Any]], b: list[dict[str, Any]], decoding: str = HEADLINE, *,
                     seed: int = 0) -> dict[str, Any]:
    """Per prompt, method a's gain minus method b's (each averaged over its seeds), with a bootstrap interval."""
    gains_a, gains_b = (_prompt_means(x, decoding) for x in (a, b))
    shared = sorted(set(gains_a) & set(gains_b))
    advantage = summarise_score_differences([gains_a[p] - gains_b[p] for p in shared], seed=seed)
    return {"advantage": advantage.mean, "ci_low": advantage.ci_low, "ci_high": advantage.ci_high,
            "prompts": len(shared)}


def _prompt_means(students: list[dict[str, Any]], decoding: str) -> dict[str, float]:
    by_prompt: dict[str, list[float]] = defaultdict(list)
    for student in students:
        for prompt, diff in student[decoding]["per_prompt_diff"].items():
            by_prompt[prompt].append(diff)
    return {p: sum(v) / len(v) for p, v in by_prompt.items()}


def _mean(values: list[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return sum(kept) / len(kept) if kept else None


def summarise(students: list[dict[str, Any]], *, seed: int = 0) -> list[dict[str, Any]]:
    """A row per (task, method) with the pooled gain (sampled and greedy), length, KL and the verdicts."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for student in students:
        groups[(student["task"], student["method"])].append(student)
    rows = []
    for (task, method), members in sorted(groups.items()):
        sample, greedy = pooled_gain(members, "sample", seed=seed), pooled_gain(members, "greedy", seed=seed)
        row = {
            "task": task, "method": method, "seeds": len(members),
            "score_before": _mean([m["sample"]["rule_score_reference"] for m in members]),
            "score_after": _mean([m["sample"]["rule_score_model"] for m in members]),
            "gain": sample["gain"], "gain_ci_low": sample["ci_low"], "gain_ci_high": sample["ci_high"],
            "improved": sample["improved"], "worsened": sample["worsened"], "prompts": sample["prompts"],
            "greedy_gain": greedy["gain"], "greedy_ci_low": greedy["ci_low"], "greedy_ci_high": greedy["ci_high"],
            "length_ratio": _mean([m["sample"]["length_ratio"] for m in members]),
            "greedy_length_ratio": _mean([m["greedy"]["length_ratio"] for m in members]),
            "cap_hits": _mean([m["sample"]["hit_length_cap_model"] for m in members]),
            "cap_hits_reference": _mean([m["sample"]["hit_length_cap_reference"] for m in members]),
            "kl_per_token": _mean([m["sample"]["kl_per_token"] for m in members]),
            # align's own verdict after training (align.train.diagnosis), from its held-out reward accuracy
            "memorised": sum(1 for m in members if (m.get("diagnosis") or {}).get("verdict") == "memorised"),
            "per_seed_gain": [m["sample"]["score_diff"] for m in members],
        }
        random_control = groups.get((task, "random"))
        if method != "random" and random_control:
            vs = paired_advantage(members, random_control, seed=seed)
            row.update(vs_random=vs["advantage"], vs_random_ci_low=vs["ci_low"], vs_random_ci_high=vs["ci_high"])
        row["holds"] = _holds(row) if method.startswith("align-") else None
        rows.append(row)
    return rows


def _holds(row: dict[str, Any]) -> bool:
    """Issue 15's bar: gain interval above 0 and above the random control (paired), length within 1.3x."""
    above_random = row.get("vs_random_ci_low") is None or row["vs_random_ci_low"] > 0
    return bool(row["gain_ci_low"] > 0 and above_random and (row["length_ratio"] or 0) <= LENGTH_RATIO_LIMIT)


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def table(rows: list[dict[str, Any]]) -> str:
    header = (f"{'task':14} {'method':11} {'seeds':>5} {'score before->after':>20} {'gain (95% CI)':>24} "
              f"{'+/-':>7} {'greedy gain (95% CI)':>24} {'vs random (95% CI)':>24} {'len x':>6} {'cap':>5} "
              f"{'KL/tok':>7} {'memo':>5} {'holds':>5}")
    lines = [header, "-" * len(header)]
    for r in rows:
        interval = f"{_fmt(r['gain'])} ({_fmt(r['gain_ci_low'])},{_fmt(r['gain_ci_high'])})"
        greedy = f"{_fmt(r['greedy_gain'])} ({_fmt(r['greedy_ci_low'])},{_fmt(r['greedy_ci_high'])})"
        vs = (f"{_fmt(r['vs_random'])} ({_fmt(r['vs_random_ci_low'])},{_fmt(r['vs_random_ci_high'])})"
              if "vs_random" in r else "-")
        holds = {True: "yes", False: "NO", None: ""}[r["holds"]]
        lines.append(f"{r['task']:14} {r['method']:11} {r['seeds']:>5} "
                     f"{_fmt(r['score_before']) + ' -> ' + _fmt(r['score_after']):>20} {interval:>24} "
                     f"{str(r['improved']) + '/' + str(r['worsened']):>7} {greedy:>24} {vs:>24} "
                     f"{_fmt(r['length_ratio'], 2):>6} {_fmt(r['cap_hits'], 2):>5} {_fmt(r['kl_per_token']):>7} "
                     f"{r['memorised']:>5} {holds:>5}")
    return "\n".join(lines)


def frontier_plot(students: list[dict[str, Any]], path: Path) -> Path:
    """Held-out gain against KL(student || reference) per token, a point per student (sampled answers)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"align-dpo": "tab:blue", "align-kto": "tab:green", "random": "tab:gray", "trl-dpo": "tab:red",
               "align-sft": "tab:purple", "align-orpo": "tab:orange", "align-simpo": "tab:brown",
               "align-rounds": "tab:cyan"}
    markers = "osD^vP*X"
    tasks = sorted({s["task"] for s in students})
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for student in students:
        m = student["sample"]
        if m["kl_per_token"] is None or m["score_diff"] is None:
            continue
        ax.errorbar(m["kl_per_token"], m["score_diff"],
                    yerr=[[m["score_diff"] - m["score_diff_ci_low"]], [m["score_diff_ci_high"] - m["score_diff"]]],
                    fmt=markers[tasks.index(student["task"]) % len(markers)],
                    color=colours.get(student["method"], "black"), alpha=0.8, capsize=2)
    ax.axhline(0, color="black", linewidth=0.8)
    for method in sorted({s["method"] for s in students}):
        ax.plot([], [], "s", color=colours.get(method, "black"), label=method)
    for i, task in enumerate(tasks):
        ax.plot([], [], markers[i % len(markers)], color="black", fillstyle="none", label=task)
    ax.set_xlabel("KL(student || reference) per token, held-out samples")
    ax.set_ylabel("held-out rule score gain (95% CI)")
    ax.set_title("Gain vs drift: up is better, right is further from the reference")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_outputs(out: Path, meta: dict[str, Any], prepared: list[dict[str, Any]], students: list[dict[str, Any]],
                  rows: list[dict[str, Any]]) -> None:
    text = table(rows)
    print(text)
    print(f"timings: {meta['timings_s']}")
    out.parent.mkdir(parents=True, exist_ok=True)
    plot = frontier_plot(students, out.with_suffix(".png"))
    slim = [{k: v for k, v in s.items()} for s in students]
    out.write_text(json.dumps({"meta": meta, "tasks": prepared, "summary": rows, "students": slim}, indent=1) + "\n")
    print(f"wrote {out} and {plot}")
