"""curves.png: loss and the task metric against step, train and validation (metrics.jsonl)."""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["read_metrics", "plot_curves"]


def read_metrics(path: str | Path) -> list[dict]:
    """Parse metrics.jsonl; a torn last line (a killed run) is skipped."""
    records = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


METRIC_LABELS = {"bpb": "bits per byte", "ppl": "perplexity", "accuracy": "accuracy"}


def plot_curves(metrics_path: str | Path, out_path: str | Path) -> Path:
    """Two panels: loss, and bits per byte, perplexity or accuracy.

    Needs matplotlib (extra "plot")."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    metric = next((m for m in ("bpb", "ppl") if any(m in r for r in records)), "accuracy")
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for split, style in (("train", "-"), ("val", "o-")):
        rows = [r for r in records if r.get("split") == split]
        if not rows:
            continue
        steps = [r["step"] for r in rows]
        axes[0].plot(steps, [r["loss"] for r in rows], style, label=split, markersize=3)
        if all(metric in r for r in rows):
            axes[1].plot(steps, [r[metric] for r in rows], style, label=split, markersize=3)
    axes[0].set_ylabel("loss (nats)")
    axes[1].set_ylabel(METRIC_LABELS[metric])
    if metric == "ppl":
        axes[1].set_yscale("log")
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    out = Path(out_path)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
