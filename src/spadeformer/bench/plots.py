"""Benchmark figures and tables.

Figures need matplotlib, an optional extra (``pip install 'spadeformer[plot]'``): it is
imported inside the plotting functions, which raise ImportError when it is missing (the CLI
then prints a note instead of the PNG). The markdown tables need nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["generate_table", "plot_generate", "plot_train", "ratio_table", "spade_targets"]

REFERENCE_MODEL = "spade-s4-window"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    return plt


def _series(rows: list[dict[str, Any]], x: str, y: str, model: str,
            where=lambda r: True) -> tuple[list[float], list[float]]:
    pts = sorted((float(r[x]), float(r[y])) for r in rows
                 if r["model"] == model and r["status"] == "ok" and r[y] != "" and where(r))
    return [p[0] for p in pts], [p[1] for p in pts]


def _save(plt, fig, path: str | Path, title: str) -> Path:
    """Title, tight layout, write at 120 dpi and close ``fig``; returns the path."""
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_train(rows: list[dict[str, Any]], path: str | Path, title: str = "") -> Path:
    """Two log-log panels as the paper's Figure 5: step time and peak memory vs length,
    one line per model (skipped cells are left out)."""
    plt = _pyplot()
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
    for model in dict.fromkeys(r["model"] for r in rows):
        style = dict(marker="o", linewidth=2.2 if model.startswith("spade") else 1.3,
                     label=model)
        xs, ys = _series(rows, "length", "median_s", model)
        if xs:
            ax_t.plot(xs, ys, **style)
        xs, ys = _series(rows, "length", "peak_mem_mb", model)
        if xs:
            ax_m.plot(xs, [max(y, 1e-3) for y in ys], **style)
    for ax, ylabel in ((ax_t, "training step time (s)"), (ax_m, "peak memory (MB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    ax_t.legend(fontsize=8)
    return _save(plt, fig, path, title)


def plot_generate(rows: list[dict[str, Any]], path: str | Path, title: str = "") -> Path:
    """Per-token latency and decoding-state memory vs context (log-log). Filled markers:
    state reached by stepping; hollow: synthetic state of the same shapes."""
    plt = _pyplot()
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
    for i, model in enumerate(dict.fromkeys(r["model"] for r in rows)):
        color = f"C{i}"
        xs, ys = _series(rows, "context", "median_ms", model)
        if not xs:
            continue
        ax_t.plot(xs, ys, color=color, label=model)
        xm, ym = _series(rows, "context", "state_mb", model)
        ax_m.plot(xm, [max(y, 1e-4) for y in ym], color=color, label=model)
        for mode, face in (("stepped", color), ("synthetic", "none")):
            sel = lambda r, m=mode: r["state_mode"] == m  # noqa: E731
            xs, ys = _series(rows, "context", "median_ms", model, sel)
            ax_t.plot(xs, ys, "o", color=color, markerfacecolor=face)
            xs, ys = _series(rows, "context", "state_mb", model, sel)
            ax_m.plot(xs, [max(y, 1e-4) for y in ys], "o", color=color, markerfacecolor=face)
    for ax, ylabel in ((ax_t, "median latency per token (ms)"),
                       (ax_m, "decoding state (MB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    ax_t.legend(fontsize=8, title="filled: stepped, hollow: synthetic", title_fontsize=7)
    return _save(plt, fig, path, title)


# ------------------------------------------------------------------------------ tables
def _lookup(rows: list[dict[str, Any]], model: str, length: int) -> dict[str, Any] | None:
    for r in rows:
        if r["model"] == model and int(r["length"]) == length and r["status"] == "ok":
            return r
    return None


def ratio_table(rows: list[dict[str, Any]], reference: str = REFERENCE_MODEL) -> str:
    """Markdown: per model and length, time and memory as multiples of ``reference``."""
    lengths = sorted({int(r["length"]) for r in rows})
    models = list(dict.fromkeys(r["model"] for r in rows))
    out = [f"Step time / memory relative to {reference} (x = model / {reference})", "",
           "| model | " + " | ".join(f"L={n}" for n in lengths) + " |",
           "|---|" + "---|" * len(lengths)]
    for m in models:
        cells = []
        for n in lengths:
            r, ref = _lookup(rows, m, n), _lookup(rows, reference, n)
            if r is None:
                cells.append("skipped")
            elif ref is None:
                cells.append(f"{float(r['median_s']):.2f}s / {float(r['peak_mem_mb']):.0f}MB")
            else:
                t = float(r["median_s"]) / float(ref["median_s"])
                ref_mem = float(ref["peak_mem_mb"])
                # below 1 MB the RSS delta is page-level noise: no meaningful ratio
                mem = f"{float(r['peak_mem_mb']) / ref_mem:.2f}x" if ref_mem >= 1 else "n/a"
                cells.append(f"{t:.2f}x / {mem}")
        out.append(f"| {m} | " + " | ".join(cells) + " |")
    out += ["", f"Absolute {reference}: " + ", ".join(
        f"L={n}: {float(r['median_s']):.3f}s {float(r['peak_mem_mb']):.0f}MB"
        for n in lengths if (r := _lookup(rows, reference, n)) is not None)]
    return "\n".join(out)


def spade_targets(rows: list[dict[str, Any]], peak_gflops: float | None) -> str:
    """The project's speed targets for SPADE (frozen S4 + window), measured value vs goal."""
    spade, full, window = "spade-s4-window", "transformer-full", "transformer-window"
    lines = ["| target | measured | goal | met |", "|---|---|---|---|"]

    def ratio(a: str, b: str, n: int) -> float | None:
        ra, rb = _lookup(rows, a, n), _lookup(rows, b, n)
        return None if ra is None or rb is None else float(ra["median_s"]) / float(rb["median_s"])

    def add(label: str, value: float | None, goal: float, fmt: str, le: bool = True) -> None:
        if value is None:
            lines.append(f"| {label} | not measured | {fmt.format(goal)} | n/a |")
            return
        met = value <= goal if le else value >= goal
        lines.append(f"| {label} | {fmt.format(value)} | {'<=' if le else '>='} "
                     f"{fmt.format(goal)} | {'yes' if met else 'no'} |")

    add("SPADE / full (SDPA) step time, L=8192", ratio(spade, full, 8192), 0.5, "{:.2f}x")
    add("SPADE / full (SDPA) step time, L=16384", ratio(spade, full, 16384), 0.35, "{:.2f}x")
    lengths = sorted({int(r["length"]) for r in rows if int(r["length"]) >= 2048})
    for n in lengths:
        add(f"SPADE / window-only step time, L={n}", ratio(spade, window, n), 1.10, "{:.2f}x")
    if not lengths:  # the target still shows, unmeasured, when the sweep stayed below 2k
        add("SPADE / window-only step time, every L >= 2048", None, 1.10, "{:.2f}x")
    a, b = _lookup(rows, spade, 2048), _lookup(rows, spade, 16384)
    growth = None if a is None or b is None else float(b["median_s"]) / float(a["median_s"])
    add("SPADE time growth 2048 -> 16384", growth, 8.8, "{:.2f}x")
    best = max((float(r["pct_of_peak"]) for r in rows if r["model"] == spade
                and r["status"] == "ok" and r["pct_of_peak"] != ""), default=None)
    add("SPADE achieved FLOP/s, % of matmul peak (best length)", best, 45.0, "{:.0f}%",
        le=False)
    if peak_gflops:
        lines.append(f"\nmatmul peak (fp32, median): {peak_gflops:.1f} GFLOP/s")
    return "\n".join(lines)


