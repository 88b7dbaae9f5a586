"""A byte-level language-modelling corpus made of the Python standard library's own source.

Every machine with Python has it, so the LM demo and tests need no download. Vocabulary: the
256 byte values. Choices (all deterministic):

- files: ``*.py`` under the root (default ``sysconfig.get_paths()["stdlib"]``), never inside
  ``site-packages`` / ``dist-packages`` / ``__pycache__``; test suites (a path component named
  ``test``, ``tests`` or ``idle_test``) only with ``include_tests=True`` (they are larger than
  the library itself and full of deliberately odd bytes);
- split: by the SHA-1 of the file's relative POSIX path, so a file never moves between splits
  when files are added or removed, and the split is disjoint by file (no near-duplicate leakage
  between train and val across a file boundary); default 90 / 5 / 5;
- order: files sorted by relative path and joined with :data:`FILE_SEPARATOR`;
- ``max_bytes`` keeps only the first bytes of each split, for tiny runs.

The concatenated bytes are cached in memory per (root, options).
"""

from __future__ import annotations

import hashlib
import math
import os
import sysconfig
import threading
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = [
    "VOCAB_SIZE",
    "FILE_SEPARATOR",
    "SPLITS",
    "ByteCorpus",
    "BlockDataset",
    "assign_split",
    "list_source_files",
    "load_split",
    "stdlib_root",
    "unigram_bpb",
    "unigram_bpb_ref",
]

VOCAB_SIZE = 256
# "\x1c" is ASCII FILE SEPARATOR: a control byte that does not occur in the stdlib's source,
# framed by newlines so a file boundary also ends a line.
FILE_SEPARATOR = b"\n\x1c\n"
SPLITS = ("train", "val", "test")
_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})
_TEST_DIRS = frozenset({"test", "tests", "idle_test"})

_CACHE: dict[tuple, dict[str, np.ndarray]] = {}
_CACHE_LOCK = threading.Lock()


