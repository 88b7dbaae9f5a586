"""LRA Retrieval: byte-level document matching on the ACL Anthology Network (AAN) pairs.

Files of the LRA release (``lra_release/tsv_data``)::

    new_aan_pairs.train.tsv   new_aan_pairs.eval.tsv   new_aan_pairs.test.tsv

one pair per line, five tab-separated fields and no header (a first line starting with
``label`` is skipped if present)::

    <label 0|1 (or 0.0|1.0)> <TAB> <id1> <TAB> <id2> <TAB> <text1> <TAB> <text2>

where each text is a Python bytes literal such as ``b'Abstract ...'`` (the release wrote
``str(bytes)``). Texts are parsed with :func:`ast.literal_eval` (never ``eval``) and must yield
``bytes``; a field that is not a bytes literal is taken as plain UTF-8 text. (LRA's own
pipeline byte-encoded the field as written, ``b'`` prefix and backslash escapes included; the
decoded bytes here are the document's text, so byte counts and ids differ slightly from
LRA's.) Each document is
truncated to ``max_length`` bytes (LRA: 4000, i.e. 8000 for the pair) and byte b -> id b + 1
(0 = padding, vocabulary 257). Documents recur across pairs, so each distinct truncated text is
stored once.
"""

from __future__ import annotations

import ast
import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from spadeformer.data.lra_common import (
    BYTE_VOCAB_SIZE,
    CorruptFileError,
    RaggedArray,
    bytes_to_ids,
    require_dir,
    require_file,
)

__all__ = ["AANDataset", "parse_aan_text"]

_SPLIT_FILES = {"train": "train", "val": "eval", "eval": "eval", "test": "test"}
_LAYOUT = (
    "new_aan_pairs.{train,eval,test}.tsv with lines "
    "'label<TAB>id1<TAB>id2<TAB>b\"text1\"<TAB>b\"text2\"' (LRA Retrieval release)"
)


def parse_aan_text(field: str) -> bytes:
    """One text field of the AAN TSV -> bytes (a bytes literal, or plain text as UTF-8)."""
    s = field.strip()
    if len(s) >= 3 and s[0] in "bB" and s[1] in "'\"":
        value = ast.literal_eval(s)  # literals only: no code is run
        if not isinstance(value, bytes):
            raise ValueError(f"expected a bytes literal, got {type(value).__name__}")
        return value
    return s.encode("utf-8")


class AANDataset(Dataset):
    """LRA Retrieval pairs.

    Args:
        root: the folder holding ``new_aan_pairs.*.tsv``, or one TSV file.
        split: ``"train"``, ``"val"`` (= the release's ``eval`` file) or ``"test"``; ignored
            when ``root`` is a file.
        max_length: bytes kept per document (LRA: 4000).

    Items: ``{"input_ids_1": LongTensor (L1,), "input_ids_2": LongTensor (L2,),
    "labels": LongTensor ()}`` (1 = the papers are linked by a citation).
    """

    vocab_size = BYTE_VOCAB_SIZE
    num_classes = 2

    def __init__(self, root: str | os.PathLike, split: str = "train", max_length: int = 4000):
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        root = Path(root)
        if root.is_file():
            self.path = root
        else:
            if split not in _SPLIT_FILES:
                raise ValueError(f"split must be one of {sorted(_SPLIT_FILES)}, got {split!r}")
            require_dir(root, _LAYOUT)
            self.path = require_file(root / f"new_aan_pairs.{_SPLIT_FILES[split]}.tsv", _LAYOUT)
        doc_index: dict[bytes, int] = {}
        docs: list[np.ndarray] = []
        pairs: list[tuple[int, int, int]] = []

        def doc(data: bytes) -> int:
            data = data[:max_length]
            j = doc_index.get(data)
            if j is None:
                j = doc_index[data] = len(docs)
                docs.append(bytes_to_ids(data))
            return j

        with open(self.path, encoding="utf-8", newline="") as f:
            for lineno, line in enumerate(f, start=1):
                line = line.rstrip("\r\n")
                if not line.strip():
                    continue
                fields = line.split("\t")
                if lineno == 1 and fields[0].strip().lower() == "label":
                    continue  # tolerate a header
                if len(fields) != 5:
                    raise CorruptFileError(
                        f"{self.path}:{lineno}: expected 5 tab-separated fields, got "
                        f"{len(fields)}; expected {_LAYOUT}"
                    )
                try:
                    value = float(fields[0])
                except ValueError:
                    value = -1.0
                if value not in (0.0, 1.0):
                    raise CorruptFileError(
                        f"{self.path}:{lineno}: label must be 0 or 1, got {fields[0]!r}"
                    )
                try:
                    t1, t2 = parse_aan_text(fields[3]), parse_aan_text(fields[4])
                except (ValueError, SyntaxError) as e:
                    raise CorruptFileError(
                        f"{self.path}:{lineno}: a text field is not a valid bytes literal ({e})"
                    ) from None
                if not t1 or not t2:
                    raise CorruptFileError(
                        f"{self.path}:{lineno}: text {1 if not t1 else 2} of the pair is empty; "
                        "every document must hold at least one byte"
                    )
                pairs.append((doc(t1), doc(t2), int(value)))
        if not pairs:
            raise CorruptFileError(f"{self.path} holds no pairs; expected {_LAYOUT}")
        self.documents = RaggedArray(docs, dtype=np.uint16)
        self.pairs = np.asarray(pairs, dtype=np.int64)  # (N, 3): doc1, doc2, label

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        d1, d2, label = (int(v) for v in self.pairs[i])
        return {
            "input_ids_1": torch.from_numpy(self.documents[d1].astype(np.int64)),
            "input_ids_2": torch.from_numpy(self.documents[d2].astype(np.int64)),
            "labels": torch.tensor(label),
        }
