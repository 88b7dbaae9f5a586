"""``spadeformer bench train|generate``: the speed / memory benchmarks from the command line.

Outputs in ``--out DIR``: ``train.csv`` / ``generate.csv`` (one row per cell), ``train.png`` /
``generate.png`` (when matplotlib is installed), ``train_table.md`` / ``generate_table.md``
(the printed tables), ``train_machine.json`` / ``generate_machine.json`` (machine, load,
matmul peak) and ``command.txt`` (one line per subcommand: the full command that made them).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from spadeformer.cli_format import HelpFormatter

__all__ = ["add_bench_parser", "bench_generate", "bench_train", "canonical_command"]

DEFAULT_LENGTHS = "1024,2048,4096,8192,16384"
DEFAULT_CONTEXTS = "1024,4096,16384,65536"


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated positive integers, got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(
            f"expected comma-separated positive integers, got {text!r}")
    return values


def _name_list(text: str) -> list[str]:
    """Comma-separated names; commas inside [] or {} (a model option's list / dict value)
    do not split."""
    names, depth, current = [], 0, ""
    for ch in text:
        depth += (ch in "[{") - (ch in "]}")
        if ch == "," and depth <= 0:
            names.append(current)
            current = ""
        else:
            current += ch
    return [v.strip() for v in [*names, current] if v.strip()]


def _memory(text: str) -> str | float:
    if text == "auto":
        return text
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'auto' or megabytes, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected 'auto' or megabytes >= 0, got {text!r}")
    return value


def _add_common(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model shape (shared by every model)")
    g.add_argument("--d-model", type=int, default=512, help="model width")
    g.add_argument("--n-layers", type=int, default=4, help="layers")
    g.add_argument("--n-heads", type=int, default=8, help="attention heads")
    g.add_argument("--d-ff", type=int, default=None, help="default 4 * d_model")
    g.add_argument("--d-state", type=int, default=64, help="S4 state size")
    g.add_argument("--window", type=int, default=256, help="window size (window attention)")
    g.add_argument("--chunk", type=int, default=256, help="chunk size (chunk attention)")
    g.add_argument("--batch", type=int, default=1, help="sequences per step")
    g.add_argument("--vocab", type=int, default=256, help="vocabulary size")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda[:N]")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    p.add_argument("--max-memory-mb", type=_memory, default="auto",
                   help="memory budget per subprocess (CPU, Linux RLIMIT_DATA): 'auto' = 60%% "
                        "of the memory available at start, 0 = no limit")
    p.add_argument("--in-process", action="store_true",
                   help="run cells in this process (fast; memory is then not per cell)")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")


def add_bench_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``bench`` with its ``train`` and ``generate`` subcommands to ``subparsers``."""
    from spadeformer.bench.generate_bench import GENERATE_MODELS, STATE_MODES
    from spadeformer.bench.train_bench import MODELS

    bench = subparsers.add_parser(
        "bench", help="speed / memory benchmarks (train step, generation)",
        description="Benchmarks of SPADE against Transformer and S4 baselines.")
    sub = bench.add_subparsers(dest="bench_command", required=True, metavar="BENCH")

    p = sub.add_parser(
        "train", help="training-step time, memory and FLOP/s against sequence length",
        formatter_class=HelpFormatter,
        description="One training step (forward, backward, AdamW) per model and length, each "
                    "cell in a fresh subprocess. Writes train.csv, train.png, train_table.md.")
    p.add_argument("--lengths", type=_int_list, default=DEFAULT_LENGTHS,
                   help="comma-separated sequence lengths")
    p.add_argument("--models", type=_name_list, default=",".join(MODELS),
                   help="comma-separated model names; the default runs all of them. A name "
                        "may carry SpadeConfig fields of its own, NAME:FIELD=VALUE[:...], e.g. "
                        "mega-chunk:mega_attention_fn=laplace")
    p.add_argument("--warmup", type=int, default=1,
                   help="untimed steps per cell (with --interleave: untimed rounds of all "
                        "models; 2 lets the shared heap settle, see benchmarks/README.md)")
    p.add_argument("--repeats", type=int, default=3, help="timed steps per cell (median)")
    p.add_argument("--rounds", type=int, default=1,
                   help="repeat the whole sweep; per cell, the median over all rounds' steps "
                        "(spreads bursts of foreign load on a shared machine over all models)")
    p.add_argument("--interleave", action="store_true",
                   help="time all models of a length together in one process, stepped in "
                        "turn (steadier ratios on a noisy machine); memory still comes from "
                        "two steps per cell in its own subprocess")
    p.add_argument("--min-seconds", type=float, default=0.0,
                   help="with --interleave: step each model until its timed steps add up to "
                        "this many seconds (and at least --repeats): more samples where steps "
                        "are short and noisy")
    p.add_argument("--max-seconds", type=float, default=300.0,
                   help="wall-time budget per cell; over it the cell is recorded as skipped")
    p.add_argument("--peak-size", type=int, default=4096,
                   help="matrix size of the fp32 matmul peak measurement")
    p.add_argument("--peak-repeats", type=int, default=5,
                   help="timed matmuls for the machine's fp32 peak (median)")
    p.add_argument("--profile", default=None, metavar="MODEL@LENGTH",
                   help="also write a torch.profiler breakdown of one step, e.g. "
                        "spade-s4-window@8192")
    _add_common(p)
    p.set_defaults(handler=bench_train, bench_parser=p)

    p = sub.add_parser(
        "generate", help="per-token decoding latency and memory against context length",
        formatter_class=HelpFormatter,
        description="Streaming decoding after a context of N tokens, one subprocess per "
                    "model. Writes generate.csv, generate.png, generate_table.md.")
    p.add_argument("--contexts", type=_int_list, default=DEFAULT_CONTEXTS,
                   help="comma-separated context lengths")
    p.add_argument("--models", type=_name_list, default="spade-s4-window,transformer-full",
                   help=f"comma-separated, from {','.join(GENERATE_MODELS)} (each "
                        "optionally NAME:FIELD=VALUE[:...], as in bench train)")
    p.add_argument("--tokens", type=int, default=32, help="timed tokens per context (median)")
    p.add_argument("--warmup", type=int, default=4, help="untimed tokens per context")
    p.add_argument("--state", choices=STATE_MODES, default="auto",
                   help="reach each context by stepping, with a synthetic state of the same "
                        "shapes, or auto (step while it fits --max-seconds)")
    p.add_argument("--max-seconds", type=float, default=600.0,
                   help="wall-time budget per model")
    _add_common(p)
    p.set_defaults(handler=bench_generate, bench_parser=p)
    return bench


# --------------------------------------------------------------------------------- helpers
def canonical_command(args: argparse.Namespace) -> str:
    """The full ``spadeformer bench ...`` command with every option spelled out."""
    parts = ["spadeformer", "bench", args.bench_command]
    for action in args.bench_parser._actions:
        if not action.option_strings or action.dest in ("help",):
            continue
        flag = next(s for s in action.option_strings if s.startswith("--"))
        value = getattr(args, action.dest)
        if isinstance(action, argparse._StoreTrueAction):
            if value:
                parts.append(flag)
            continue
        if value is None:
            continue
        if isinstance(value, list):
            value = ",".join(str(v) for v in value)
        parts += [flag, str(value)]
    return " ".join(parts)


def _write_command(out: Path, args: argparse.Namespace) -> None:
    """command.txt keeps one line per bench subcommand (train and generate may share DIR)."""
    path = out / "command.txt"
    prefix = f"spadeformer bench {args.bench_command} "
    lines = path.read_text().splitlines() if path.is_file() else []
    lines = [ln for ln in lines if not ln.startswith(prefix)] + [canonical_command(args)]
    path.write_text("\n".join(lines) + "\n")


def _fmt(value: Any) -> Any:
    return f"{value:.6g}" if isinstance(value, float) else value


def write_csv(rows: list[dict[str, Any]], path: Path, columns: tuple[str, ...]) -> None:
    tmp = path.with_suffix(".csv.tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns))
        writer.writeheader()
        for row in rows:
            writer.writerow({c: _fmt(row.get(c, "")) for c in columns})
    os.replace(tmp, path)


def _machine() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"time": time.strftime("%Y-%m-%d %H:%M:%S"),
                            "platform": platform.platform(), "python": platform.python_version(),
                            "torch": torch.__version__, "cpu_count": os.cpu_count(),
                            "torch_threads": torch.get_num_threads()}
    try:
        info["cpu"] = next(ln.split(":", 1)[1].strip()
                           for ln in Path("/proc/cpuinfo").read_text().splitlines()
                           if ln.startswith("model name"))
    except (OSError, StopIteration):
        info["cpu"] = platform.processor()
    if hasattr(os, "getloadavg"):
        info["loadavg"] = list(os.getloadavg())
    if torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name()
    return info


def _process_malloc() -> str:
    """This process's malloc policy (spadeformer.allocator; cli.main has applied it)."""
    from spadeformer.allocator import reuse_freed_memory

    return "reuse freed memory" if reuse_freed_memory() else "system"


def _setup(args: argparse.Namespace, models: list[str], length: int, kind: str):
    """Check the common flags and every model, then make the output folder. An older
    ``<kind>.png`` there goes first: it would not match the new CSV, whose rows are written
    as they come (also when the run is interrupted or --no-plot)."""
    import torch

    from spadeformer.bench.machine import available_memory_mb
    from spadeformer.bench.train_bench import BenchShape

    for name in ("warmup", "max_seconds", "threads", "batch"):
        value = getattr(args, name)
        if value < 0 or (name in ("max_seconds", "batch") and value == 0):
            raise ValueError(f"--{name.replace('_', '-')} must be "
                             f"{'> 0' if name in ('max_seconds', 'batch') else '>= 0'}, "
                             f"got {value}")
    shape = BenchShape(d_model=args.d_model, n_layers=args.n_layers, n_heads=args.n_heads,
                       d_ff=args.d_ff, d_state=args.d_state, window_size=args.window,
                       chunk_size=args.chunk, batch_size=args.batch, vocab_size=args.vocab)
    _check_configs(models, shape, length)
    if args.threads:
        torch.set_num_threads(args.threads)
    mem = args.max_memory_mb
    if mem == "auto":
        avail = available_memory_mb()
        mem = 0.6 * avail if avail else 0.0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stale = out / f"{kind}.png"
    if stale.exists():
        stale.unlink()
        _say(f"removed the old {stale.name}: it showed an earlier run")
    _write_command(out, args)
    return shape, float(mem), out


def _plot(kind: str, rows: list[dict[str, Any]], path: Path, title: str,
          enabled: bool = True) -> None:
    """Draw the PNG (``_setup`` has removed an older one)."""
    from spadeformer.bench import plots

    if not enabled:
        return
    try:
        getattr(plots, f"plot_{kind}")(rows, path, title=title)
        _say(f"plot: {path}")
    except ImportError:
        _say(f"{path.name} skipped: matplotlib is not installed (pip install "
             "'spadeformer[plot]')")


# --------------------------------------------------------------------------------- handlers
def _check_configs(models: list[str], shape, length: int) -> None:
    """Build every model's config (and its FLOP count) before anything is timed or written:
    a bad NAME:FIELD=VALUE fails here, named, instead of as a failed cell."""
    from spadeformer.bench.models import train_flops

    for spec in models:
        try:
            train_flops(spec, shape, length)
        except (TypeError, ValueError) as err:
            raise ValueError(f"model {spec!r}: {err}") from None


def bench_train(args: argparse.Namespace) -> int:
    """Handler of ``spadeformer bench train``; returns the exit code."""
    from spadeformer.bench import machine as bm
    from spadeformer.bench import plots
    from spadeformer.bench import train_bench as tb

    tb.check_models(args.models)
    for flag in ("repeats", "rounds"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    if args.min_seconds < 0 or (args.min_seconds > 0 and not args.interleave):
        raise ValueError(f"--min-seconds must be >= 0 and needs --interleave, got "
                         f"{args.min_seconds} (interleave={args.interleave})")
    profile = None
    if args.profile:
        model, _, length = args.profile.partition("@")
        if not length.isdigit() or tb.split_model(model)[0] not in tb.MODELS:
            raise ValueError(f"--profile must be MODEL@LENGTH with MODEL in {list(tb.MODELS)} "
                             f"(optionally MODEL:FIELD=VALUE...), got {args.profile!r}")
        profile = (model, int(length))
    shape, mem, out = _setup(args, [*args.models, *([profile[0]] if profile else [])],
                             min(args.lengths), "train")
    device = bm.resolve_device(args.device)
    machine = _machine()
    _say(f"bench train: {len(args.models)} models x {len(args.lengths)} lengths, "
         f"shape {shape}, device {device}, memory budget {mem:.0f} MB")
    peaks = [bm.matmul_peak(args.peak_size, args.peak_repeats, device)]
    _say(f"matmul peak ({args.peak_size}^2 fp32): {peaks[0]['gflops_median']:.1f} GFLOP/s")
    csv_path = out / "train.csv"
    rows = tb.run_train_bench(
        args.models, args.lengths, shape, warmup=args.warmup, repeats=args.repeats,
        rounds=args.rounds,
        max_seconds=args.max_seconds, max_memory_mb=mem, device=str(device),
        threads=args.threads, isolate=not args.in_process, interleave=args.interleave,
        min_seconds=args.min_seconds,
        peak=peaks[0],
        on_row=lambda rs: write_csv(rs, csv_path, tb.TRAIN_COLUMNS), log=_say)
    # the machine may be shared: measure the peak again and use the median of all samples
    peaks.append(bm.matmul_peak(args.peak_size, args.peak_repeats, device))
    peak = statistics.median([s for p in peaks for s in p["samples_gflops"]])
    for row in rows:
        row["matmul_peak_gflops"] = peak
        if row["status"] == "ok":
            row["pct_of_peak"] = 100.0 * row["gflops"] / peak
    write_csv(rows, csv_path, tb.TRAIN_COLUMNS)
    table = plots.ratio_table(rows) + "\n\n" + plots.spade_targets(rows, peak)
    print(table)
    (out / "train_table.md").write_text(table + "\n")
    # the timing subprocesses apply this process's malloc policy; the interleaved mode's
    # memory subprocesses keep the system malloc (train_bench)
    timing_malloc = _process_malloc()
    separate_memory_cells = args.interleave and not args.in_process
    machine.update(matmul_peak_gflops=peak, matmul_peak_runs=peaks,
                   loadavg_end=list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
                   memory_budget_mb=mem, device=str(device), malloc=timing_malloc,
                   malloc_memory_cells="system" if separate_memory_cells else timing_malloc)
    (out / "train_machine.json").write_text(json.dumps(machine, indent=2) + "\n")
    _plot("train", rows, out / "train.png",
          f"training step, d={shape.d_model}, {shape.n_layers} layers, batch "
          f"{shape.batch_size}, {device} ({machine.get('cpu', '')})", enabled=not args.no_plot)
    if profile is not None:
        model, length = profile
        payload = dict(mode="profile", model=model, length=length, shape=asdict(shape),
                       device=str(device), threads=args.threads, max_memory_mb=mem,
                       deadline=time.time() + args.max_seconds)
        res = bm.run_subprocess("spadeformer.bench.train_bench", payload,
                                timeout=args.max_seconds + 10, log=_say)
        safe = "".join(c if c.isalnum() or c in "-_.=" else "_" for c in model)
        path = out / f"profile_{safe}_{length}.txt"
        if res.get("status") == "ok":
            path.write_text(res["text"] + "\n")
            _say(f"profile: {path}")
        else:
            _say(f"profile {args.profile} {res.get('status')}: {res.get('note')}")
    return 0 if any(r["status"] == "ok" for r in rows) else 1


def bench_generate(args: argparse.Namespace) -> int:
    """Handler of ``spadeformer bench generate``; returns the exit code."""
    from spadeformer.bench import generate_bench as gb
    from spadeformer.bench import plots

    gb.check_models(args.models, gb.GENERATE_MODELS)
    if args.tokens < 1:
        raise ValueError(f"--tokens must be >= 1, got {args.tokens}")
    shape, mem, out = _setup(args, args.models, min(args.contexts), "generate")
    device = gb.resolve_device(args.device)
    machine = _machine()
    _say(f"bench generate: {args.models} at contexts {args.contexts}, shape {shape}, "
         f"device {device}, state {args.state}")
    rows = gb.run_generate_bench(
        args.models, args.contexts, shape, tokens=args.tokens, warmup=args.warmup,
        state_mode=args.state, max_seconds=args.max_seconds, max_memory_mb=mem,
        device=str(device), threads=args.threads, isolate=not args.in_process, log=_say)
    write_csv(rows, out / "generate.csv", gb.GENERATE_COLUMNS)
    table = plots.generate_table(rows)
    print(table)
    (out / "generate_table.md").write_text(table + "\n")
    machine.update(loadavg_end=list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
                   memory_budget_mb=mem, device=str(device),
                   # the per-model subprocesses keep the system malloc (generate_bench)
                   malloc=_process_malloc() if args.in_process else "system")
    (out / "generate_machine.json").write_text(json.dumps(machine, indent=2) + "\n")
    _plot("generate", rows, out / "generate.png",
          f"decoding, d={shape.d_model}, {shape.n_layers} layers, batch "
          f"{shape.batch_size}, {device} ({machine.get('cpu', '')})", enabled=not args.no_plot)
    return 0 if any(r["status"] == "ok" for r in rows) else 1
