"""Deterministic sampling and collation shared by every task.

The trainer never uses a shuffling ``DataLoader``: the order in which examples are seen is a
pure function of ``(seed, position)`` (position = how many examples the run has consumed), so a
run resumed from a checkpoint that stores ``position`` sees exactly the same batches as the
uninterrupted run, and every data-parallel rank can cut its own shard of the same global batch.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

__all__ = ["EpochSampler", "collate_batch", "fetch_batch", "PAD_ID"]

PAD_ID = 0  # byte 0 / token 0 fills padded positions; padding_mask says which they are


class EpochSampler:
    """An endless stream of dataset indices, epoch after epoch.

    Epoch ``e`` is a permutation of ``range(num_items)`` drawn from a generator seeded with
    ``(seed, e)`` (or the identity when ``shuffle=False``); stream position ``p`` is item
    ``p % num_items`` of epoch ``p // num_items``. Nothing depends on global RNG state.
    """

    def __init__(self, num_items: int, seed: int = 0, shuffle: bool = True) -> None:
        if isinstance(num_items, bool) or not isinstance(num_items, int) or num_items <= 0:
            raise ValueError(f"num_items must be a positive integer, got {num_items!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        self.num_items = num_items
        self.seed = seed
        self.shuffle = shuffle
        self._epoch: int | None = None
        self._perm: np.ndarray | None = None

    def permutation(self, epoch: int) -> np.ndarray:
        """The order of epoch ``epoch`` (int64 array of length num_items)."""
        if self._epoch != epoch:
            if self.shuffle:
                # SeedSequence mixes (seed, epoch) so neighbouring seeds give unrelated orders.
                rng = np.random.default_rng([self.seed, epoch])
                self._perm = rng.permutation(self.num_items)
            else:
                self._perm = np.arange(self.num_items)
            self._epoch = epoch
        assert self._perm is not None
        return self._perm

    def indices(self, position: int, count: int) -> list[int]:
        """The ``count`` indices starting at stream position ``position`` (may span epochs)."""
        if position < 0 or count < 0:
            raise ValueError(f"position and count must be >= 0, got {position}, {count}")
        out: list[int] = []
        while len(out) < count:
            epoch, offset = divmod(position + len(out), self.num_items)
            take = min(count - len(out), self.num_items - offset)
            out.extend(self.permutation(epoch)[offset : offset + take].tolist())
        return out


def collate_batch(items: Sequence[Mapping[str, Any]],
                  pad_id: int = PAD_ID) -> dict[str, torch.Tensor]:
    """Stack a list of example dicts into a batch dict.

    Tensors with equal shapes are stacked. 1-d tensors of different lengths (variable-length
    ``input_ids`` / per-token ``labels``) are right-padded: ``input_ids`` with ``pad_id``,
    ``labels`` with -100 (ignored by the loss), anything else with 0, and a
    ``padding_mask`` (batch, length) bool, True = padded, is added from ``input_ids`` -- only
    then: a batch whose items all have one length has no ``padding_mask`` key (use
    :class:`~spadeformer.data.lra_common.PadCollate` for a mask in every batch).
    Python numbers become tensors.
    """
    if len(items) == 0:
        raise ValueError("collate_batch needs at least one item, got an empty list")
    keys = list(items[0].keys())
    batch: dict[str, torch.Tensor] = {}
    padded_lengths: list[int] | None = None
    for key in keys:
        values = [torch.as_tensor(item[key]) for item in items]
        shapes = {tuple(v.shape) for v in values}
        if len(shapes) == 1:
            batch[key] = torch.stack(values)
            continue
        if any(v.dim() != 1 for v in values):
            raise ValueError(f"cannot collate {key!r}: shapes differ and are not 1-d: "
                             f"{sorted(shapes)}")
        fill = pad_id if key == "input_ids" else (-100 if key == "labels" else 0)
        length = max(v.shape[0] for v in values)
        out = values[0].new_full((len(values), length), fill)
        for i, v in enumerate(values):
            out[i, : v.shape[0]] = v
        batch[key] = out
        if key == "input_ids":
            padded_lengths = [v.shape[0] for v in values]
    if padded_lengths is not None and "padding_mask" not in batch:
        length = batch["input_ids"].shape[1]
        lengths = torch.tensor(padded_lengths)
        batch["padding_mask"] = torch.arange(length)[None, :] >= lengths[:, None]
    return batch


def fetch_batch(
    dataset: Any,
    indices: Sequence[int],
    collate_fn: Callable[[list[Any]], dict[str, torch.Tensor]] | None = None,
) -> dict[str, torch.Tensor]:
    """Gather ``dataset[i]`` for ``i`` in ``indices`` into one batch dict.

    A dataset with a vectorised ``get_batch(indices)`` (e.g. :class:`BlockDataset`) is asked
    directly unless a custom ``collate_fn`` is given.
    """
    if collate_fn is None and hasattr(dataset, "get_batch"):
        return dataset.get_batch(list(indices))
    items = [dataset[i] for i in indices]
    return (collate_fn or collate_batch)(items)