def generate_table(rows: list[dict[str, Any]], reference: str = "spade-s4-window") -> str:
    """Markdown: median ms/token per (model, context), with growth over the first context
    and the ratio to ``reference`` at the same context."""
    contexts = sorted({int(r["context"]) for r in rows})
    models = list(dict.fromkeys(r["model"] for r in rows))
    ok = {(r["model"], int(r["context"])): r for r in rows if r["status"] == "ok"}
    out = ["Median ms per decoded token (growth vs the model's first context; ratio vs "
           f"{reference}); * = synthetic state", "",
           "| model | " + " | ".join(f"ctx={c}" for c in contexts) + " |",
           "|---|" + "---|" * len(contexts)]
    for m in models:
        first = next((ok[(m, c)] for c in contexts if (m, c) in ok), None)
        cells = []
        for c in contexts:
            r = ok.get((m, c))
            if r is None:
                cells.append("skipped")
                continue
            t = float(r["median_ms"])
            text = f"{t:.2f}{'*' if r['state_mode'] == 'synthetic' else ''}"
            text += f" ({t / float(first['median_ms']):.2f}x)"
            ref = ok.get((reference, c))
            if ref is not None and m != reference:
                text += f" [{t / float(ref['median_ms']):.2f}x ref]"
            cells.append(text)
        out.append(f"| {m} | " + " | ".join(cells) + " |")
    out += ["", "Decoding state (MB): " + "; ".join(
        f"{m}: " + ", ".join(f"{c}: {float(ok[(m, c)]['state_mb']):.3g}" for c in contexts
                             if (m, c) in ok) for m in models)]
    return "\n".join(out)
