"""LRA Text: byte-level document classification from a folder-per-class layout (IMDB).

Layout read by :class:`ByteTextClassificationDataset` (the aclImdb release is one instance)::

    <root>/<split>/<class_a>/*.txt
    <root>/<split>/<class_b>/*.txt
    ...

Class ids follow the sorted folder names (``sorted(classes)``): for IMDB ``neg`` = 0,
``pos`` = 1, as in TFDS ``imdb_reviews`` that LRA used. aclImdb's ``train/unsup`` folder holds
unlabelled reviews, so :func:`imdb` passes ``classes=("neg", "pos")`` explicitly; with
``classes=None`` every sub-folder is a class.

Encoding: the file's raw bytes, checked to be UTF-8, each byte b -> id ``b + 1`` (id 0 is
padding, ``vocab_size`` 257, see :mod:`spadeformer.data.lra_common`), truncated to
``max_length`` bytes (LRA Text: 4096). Nothing else is stripped (IMDB's ``<br />`` tags stay,
as in the LRA input pipeline). Files are read once, at construction.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from spadeformer.data.lra_common import (
    BYTE_VOCAB_SIZE,
    CorruptFileError,
    RaggedArray,
    bytes_to_ids,
    classification_item,
    require_dir,
)

__all__ = ["ByteTextClassificationDataset", "imdb"]

_LAYOUT = "<root>/<split>/<class>/*.txt, one sub-folder per class (e.g. aclImdb/train/pos/*.txt)"


class ByteTextClassificationDataset(Dataset):
    """Byte-level text classification from one folder per class.

    Args:
        root: data set root (e.g. the ``aclImdb`` folder).
        split: sub-folder of ``root`` holding the class folders (``"train"``, ``"test"``), or
            None when the class folders sit directly in ``root``.
        classes: class folder names; None = every sub-folder. Ids follow ``sorted(classes)``.
        max_length: keep the first ``max_length`` bytes of each document (LRA Text: 4096).
        pattern: file glob inside a class folder.

    Items: ``{"input_ids": LongTensor (L <= max_length,) of ids 1..256, "labels": LongTensor ()}``.
    Attributes: ``classes`` (sorted names), ``files`` (paths), ``vocab_size`` = 257.
    """

    vocab_size = BYTE_VOCAB_SIZE

    def __init__(
        self,
        root: str | os.PathLike,
        split: str | None = "train",
        classes: Sequence[str] | None = None,
        max_length: int = 4096,
        pattern: str = "*.txt",
    ):
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        base = require_dir(root, _LAYOUT)
        if split is not None:
            base = require_dir(base / split, _LAYOUT)
        if classes is None:
            # hidden folders (.ipynb_checkpoints, .git) are no classes
            classes = [d.name for d in base.iterdir() if d.is_dir() and not d.name.startswith(".")]
            if not classes:
                raise FileNotFoundError(f"{base} has no class sub-folders; expected {_LAYOUT}")
        self.classes = sorted(classes)
        if len(set(self.classes)) != len(self.classes):
            raise ValueError(f"classes must be distinct, got {list(classes)}")
        self.num_classes = len(self.classes)
        self.files: list[Path] = []
        seqs: list[np.ndarray] = []
        labels: list[int] = []
        for label, name in enumerate(self.classes):
            folder = require_dir(base / name, _LAYOUT)
            # hidden files (macOS ._x.txt resource forks, .keep) are no documents
            files = sorted(f for f in folder.glob(pattern)
                           if f.is_file() and not f.name.startswith("."))
            if not files:
                raise FileNotFoundError(f"{folder} holds no {pattern} files; expected {_LAYOUT}")
            for f in files:
                data = f.read_bytes()
                if not data:
                    raise CorruptFileError(f"{f}: empty document (0 bytes); every {pattern} "
                                           "file must hold at least one byte of text")
                try:
                    data.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise CorruptFileError(f"{f}: not UTF-8 text ({e})") from None
                seqs.append(bytes_to_ids(data, max_length))
                labels.append(label)
                self.files.append(f)
        self.sequences = RaggedArray(seqs, dtype=np.uint16)
        self.labels = np.asarray(labels, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return classification_item(self.sequences[i], self.labels[i])


def imdb(root: str | os.PathLike, split: str = "train",
         max_length: int = 4096) -> ByteTextClassificationDataset:
    """LRA Text (IMDB reviews, ``aclImdb`` release): ``split`` "train" or "test"; neg = 0,
    pos = 1; the unlabelled ``unsup`` folder is ignored."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    return ByteTextClassificationDataset(root, split, classes=("neg", "pos"), max_length=max_length)
