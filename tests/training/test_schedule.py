import math

import pytest
import torch

from spadeformer.training.schedule import build_scheduler, lr_factor


def test_linear_warmup_then_decay_values():
    # W=4, T=12, m=0.1: warmup (t+1)/4, then 1 - 0.9 * (t - 4) / 8: the first update after
    # warm-up at the full lr, the last (t=11) still above the floor, the floor from t=T on.
    got = [lr_factor(t, total_steps=12, warmup_steps=4, schedule="linear", min_lr_ratio=0.1)
           for t in range(14)]
    want = [0.25, 0.5, 0.75, 1.0,
            1.0, 1 - 0.9 / 8, 1 - 0.9 * 2 / 8, 1 - 0.9 * 3 / 8,
            1 - 0.9 * 4 / 8, 1 - 0.9 * 5 / 8, 1 - 0.9 * 6 / 8, 1 - 0.9 * 7 / 8,
            0.1, 0.1]  # past the end it stays at the floor
    assert got == pytest.approx(want, abs=1e-12)


def test_every_update_moves_the_weights():
    # with the default floor 0 no update runs at lr 0, even a one-step run's
    for total, warmup in [(1, 0), (4, 0), (4, 2), (5, 5)]:
        for schedule in ("linear", "cosine"):
            factors = [lr_factor(t, total_steps=total, warmup_steps=warmup, schedule=schedule)
                       for t in range(total)]
            assert min(factors) > 0 and max(factors) == 1.0, (total, warmup, schedule, factors)


def test_cosine_values():
    got = [lr_factor(t, total_steps=10, warmup_steps=2, schedule="cosine", min_lr_ratio=0.0)
           for t in range(10)]
    assert got[:2] == pytest.approx([0.5, 1.0])
    # Half-way through the decay (p = 4/8) the cosine factor is exactly 1/2.
    assert got[6] == pytest.approx(0.5, abs=1e-12)
    assert got[2] == pytest.approx(1.0, abs=1e-12)
    assert got[3] == pytest.approx(0.5 * (1 + math.cos(math.pi / 8)), abs=1e-12)
    assert got[-1] == pytest.approx(0.5 * (1 + math.cos(math.pi * 7 / 8)), abs=1e-12)
    assert all(a >= b for a, b in zip(got[1:], got[2:], strict=False))  # non-increasing


def test_constant_and_no_warmup():
    assert [lr_factor(t, total_steps=5, warmup_steps=2, schedule="constant") for t in range(5)] \
        == [0.5, 1.0, 1.0, 1.0, 1.0]
    assert [lr_factor(t, total_steps=4, schedule="linear") for t in range(4)] == pytest.approx(
        [1.0, 0.75, 0.5, 0.25])


def test_scheduler_drives_every_group_with_its_own_base_lr():
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([{"params": [a], "lr": 1e-2}, {"params": [b], "lr": 1e-3}])
    sched = build_scheduler(opt, total_steps=6, warmup_steps=2, schedule="linear",
                            min_lr_ratio=0.0)
    seen = []
    for t in range(6):
        seen.append([g["lr"] for g in opt.param_groups])
        want = lr_factor(t, total_steps=6, warmup_steps=2, schedule="linear")
        assert seen[-1] == pytest.approx([1e-2 * want, 1e-3 * want], rel=1e-12)
        opt.step()
        sched.step()
    assert seen[0] == pytest.approx([5e-3, 5e-4])
    # Round trip through state_dict (the checkpoint path) keeps the position.
    sched2 = build_scheduler(opt, total_steps=6, warmup_steps=2)
    sched2.load_state_dict(sched.state_dict())
    assert sched2.last_epoch == sched.last_epoch == 6


@pytest.mark.parametrize("kwargs, match", [
    ({"total_steps": 0}, "total_steps"),
    ({"total_steps": 5, "warmup_steps": 6}, "warmup_steps"),
    ({"total_steps": 5, "schedule": "step"}, "schedule"),
    ({"total_steps": 5, "min_lr_ratio": 1.5}, "min_lr_ratio"),
])
def test_bad_arguments_name_themselves(kwargs, match):
    with pytest.raises(ValueError, match=match):
        lr_factor(0, **kwargs)
