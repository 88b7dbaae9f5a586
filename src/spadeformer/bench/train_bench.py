"""Training-step benchmark: time, memory and achieved FLOP/s per model and sequence length.

One *cell* = one (model, length). By default each cell runs in a fresh subprocess
(``python -m spadeformer.bench.train_bench --cell JSON --result FILE``) so its peak memory is
its own: on CPU the peak resident set (``getrusage(RUSAGE_SELF).ru_maxrss``) minus the same
process's peak just before the model is built; on CUDA ``max_memory_allocated``. The cell runs
``warmup`` + ``repeats`` training steps (forward, backward, AdamW step) on random tokens and
reports the median of the timed ones. A cell that would not finish within ``max_seconds`` of
wall time (projected from its first step), or that runs out of the memory budget (enforced
with ``RLIMIT_DATA`` on Linux, so an allocation fails cleanly instead of waking the OOM
killer), is recorded as skipped; so are the longer lengths of that model.

With ``interleave=True`` (``--interleave``) the timing moves out of the per-cell subprocesses:
those run two steps only, for memory, and then one process per length steps every model that
fits in turn (:func:`run_interleaved_cells`), so that the machine's slow spells hit all models
alike and the ratios between them hold still.

Every subprocess that times steps first calls :func:`spadeformer.allocator.reuse_freed_memory`,
as the ``spadeformer`` command does (unless ``SPADEFORMER_MALLOC=system``): large CPU tensors
are then reused instead of page-faulted in every step. The interleaved mode's memory cells keep
the system malloc, so their peak RSS counts the model's tensors and not the heap fragmentation
that reuse costs (about +25% RSS at 16k tokens on glibc 2.36). That fragmentation adds up in
the shared timing process, which holds every model: a model that fitted alone but runs out of
memory there is timed alone in its own subprocess instead (and its note says so).

Models, their variants and the FLOP count: :mod:`spadeformer.bench.models`.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from spadeformer.allocator import reuse_freed_memory
from spadeformer.bench.machine import (
    MB,
    is_oom,
    limit_memory,
    matmul_peak,
    minor_faults,
    out_of_memory,
    peak_rss_mb,
    resolve_device,
    run_subprocess,
    sync,
    warm_libraries,
)
from spadeformer.bench.models import (  # re-exported: the bench's public names live here too
    MODELS,
    REFERENCE_MODEL,
    BenchShape,
    FlopCount,
    attention_pairs,
    build_model,
    check_models,
    model_config,
    split_model,
    train_flops,
)

__all__ = [
    "MODELS",
    "REFERENCE_MODEL",
    "TRAIN_COLUMNS",
    "BenchShape",
    "FlopCount",
    "attention_pairs",
    "build_model",
    "check_models",
    "matmul_peak",
    "model_config",
    "profile_train_step",
    "run_train_bench",
    "run_train_cell",
    "split_model",
    "train_flops",
]


TRAIN_COLUMNS = (
    "model", "length", "status", "note", "median_s", "min_s", "max_s", "repeats",
    "first_step_s", "tokens_per_s", "gflop_per_step", "gflops", "pct_of_peak", "peak_mem_mb",
    "peak_rss_mb", "baseline_rss_mb", "params", "trainable_params", "device", "threads",
    "batch_size", "d_model", "n_layers", "n_heads", "d_ff", "d_state", "window_size",
    "chunk_size", "matmul_peak_gflops", "faults_per_step",
)



# --------------------------------------------------------------------------------- one cell
class _Trainee:
    """One benchmarked model with its AdamW and a fixed batch of random tokens."""

    def __init__(self, name: str, shape: BenchShape, length: int, device: torch.device,
                 seed: int = 0):
        torch.manual_seed(seed)
        self.model = build_model(name, shape).to(device).train()
        self.opt = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad],
                                     lr=1e-4)
        self.ids = torch.randint(0, shape.vocab_size, (shape.batch_size, length),
                                 device=device)
        self.device = device
        self.last_faults: int | None = None  # minor page faults of the last step

    def info(self) -> dict[str, Any]:
        return {"params": self.model.num_parameters(),
                "trainable_params": self.model.num_parameters(True),
                "threads": torch.get_num_threads(), "device": str(self.device)}

    def step(self) -> float:
        """One training step (zero_grad, forward, backward, AdamW); returns its seconds and
        leaves the step's minor page faults in ``last_faults``."""
        faults = minor_faults()
        t0 = time.perf_counter()
        self.opt.zero_grad(set_to_none=True)
        self.model(self.ids, labels=self.ids).loss.backward()
        self.opt.step()
        sync(self.device)
        dt = time.perf_counter() - t0
        self.last_faults = minor_faults() - faults
        return dt


