"""Learning-rate schedules: linear warmup, then linear decay, cosine decay or constant.

Indexing: ``t`` is the 0-based index of the optimiser update, so update ``t`` uses
``lr * lr_factor(t)``. ``LambdaLR`` calls the factor with its ``last_epoch`` counter, which is 0
before the first ``scheduler.step()``, so the two agree when the trainer steps the scheduler once
after every optimiser update.

    warmup (t < W):   (t + 1) / W                        reaches 1 on the last warmup update
    after warmup:     p = (t - W) / (T - W)               0 on the first update after warmup
        linear:       1 - (1 - m) p                       (paper Table 10: linear decay)
        cosine:       m + (1 - m) (1 + cos(pi p)) / 2
        constant:     1
    (W = warmup_steps, T = total_steps, m = min_lr_ratio; factors clamp at m for t >= T)

So the first update after warm-up uses the full learning rate and the last one still moves
the weights (p = 1 - 1 / (T - W) < 1; with the default m = 0 a factor of 1 / (T - W)), as in
fairseq and Hugging Face; no update is wasted at a zero learning rate.
"""

from __future__ import annotations

import functools
import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

__all__ = ["SCHEDULES", "lr_factor", "build_scheduler"]

SCHEDULES = ("linear", "cosine", "constant")


def _check(total_steps: int, warmup_steps: int, schedule: str, min_lr_ratio: float) -> None:
    if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps <= 0:
        raise ValueError(f"total_steps must be a positive integer, got {total_steps!r}")
    if (isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int)
            or not 0 <= warmup_steps <= total_steps):
        raise ValueError(f"warmup_steps must be an integer in [0, total_steps={total_steps}], "
                         f"got {warmup_steps!r}")
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"min_lr_ratio must lie in [0, 1], got {min_lr_ratio!r}")


def lr_factor(t: int, *, total_steps: int, warmup_steps: int = 0, schedule: str = "linear",
              min_lr_ratio: float = 0.0) -> float:
    """Multiplier of the base learning rate for 0-based update ``t`` (see module doc)."""
    _check(total_steps, warmup_steps, schedule, min_lr_ratio)
    if t < 0:
        raise ValueError(f"t must be >= 0, got {t}")
    if t < warmup_steps:
        return (t + 1) / warmup_steps
    if schedule == "constant" or total_steps == warmup_steps:
        return 1.0
    p = min(1.0, (t - warmup_steps) / (total_steps - warmup_steps))
    if schedule == "linear":
        return 1.0 - (1.0 - min_lr_ratio) * p
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * p))


def build_scheduler(optimizer: Optimizer, *, total_steps: int, warmup_steps: int = 0,
                    schedule: str = "linear", min_lr_ratio: float = 0.0) -> LambdaLR:
    """A ``LambdaLR`` applying :func:`lr_factor` to every parameter group's own base lr (so an
    SSM group with its own lr follows the same shape). Step it once per optimiser update."""
    _check(total_steps, warmup_steps, schedule, min_lr_ratio)
    # A partial of a module-level function: LambdaLR.state_dict() then stores no closure.
    fn = functools.partial(lr_factor, total_steps=total_steps, warmup_steps=warmup_steps,
                           schedule=schedule, min_lr_ratio=min_lr_ratio)
    return LambdaLR(optimizer, lr_lambda=fn)
