"""Decoding benchmark: per-token latency and memory against the context length.

For each model (one subprocess each, ``python -m spadeformer.bench.generate_bench``), the
contexts are visited in increasing order on one stream: the model consumes random tokens with
``step()`` up to the next context length, then decodes ``warmup`` + ``tokens`` greedy tokens,
timing each ``step()`` + argmax; the stream then continues from there to the next context.
SPADE with window attention carries a fixed-size state (S4 state + a (w+1)-slot ring buffer),
so its latency should not depend on the context; a full-attention Transformer keeps a growing
key/value cache.

How the state at a context is reached (column ``state_mode``):

* ``stepped``: exactly, by stepping the model through ``context`` tokens;
* ``synthetic``: a state of exactly the structure, shapes and position stepping would give
  (:func:`synthetic_state`; caches and SSM state filled with random numbers). Decoding cost does
  not depend on the numbers in the state, only on its shapes, so the latency and the memory are
  the same; this is used when stepping to the context would not fit the time budget (at d=512
  a CPU step takes ~10 ms, so 64k tokens take over ten minutes, and full attention's cost per
  step grows with the context, which makes reaching long contexts quadratic). ``--state
  auto`` (default) steps while the projected time fits ``max_seconds`` and switches to
  synthetic for the rest.

Memory: ``state_mb`` is the exact size of the decoding state's tensors; ``rss_mb`` the
process's resident set minus the same before the model was built (CUDA: allocated memory).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from spadeformer.bench.machine import (
    current_rss_mb,
    is_oom,
    limit_memory,
    out_of_memory,
    peak_rss_mb,
    resolve_device,
    run_subprocess,
    sync,
    warm_libraries,
)
from spadeformer.bench.models import MODELS, BenchShape, build_model, check_models

__all__ = [
    "GENERATE_COLUMNS",
    "GENERATE_MODELS",
    "STATE_MODES",
    "run_generate_bench",
    "run_generate_model",
    "state_nbytes",
    "state_signature",
    "synthetic_state",
]

# The eager model decodes exactly like transformer-full (step() has one path): not listed.
GENERATE_MODELS = tuple(m for m in MODELS if m != "transformer-full-eager")
STATE_MODES = ("auto", "stepped", "synthetic")
GENERATE_COLUMNS = (
    "model", "context", "position", "status", "note", "state_mode", "median_ms", "mean_ms",
    "p90_ms", "min_ms", "tokens", "tokens_per_s", "state_mb", "rss_mb", "peak_rss_mb", "stepping_s",
    "params", "device", "threads", "batch_size", "d_model", "n_layers", "n_heads", "d_ff",
    "d_state", "window_size", "chunk_size",
)


# --------------------------------------------------------------------------------- states
def _map_state(obj: Any, position: int, fill: Callable[[torch.Tensor, tuple], torch.Tensor]
               ) -> Any:
    from spadeformer.attention import AttentionCache, full_cache_capacity

    if isinstance(obj, AttentionCache):
        k, v = obj.key, obj.value
        # a full-attention cache starts empty and grows as stepping would grow it; window and
        # chunk caches are preallocated ring buffers of fixed size. Keys and values may differ
        # in width (Mega's z and v).
        slots = obj.num_slots or full_cache_capacity(position)
        return AttentionCache(key=fill(k, (*k.shape[:2], slots, k.shape[3])),
                              value=fill(v, (*v.shape[:2], slots, v.shape[3])),
                              position=position)
    if isinstance(obj, torch.Tensor):
        return fill(obj, tuple(obj.shape))
    if isinstance(obj, dict):
        return {key: position if key == "position" else _map_state(v, position, fill)
                for key, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(_map_state(o, position, fill) for o in obj)
    if obj is None:
        return None
    raise TypeError(f"unexpected object of type {type(obj).__name__} in a decoding state")


def synthetic_state(model, batch_size: int, position: int, scale: float = 0.1) -> Any:
    """A decoding state as after ``position`` tokens: same structure, shapes and positions as
    stepping would give, random contents (N(0, scale^2)) instead of the real ones."""
    if isinstance(position, bool) or not isinstance(position, int) or position < 0:
        raise ValueError(f"position must be a non-negative integer, got {position!r}")

    def fill(t: torch.Tensor, shape: tuple) -> torch.Tensor:
        return torch.randn(shape, dtype=t.dtype, device=t.device) * scale

    return _map_state(model.initial_state(batch_size), position, fill)


def state_signature(state: Any) -> Any:
    """Structure of a state: tensors -> (shape, dtype), positions kept. For comparisons."""
    from spadeformer.attention import AttentionCache

    if isinstance(state, AttentionCache):
        return ("cache", state_signature(state.key), state_signature(state.value),
                state.position)
    if isinstance(state, torch.Tensor):
        return (tuple(state.shape), str(state.dtype))
    if isinstance(state, dict):
        return {k: state_signature(v) for k, v in state.items()}
    if isinstance(state, (tuple, list)):
        return tuple(state_signature(s) for s in state)
    return state


def state_nbytes(state: Any) -> int:
    """Bytes held by the tensors of a decoding state."""
    from spadeformer.attention import AttentionCache

    if isinstance(state, AttentionCache):
        return state_nbytes(state.key) + state_nbytes(state.value)
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    if isinstance(state, dict):
        return sum(state_nbytes(v) for v in state.values())
    if isinstance(state, (tuple, list)):
        return sum(state_nbytes(s) for s in state)
    return 0


# --------------------------------------------------------------------------------- one model
def run_generate_model(name: str, shape: BenchShape, contexts: list[int], *, tokens: int = 32,
                       warmup: int = 4, state_mode: str = "auto",
                       max_seconds: float = float("inf"), device: str | torch.device = "cpu",
                       seed: int = 0, on_row: Callable[[list[dict]], None] | None = None
                       ) -> list[dict[str, Any]]:
    """Latency rows of one model at each context (ascending), see the module docstring."""
    if state_mode not in STATE_MODES:
        raise ValueError(f"state_mode must be one of {list(STATE_MODES)}, got {state_mode!r}")
    device = torch.device(device)
    start = time.perf_counter()
    base_rss = current_rss_mb()
    base_peak = peak_rss_mb()
    cuda_base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    torch.manual_seed(seed)
    model = build_model(name, shape).to(device).eval()
    B, V = shape.batch_size, shape.vocab_size
    rows: list[dict[str, Any]] = []
    common = dict(params=model.num_parameters(), device=str(device),
                  threads=torch.get_num_threads(), batch_size=B, d_model=shape.d_model,
                  n_layers=shape.n_layers, n_heads=shape.n_heads, d_ff=shape.ff,
                  d_state=shape.d_state, window_size=shape.window_size,
                  chunk_size=shape.chunk_size)

    def decode(state: Any, ids: torch.Tensor, n: int) -> tuple[list[float], Any, torch.Tensor]:
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            logits, state = model.step(ids, state)
            ids = logits.argmax(-1)
            sync(device)
            times.append(time.perf_counter() - t0)
        return times, state, ids

    with torch.inference_mode():
        state = model.initial_state(B)
        ids = torch.randint(0, V, (B,), device=device)
        # latency probe near position 0: first point of the linear latency model a + b t
        probe_times, state, ids = decode(state, ids, max(warmup, 1) + 4)
        pos = len(probe_times)
        points = [(pos, statistics.median(probe_times[-4:]))]
        synthetic = state_mode == "synthetic"
        for ctx in sorted(contexts):
            t_step = time.perf_counter()
            per_ctx = warmup + tokens
            if not synthetic and ctx > pos:
                a, b = _fit(points)
                projected = (ctx - pos) * (a + b * (pos + ctx) / 2)
                left = max_seconds - (time.perf_counter() - start)
                remaining = [c for c in contexts if c >= ctx]
                reserve = sum(per_ctx * (a + b * c) for c in remaining)
                if state_mode == "auto" and projected + reserve > left:
                    synthetic = True
                else:
                    prompt = torch.randint(0, V, (ctx - pos, B), device=device)
                    for t in range(ctx - pos):
                        _, state = model.step(prompt[t], state)
                        if (state_mode == "auto" and t % 256 == 255
                                and time.perf_counter() - start + reserve > max_seconds):
                            synthetic = True  # out of budget mid-way: give up stepping
                            break
                    else:
                        pos = ctx
            if synthetic or pos < ctx:
                synthetic = True
                state, pos = synthetic_state(model, B, ctx), ctx
            stepping = time.perf_counter() - t_step
            times, state, ids = decode(state, ids, per_ctx)
            measured = times[warmup:]
            points.append((pos + warmup, statistics.median(measured)))
            pos += per_ctx
            ms = [t * 1e3 for t in measured]
            rss = current_rss_mb() - base_rss
            if device.type == "cuda":
                rss = (torch.cuda.memory_allocated(device) - cuda_base) / 2**20
            rows.append(dict(
                common, model=name, context=ctx, position=pos - per_ctx, status="ok", note="",
                state_mode="synthetic" if synthetic else "stepped",
                median_ms=statistics.median(ms), mean_ms=statistics.fmean(ms),
                p90_ms=sorted(ms)[int(0.9 * (len(ms) - 1))], min_ms=min(ms), tokens=len(ms),
                tokens_per_s=1e3 / statistics.median(ms), state_mb=state_nbytes(state) / 2**20,
                rss_mb=rss, peak_rss_mb=peak_rss_mb() - base_peak, stepping_s=stepping))
            if on_row is not None:
                on_row(rows)
    return rows


def _fit(points: list[tuple[int, float]]) -> tuple[float, float]:
    """Latency model a + b * position through the first and last measured points, b >= 0."""
    (p0, t0), (p1, t1) = points[0], points[-1]
    b = max((t1 - t0) / (p1 - p0), 0.0) if p1 > p0 else 0.0
    return max(t0 - b * p0, 0.0) if b else t1, b


def _child_main(argv: list[str] | None = None) -> int:
    """Entry point of a per-model subprocess (internal)."""
    parser = argparse.ArgumentParser(description="generation benchmark of one model (internal)")
    parser.add_argument("--cell", required=True)
    parser.add_argument("--result", required=True)
    args = parser.parse_args(argv)
    payload = json.loads(args.cell)
    # The system malloc here, not spadeformer.allocator's reuse policy: rss_mb is the live
    # resident set against the context, and a heap that keeps freed blocks (the KV cache's
    # old buffers after each doubling) would count memory the model no longer holds.
    # Decoding allocates small tensors per token, so page faults cost it little.
    if payload.get("threads"):
        torch.set_num_threads(int(payload["threads"]))
    limit_memory(float(payload.get("max_memory_mb", 0)))
    result_path = Path(args.result)

    def save(rows: list[dict]) -> None:  # partial results survive a later kill
        result_path.write_text(json.dumps({"status": "partial", "rows": rows}))

    try:
        warm_libraries()
        rows = run_generate_model(
            payload["model"], BenchShape(**payload["shape"]), payload["contexts"],
            tokens=payload["tokens"], warmup=payload["warmup"], state_mode=payload["state"],
            max_seconds=payload["deadline"] - time.time(), device=payload["device"],
            on_row=save)
        result = {"status": "ok", "rows": rows}
    except (MemoryError, RuntimeError) as err:
        if not is_oom(err):
            raise
        done = json.loads(result_path.read_text())["rows"] if result_path.is_file() else []
        result = out_of_memory(f"out of memory: {str(err)[:160]}", rows=done)
    result_path.write_text(json.dumps(result))
    return 0


# --------------------------------------------------------------------------------- the run
def run_generate_bench(models: list[str], contexts: list[int], shape: BenchShape, *,
                       tokens: int = 32, warmup: int = 4, state_mode: str = "auto",
                       max_seconds: float = 600.0, max_memory_mb: float = 0.0,
                       device: str = "auto", threads: int = 0, isolate: bool = True,
                       log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Rows for every (model, context); one subprocess per model unless ``isolate=False``.

    Contexts a model did not reach (time-out, out of memory) get a "skipped" row.
    """
    check_models(models, GENERATE_MODELS)
    width = max(18, *map(len, models))  # the per-context log lines stay aligned
    if state_mode not in STATE_MODES:
        raise ValueError(f"state must be one of {list(STATE_MODES)}, got {state_mode!r}")
    dev = resolve_device(device)
    rows: list[dict[str, Any]] = []
    for name in models:
        if isolate:
            payload = dict(model=name, shape=asdict(shape), contexts=sorted(contexts),
                           tokens=tokens, warmup=warmup, state=state_mode, device=str(dev),
                           threads=threads, max_memory_mb=max_memory_mb,
                           deadline=time.time() + max_seconds)
            result = run_subprocess("spadeformer.bench.generate_bench", payload,
                                    timeout=max_seconds + 30, log=log)
            got = result.get("rows", [])
        else:
            result = {"status": "ok"}
            got = run_generate_model(name, shape, contexts, tokens=tokens, warmup=warmup,
                                     state_mode=state_mode, max_seconds=max_seconds,
                                     device=dev)
        done = {r["context"] for r in got}
        for ctx in sorted(contexts):
            if ctx not in done:
                got.append({"model": name, "context": ctx, "status": result["status"]
                            if result["status"] != "ok" else "skipped",
                            "note": result.get("note", "not reached")})
        for r in sorted(got, key=lambda r: r["context"]):
            row = {c: r.get(c, "") for c in GENERATE_COLUMNS}
            rows.append(row)
            shown = (f"{row['median_ms']:.2f} ms/token  state {row['state_mb']:.3g}MB "
                     f"({row['state_mode']})" if row["status"] == "ok"
                     else f"{row['status']}: {row['note']}")
            log(f"  context={row['context']:<7} {name:<{width}} {shown}")
    return rows


if __name__ == "__main__":  # pragma: no cover - exercised through subprocesses
    sys.exit(_child_main())