def _timed(result: dict[str, Any], times: list[float], repeats: int,
           faults: list[int | None] | None = None) -> dict[str, Any]:
    """Add the timing summary of ``times`` (the timed steps) to ``result``; ``faults``: the
    same steps' minor page faults (None where unknown)."""
    result.update(status="ok", note=result.get("note", ""), median_s=statistics.median(times),
                  min_s=min(times), max_s=max(times), repeats=len(times), times=times)
    if faults and all(f is not None for f in faults):
        result.update(faults_per_step=statistics.median(faults), faults=faults)
    if len(times) < repeats:
        result["note"] = f"only {len(times)}/{repeats} repeats fit in max_seconds"
    return result


def run_train_cell(name: str, shape: BenchShape, length: int, *, warmup: int = 1,
                   repeats: int = 3, max_seconds: float = float("inf"),
                   device: str | torch.device = "cpu", seed: int = 0) -> dict[str, Any]:
    """Time ``warmup`` + ``repeats`` training steps of ``name`` on (batch, length) tokens.

    Returns a result dict (status "ok" or "skipped"); stops early, keeping the repeats done
    so far, when the next step would cross ``max_seconds`` (wall time from this call).
    """
    device = torch.device(device)
    start = time.perf_counter()
    baseline_rss = peak_rss_mb()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    cuda_base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    trainee = _Trainee(name, shape, length, device, seed)
    result: dict[str, Any] = {**trainee.info(), "baseline_rss_mb": baseline_rss}
    times: list[float] = []
    faults: list[int | None] = []
    total = warmup + repeats
    for i in range(total):
        dt = trainee.step()
        if i == 0:
            result["first_step_s"] = dt
            left = max_seconds - (time.perf_counter() - start)
            if dt * warmup > left:  # not even the rest of warm-up + one timed step fits
                result.update(status="skipped", note=(
                    f"first step {dt:.0f}s: {warmup + 1} steps would exceed max_seconds"))
                break
        if i >= warmup:
            times.append(dt)
            faults.append(trainee.last_faults)
        if i + 1 < total and time.perf_counter() - start + dt > max_seconds:
            if not times:
                result.update(status="skipped", note="time budget spent in warm-up")
            break
    if times:
        _timed(result, times, repeats, faults)
    peak_rss = peak_rss_mb()
    result["peak_rss_mb"] = peak_rss
    if device.type == "cuda":
        result["peak_mem_mb"] = (torch.cuda.max_memory_allocated(device) - cuda_base) / MB
    else:
        result["peak_mem_mb"] = peak_rss - baseline_rss
    return result


