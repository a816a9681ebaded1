"""Rounds over time: one row per finished round (``rounds_summary.json``, ``.md``, ``.png`` in the run dir) and the
``stop_when`` rules that end a run of rounds early. The rows and the rules are pure functions of the rounds' eval
metrics; writing them is apart."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from align.data.io import atomic_path, write_json, write_text
from align.pipeline.config import StopWhen

# A row's figures, from the round's eval against the original model (metrics.json's keys) ...
_AGAINST_ORIGINAL = {"win_rate": "win_rate", "win_rate_ci_low": "win_rate_ci_low",
                     "win_rate_ci_high": "win_rate_ci_high", "lc_win_rate": "lc_win_rate",
                     "lc_win_rate_ci_low": "lc_win_rate_ci_low", "lc_win_rate_ci_high": "lc_win_rate_ci_high",
                     "rule_score": "rule_score_model", "kl_per_token": "kl_per_token",
                     "mean_length": "mean_length_model", "hit_length_cap": "hit_length_cap_model"}
# ... and against the previous round's student (none in round 1).
_AGAINST_PREVIOUS = ("win_rate", "win_rate_ci_low", "win_rate_ci_high", "lc_win_rate", "lc_win_rate_ci_low",
                     "lc_win_rate_ci_high", "kl_per_token")


def round_row(index: int, folder: str, metrics: dict[str, Any], previous: dict[str, Any] | None,
              pairs: dict[str, Any] | None = None) -> dict[str, Any]:
    """One round's row: its eval against the original model, against the previous round's student
    (``vs_previous_*``, None in round 1) and how many pairs it trained on."""
    row: dict[str, Any] = {"round": index, "dir": folder, "pairs": (pairs or {}).get("pairs"),
                           "heldout_prompts": metrics.get("prompts")}
    row.update({key: metrics.get(source) for key, source in _AGAINST_ORIGINAL.items()})
    row.update({f"vs_previous_{key}": (previous or {}).get(key) for key in _AGAINST_PREVIOUS})
    return row


def original_row(metrics: dict[str, Any]) -> dict[str, Any]:
    """The original model's figures (round 0), as round 1's eval measured them on its reference answers."""
    return {"round": 0, "rule_score": metrics.get("rule_score_reference"),
            "mean_length": metrics.get("mean_length_reference"),
            "hit_length_cap": metrics.get("hit_length_cap_reference")}


def stop_reason(row: dict[str, Any], stop_when: StopWhen) -> str | None:
    """Why the rounds stop after this one, or None: no sure gain over the previous round's student (its win rate's
    95% interval contains 0.5; from round 2), or KL per token to the original model past the budget."""
    k = row["round"]
    low, high = row.get("vs_previous_win_rate_ci_low"), row.get("vs_previous_win_rate_ci_high")
    if stop_when.no_gain and k > 1 and low is not None and high is not None and low <= 0.5 <= high:
        return (f"no gain: round {k}'s held-out win rate against round {k - 1}'s student is "
                f"{_fmt(row.get('vs_previous_win_rate'))} (95% CI {_fmt(low)}-{_fmt(high)}), an interval that "
                "contains 0.5 (stop_when.no_gain)")
    kl, budget = row.get("kl_per_token"), stop_when.kl_per_token
    if budget is not None and kl is not None and kl > budget:
        within = f"; round {k - 1} is the last within it" if k > 1 else "; no round is within it"
        return (f"KL budget: round {k}'s KL per token to the original model is {kl:.4f}, past the budget "
                f"{budget:g} (stop_when.kl_per_token){within}")
    return None


def _fmt(value: Any, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _rate(row: dict[str, Any], key: str) -> str:
    if row.get(key) is None:
        return "n/a"
    return f"{row[key]:.3f} ({_fmt(row.get(f'{key}_ci_low'))}-{_fmt(row.get(f'{key}_ci_high'))})"


def summary_markdown(summary: dict[str, Any]) -> str:
    """The table a person reads: one row per round, the original model above them."""
    original = summary.get("original") or {}
    lines = [f"# Rounds: {len(summary['rounds'])} of {summary['planned_rounds']}", "",
             "Each round's student on the held-out prompts against the original model (win rate, length-controlled "
             "win rate, KL) and against the previous round's student (\"vs prev.\"); 95% intervals resample prompts.",
             "",
             "| round | pairs | win rate | LC win rate | win rate vs prev. | LC vs prev. | rule score | KL/token | "
             "KL/token vs prev. | mean length | hit length cap |",
             "|---|---|---|---|---|---|---|---|---|---|---|",
             f"| original | | | | | | {_fmt(original.get('rule_score'))} | | | {_fmt(original.get('mean_length'), 1)} "
             f"| {_fmt(original.get('hit_length_cap'), 2)} |"]
    for row in summary["rounds"]:
        lines.append(f"| {row['round']} | {row.get('pairs') if row.get('pairs') is not None else 'n/a'} | "
                     f"{_rate(row, 'win_rate')} | {_rate(row, 'lc_win_rate')} | {_rate(row, 'vs_previous_win_rate')} | "
                     f"{_rate(row, 'vs_previous_lc_win_rate')} | {_fmt(row.get('rule_score'))} | "
                     f"{_fmt(row.get('kl_per_token'), 4)} | {_fmt(row.get('vs_previous_kl_per_token'), 4)} | "
                     f"{_fmt(row.get('mean_length'), 1)} | {_fmt(row.get('hit_length_cap'), 2)} |")
    lines += ["", _ending(summary), "", "![rounds](rounds_summary.png)", ""]
    return "\n".join(lines)


def _ending(summary: dict[str, Any]) -> str:
    done, planned = len(summary["rounds"]), summary["planned_rounds"]
    if summary.get("stopped"):
        return f"Stopped after round {done} of {planned}: {summary['stopped']}."
    if summary.get("waiting"):
        return f"Waiting in round {done + 1} of {planned}: {summary['waiting']}"
    return f"All {planned} rounds ran; none of stop_when's rules fired."


def summary_lines(summary: dict[str, Any]) -> list[str]:
    """The table and how the rounds ended, for the end of `align pipeline run`."""
    return [line for line in summary_markdown(summary).splitlines()[4:] if line and not line.startswith("![")]


def write_summary(run_dir: Path, rows: list[dict[str, Any]], original: dict[str, Any] | None, planned: int, *,
                  stopped: str | None = None, waiting: str | None = None) -> dict[str, Path]:
    """rounds_summary.json, .md and .png in the run dir (each written whole or not at all)."""
    summary = {"planned_rounds": planned, "rounds": rows, "original": original, "stopped": stopped,
               "waiting": waiting}
    files = {"json": run_dir / "rounds_summary.json", "md": run_dir / "rounds_summary.md",
             "png": run_dir / "rounds_summary.png"}
    write_json(files["json"], summary)
    write_text(files["md"], summary_markdown(summary))
    _plot(files["png"], rows, original or {})
    return files


def read_summary(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "rounds_summary.json").read_text())


def _plot(path: Path, rows: list[dict[str, Any]], original: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = [row["round"] for row in rows]
    fig, axes = plt.subplots(2, 2, figsize=(10, 7), sharex=True)
    win = axes[0][0]
    # Side by side at each round (the four often coincide): raw and length-controlled, against each model.
    for key, label, style, dodge in (("win_rate", "vs original", "o-", -0.09), ("lc_win_rate", "vs original, LC",
                                                                                "s--", -0.03),
                                     ("vs_previous_win_rate", "vs previous round", "o-", 0.03),
                                     ("vs_previous_lc_win_rate", "vs previous round, LC", "s--", 0.09)):
        points = [(r["round"] + dodge, r[key], r.get(f"{key}_ci_low"), r.get(f"{key}_ci_high")) for r in rows
                  if r.get(key) is not None]
        if not points:
            continue
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        errors = [[y - (p[2] if p[2] is not None else y) for y, p in zip(ys, points)],
                  [(p[3] if p[3] is not None else y) - y for y, p in zip(ys, points)]]
        win.errorbar(xs, ys, yerr=errors, fmt=style, capsize=3, label=label)
    win.axhline(0.5, color="grey", lw=0.8, ls=":")
    win.set_ylim(0, 1)
    win.set_title("held-out win rate (95% CI)")
    win.legend(fontsize=7)
    for ax, key, title in ((axes[0][1], "rule_score", "rule score (round 0: the original model)"),
                           (axes[1][1], "mean_length", "mean length, tokens (round 0: the original model)")):
        xs = ([0] if original.get(key) is not None else []) + [r["round"] for r in rows if r.get(key) is not None]
        ys = ([original[key]] if original.get(key) is not None else []) + [r[key] for r in rows
                                                                            if r.get(key) is not None]
        ax.plot(xs, ys, "o-")
        ax.set_title(title)
    cap = axes[1][1].twinx()
    xs = ([0] if original.get("hit_length_cap") is not None else []) + rounds
    ys = ([original["hit_length_cap"]] if original.get("hit_length_cap") is not None else []) + [
        r.get("hit_length_cap") or 0.0 for r in rows]
    cap.plot(xs, ys, "x:", color="tab:red")
    cap.set_ylabel("share hitting the length cap", color="tab:red")
    cap.set_ylim(0, 1)
    kl = axes[1][0]
    for key, label in (("kl_per_token", "to the original model"),
                       ("vs_previous_kl_per_token", "to the previous round")):
        points = [(r["round"], r[key]) for r in rows if r.get(key) is not None]
        if points:
            kl.plot([p[0] for p in points], [p[1] for p in points], "o-", label=label)
    kl.set_title("KL per token")
    kl.legend(fontsize=7)
    for ax in axes[1]:
        ax.set_xlabel("round")
        ax.set_xticks(sorted(set([0, *rounds])))
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
