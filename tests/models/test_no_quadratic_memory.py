"""Nothing in a SPADE training step allocates O(L^2): every tensor any op produces, forward and
backward, is watched, and the largest must grow linearly with the sequence length.

Only the full-attention reference path (the paper's eager baseline) may build (L, L) scores;
it is watched too, so the check is shown to catch a quadratic tensor.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from spadeformer.bench.train_bench import BenchShape, build_model

SHAPE = BenchShape(d_model=16, n_layers=2, n_heads=2, d_state=8, window_size=32, chunk_size=32)


class LargestTensor(TorchDispatchMode):
    """Records the largest element count of any tensor an op returns while active."""

    def __init__(self):
        super().__init__()
        self.largest = 0
        self.op = ""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.numel() > self.largest:
                self.largest, self.op = t.numel(), str(func)
        return out


def largest_tensor_of_a_training_step(name: str, length: int) -> tuple[int, str]:
    torch.manual_seed(0)
    model = build_model(name, SHAPE)
    ids = torch.randint(0, SHAPE.vocab_size, (1, length))
    with LargestTensor() as watch:
        model(ids, labels=ids).loss.backward()
    return watch.largest, watch.op


@pytest.mark.parametrize("name", ["spade-s4-window", "spade-s4-chunk", "transformer-window",
                                  "transformer-chunk", "s4", "transformer-full"])
def test_largest_tensor_grows_linearly(name):
    small, _ = largest_tensor_of_a_training_step(name, 2048)
    big, op = largest_tensor_of_a_training_step(name, 4096)
    assert big <= 2.05 * small, f"{name}: {op} grew {big / small:.2f}x when L doubled"
    assert big < 4096**2 / 8, f"{name}: {op} holds {big} elements at L=4096"


def test_the_watch_sees_the_eager_baseline_quadratic_scores():
    small, _ = largest_tensor_of_a_training_step("transformer-full-eager", 512)
    big, _ = largest_tensor_of_a_training_step("transformer-full-eager", 1024)
    assert big >= 1024**2 and big >= 3.9 * small