def run_interleaved_cells(names: list[str], shape: BenchShape, length: int, *,
                          warmup: int = 1, repeats: int = 3, min_seconds: float = 0.0,
                          max_seconds: float = float("inf"),
                          device: str | torch.device = "cpu", seed: int = 0
                          ) -> dict[str, dict[str, Any]]:
    """Time every model of ``names`` at one length in this process, stepping them in turn.

    Build every model, then go in rounds: one step of every model that still wants one, in a
    new random (seeded) order each round. The first ``warmup`` rounds are not timed; they are
    interleaved too, because the heap these models share settles into the layout the timed
    rounds reuse only once every model has stepped beside the others (before that a step can
    fault tens of thousands of fresh pages in, ~0.1-0.4 s at 16k tokens). A model wants
    steps until it has ``repeats`` timed steps and they add up to ``min_seconds`` (so short
    lengths, whose steps are quick and noisy, get more of them). A slow spell of the machine
    (foreign load, thermal or memory bandwidth drift) then lands on every model alike, so
    ratios between models are much steadier than with one model after the other.
    ``max_seconds`` is each model's own budget (the sum of its steps). Memory is not measured
    here (the process is shared); a model that runs out of memory is recorded as skipped and
    the others go on. Returns name -> result (with the timed steps' page faults).
    """
    device = torch.device(device)
    results: dict[str, dict[str, Any]] = {}
    trainees: dict[str, _Trainee] = {}
    spent: dict[str, float] = {}
    times: dict[str, list[float]] = {}
    faults: dict[str, list[int | None]] = {}

    def step(name: str, timed: bool) -> None:
        try:
            dt = trainees[name].step()
        except (MemoryError, RuntimeError) as err:
            if not is_oom(err):
                raise
            results[name].update(out_of_memory(f"out of memory: {str(err)[:160]}"))
            del trainees[name]
            return
        spent[name] += dt
        results[name].setdefault("first_step_s", dt)
        if timed:
            times[name].append(dt)
            faults[name].append(trainees[name].last_faults)

    for name in names:
        try:
            trainees[name] = _Trainee(name, shape, length, device, seed)
        except (MemoryError, RuntimeError) as err:
            if not is_oom(err):
                raise
            results[name] = out_of_memory("out of memory while building")
            continue
        results[name] = trainees[name].info()
        spent[name], times[name], faults[name] = 0.0, [], []

    def wants_step(name: str) -> bool:
        if name not in trainees:
            return False
        done = times[name]
        if done and spent[name] + done[-1] > max_seconds:
            return False  # this model's budget is spent; keep the repeats it has
        return len(done) < repeats or sum(done) < min_seconds

    # A fresh random order each round (seeded: runs repeat). Rotating one fixed order would
    # keep each model's predecessor, and a model stepped right after a memory-hungry one pays
    # for faulting its own pages back in (~0.1 s per GB here): a bias, not noise.
    shuffle = random.Random(seed * 1_000_003 + length)
    for _ in range(warmup):
        for name in shuffle.sample(names, len(names)):
            if name in trainees:
                step(name, timed=False)
    r = 0
    while any(wants_step(name) for name in names) and r < repeats + 10_000:
        for name in shuffle.sample(names, len(names)):
            if wants_step(name):
                step(name, timed=True)
        r += 1
    for name, result in results.items():
        if times.get(name) and result.get("status") != "skipped":
            _timed(result, times[name], repeats, faults[name])
        elif result.get("status") != "skipped":
            result.update(status="skipped", note="no timed step fit in max_seconds")
    return results


# --------------------------------------------------------------------------------- subprocess
def _child_main(argv: list[str] | None = None) -> int:
    """Entry point of a cell subprocess (``python -m spadeformer.bench.train_bench``)."""
    parser = argparse.ArgumentParser(description="one benchmark cell (internal)")
    parser.add_argument("--cell", required=True, help="JSON payload")
    parser.add_argument("--result", required=True, help="where to write the JSON result")
    args = parser.parse_args(argv)
    payload = json.loads(args.cell)
    if payload.get("malloc", "reuse") == "reuse":
        reuse_freed_memory()  # as the spadeformer command does (SPADEFORMER_MALLOC still rules)
    if payload.get("threads"):
        torch.set_num_threads(int(payload["threads"]))
    limit_memory(float(payload.get("max_memory_mb", 0)))
    shape = BenchShape(**payload["shape"])
    try:
        warm_libraries()
        left = payload["deadline"] - time.time()
        if payload.get("mode") == "profile":
            result = {"status": "ok", "text": profile_train_step(
                payload["model"], shape, payload["length"], device=payload["device"])}
        elif payload.get("mode") == "interleave":
            result = {"status": "ok", "cells": run_interleaved_cells(
                payload["models"], shape, payload["length"], warmup=payload["warmup"],
                repeats=payload["repeats"], min_seconds=payload.get("min_seconds", 0.0),
                max_seconds=payload["max_seconds"], device=payload["device"])}
        else:
            result = run_train_cell(payload["model"], shape, payload["length"],
                                    warmup=payload["warmup"], repeats=payload["repeats"],
                                    max_seconds=left, device=payload["device"])
    except (MemoryError, RuntimeError) as err:
        if not is_oom(err):
            raise
        result = out_of_memory(f"out of memory: {str(err)[:160]}", peak_rss_mb=peak_rss_mb())
    Path(args.result).write_text(json.dumps(result))
    return 0


