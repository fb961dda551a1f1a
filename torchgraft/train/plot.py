"""PNG curves from one or more run directories (loss, validation metrics, learning rate), overlaid."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from torchgraft.errors import TorchgraftError
from torchgraft.train.logging import read_metrics

PANELS = [("loss", "train loss"), ("val_loss", "validation loss"),
          ("val_accuracy", "validation accuracy"), ("lr", "learning rate"),
          # reinforcement learning runs (torchgraft.rl: behaviour cloning and PPO)
          ("val_return", "evaluation return"), ("episode_return", "episode return (training)"),
          ("episode_length", "episode length"), ("approx_kl", "approx KL"),
          ("clip_fraction", "clip fraction"), ("explained_variance", "explained variance")]
PANELS_PER_ROW = 4


def plot_runs(run_dirs: Sequence[str | Path], out: str | Path, labels: Sequence[str] | None = None,
              title: str | None = None) -> Path:
    """Write a PNG with one panel per metric present in any run; each run is one line per panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = []
    for i, d in enumerate(run_dirs):
        d = Path(d)
        if not (d / "metrics.jsonl").is_file():
            raise TorchgraftError(f"{d} has no metrics.jsonl (is it a torchgraft run directory?)")
        label = labels[i] if labels else (d.name or str(d))
        runs.append((label, read_metrics(d)))
    panels = [(k, t) for k, t in PANELS if any(k in r for _, recs in runs for r in recs)]
    if not panels:
        raise TorchgraftError("no loss/val_loss/val_accuracy/lr values to plot in " + ", ".join(map(str, run_dirs)))
    cols = min(len(panels), PANELS_PER_ROW)
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    for ax, (key, name) in zip(axes.flat, panels):
        for label, recs in runs:
            pts = [(r["step"], r[key]) for r in recs if r.get(key) is not None and "step" in r]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, label=label, marker="o" if len(pts) < 15 else None, markersize=3)
        ax.set_title(name)
        ax.set_xlabel("step")
        if key in ("loss", "val_loss") and all(y > 0 for _, recs in runs for r in recs
                                                for y in [r.get(key)] if y is not None):
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