def stdlib_root() -> Path:
    """The directory of the running interpreter's standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


def list_source_files(root: str | os.PathLike | None = None, *,
                      include_tests: bool = False) -> list[str]:
    """Sorted relative POSIX paths of the ``*.py`` files under ``root`` (see module doc)."""
    root_path = Path(root) if root is not None else stdlib_root()
    if not root_path.is_dir():
        raise FileNotFoundError(f"root must be an existing directory, got {str(root_path)!r}")
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root_path):
        rel_dir = Path(dirpath).relative_to(root_path)
        skip = _SKIP_DIRS if include_tests else _SKIP_DIRS | _TEST_DIRS
        # Prune in place so os.walk does not descend (site-packages can be huge).
        dirnames[:] = [d for d in dirnames if d not in skip]
        for name in filenames:
            if name.endswith(".py"):
                found.append((rel_dir / name).as_posix())
    return sorted(found)


def _check_fractions(fractions: Sequence[float]) -> tuple[float, float, float]:
    if (len(fractions) != 3 or any(f < 0 for f in fractions)
            or not math.isclose(sum(fractions), 1.0)):
        raise ValueError(
            f"fractions must be three non-negative numbers (train, val, test) summing to 1, "
            f"got {tuple(fractions)!r}"
        )
    return (float(fractions[0]), float(fractions[1]), float(fractions[2]))


def assign_split(rel_path: str, fractions: Sequence[float] = (0.9, 0.05, 0.05)) -> str:
    """"train", "val" or "test" for a relative path, from the SHA-1 of the path."""
    f_train, f_val, _ = _check_fractions(fractions)
    digest = hashlib.sha1(rel_path.encode("utf-8")).digest()
    u = int.from_bytes(digest[:8], "big") / 2.0**64  # uniform in [0, 1)
    if u < f_train:
        return "train"
    return "val" if u < f_train + f_val else "test"


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def _build(root: Path, include_tests: bool, fractions: tuple[float, float, float],
           max_bytes: int | None) -> dict[str, np.ndarray]:
    files = list_source_files(root, include_tests=include_tests)
    parts: dict[str, list[bytes]] = {s: [] for s in SPLITS}
    sizes = dict.fromkeys(SPLITS, 0)
    for rel in files:
        split = assign_split(rel, fractions)
        if max_bytes is not None and sizes[split] >= max_bytes:
            continue  # this split is already full; skip reading more files for it
        data = (root / rel).read_bytes()
        parts[split].append(data)
        sizes[split] += len(data) + len(FILE_SEPARATOR)
    out: dict[str, np.ndarray] = {}
    for split in SPLITS:
        joined = FILE_SEPARATOR.join(parts[split])
        if max_bytes is not None:
            joined = joined[:max_bytes]
        arr = np.frombuffer(joined, dtype=np.uint8).copy()
        arr.flags.writeable = False
        out[split] = arr
    return out


def _load_all(root: str | os.PathLike | None, include_tests: bool, fractions: Sequence[float],
              max_bytes: int | None) -> dict[str, np.ndarray]:
    root_path = (Path(root) if root is not None else stdlib_root()).resolve()
    fr = _check_fractions(fractions)
    if max_bytes is not None and (isinstance(max_bytes, bool) or not isinstance(max_bytes, int)
                                  or max_bytes <= 0):
        raise ValueError(f"max_bytes must be a positive integer or None, got {max_bytes!r}")
    key = (str(root_path), bool(include_tests), fr, max_bytes)
    with _CACHE_LOCK:
        if key not in _CACHE:
            _CACHE[key] = _build(root_path, include_tests, fr, max_bytes)
        return _CACHE[key]


def load_split(split: str, *, root: str | os.PathLike | None = None, include_tests: bool = False,
               fractions: Sequence[float] = (0.9, 0.05, 0.05),
               max_bytes: int | None = None) -> torch.Tensor:
    """The bytes of one split as a 1-d uint8 tensor (a fresh copy of the in-memory cache)."""
    _check_split(split)
    arr = _load_all(root, include_tests, fractions, max_bytes)[split]
    return torch.from_numpy(arr.copy())


def unigram_bpb(train: torch.Tensor, data: torch.Tensor) -> float:
    """Bits per byte of ``data`` under the train split's byte frequencies, add-one smoothed:
    p(b) = (count_train(b) + 1) / (len(train) + 256). Vectorised twin of ``unigram_bpb_ref``."""
    if data.numel() == 0:
        raise ValueError("data must hold at least one byte, got an empty tensor")
    counts = torch.bincount(train.flatten().long(), minlength=VOCAB_SIZE).double()
    log2_p = torch.log2((counts + 1.0) / (train.numel() + VOCAB_SIZE))
    # Sum over byte values weighted by how often each occurs in data: exact and O(256).
    data_counts = torch.bincount(data.flatten().long(), minlength=VOCAB_SIZE).double()
    return float(-(data_counts * log2_p).sum() / data.numel())


def unigram_bpb_ref(train: bytes, data: bytes) -> float:
    """Pure-Python reference for :func:`unigram_bpb` (one log per byte of ``data``)."""
    counts = [0] * VOCAB_SIZE
    for b in train:
        counts[b] += 1
    total = len(train) + VOCAB_SIZE
    return -sum(math.log2((counts[b] + 1) / total) for b in data) / len(data)


def _numpy_bytes_to_tensor(data: np.ndarray) -> torch.Tensor:
    """A numpy array of byte values as a uint8 tensor. A uint8 array (e.g. a memmap of a
    corpus larger than RAM) is shared, not copied; other integer dtypes are range-checked
    and narrowed to one byte per value (never widened to int64 first)."""
    if data.dtype.kind not in "ui":
        raise ValueError(f"data must hold integer byte values, got a numpy {data.dtype}")
    if data.dtype != np.uint8:
        if data.size and (int(data.min()) < 0 or int(data.max()) > 255):
            raise ValueError(f"data must hold byte values 0..255, got numpy {data.dtype} "
                             f"values in [{int(data.min())}, {int(data.max())}]")
        data = data.astype(np.uint8)
    data = np.ascontiguousarray(data)
    if not data.flags.writeable:
        # A read-only memmap: torch warns that writes would be undefined; this dataset only
        # ever reads its bytes, so share the buffer instead of copying it.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*not writable.*")
            return torch.from_numpy(data)
    return torch.from_numpy(data)


class BlockDataset(Dataset):
    """Contiguous blocks of ``seq_len + 1`` bytes: ``input_ids`` = the first ``seq_len``,
    ``labels`` = the next byte at each position (already shifted; int64, shape (seq_len,)).

    Block ``i`` starts at byte ``i * stride`` (default ``stride = seq_len``: blocks tile the
    data, each sharing its last byte with the next block's first so every byte is a target
    exactly once). The tail shorter than a block is dropped.
    """

    def __init__(self, data: torch.Tensor | np.ndarray | bytes, seq_len: int,
                 stride: int | None = None) -> None:
        if isinstance(data, bytes | bytearray):
            data = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        elif isinstance(data, np.ndarray):
            data = _numpy_bytes_to_tensor(data)
        if not isinstance(data, torch.Tensor) or data.dim() != 1:
            raise ValueError(f"data must be a 1-d byte tensor, got {type(data).__name__} "
                             f"of shape {tuple(getattr(data, 'shape', ()))}")
        if data.dtype != torch.uint8:  # a cast would wrap 300 to 44 and -1 to 255
            if data.dtype.is_floating_point or data.dtype.is_complex or data.dtype == torch.bool:
                raise ValueError(f"data must hold integer byte values, got {data.dtype}")
            if data.numel() and (int(data.min()) < 0 or int(data.max()) > 255):
                raise ValueError(
                    f"data must hold byte values 0..255, got {data.dtype} values in "
                    f"[{int(data.min())}, {int(data.max())}]"
                )
        if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len <= 0:
            raise ValueError(f"seq_len must be a positive integer, got {seq_len!r}")
        stride = seq_len if stride is None else stride
        if isinstance(stride, bool) or not isinstance(stride, int) or stride <= 0:
            raise ValueError(f"stride must be a positive integer, got {stride!r}")
        if data.numel() < seq_len + 1:
            raise ValueError(f"data has {data.numel()} bytes, fewer than one block of "
                             f"seq_len + 1 = {seq_len + 1}")
        self.data = data if data.dtype == torch.uint8 else data.to(torch.uint8)
        self.seq_len = seq_len
        self.stride = stride
        self._len = (data.numel() - (seq_len + 1)) // stride + 1

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        """-> {"input_ids": (seq_len,) int64, "labels": (seq_len,) int64}"""
        if index < 0:
            index += self._len
        if not 0 <= index < self._len:
            raise IndexError(f"block index {index} out of range for {self._len} blocks")
        start = index * self.stride
        block = self.data[start : start + self.seq_len + 1].long()
        return {"input_ids": block[:-1], "labels": block[1:]}

    def get_batch(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        """Vectorised ``collate([self[i] for i in indices])``: (batch, seq_len) int64 each."""
        idx = torch.as_tensor(list(indices), dtype=torch.long)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self._len):
            raise IndexError(f"block indices must lie in [0, {self._len}), got {idx.tolist()}")
        offsets = idx[:, None] * self.stride + torch.arange(self.seq_len + 1)[None, :]
        blocks = self.data[offsets].long()  # (batch, seq_len + 1)
        return {"input_ids": blocks[:, :-1], "labels": blocks[:, 1:]}


class ByteCorpus:
    """The stdlib (or any directory's) ``*.py`` bytes, split by file into train / val / test.

    >>> corpus = ByteCorpus(max_bytes=1_000_000)
    >>> train = corpus.dataset("train", seq_len=512)     # BlockDataset
    >>> corpus.unigram_bpb("val")                       # the baseline to beat
    """

    vocab_size = VOCAB_SIZE

    def __init__(self, root: str | os.PathLike | None = None, *, include_tests: bool = False,
                 fractions: Sequence[float] = (0.9, 0.05, 0.05),
                 max_bytes: int | None = None) -> None:
        self.root = (Path(root) if root is not None else stdlib_root()).resolve()
        self.include_tests = include_tests
        self.fractions = _check_fractions(fractions)
        self.max_bytes = max_bytes
        _load_all(self.root, include_tests, self.fractions, max_bytes)  # validate + warm cache

    def files(self, split: str) -> list[str]:
        """Sorted relative paths of the files assigned to ``split`` (before ``max_bytes``)."""
        _check_split(split)
        return [f for f in list_source_files(self.root, include_tests=self.include_tests)
                if assign_split(f, self.fractions) == split]

    def bytes(self, split: str) -> torch.Tensor:
        """(num_bytes,) uint8: the split's files joined with FILE_SEPARATOR."""
        return load_split(split, root=self.root, include_tests=self.include_tests,
                          fractions=self.fractions, max_bytes=self.max_bytes)

    def dataset(self, split: str, seq_len: int, stride: int | None = None) -> BlockDataset:
        return BlockDataset(self.bytes(split), seq_len, stride)

    def unigram_bpb(self, split: str = "val") -> float:
        """Bits per byte of ``split`` under the add-one-smoothed train byte frequencies."""
        return unigram_bpb(self.bytes("train"), self.bytes(split))
