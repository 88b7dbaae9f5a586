"""Helpers shared by the LRA and language-model data pipelines.

Conventions used by every dataset in :mod:`spadeformer.data`:

* items are dicts of tensors ready for the models: classification
  ``{"input_ids": LongTensor (L,), "labels": LongTensor ()}``, retrieval
  ``{"input_ids_1", "input_ids_2", "labels"}``, language modelling ``{"input_ids", "labels"}``
  with labels already shifted (``labels[t]`` is the target at position t) and
  ``IGNORE_INDEX = -100`` where nothing is scored;
* :class:`PadCollate` stacks a list of such items, padding to the batch maximum (or to a fixed
  length) and adding ``padding_mask`` (batch, L) bool, **True = padded** (the library-wide
  convention, see ``spadeformer.ops.fftconv``); retrieval batches get ``padding_mask_1`` and
  ``padding_mask_2``, matching ``SpadeForRetrieval.forward``;
* byte-level text (LRA Text and Retrieval) maps a UTF-8 byte ``b`` to id ``b + 1`` and keeps
  id 0 for padding, so the vocabulary has ``BYTE_VOCAB_SIZE = 257`` entries;
* a missing file or folder raises :class:`FileNotFoundError` naming the path and the layout that
  was expected; a file that exists but cannot be parsed raises :class:`CorruptFileError`
  (a :class:`ValueError`) naming the file and, where known, the line.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Subset

__all__ = [
    "IGNORE_INDEX",
    "PAD_ID",
    "BYTE_OFFSET",
    "BYTE_VOCAB_SIZE",
    "CorruptFileError",
    "PadCollate",
    "RaggedArray",
    "bytes_to_ids",
    "classification_item",
    "import_pil",
    "pad_sequences",
    "require_dir",
    "require_file",
    "split_indices",
    "subset",
]

IGNORE_INDEX = -100  # torch.nn.functional.cross_entropy's default ignore_index
PAD_ID = 0
BYTE_OFFSET = 1  # byte b -> id b + 1; id 0 is padding
BYTE_VOCAB_SIZE = 256 + BYTE_OFFSET


class CorruptFileError(ValueError):
    """A dataset file exists but its content is not in the expected release format."""


def _require(path: str | os.PathLike, layout: str, kind: str) -> Path:
    """``Path(path)`` if it is a ``kind`` ("file" or "directory"), else FileNotFoundError
    naming the path, what it is instead and the expected ``layout``."""
    p = Path(path)
    is_kind = {"file": p.is_file, "directory": p.is_dir}
    if not is_kind[kind]():
        other = "directory" if kind == "file" else "file"
        what = f"is a {other}, not a {kind}" if is_kind[other]() else "does not exist"
        raise FileNotFoundError(f"{p} {what}; expected layout: {layout}")
    return p


def require_file(path: str | os.PathLike, layout: str) -> Path:
    """Return ``Path(path)`` or raise FileNotFoundError naming it and the expected ``layout``."""
    return _require(path, layout, "file")


def require_dir(path: str | os.PathLike, layout: str) -> Path:
    """Return ``Path(path)`` or raise FileNotFoundError naming it and the expected ``layout``."""
    return _require(path, layout, "directory")


def import_pil():
    """Import Pillow lazily (PNG I/O for Pathfinder); it is an optional dependency."""
    try:
        from PIL import Image
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "Pathfinder PNG I/O needs Pillow, which is not installed: "
            "pip install spadeformer[data]  (or: pip install pillow)"
        ) from e
    return Image


def classification_item(ids: np.ndarray, label: Any) -> dict[str, torch.Tensor]:
    """One classification example: ids (L,) of any integer dtype and an integer label ->
    ``{"input_ids": LongTensor (L,), "labels": LongTensor ()}``."""
    return {
        "input_ids": torch.from_numpy(ids.astype(np.int64)),
        "labels": torch.tensor(int(label)),
    }


def bytes_to_ids(data: bytes, max_length: int | None = None) -> np.ndarray:
    """UTF-8 bytes -> uint16 ids ``b + BYTE_OFFSET`` (1..256), truncated to ``max_length``."""
    arr = np.frombuffer(data[:max_length] if max_length is not None else data, dtype=np.uint8)
    return arr.astype(np.uint16) + BYTE_OFFSET


class RaggedArray:
    """Many variable-length 1-D integer sequences in one flat array plus offsets.

    Holding 100k sequences as one buffer keeps memory close to the raw data size and makes
    datasets cheap to pickle into DataLoader workers.
    """

    def __init__(self, sequences: Sequence[np.ndarray], dtype: np.dtype | type = np.int64):
        lengths = np.fromiter((len(s) for s in sequences), dtype=np.int64, count=len(sequences))
        self.offsets = np.zeros(len(sequences) + 1, dtype=np.int64)
        np.cumsum(lengths, out=self.offsets[1:])
        self.data = (
            np.concatenate([np.asarray(s, dtype=dtype) for s in sequences])
            if len(sequences)
            else np.zeros(0, dtype=dtype)
        )

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> np.ndarray:
        return self.data[self.offsets[i] : self.offsets[i + 1]]

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)


def pad_sequences(
    sequences: Sequence[torch.Tensor], pad_id: int = PAD_ID, length: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad 1-D LongTensors.

    Returns ``(ids (batch, L), padding_mask (batch, L) bool, True = padded)`` where ``L`` is
    ``length`` if given (sequences longer than it raise) else the batch maximum.
    """
    if len(sequences) == 0:
        raise ValueError("pad_sequences needs at least one sequence, got an empty list")
    longest = max(int(s.shape[0]) for s in sequences)
    if length is None:
        length = longest
    elif longest > length:
        raise ValueError(
            f"length={length} is shorter than the longest sequence in the batch ({longest}); "
            "truncate in the dataset or pass length=None to pad to the batch maximum"
        )
    ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    mask = torch.ones((len(sequences), length), dtype=torch.bool)
    for i, s in enumerate(sequences):
        n = int(s.shape[0])
        ids[i, :n] = s
        mask[i, :n] = False
    return ids, mask


