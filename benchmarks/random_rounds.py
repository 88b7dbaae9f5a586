"""Timing helpers shared by the scripts in benchmarks/: cases timed in a fresh random order
each round, so a slow spell of the machine hits every case alike."""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable


def timed(fn: Callable[[], object]) -> Callable[[], float]:
    """fn -> a callable that runs fn once and returns its wall time in seconds."""
    def run() -> float:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0
    return run


def time_in_random_order(cases: dict[str, Callable[[], float]], *, rounds: int, seed: int,
                         warmup_rounds: int = 1) -> dict[str, list[float]]:
    """Each case returns its own time in seconds. Untimed warm-up rounds in the given order
    (caches, thread pool, the heap settling), then ``rounds`` timed rounds, each in a new
    random order -> {case name: its times}."""
    for _ in range(warmup_rounds):
        for fn in cases.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in cases}
    order = random.Random(seed)
    for _ in range(rounds):
        for name in order.sample(list(cases), len(cases)):
            times[name].append(cases[name]())
    return times


def print_medians(times: dict[str, list[float]], header: str, width: int) -> None:
    print(f"{header} (median / min, s)")
    for name, ts in times.items():
        print(f"  {name:<{width}} {statistics.median(ts):8.3f} {min(ts):8.3f}")
