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

Models (the paper's Figure 5 systems plus the eager baseline):

* ``transformer-full-eager``: softmax(QK^T / sqrt(d)) V with dense L x L scores, i.e. the
  paper's full-attention baseline. Built as ``transformer-full`` whose Attention modules are
  rerouted to :meth:`spadeformer.attention.Attention.forward_ref` (the dense reference path);
  the library has no runtime switch for it, so the bench sets the instance's ``forward``.
* ``transformer-full`` (fused SDPA, causal), ``transformer-window``, ``transformer-chunk``,
  ``s4`` (a stack of trainable S4 blocks), ``spade-s4-window`` and ``spade-s4-chunk`` (frozen
  S4 in the bottom layer, paper Sec. 4.2);
* ``mega-chunk``: Mega blocks (Ma et al. 2022; trained damped EMA, 16 dimensions, and
  single-head gated attention inside chunks of ``chunk_size`` in every layer; Z = d/2, V = 2d
  wide), a linear-cost baseline beside SPADE.

FLOPs are counted analytically (:func:`train_flops`), see its docstring for the formula.
"""

from __future__ import annotations

import argparse
import difflib
import json
import math
import random
import re
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
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

__all__ = [
    "MODELS",
    "REFERENCE_MODEL",
    "TRAIN_COLUMNS",
    "BenchShape",
    "FlopCount",
    "attention_pairs",
    "build_model",
    "matmul_peak",
    "model_config",
    "profile_train_step",
    "run_train_bench",
    "run_train_cell",
    "train_flops",
]

MODELS = (
    "transformer-full-eager",
    "transformer-full",
    "transformer-window",
    "transformer-chunk",
    "s4",
    "spade-s4-window",
    "spade-s4-chunk",
    "mega-chunk",
)
REFERENCE_MODEL = "spade-s4-window"

TRAIN_COLUMNS = (
    "model", "length", "status", "note", "median_s", "min_s", "max_s", "repeats",
    "first_step_s", "tokens_per_s", "gflop_per_step", "gflops", "pct_of_peak", "peak_mem_mb",
    "peak_rss_mb", "baseline_rss_mb", "params", "trainable_params", "device", "threads",
    "batch_size", "d_model", "n_layers", "n_heads", "d_ff", "d_state", "window_size",
    "chunk_size", "matmul_peak_gflops", "faults_per_step",
)



# --------------------------------------------------------------------------------- models
@dataclass(frozen=True)
class BenchShape:
    """Width / depth / attention sizes shared by every benchmarked model."""

    d_model: int = 512
    n_layers: int = 4
    n_heads: int = 8
    d_ff: int | None = None  # None = 4 * d_model
    d_state: int = 64
    window_size: int = 256
    chunk_size: int = 256
    batch_size: int = 1
    vocab_size: int = 256

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if value is None and name == "d_ff":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads "
                             f"({self.n_heads})")
        if self.d_state % 2:
            raise ValueError(f"d_state must be even (S4 stores conjugate pairs), got "
                             f"{self.d_state}")

    @property
    def ff(self) -> int:
        return self.d_ff if self.d_ff is not None else 4 * self.d_model


# SpadeConfig fields that BenchShape sets for every model alike
_SHAPE_FIELDS = ("vocab_size", "d_model", "n_layers", "n_heads", "d_ff", "window_size",
                 "chunk_size")


def split_model(spec: str) -> tuple[str, dict[str, Any]]:
    """A model of the benchmark, optionally with SpadeConfig fields of its own:
    ``NAME[:FIELD=VALUE[:FIELD=VALUE...]]`` -> (NAME, {FIELD: VALUE}), values read as YAML
    (``mega-chunk:mega_attention_fn=laplace:position=rotary``; a ':' splits only before the next
    ``FIELD=``, so ``s4:ssm_options={n_dims: 4}`` works). The whole spec names the model in the
    CSV, tables and plot. The shape's fields (width, depth, heads, sizes) stay the flags', the
    same for every model; ``ssm_options`` are added to the bench's (S4's d_state)."""
    import dataclasses

    import yaml

    from spadeformer.config import SpadeConfig
    from spadeformer.runconfig import _parse_value

    name, *options = re.split(r":(?=[A-Za-z_]\w*=)", spec)
    fields = {f.name for f in dataclasses.fields(SpadeConfig)}
    overrides: dict[str, Any] = {}
    for option in options:
        key, eq, raw = option.partition("=")
        if not eq or key not in fields:
            close = difflib.get_close_matches(key, sorted(fields), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close and eq else ""
            raise ValueError(f"model option {option!r} of {spec!r} must be FIELD=VALUE with "
                             f"FIELD a SpadeConfig field{hint}, e.g. mega-chunk:position=rotary")
        if key in _SHAPE_FIELDS:
            raise ValueError(f"model option {option!r} of {spec!r}: {key} is part of the "
                             "shape every model shares; set it with the command's flags")
        if key == "causal":
            raise ValueError(f"model option {option!r} of {spec!r}: the benchmark times a "
                             "causal LM's training step, so causal stays True")
        if key in overrides:
            raise ValueError(f"model option {key!r} appears twice in {spec!r}")
        try:
            overrides[key] = _parse_value(raw)
        except yaml.YAMLError as err:
            raise ValueError(f"model option {option!r} of {spec!r}: its value is not valid "
                             f"YAML ({' '.join(str(err).split())})") from None
    if ":" in name or "=" in name:
        raise ValueError(f"model {spec!r} must be NAME[:FIELD=VALUE...], e.g. "
                         "mega-chunk:position=rotary")
    return name, overrides


def check_models(models: list[str], allowed: tuple[str, ...] = MODELS) -> list[str]:
    """``models`` (specs, see :func:`split_model`) if every name is in ``allowed``."""
    bad = [m for m in models if split_model(m)[0] not in allowed]
    if bad or not models:
        close = [c for m in bad for c in difflib.get_close_matches(split_model(m)[0], allowed, 1)]
        hint = f" (did you mean {', '.join(map(repr, close))}?)" if close else ""
        raise ValueError(f"models must be a non-empty list from {list(allowed)} (each "
                         f"optionally NAME:FIELD=VALUE...), got {bad or models}{hint}")
    if len(set(models)) != len(models):
        raise ValueError(f"models must not repeat, got {models}")
    return list(models)


def model_config(spec: str, shape: BenchShape):
    """The SpadeConfig of a benchmarked model (dropout 0: the bench times the math only);
    ``spec`` is a name of :data:`MODELS` with optional fields (:func:`split_model`)."""
    from spadeformer.config import SpadeConfig

    check_models([spec])
    name, options = split_model(spec)
    system = "transformer-full" if name == "transformer-full-eager" else name
    overrides: dict[str, Any] = dict(
        vocab_size=shape.vocab_size, d_model=shape.d_model, n_layers=shape.n_layers,
        n_heads=shape.n_heads, d_ff=shape.ff, dropout=0.0, window_size=shape.window_size,
        chunk_size=shape.chunk_size,
    )
    if system == "s4":
        # The pure S4 baseline trains its SSM; the preset sizes its stack by the size's depth,
        # so name every layer explicitly for our depth.
        overrides["global_layers"] = list(range(shape.n_layers))
        overrides["ssm_options"] = {"d_state": shape.d_state, "trainable": True}
    elif system.startswith("spade-"):
        # SPADE freezes S4 at its HiPPO initialisation (paper Sec. 4.2, Eq. 5).
        overrides["ssm_options"] = {"d_state": shape.d_state, "trainable": False}
    if isinstance(options.get("ssm_options"), dict):
        if "d_state" in options["ssm_options"]:
            raise ValueError(f"model {spec!r}: d_state is part of the shape every model shares; "
                             "set it with --d-state")
        options["ssm_options"] = {**overrides.get("ssm_options", {}), **options["ssm_options"]}
    return SpadeConfig.from_preset(system, "tiny", **{**overrides, **options})


def build_model(spec: str, shape: BenchShape):
    """SpadeForCausalLM for ``spec``; the eager model runs Attention.forward_ref (dense)."""
    from spadeformer.attention import Attention
    from spadeformer.models.heads import SpadeForCausalLM

    model = SpadeForCausalLM(model_config(spec, shape))
    if split_model(spec)[0] == "transformer-full-eager":
        for module in model.modules():
            if isinstance(module, Attention):
                # instance attribute shadows the class method: nn.Module.__call__ -> forward_ref
                module.forward = module.forward_ref
    return model


# --------------------------------------------------------------------------------- FLOPs
def attention_pairs(
    kind: str, length: int, window_size: int, chunk_size: int, batch: int = 1,
    with_bias: bool = False,
) -> int:
    """(query, key) score pairs one head computes over a batch of sequences, forward pass.

    * eager: the dense L x L score matrix per sequence (masked entries are computed too);
    * full (SDPA, causal): the causal triangle L (L + 1) / 2 per sequence -- fused causal
      kernels skip the tiles above the diagonal (their tile rounding is not counted);
    * window, L > w: what :mod:`spadeformer.ops.cpu_window_attn` computes: the batch's
      ceil(L / w) blocks per sequence, flattened, all but the first against 2w keys, plus one
      causal w x w block per sequence (the sequence starts, redone);
    * window, L <= w (the generic blocked kernel of ``ops.local_attn``): one block of L
      queries against L + (L - 1) keys per sequence;
    * chunk: ceil(L / c) causal blocks of c = min(chunk, L) per sequence: c (c + 1) / 2 pairs
      each.
    ``with_bias`` (an additive position bias, Mega's): SDPA then takes the causal mask as a
    dense mask and computes every pair of its blocks: full L^2, chunk c^2 per block, window
    (the generic blocked kernel) ceil(L / w) blocks of w queries against 2w keys per sequence.
    Ragged last blocks are padded and computed too. The window and chunk counts follow the CPU
    kernels; on CUDA the FlexAttention kernel computes the 128 x 128 tiles its block mask
    keeps instead, which these counts do not model.
    """
    L = length
    if kind == "eager":
        return batch * L * L
    if kind == "full":
        return batch * L * L if with_bias else batch * L * (L + 1) // 2
    if kind == "window":
        if L > window_size:
            w = window_size
            if with_bias:
                return batch * math.ceil(L / w) * w * 2 * w
            return (batch * math.ceil(L / w) - 1) * w * 2 * w + batch * w * (w + 1) // 2
        return batch * L * (2 * L - 1)
    if kind == "chunk":
        block = min(chunk_size, L)
        per_block = block * block if with_bias else block * (block + 1) // 2
        return batch * math.ceil(L / block) * per_block
    raise ValueError(f"kind must be one of ['eager', 'full', 'window', 'chunk'], got {kind!r}")


@dataclass(frozen=True)
class FlopCount:
    """Forward FLOPs of one training step's matmuls, split by how backward treats them."""

    trainable_matmul: float  # weights that get gradients: backward = 2x forward (dX, dW)
    frozen_matmul: float  # frozen weights (frozen S4 output block): backward = 1x (dX only)
    attention: float  # QK^T and PV: backward = 2x forward (dQ, dK, dP, dV)

    @property
    def forward(self) -> float:
        return self.trainable_matmul + self.frozen_matmul + self.attention

    @property
    def train_step(self) -> float:
        return 3 * self.trainable_matmul + 2 * self.frozen_matmul + 3 * self.attention


def train_flops(name: str, shape: BenchShape, length: int) -> FlopCount:
    """Analytic matmul FLOPs of one training step (2 FLOPs per multiply-add).

    Per token, forward, with d = d_model, f = d_ff, V = vocab:
      attention projections q, k, v, out: 8 d^2;  feed-forward: 4 d f;
      global layer: concat mix W (2d -> d): 4 d^2;  S4 output linear (d -> d), only where
      the S4 has its pointwise block (the ``s4`` stack; SPADE's S4 has none): 2 d^2;
      LM head (d -> V, tied to the embedding): 2 d V.
    Per attention layer: 4 d * pairs (QK^T and PV over all heads), pairs from
    :func:`attention_pairs`. Training step = 3 x forward, except frozen weights (no dW):
    2 x forward. Not counted: the S4 FFT convolution and kernel generation, norms,
    activations, softmax, the optimizer step.

    Mega blocks (z, v = Mega's widths): V projection 2 d v, fused gate projection
    2 d (2 d + z + v), U_h 2 v d, feed-forward 4 d f per token; the single head's attention
    2 (z + v) * pairs. Not counted: the EMA's kernel and FFT convolution.
    """
    from spadeformer.config import MEGA_POSITIONS

    cfg = model_config(name, shape)
    d, f, V = shape.d_model, shape.ff, shape.vocab_size
    tokens = shape.batch_size * length
    kind = "eager" if split_model(name)[0] == "transformer-full-eager" else cfg.attention
    trainable = frozen = attention = 0.0
    ssm_trainable = bool(cfg.ssm_options.get("trainable", True))
    ssm_pointwise = bool(cfg.ssm_options.get("pointwise", True))
    if cfg.block == "mega":
        z, v = cfg.mega_z_dim, cfg.mega_v_dim
        pairs = attention_pairs(kind, length, shape.window_size, shape.chunk_size,
                                shape.batch_size, with_bias=cfg.position in MEGA_POSITIONS)
        per_token = 2 * d * v + 2 * d * (2 * d + z + v) + 2 * v * d + 4 * d * f
        trainable = cfg.n_layers * per_token * tokens + 2 * d * V * tokens
        return FlopCount(trainable, 0.0, cfg.n_layers * 2 * (z + v) * pairs)
    for layer in cfg.layer_kinds():
        trainable += 4 * d * f * tokens
        if cfg.attention != "none":
            trainable += 8 * d * d * tokens
            pairs = attention_pairs(
                kind, length, shape.window_size, shape.chunk_size, shape.batch_size
            )
            attention += 4 * d * pairs
        if layer == "global":
            out_linear = 2 * d * d * tokens if ssm_pointwise else 0.0
            if ssm_trainable:
                trainable += out_linear
            else:
                frozen += out_linear
            if cfg.attention != "none" and cfg.combine == "concat":
                trainable += 4 * d * d * tokens
    trainable += 2 * d * V * tokens
    return FlopCount(trainable, frozen, attention)


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