@dataclass
class PadCollate:
    """``collate_fn`` for DataLoader: pads ``input_ids`` (and ``input_ids_1/2``) and adds masks.

    Args:
        pad_id: id written at padded positions (0 for every vocabulary in this package).
        length: pad every batch to this fixed length instead of the batch maximum.

    A classification batch becomes ``{"input_ids" (B, L), "padding_mask" (B, L), "labels" (B,)}``;
    a retrieval batch ``{"input_ids_1", "padding_mask_1", "input_ids_2", "padding_mask_2",
    "labels"}``. Other tensor keys of equal shape (e.g. LM ``labels``) are stacked; LM labels
    of unequal length are padded with ``IGNORE_INDEX``.
    """

    pad_id: int = PAD_ID
    length: int | None = None

    def __call__(self, batch: Sequence[dict[str, torch.Tensor]]) -> dict[str, Any]:
        if len(batch) == 0:
            raise ValueError("PadCollate got an empty batch")
        out: dict[str, Any] = {}
        for key in batch[0]:
            values = [item[key] for item in batch]
            if key.startswith("input_ids"):
                ids, mask = pad_sequences(values, self.pad_id, self.length)
                out[key] = ids
                out["padding_mask" + key[len("input_ids") :]] = mask
            elif all(v.shape == values[0].shape for v in values):
                out[key] = torch.stack(values)
            else:  # token-level labels of ragged LM windows
                out[key], _ = pad_sequences(values, IGNORE_INDEX, self.length)
        return out


def split_indices(
    n: int, fractions: Sequence[float], seed: int = 0
) -> list[np.ndarray]:
    """Deterministic random partition of ``range(n)`` into parts of the given ``fractions``.

    The fractions must be positive and sum to 1; the last part takes the rounding remainder.
    """
    if any(f <= 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"fractions must be positive and sum to 1, got {list(fractions)}")
    perm = np.random.default_rng(seed).permutation(n)
    bounds = np.round(np.cumsum(fractions)[:-1] * n).astype(int)
    return [np.sort(p) for p in np.split(perm, bounds)]


def subset(dataset: Dataset, indices: np.ndarray) -> Subset:
    """``torch.utils.data.Subset`` with plain int indices, e.g. a validation split carved out
    of CIFAR-10's training set with :func:`split_indices`."""
    return Subset(dataset, [int(i) for i in indices])
