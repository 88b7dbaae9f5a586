"""The CPU causal-window path (key bands as views) against the generic blocked path it replaced.

    python benchmarks/window_path_ab.py --length 8192 --rounds 7

In one process, in a fresh random order each round, it times forward + backward of the window
attention alone (batch 1, 8 heads, head_dim 64, window 256, q / k / v laid out as a projection
gives them) and one training step of the window-only Transformer, each with the view path of
``spadeformer.ops.cpu_window_attn`` and with it switched off (``supported`` patched to False,
so ``sliding_window_attention`` takes ``_blocked_attention``). Prints medians.
"""

from __future__ import annotations

import argparse
from unittest import mock

import torch
from random_rounds import print_medians, time_in_random_order, timed

from spadeformer.allocator import reuse_freed_memory
from spadeformer.bench.train_bench import BenchShape, _Trainee
from spadeformer.ops import cpu_window_attn
from spadeformer.ops.local_attn import sliding_window_attention


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=8192)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    reuse_freed_memory()  # as the spadeformer command does
    L, shape = args.length, BenchShape()
    heads, head_dim = shape.n_heads, shape.d_model // shape.n_heads
    x = torch.randn(1, L, 3, heads, head_dim)
    q, k, v = (t.transpose(1, 2).requires_grad_(True) for t in x.unbind(2))
    grad = torch.randn(1, L, heads, head_dim).transpose(1, 2)
    model = _Trainee("transformer-window", shape, L, torch.device("cpu"))

    attention = timed(
        lambda: sliding_window_attention(q, k, v, shape.window_size).backward(grad))

    def generic(fn):
        def run() -> float:
            with mock.patch.object(cpu_window_attn, "supported", return_value=False):
                return fn()
        return run

    cases = {
        "attention fwd+bwd, view path": attention,
        "attention fwd+bwd, generic": generic(attention),
        "window-model step, view path": model.step,
        "window-model step, generic": generic(model.step),
    }
    # two warm-up rounds: caches, thread pool, the heap settling
    times = time_in_random_order(cases, rounds=args.rounds, seed=L, warmup_rounds=2)
    print_medians(times, f"L={L}, {args.rounds} rounds, {torch.get_num_threads()} threads", 30)


if __name__ == "__main__":
    main()
