"""Plots of a run's metrics.jsonl: loss, accuracy and learning rate as PNG files."""

from __future__ import annotations

from pathlib import Path

from .logging import read_metrics


def write_plots(out_dir: str | Path) -> list[Path]:
    """Plot ``metrics.jsonl`` into ``plots/loss.png``, ``plots/accuracy.png``, ``plots/lr.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    records = read_metrics(out_dir / "metrics.jsonl")
    train = [r for r in records if r.get("kind") == "train"]
    val = [r for r in records if r.get("kind") == "val"]
    plot_dir = out_dir / "plots"
    plot_dir.mkdir(parents=True, exist_ok=True)

    def series(rs, key):
        pts = [(r["step"], r[key]) for r in rs if isinstance(r.get(key), (int, float))]
        return [p[0] for p in pts], [p[1] for p in pts]

    def figure(name, title, ylabel, lines):
        fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
        for rs, key, label, style in lines:
            x, y = series(rs, key)
            if x:
                ax.plot(x, y, style, label=label)
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
        fig.tight_layout()
        path = plot_dir / f"{name}.png"
        fig.savefig(path)
        plt.close(fig)
        return path

    return [
        figure("loss", "Loss", "loss", [(train, "loss", "train", "-"), (val, "loss", "val", "o-")]),
        figure(
            "accuracy",
            "Accuracy",
            "accuracy (fraction)",
            [(train, "acc1", "train top-1", "-"), (val, "acc1", "val top-1", "o-"),
             (val, "acc5", "val top-5", "s--"), (val, "ema_acc1", "val top-1 (EMA)", "^-")],
        ),
        figure("lr", "Learning rate", "lr", [(train, "lr", "lr", "-")]),
    ]
