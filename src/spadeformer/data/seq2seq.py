"""Source -> target pairs for the encoder-decoder (paper Sec. 5.1: summarisation-style tasks).

Files: ``<path>/{train,val,test}.jsonl``, one JSON object per line holding two strings, the
source and the target (keys ``source`` / ``target`` by default; e.g. ``article`` /
``abstract`` for the arXiv summarisation set, ``document`` / ``summary`` for XSum).

Tokens are UTF-8 bytes, as in LRA Text: byte ``b`` -> id ``b + 1``, id 0 = padding (which is
also the decoder's start token, as in T5), id 257 = end of target (``EOS_ID``), appended to
every target so a model learns where to stop, and ids 258 .. 513 the sentinels of T5's span
corruption (:mod:`spadeformer.data.span_corruption`), so that a model pre-trained that way
and one fine-tuned on pairs share one vocabulary of ``SEQ2SEQ_VOCAB_SIZE = 514``. Items:
``{"input_ids": (S,) source ids, "labels": (T,) target ids ending in EOS_ID}`` (int64);
:class:`~spadeformer.data.lra_common.PadCollate` pads sources (with ``padding_mask``) and
targets (with -100).
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

__all__ = ["EOS_ID", "FIRST_SENTINEL_ID", "NUM_SENTINELS", "SEQ2SEQ_VOCAB_SIZE",
           "Seq2SeqDataset", "decode_target", "encode_source", "read_jsonl_fields"]

EOS_ID = 256 + BYTE_OFFSET  # 257: after the 256 byte ids
FIRST_SENTINEL_ID = EOS_ID + 1  # 258: span corruption's sentinel i is FIRST_SENTINEL_ID + i
NUM_SENTINELS = 256  # byte tokens make many spans: ~26 per 512 bytes at T5's noise settings
SEQ2SEQ_VOCAB_SIZE = FIRST_SENTINEL_ID + NUM_SENTINELS  # 514
_LAYOUT = "<path>/{train,val,test}.jsonl, one {\"source\": ..., \"target\": ...} per line"


def encode_source(text: str, max_length: int | None = None) -> torch.Tensor:
    """Source text -> (S,) int64 ids (UTF-8 bytes + 1), truncated to ``max_length``."""
    return torch.from_numpy(bytes_to_ids(text.encode("utf-8"), max_length).astype(np.int64))


def decode_target(ids: Sequence[int] | torch.Tensor) -> str:
    """Target ids -> text: up to the first EOS_ID, padding and sentinels dropped, invalid
    UTF-8 replaced."""
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
        for source, target in read_jsonl_fields(self.path, (source_key, target_key)):
            self.target_texts.append(target.decode("utf-8"))
            sources.append(bytes_to_ids(source, max_source_length))
            ids = np.append(bytes_to_ids(target), np.uint16(EOS_ID))
            targets.append(ids[:max_target_length])
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


def read_jsonl_fields(path: Path, keys: Sequence[str]) -> list[tuple[bytes, ...]]:
    """The UTF-8 bytes of the string fields ``keys`` of every JSON object line of ``path``
    (empty lines skipped); a CorruptFileError names ``path:line`` for anything else."""
    rows = []
    with open(path, "rb") as f:  # bytes: a bad byte is reported with its line
        for line_no, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise CorruptFileError(f"{path}:{line_no}: not UTF-8 text ({err})") from None
            if line.strip():
                rows.append(_read_fields(line, f"{path}:{line_no}", keys))
    if not rows:
        raise CorruptFileError(f"{path}: no JSON lines (every line is empty)")
    return rows


def _read_fields(line: str, where: str, keys: Sequence[str]) -> tuple[bytes, ...]:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as err:
        raise CorruptFileError(f"{where}: not a JSON object ({err.msg})") from None
    if not isinstance(obj, dict):
        raise CorruptFileError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    out = []
    for key in keys:
        value = obj.get(key)
        if not isinstance(value, str) or not value:
            got = "missing" if key not in obj else repr(value)[:40]
            raise CorruptFileError(f"{where}: {key!r} must be a non-empty string, got {got} "
                                   f"(keys: {sorted(obj)}; the data.*_key options name "
                                   "other fields)")
        try:
            out.append(value.encode("utf-8"))
        except UnicodeEncodeError:  # JSON allows an escaped lone surrogate ("\ud800")
            raise CorruptFileError(f"{where}: {key!r} holds an unpaired surrogate escape, "
                                   "which is no text") from None
    return tuple(out)
