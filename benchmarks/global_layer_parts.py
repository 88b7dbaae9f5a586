"""Where SPADE's extra step time goes: the global layer's parts timed beside whole steps.

    python benchmarks/global_layer_parts.py --length 8192 --rounds 5

In one process, in a fresh random order each round, it times one training step of the
window-only Transformer and of SPADE (S4 + window), and forward + backward of three parts of
SPADE's global layer alone on random (1, L, d_model) inputs: the frozen S4 branch, the concat
mix (two LayerNorms + the 2d -> d projection) and the window attention block. Prints medians.
The same shapes as ``spadeformer bench train`` (d_model 512, 4 layers, window 256).
"""

from __future__ import annotations

import argparse
import statistics

import torch
from random_rounds import print_medians, time_in_random_order, timed

from spadeformer.allocator import reuse_freed_memory
from spadeformer.bench.train_bench import BenchShape, _Trainee


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=8192)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="0 = torch's default")
    args = parser.parse_args()
    reuse_freed_memory()  # as the spadeformer command does
    if args.threads:
        torch.set_num_threads(args.threads)
    L, shape, cpu = args.length, BenchShape(), torch.device("cpu")
    window = _Trainee("transformer-window", shape, L, cpu)
    spade = _Trainee("spade-s4-window", shape, L, cpu)
    layer = spade.model.backbone.layers[0]  # SPADE's global layer (the bottom one)
    h, x_local, x_global = (torch.randn(1, L, shape.d_model, requires_grad=True)
                            for _ in range(3))

    cases = {
        "step: transformer-window": window.step,
        "step: spade-s4-window": spade.step,
        "part: frozen S4 branch": timed(lambda: layer.ssm(h).sum().backward()),
        "part: concat mix (2 LN + 2d->d)": timed(
            lambda: layer._merge(x_local, x_global).sum().backward()),
        "part: window attention block": timed(lambda: layer.attn(h).sum().backward()),
    }
    # one warm-up round: caches, thread pool, the S4 spectrum
    times = time_in_random_order(cases, rounds=args.rounds, seed=L, warmup_rounds=1)
    gap = (statistics.median(times["step: spade-s4-window"])
           - statistics.median(times["step: transformer-window"]))
    print_medians(times, f"L={L}, {args.rounds} rounds, {torch.get_num_threads()} threads", 34)
    print(f"  {'SPADE - window (medians)':<34} {gap:8.3f}")


if __name__ == "__main__":
    main()
