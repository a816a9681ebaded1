"""PNG plots for people who would rather look than read (headless: the Agg backend)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

TRAINING_PANELS = (
    ("loss", ("loss", "eval_loss")),
    ("rewards", ("rewards/chosen", "rewards/rejected", "rewards/margins")),
    ("reward accuracy", ("rewards/accuracies", "eval_rewards/accuracies")),
    ("KL", ("kl",)),
    ("learning rate", ("learning_rate",)),
    ("tokens/s", ("tokens_per_second",)),
)


def plot_training_curves(rows: list[dict[str, Any]], out: str | Path, title: str = "") -> Path | None:
    """One panel per metric family, step on the x-axis; panels with no data are left out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(name, [k for k in keys if any(k in r for r in rows)]) for name, keys in TRAINING_PANELS]
    panels = [(name, keys) for name, keys in panels if keys]
    if not panels:
        return None
    cols = min(3, len(panels))
    nrows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.0 * nrows), squeeze=False)
    for ax, (name, keys) in zip(axes.flat, panels):
        for key in keys:
            points = [(r["step"], r[key]) for r in rows if key in r and r[key] is not None]
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, marker="o" if len(points) < 30 else None, markersize=3, label=key)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if len(keys) > 1:
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
