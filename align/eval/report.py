"""The eval report: report.md with a table, and PNG plots a person can read at a glance."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _answers_line(m: dict[str, Any]) -> str:
    """How each model answered: one sample, K samples, or one greedy answer per prompt."""
    if m.get("decoding") == "greedy":
        return "one greedy answer each"
    k = m.get("samples_per_prompt", 1)
    each = "one sample each" if k == 1 else f"{k} samples each (the k-th answers compared; intervals resample prompts)"
    return f"{each} at temperature {m['temperature']}"


def _signed(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:+.{digits}f}"


def _lc_note(m: dict[str, Any]) -> str:
    """The fitted length slope, or why there is none (the LC rate is then the raw one)."""
    if "lc_length_slope" not in m:
        return ""
    slope = m["lc_length_slope"]
    return "; = raw rate, no length fit" if slope is None else f"; length slope {slope:+.2f}"


def write_report(out: Path, metrics: dict[str, Any], per_prompt: dict[str, dict[str, Any]],
                 sampled: dict[str, Any], prompt_ids: list[str]) -> Path:
    plots = _plots(out, metrics, per_prompt, sampled, prompt_ids)
    m = metrics
    lines = [
        f"# Evaluation: {m['model']} vs {m['reference']}",
        "",
        f"{m['prompts']} held-out prompts, {_answers_line(m)} "
        f"(max {m['max_new_tokens']} new tokens); judge: {m.get('judge')}.",
        "",
        "| metric | value |",
        "|---|---|",
        f"| win rate (ties apart) | **{_fmt(m['win_rate'])}** (95% CI {_fmt(m['win_rate_ci_low'])} - "
        f"{_fmt(m['win_rate_ci_high'])}) |",
    ]
    if m.get("lc_win_rate") is not None:
        lines.append(f"| length-controlled win rate (at equal {m.get('lc_length_unit', 'tokens')}) | "
                     f"**{_fmt(m['lc_win_rate'])}** (95% CI {_fmt(m['lc_win_rate_ci_low'])} - "
                     f"{_fmt(m['lc_win_rate_ci_high'])}){_lc_note(m)} |")
    lines += [
        f"| wins / ties / losses | {m['wins']} / {m['ties']} / {m['losses']} |",
        f"| win rate, ties as half | {_fmt(m.get('win_rate_ties_as_half'))} |",
    ]
    if m.get("score_diff") is not None:
        lines += [f"| mean score difference (student - reference) | **{_signed(m['score_diff'])}** (95% CI "
                  f"{_signed(m['score_diff_ci_low'])} to {_signed(m['score_diff_ci_high'])}) |",
                  f"| prompts improved / worsened / unchanged | {m['improved']} / {m['worsened']} / "
                  f"{m.get('unchanged', 'n/a')} |"]
    lines += [
        f"| KL(student \\|\\| reference) per token | {_fmt(m['kl_per_token'], 4)} |",
        f"| KL per sequence | {_fmt(m['kl_per_sequence'], 3)} |",
        f"| mean length, tokens (reference -> student) | {_fmt(m['mean_length_reference'], 1)} -> "
        f"{_fmt(m['mean_length_model'], 1)} |",
        f"| hit the length cap (reference -> student) | {_fmt(m['hit_length_cap_reference'])} -> "
        f"{_fmt(m['hit_length_cap_model'])} |",
    ]
    if "rule_score_model" in m:
        lines += [f"| mean rule score (reference -> student) | {_fmt(m['rule_score_reference'])} -> "
                  f"{_fmt(m['rule_score_model'])} |",
                  f"| meets every rule (reference -> student) | {_fmt(m['rule_pass_rate_reference'])} -> "
                  f"{_fmt(m['rule_pass_rate_model'])} |",
                  f"| passes hard rules (reference -> student) | {_fmt(m['pass_rate_reference'])} -> "
                  f"{_fmt(m['pass_rate_model'])} |"]
    if "implicit_reward" in m:
        ir = m["implicit_reward"]
        lines.append(f"| implicit-reward accuracy on {ir['pairs']} held-out pairs (beta {ir['beta']}) | "
                     f"{_fmt(ir['accuracy'])} (margin {_fmt(ir['margin'], 4)}) |")
    if "rules" in m:
        lines += ["", "## Per rule (mean score; pass rate)", "", "| rule | reference | student |", "|---|---|---|"]
        for name, s in m["rules"].items():
            lines.append(f"| {name} | {_fmt(s['reference_score'])} ({_fmt(s['reference_pass'], 2)}) | "
                         f"{_fmt(s['model_score'])} ({_fmt(s['model_pass'], 2)}) |")
    lines += ["", "## How to read this", "",
              "- The win rate counts decisive comparisons only; ties are listed apart. An interval that "
              "contains 0.5 means no measurable difference.",
              "- The length-controlled win rate fits the verdicts on the two answers' length difference "
              "(logistic in tanh of the scaled difference, ties apart) and reads the fit at equal lengths. Well "
              "below the raw win rate, the judge rewarded the student's extra length; about the same, length "
              "did not explain the wins. It equals the raw rate when lengths never differ or the student wins "
              "(or loses) every decisive comparison: length cannot be told apart from quality there.",
              "- The score difference is the student's rule score minus the reference's, per prompt (averaged "
              "over its answers), then over prompts; it sees by how much, where the win rate sees only which. "
              "An interval that contains 0 means no measurable difference.",
              "- KL is estimated on the student's own samples; a large KL or a jump in length or in "
              "length-cap hits means the student moved far or won by rambling, not by being better.", ""]
    if m.get("kl_caveat"):
        lines += [f"**KL caveat:** {m['kl_caveat']}.", ""]
    lines += [f"![{p.stem}]({p.name})" for p in plots]
    report = out / "report.md"
    from align.data.io import atomic_path

    with atomic_path(report) as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    return report


def _plots(out: Path, metrics: dict[str, Any], per_prompt: dict[str, dict[str, Any]], sampled: dict[str, Any],
           prompt_ids: list[str]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    rate, low, high = metrics["win_rate"], metrics["win_rate_ci_low"], metrics["win_rate_ci_high"]
    ax.bar(["student vs reference"], [rate], yerr=[[rate - low], [high - rate]], capsize=8, color="#4C72B0")
    if metrics.get("lc_win_rate") is not None:
        lc, lc_low, lc_high = metrics["lc_win_rate"], metrics["lc_win_rate_ci_low"], metrics["lc_win_rate_ci_high"]
        ax.bar(["length-controlled"], [lc], yerr=[[lc - lc_low], [lc_high - lc]], capsize=8, color="#8FAADC")
    ax.axhline(0.5, color="grey", linestyle="--", linewidth=1)
    ax.set_ylim(0, 1)
    ax.set_ylabel("win rate (ties apart)")
    ax.set_title(f"win rate {rate:.2f} [{low:.2f}, {high:.2f}], ties {metrics['ties']}")
    paths.append(_save(fig, out / "win_rate.png"))

    scores = [pair for v in per_prompt.values()  # one point per answer
              for pair in zip(v.get("log_ratios") or [], v.get("model_scores") or [])]
    scores = [(x, y) for x, y in scores if x is not None and y is not None]
    if scores:
        fig, ax = plt.subplots(figsize=(4.5, 3.2))
        ax.scatter([x for x, _ in scores], [y for _, y in scores], s=14, alpha=0.7)
        ax.set_xlabel("log p_student - log p_reference (per sample)")
        ax.set_ylabel("rule score (reward)")
        ax.set_title(f"reward vs KL (mean KL/seq {metrics['kl_per_sequence']:.2f})")
        paths.append(_save(fig, out / "reward_vs_kl.png"))

    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    for role, color in (("reference", "#999999"), ("model", "#4C72B0")):
        lengths = [r.num_tokens or 0 for pid in prompt_ids for r in sampled[role][pid].responses]
        ax.hist(lengths, bins=20, alpha=0.6, label=role if role == "reference" else "student", color=color)
    ax.set_xlabel("response length (tokens)")
    ax.set_ylabel("answers")
    ax.legend()
    ax.set_title("length before / after")
    paths.append(_save(fig, out / "length_hist.png"))
    return paths


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def summary_lines(m: dict[str, Any]) -> list[str]:
    """The few numbers a person reads first, for the end of `align eval` and `align pipeline run`."""
    lines = [f"win rate of the student vs the reference: {m['win_rate']:.3f} "
             f"(95% CI {m['win_rate_ci_low']:.3f}-{m['win_rate_ci_high']:.3f}; "
             f"wins/ties/losses {m['wins']}/{m['ties']}/{m['losses']})"]
    if m.get("lc_win_rate") is not None:  # metrics written before it existed have none
        lines.append(f"length-controlled win rate (at equal {m.get('lc_length_unit', 'tokens')}): "
                     f"{m['lc_win_rate']:.3f} (95% CI {m['lc_win_rate_ci_low']:.3f}-{m['lc_win_rate_ci_high']:.3f})")
    if m.get("score_diff") is not None:
        lines.append(f"score difference (student - reference): {m['score_diff']:+.3f} "
                     f"(95% CI {m['score_diff_ci_low']:+.3f} to {m['score_diff_ci_high']:+.3f}); "
                     f"prompts improved/worsened {m['improved']}/{m['worsened']} of {m['prompts']}")
    if "rule_score_model" in m:
        lines.append(f"rule score {_fmt(m['rule_score_reference'])} -> {_fmt(m['rule_score_model'])}; "
                     f"meets every rule {m['rule_pass_rate_reference']:.3f} -> {m['rule_pass_rate_model']:.3f}; "
                     f"passes hard rules {m['pass_rate_reference']:.3f} -> {m['pass_rate_model']:.3f}")
    kl = (f"KL(student||reference): {m['kl_per_token']:.4f} per token, {m['kl_per_sequence']:.3f} per sequence"
          if m.get("kl_per_token") is not None else "KL(student||reference): not measured")
    if m.get("kl_caveat"):
        kl += f" ({m['kl_caveat']})"
    lines.append(kl)
    lines.append(f"mean length: {m['mean_length_reference']:.1f} -> {m['mean_length_model']:.1f} tokens; "
                 f"hit the cap {m['hit_length_cap_reference']:.2f} -> {m['hit_length_cap_model']:.2f}")
    if m.get("identical_answers") is not None:
        lines.append(f"identical answers: {m['identical_answers']:.3f} of the compared pairs")
    return lines
