"""T5's span-corruption pre-training objective on byte tokens (Raffel et al. 2020, Sec. 3.1.4;
the paper pre-trains its encoder-decoder this way, Sec. 5.1).

Documents: ``<path>/{train,val,test}.jsonl``, one JSON object per line with the text under
``text`` (C4's format). Each document's UTF-8 bytes are cut into chunks of at most
``seq_len`` bytes. In a chunk, ``noise_density`` of the bytes (T5: 0.15) in spans of mean
length ``mean_span_length`` (T5: 3) are dropped from the input, each span replaced by one
sentinel; the target lists each sentinel followed by the bytes it replaced, then the end
token::

    input:   Thank you <S0> me to your party <S1> week.      (ids: bytes + 1, sentinels)
    target:  <S0> for inviting <S1> last <EOS>

Sentinel i is id ``FIRST_SENTINEL_ID + i`` (:mod:`spadeformer.data.seq2seq`: one vocabulary
with the fine-tuning pairs). The noise of item ``i`` is drawn from a generator seeded by
``(seed, i)``: the same item always gets the same corruption, whatever the order or the
process asking, so runs and their resumes repeat exactly (T5 re-draws it every time it reads
an example; with many documents the difference is small).
"""

from __future__ import annotations

import os

import numpy as np
import torch
from torch.utils.data import Dataset

from spadeformer.data.lra_common import RaggedArray, bytes_to_ids, require_file
from spadeformer.data.seq2seq import (
    EOS_ID,
    FIRST_SENTINEL_ID,
    NUM_SENTINELS,
    read_jsonl_fields,
)

__all__ = ["SpanCorruptionDataset", "check_noise_settings", "corrupt_spans",
           "random_spans_noise_mask"]

_LAYOUT = "<path>/{train,val,test}.jsonl, one {\"text\": ...} per line (C4's format)"


def check_noise_settings(noise_density, mean_span_length) -> None:
    """ValueError naming the setting unless 0 < noise_density < 1 and mean_span_length >= 1."""
    for name, value, ok, allowed in (
            ("noise_density", noise_density, lambda v: 0 < v < 1, "a number in (0, 1)"),
            ("mean_span_length", mean_span_length, lambda v: v >= 1, "a number >= 1")):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not ok(value):
            raise ValueError(f"{name} must be {allowed}, got {value!r}")


def _segment(total: int, parts: int, rng: np.random.Generator) -> np.ndarray:
    """A uniformly random split of ``total`` items into ``parts`` non-empty runs: lengths."""
    cuts = np.sort(rng.choice(np.arange(1, total), size=parts - 1, replace=False))
    return np.diff(np.concatenate([[0], cuts, [total]]))


def random_spans_noise_mask(length: int, noise_density: float, mean_span_length: float,
                            rng: np.random.Generator) -> np.ndarray:
    """(length,) bool, True = noise: round(length * noise_density) noisy positions (at least
    one, at most length - 1) in round(noise / mean_span_length) spans (at least one, at most
    ``NUM_SENTINELS``), alternating with non-noise runs, a non-noise run first, as T5's
    ``random_spans_noise_mask``. Needs length >= 2."""
    if length < 2:
        raise ValueError(f"length must be >= 2 to corrupt a span and keep a byte, got {length}")
    num_noise = min(max(round(length * noise_density), 1), length - 1)
    num_spans = max(round(num_noise / mean_span_length), 1)
    num_spans = min(num_spans, num_noise, length - num_noise, NUM_SENTINELS)
    noise = _segment(num_noise, num_spans, rng)
    keep = _segment(length - num_noise, num_spans, rng)
    runs = np.stack([keep, noise], axis=1).reshape(-1)  # keep_0, noise_0, keep_1, ...
    return np.repeat(np.tile([False, True], num_spans), runs)


def corrupt_spans(ids: np.ndarray, noise_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ids (L,) and their noise mask -> (input ids, target ids): each noise span becomes a
    sentinel in the input; the target is sentinel + span for each, then ``EOS_ID``."""
    starts = noise_mask & ~np.concatenate([[False], noise_mask[:-1]])  # first of each span
    sentinel = FIRST_SENTINEL_ID + np.cumsum(starts) - 1  # the span each position belongs to
    inputs = np.where(starts, sentinel, ids)[~noise_mask | starts]
    noise = np.flatnonzero(noise_mask)
    opens = starts[noise]  # which noise positions open a span (and get a sentinel first)
    targets = np.empty(len(noise) + int(opens.sum()) + 1, dtype=np.int64)
    where = np.arange(len(noise)) + np.cumsum(opens)  # each noise id's place in the target
    targets[where] = ids[noise]
    targets[where[opens] - 1] = sentinel[noise[opens]]
    targets[-1] = EOS_ID
    return inputs.astype(np.int64), targets


class SpanCorruptionDataset(Dataset):
    """Chunks of a ``.jsonl`` file of documents, span-corrupted (see the module docstring).

    Items: ``{"input_ids": (S,), "labels": (T,)}`` int64, S <= seq_len, T = the noise plus
    one sentinel per span plus the end token.
    """

    def __init__(self, path: str | os.PathLike, seq_len: int = 512, noise_density: float = 0.15,
                 mean_span_length: float = 3.0, text_key: str = "text", seed: int = 0):
        if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
            raise ValueError(f"seq_len must be an integer >= 2, got {seq_len!r}")
        check_noise_settings(noise_density, mean_span_length)
        self.path = require_file(path, _LAYOUT)
        self.seq_len, self.noise_density = seq_len, float(noise_density)
        self.mean_span_length, self.seed = float(mean_span_length), seed
        chunks = []
        for (text,) in read_jsonl_fields(self.path, (text_key,)):
            ids = bytes_to_ids(text)
            # every chunk of seq_len bytes; a last piece of one byte cannot be corrupted
            chunks += [ids[i : i + seq_len] for i in range(0, len(ids), seq_len)
                       if len(ids) - i >= 2]
        if not chunks:
            raise ValueError(f"{self.path}: no document has 2 bytes or more to corrupt")
        self.chunks = RaggedArray(chunks, dtype=np.uint16)

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not 0 <= i < len(self):
            raise IndexError(f"item {i} out of range for {len(self)} chunks")
        ids = self.chunks[i].astype(np.int64)
        rng = np.random.default_rng([self.seed, i])
        mask = random_spans_noise_mask(len(ids), self.noise_density, self.mean_span_length, rng)
        inputs, targets = corrupt_spans(ids, mask)
        return {"input_ids": torch.from_numpy(inputs), "labels": torch.from_numpy(targets)}