# --------------------------------------------------------------------------------- profile
def profile_train_step(name: str, shape: BenchShape, length: int,
                       device: str | torch.device = "cpu", row_limit: int = 25) -> str:
    """torch.profiler tables of one training step (after one warm-up step).

    Returns two tables: operators by self time (forward and backward), and forward time per
    module (labels ``L{i}.attn``, ``L{i}.ssm``, ``L{i}.ema``, ``L{i}.ffn``, ``L{i}.mix`` and
    ``lm_head``, set with record_function in forward hooks: the model code is untouched).
    """
    from torch.profiler import ProfilerActivity, profile, record_function

    device = torch.device(device)
    model = build_model(name, shape).to(device).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, shape.vocab_size, (shape.batch_size, length), device=device)
    labels = {"lm_head": model.lm_head}
    for i, layer in enumerate(model.backbone.layers):
        for part in ("attn", "ssm", "ema", "ffn", "mix_proj"):
            if getattr(layer, part, None) is not None:
                labels[f"L{i}.{part.replace('_proj', '')}"] = getattr(layer, part)
    open_ranges: dict[int, Any] = {}
    handles = []
    for label, module in labels.items():
        def pre(mod, args, _label=label):
            open_ranges[id(mod)] = record_function(f"fwd:{_label}")
            open_ranges[id(mod)].__enter__()

        def post(mod, args, out):
            open_ranges.pop(id(mod)).__exit__(None, None, None)

        handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        model(ids, labels=ids).loss.backward()
        opt.step()
        sync(device)

    step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda"
                                           else [])
    t0 = time.perf_counter()
    with profile(activities=activities) as prof:
        step()
    wall = time.perf_counter() - t0
    for h in handles:
        h.remove()
    events = prof.key_averages()
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    ops = events.table(sort_by=sort, row_limit=row_limit)
    modules = sorted((e for e in events if e.key.startswith("fwd:")),
                     key=lambda e: -e.cpu_time_total)
    lines = [f"# {name}, L={length}, {asdict(shape)}, device {device}",
             f"# profiled step wall time {wall:.2f}s (profiler overhead included)", "",
             "## forward time per module (CPU total, includes children)"]
    lines += [f"{e.key:<18} {e.cpu_time_total / 1e6:9.3f} s" for e in modules]
    lines += ["", "## operators by self time (forward + backward + optimizer)", ops]
    return "\n".join(lines)


# --------------------------------------------------------------------------------- the run
def _row(name: str, length: int, shape: BenchShape, result: dict[str, Any], flops: FlopCount,
         peak_gflops: float | None, device: str) -> dict[str, Any]:
    row: dict[str, Any] = {c: "" for c in TRAIN_COLUMNS}
    row.update({k: v for k, v in result.items() if k in row})
    row.update(model=name, length=length, device=result.get("device", device),
               batch_size=shape.batch_size, d_model=shape.d_model, n_layers=shape.n_layers,
               n_heads=shape.n_heads, d_ff=shape.ff, d_state=shape.d_state,
               window_size=shape.window_size, chunk_size=shape.chunk_size,
               gflop_per_step=flops.train_step / 1e9, matmul_peak_gflops=peak_gflops or "")
    if result.get("status") == "ok":
        row["tokens_per_s"] = shape.batch_size * length / result["median_s"]
        row["gflops"] = flops.train_step / result["median_s"] / 1e9
        if peak_gflops:
            row["pct_of_peak"] = 100.0 * row["gflops"] / peak_gflops
    return row


