"""Source -> target pairs for the encoder-decoder (paper Sec. 5.1: summarisation-style tasks).

Files: ``<path>/{train,val,test}.jsonl``, one JSON object per line holding two strings, the
source and the target (keys ``source`` / ``target`` by default; e.g. ``article`` /
``abstract`` for the arXiv summarisation set, ``document`` / ``summary`` for XSum).

Tokens are UTF-8 bytes, as in LRA Text: byte ``b`` -> id ``b + 1``, id 0 = padding (which is
also the decoder's start token, as in T5), and id 257 = end of target (``EOS_ID``), appended to
every target so a model learns where to stop. Items: ``{"input_ids": (S,) source ids,
"labels": (T,) target ids ending in EOS_ID}`` (int64); :class:`~spadeformer.data.lra_common.
PadCollate` pads sources (with ``padding_mask``) and targets (with -100).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from spadeformer.data.lra_common import (
    BYTE_OFFSET,
    CorruptFileError,
    RaggedArray,
    bytes_to_ids,
    require_file,
)

__all__ = ["EOS_ID", "SEQ2SEQ_VOCAB_SIZE", "Seq2SeqDataset", "decode_target", "encode_source"]

EOS_ID = 256 + BYTE_OFFSET  # 257: after the 256 byte ids
SEQ2SEQ_VOCAB_SIZE = EOS_ID + 1
_LAYOUT = "<path>/{train,val,test}.jsonl, one {\"source\": ..., \"target\": ...} per line"


def encode_source(text: str, max_length: int | None = None) -> torch.Tensor:
    """Source text -> (S,) int64 ids (UTF-8 bytes + 1), truncated to ``max_length``."""
    return torch.from_numpy(bytes_to_ids(text.encode("utf-8"), max_length).astype(np.int64))


def decode_target(ids: Sequence[int] | torch.Tensor) -> str:
    """Target ids -> text: up to the first EOS_ID, padding dropped, invalid UTF-8 replaced."""
    out = bytearray()
    for i in (ids.tolist() if isinstance(ids, torch.Tensor) else ids):
        if i == EOS_ID:
            break
        if BYTE_OFFSET <= i < EOS_ID:
            out.append(i - BYTE_OFFSET)
    return out.decode("utf-8", errors="replace")


class Seq2SeqDataset(Dataset):
    """One ``.jsonl`` file of source / target pairs as byte ids (see the module docstring).

    Sources are cut to ``max_source_length`` bytes; targets to ``max_target_length`` ids,
    EOS included (a cut target ends in its last byte instead: the model learns nothing
    false about where it ends, it just never sees the end).
    """

    def __init__(self, path: str | os.PathLike, max_source_length: int = 4096,
                 max_target_length: int = 256, source_key: str = "source",
                 target_key: str = "target"):
        for name, value in (("max_source_length", max_source_length),
                            ("max_target_length", max_target_length)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        self.path = require_file(path, _LAYOUT)
        sources, targets = [], []
        self.target_texts: list[str] = []  # whole, uncut: what ROUGE compares against
        with open(self.path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                source, target = _read_pair(line, self.path, line_no, source_key, target_key)
                self.target_texts.append(target.decode("utf-8"))
                sources.append(bytes_to_ids(source, max_source_length))
                ids = np.append(bytes_to_ids(target), np.uint16(EOS_ID))
                targets.append(ids[:max_target_length])
        if not sources:
            raise CorruptFileError(f"{self.path}: no pairs (every line is empty)")
        self.sources = RaggedArray(sources, dtype=np.uint16)
        self.targets = RaggedArray(targets, dtype=np.uint16)

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": torch.from_numpy(self.sources[i].astype(np.int64)),
                "labels": torch.from_numpy(self.targets[i].astype(np.int64))}

    def target_ids(self) -> np.ndarray:
        """Every target id of the file, concatenated (for the unigram baseline)."""
        return self.targets.data.astype(np.int64)


def _read_pair(line: str, path: Path, line_no: int, source_key: str,
               target_key: str) -> tuple[bytes, bytes]:
    where = f"{path}:{line_no}"
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as err:
        raise CorruptFileError(f"{where}: not a JSON object ({err.msg})") from None
    if not isinstance(obj, dict):
        raise CorruptFileError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    out = []
    for key in (source_key, target_key):
        value = obj.get(key)
        if not isinstance(value, str) or not value:
            got = "missing" if key not in obj else repr(value)[:40]
            raise CorruptFileError(f"{where}: {key!r} must be a non-empty string, got {got} "
                                   f"(keys: {sorted(obj)}; set data.source_key / "
                                   "data.target_key for other names)")
        out.append(value.encode("utf-8"))
    return out[0], out[1]