def _merge(results: list[dict[str, Any]]) -> dict[str, Any]:
    """One cell's results over several rounds: median over every timed step of every round,
    the largest peak memory, the first round's first step."""
    ok = [r for r in results if r.get("status") == "ok"]
    if not ok:
        return results[-1]
    times = [t for r in ok for t in r.get("times", [r["median_s"]])]
    merged = dict(ok[0])
    merged.update(median_s=statistics.median(times), min_s=min(times), max_s=max(times),
                  repeats=len(times), times=times,
                  peak_mem_mb=max(r["peak_mem_mb"] for r in ok),
                  peak_rss_mb=max(r["peak_rss_mb"] for r in ok))
    if len(ok) < len(results):
        merged["note"] = " ".join(filter(None, [
            merged.get("note"), f"{len(results) - len(ok)} round(s) skipped: "
                                f"{results[-1].get('note', '')}"]))
    return merged


def run_train_bench(models: list[str], lengths: list[int], shape: BenchShape, *,
                    warmup: int = 1, repeats: int = 3, rounds: int = 1,
                    max_seconds: float = 300.0, max_memory_mb: float = 0.0,
                    device: str = "auto", threads: int = 0, isolate: bool = True,
                    interleave: bool = False, min_seconds: float = 0.0,
                    peak: dict[str, Any] | None = None,
                    on_row: Callable[[list[dict[str, Any]]], None] | None = None,
                    log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Every (length, model) cell, shortest lengths first; returns the CSV rows.

    ``rounds`` > 1 repeats the whole sweep and reports, per cell, the median over the timed
    steps of all rounds: on a shared machine a burst of foreign load then hits every model
    rather than a few consecutive cells. Once a model is skipped at some length, its longer
    lengths are skipped without running (in later rounds too). ``isolate=False`` runs cells
    in this process (fast, for tests; memory is then not per cell). ``on_row`` gets the rows
    so far after every cell (to save partial results).

    ``interleave=True`` separates memory from time: each cell first runs two steps alone in a
    fresh subprocess (its peak memory, and whether it fits), then all models that fit at that
    length are timed together in one process by :func:`run_interleaved_cells`, stepped in
    turn, so that drift in the machine's speed cannot favour one model over another;
    ``min_seconds`` asks each model there for timed steps adding up to at least that long.
    """
    check_models(models)
    width = max(18, *map(len, models))  # the per-cell log lines stay aligned
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"rounds must be an integer >= 1, got {rounds!r}")
    dev = resolve_device(device)
    peak_gflops = peak["gflops_median"] if peak else None
    cells = [(length, name) for length in sorted(lengths) for name in models]
    results: dict[tuple[int, str], list[dict[str, Any]]] = {}
    memory: dict[tuple[int, str], dict[str, Any]] = {}  # interleave: the two-step cells
    dead: dict[str, int] = {}

    def rows_so_far() -> list[dict[str, Any]]:
        return [_row(name, length, shape, _merge(results[(length, name)]),
                     train_flops(name, shape, length), peak_gflops, str(dev))
                for length, name in cells if (length, name) in results]

    def in_subprocess(seconds: float, slack: float, **payload: Any) -> dict[str, Any]:
        """Run :func:`_child_main` on ``payload`` plus the settings every child shares."""
        payload.update(shape=asdict(shape), device=str(dev), threads=threads,
                       max_memory_mb=max_memory_mb, deadline=time.time() + seconds)
        return run_subprocess("spadeformer.bench.train_bench", payload,
                              timeout=seconds + slack, log=log)

    def one_cell(name: str, length: int, warmup_: int, repeats_: int,
                 malloc: str = "reuse") -> dict[str, Any]:
        if not isolate:
            result = run_train_cell(name, shape, length, warmup=warmup_, repeats=repeats_,
                                    max_seconds=max_seconds, device=dev)
            result["note"] = " ".join(filter(None, [result.get("note"),
                                                    "in-process (memory not isolated)"]))
            return result
        return in_subprocess(max_seconds, 10, model=name, length=length, warmup=warmup_,
                             repeats=repeats_, malloc=malloc)

    def interleaved(names: list[str], length: int) -> dict[str, dict[str, Any]]:
        if not isolate:
            return run_interleaved_cells(names, shape, length, warmup=warmup, repeats=repeats,
                                         min_seconds=min_seconds, max_seconds=max_seconds,
                                         device=dev)
        out = in_subprocess(max_seconds * len(names), 30, mode="interleave", models=names,
                            length=length, warmup=warmup, repeats=repeats,
                            min_seconds=min_seconds, max_seconds=max_seconds)
        return out.get("cells") or {name: dict(out) for name in names}

    def timed_with_memory(name: str, length: int, timing: dict[str, Any],
                          how: str = "timed interleaved") -> dict[str, Any]:
        if timing.get("status") != "ok":
            return timing
        keys = ("status", "median_s", "min_s", "max_s", "repeats", "times", "faults_per_step",
                "faults")
        note = " ".join(filter(None, [timing.get("note"), how]))
        # the memory cell's own page faults (system malloc, first steps) describe no timed step
        mem = {k: v for k, v in memory[(length, name)].items() if k not in keys}
        return {**mem, **{k: timing[k] for k in keys if k in timing}, "note": note}

    def time_all(round_: int, names: list[str], length: int) -> None:
        for name, timing in interleaved(names, length).items():
            how = "timed interleaved"
            if isolate and timing.get("out_of_memory"):
                # It fitted alone (its memory cell ran), not beside the others: the shared
                # process's heap keeps every model's freed blocks (spadeformer.allocator's
                # reuse policy), fragmented. Time it alone rather than lose the cell.
                timing = one_cell(name, length, warmup, repeats)
                how = "timed alone (out of memory beside the other models)"
            record(round_, length, name, timed_with_memory(name, length, timing, how))

    def record(round_: int, length: int, name: str, result: dict[str, Any]) -> None:
        if result.get("status") != "ok":
            dead[name] = min(dead.get(name, length), length)
        if round_ > 0 and result.get("status") != "ok" and "skipped at" in result["note"]:
            return  # keep the earlier rounds' measurements of this cell
        results.setdefault((length, name), []).append(result)
        shown = (f"{result['median_s']:.3f}s  {result['peak_mem_mb']:.0f}MB"
                 if result.get("status") == "ok"
                 else f"{result.get('status')}: {result.get('note')}")
        log(f"  L={length:<6} {name:<{width}} {shown}")
        if on_row is not None:
            on_row(rows_so_far())

    for round_ in range(rounds):
        if rounds > 1:
            log(f"round {round_ + 1}/{rounds}")
        for length in sorted(lengths):
            runnable = []
            for name in models:
                if name in dead and dead[name] < length:
                    record(round_, length, name,
                           {"status": "skipped", "note": f"skipped at L={dead[name]}"})
                elif dead.get(name) == length:  # this very cell failed in an earlier round
                    continue
                elif not interleave:
                    record(round_, length, name, one_cell(name, length, warmup, repeats))
                elif (length, name) not in memory:  # interleave: memory in the first round
                    # two steps: the second one's peak includes AdamW's moments. The
                    # system malloc: peak RSS then counts the model's tensors, not the
                    # heap fragmentation of spadeformer.allocator's reuse policy
                    mem = memory[(length, name)] = one_cell(name, length, 1, 1, "system")
                    first = mem.get("first_step_s", 0.0)
                    if mem.get("status") == "ok" and first * (warmup + 1) > max_seconds:
                        mem = {**mem, "status": "skipped", "note": (
                            f"first step {first:.0f}s: {warmup + 1} steps would exceed "
                            "max_seconds")}
                    if mem.get("status") != "ok":
                        record(round_, length, name, mem)
                    else:
                        log(f"  L={length:<6} {name:<{width}} memory {mem['peak_mem_mb']:.0f}MB")
                        runnable.append(name)
                else:
                    runnable.append(name)
            if runnable:
                time_all(round_, runnable, length)
    return rows_so_far()


if __name__ == "__main__":  # pragma: no cover - exercised through subprocesses
    sys.exit(_child_main())
