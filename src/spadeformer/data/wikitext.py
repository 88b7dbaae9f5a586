"""WikiText-103 word-level language modelling: vocabulary, token stream, blocks, evaluation.

Files: ``wiki.train.tokens``, ``wiki.valid.tokens``, ``wiki.test.tokens`` (the release is
already tokenised; rare words are ``<unk>``).

* **Tokens**: each line is split on whitespace and followed by an end-of-line token ``<eos>``,
  as fairseq does (a blank line gives just ``<eos>``); the stream runs across lines.
* **Vocabulary** (:class:`WordVocab`), built from the training file: ``<pad>`` = 0,
  ``<eos>`` = 1, ``<unk>`` = 2 (the release's own ``<unk>`` token), then every other training
  token by decreasing count, ties by code point order. Stored as JSON. Words absent from it
  map to ``<unk>`` (WikiText-103's vocabulary is closed, so only foreign text hits this).
* **Training** (:class:`LMBlockDataset`): consecutive blocks of ``block_size`` (3072) tokens;
  ``labels`` are the inputs shifted by one (``labels[t]`` = token t+1), the convention of
  ``SpadeForCausalLM`` (labels aligned with input_ids, -100 ignored).
* **Evaluation** (paper 4.2, after Baevski & Auli 2019): sequences of 3072 tokens with a
  context window of 400. :func:`sliding_windows` cuts the stream into windows of ``seq_len``
  tokens, ``seq_len - context`` apart, and scores only the positions not scored before, so
  every token is scored exactly once and each token of a window after the first sees at least
  ``context`` earlier tokens (the last window is aligned to the end of the stream, which only
  adds context). The stream is the file with an ``<eos>`` prepended (:func:`eval_stream`), so
  every token of the file, including the first, is predicted. Perplexity = exp(mean NLL).
"""

from __future__ import annotations

import array
import hashlib
import inspect
import json
import math
import os
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from spadeformer.data.lra_common import IGNORE_INDEX, CorruptFileError, require_file
from spadeformer.fileio import atomic_write

__all__ = [
    "EOS",
    "PAD",
    "UNK",
    "LMBlockDataset",
    "WordVocab",
    "encode_file",
    "eval_stream",
    "evaluate_perplexity",
    "load_wikitext103",
    "sliding_windows",
]

PAD, EOS, UNK = "<pad>", "<eos>", "<unk>"
SPECIALS = (PAD, EOS, UNK)
_FORMAT = "spadeformer-word-vocab"
_LAYOUT = "<root>/wiki.{train,valid,test}.tokens (WikiText-103, tokenised text)"


def _lines(path: Path) -> Iterator[str]:
    try:
        with open(path, encoding="utf-8") as f:
            yield from f
    except UnicodeDecodeError as e:
        raise CorruptFileError(f"{path}: not UTF-8 text ({e})") from None


class WordVocab:
    """Word <-> id mapping: ``<pad>`` 0, ``<eos>`` 1, ``<unk>`` 2, then words by frequency."""

    def __init__(self, tokens: list[str]):
        if tuple(tokens[: len(SPECIALS)]) != SPECIALS:
            raise ValueError(f"tokens must start with {list(SPECIALS)}, got {tokens[:3]}")
        if len(set(tokens)) != len(tokens):
            raise ValueError("tokens must be distinct")
        self.tokens = list(tokens)
        self.index = {t: i for i, t in enumerate(self.tokens)}
        self.pad_id, self.eos_id, self.unk_id = 0, 1, 2

    def __len__(self) -> int:
        return len(self.tokens)

    @classmethod
    def build(cls, path: str | os.PathLike) -> WordVocab:
        """Count whitespace tokens of a training file (``<eos>`` once per line)."""
        path = require_file(path, _LAYOUT)
        counts: Counter[str] = Counter()
        for line in _lines(path):
            counts.update(line.split())
        words = sorted((w for w in counts if w not in SPECIALS), key=lambda w: (-counts[w], w))
        return cls([*SPECIALS, *words])

    def encode_line(self, line: str) -> list[int]:
        """One line -> ids of its words followed by ``<eos>``."""
        get, unk = self.index.get, self.unk_id
        return [get(w, unk) for w in line.split()] + [self.eos_id]

    def decode(self, ids) -> str:
        return " ".join(self.tokens[int(i)] for i in ids)

    def fingerprint(self) -> str:
        return hashlib.sha1("\n".join(self.tokens).encode("utf-8")).hexdigest()[:16]

    def save(self, path: str | os.PathLike) -> None:
        """Write the vocabulary as JSON, atomically (a concurrent reader never sees half)."""
        text = json.dumps({"format": _FORMAT, "version": 1, "tokens": self.tokens},
                          ensure_ascii=False)
        atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))

    @classmethod
    def load(cls, path: str | os.PathLike) -> WordVocab:
        path = require_file(path, "a JSON vocabulary written by WordVocab.save")
        try:
            obj = json.loads(path.read_text(encoding="utf-8"))
            if obj.get("format") != _FORMAT:
                raise ValueError(f"format is {obj.get('format')!r}, expected {_FORMAT!r}")
            return cls(list(obj["tokens"]))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise CorruptFileError(f"{path}: not a WordVocab JSON file ({e})") from None


def encode_file(path: str | os.PathLike, vocab: WordVocab,
                cache_dir: str | os.PathLike | None = None) -> np.ndarray:
    """A token file -> int32 ids (N,), each line's words then ``<eos>``.

    With ``cache_dir``, the ids are saved there (atomically) and read back on later calls
    (encoding WikiText-103's training file takes about a minute). The cache file's name holds
    the vocabulary's fingerprint and a hash of the source's bytes (~1 s for WikiText-103's
    540 MB), so another file of the same name, or the file edited, is encoded afresh, while a
    touched, copied or moved file reuses its ids (no second copy of them on disk).
    """
    path = require_file(path, _LAYOUT)
    cache = None
    if cache_dir is not None:
        digest = hashlib.sha1()
        with open(path, "rb") as f:  # (hashlib.file_digest needs Python 3.11)
            while chunk := f.read(1 << 20):
                digest.update(chunk)
        key = digest.hexdigest()[:16]
        cache = Path(cache_dir) / f"{path.name}.{vocab.fingerprint()}.{key}.npy"
        if cache.is_file():
            return np.load(cache, allow_pickle=False)
    buf = array.array("i")
    get, unk, eos = vocab.index.get, vocab.unk_id, vocab.eos_id
    for line in _lines(path):
        buf.extend([get(w, unk) for w in line.split()])
        buf.append(eos)
    ids = np.frombuffer(buf, dtype=np.int32).copy()
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)

        def write(tmp: str) -> None:
            with open(tmp, "wb") as f:  # a file object: np.save would append .npy to a name
                np.save(f, ids)

        atomic_write(cache, write)
    return ids


def load_wikitext103(
    root: str | os.PathLike, vocab_path: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> tuple[WordVocab, dict[str, np.ndarray]]:
    """Vocabulary (built from train, or loaded/saved at ``vocab_path``) and the three streams
    ``{"train", "valid", "test"}`` of int32 ids."""
    root = Path(root)
    files = {s: require_file(root / f"wiki.{s}.tokens", _LAYOUT)
             for s in ("train", "valid", "test")}
    if vocab_path is not None and Path(vocab_path).is_file():
        vocab = WordVocab.load(vocab_path)
    else:
        vocab = WordVocab.build(files["train"])
        if vocab_path is not None:
            vocab.save(vocab_path)
    return vocab, {s: encode_file(p, vocab, cache_dir) for s, p in files.items()}


class LMBlockDataset(Dataset):
    """Consecutive training blocks of a token stream.

    Args:
        ids: the stream (N,) (numpy or tensor).
        block_size: tokens per block (paper: 3072).

    Item i: ``{"input_ids": ids[i*B : (i+1)*B], "labels": ids[i*B+1 : (i+1)*B+1]}`` (LongTensors
    (B,)); there are ``(N - 1) // B`` blocks, the tail is dropped.
    """

    def __init__(self, ids, block_size: int = 3072):
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.ids = np.asarray(ids)
        if self.ids.ndim != 1:
            raise ValueError(f"ids must be 1-D, got shape {self.ids.shape}")
        self.block_size = block_size

    def __len__(self) -> int:
        return max(0, (len(self.ids) - 1) // self.block_size)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not 0 <= i < len(self):
            raise IndexError(f"block {i} out of range for {len(self)} blocks")
        s = i * self.block_size
        chunk = torch.from_numpy(self.ids[s : s + self.block_size + 1].astype(np.int64))
        return {"input_ids": chunk[:-1], "labels": chunk[1:]}


def eval_stream(ids, eos_id: int = 1) -> np.ndarray:
    """``<eos>`` + ids: the evaluation stream in which every token of ``ids`` is a target."""
    ids = np.asarray(ids)
    return np.concatenate([np.array([eos_id], dtype=ids.dtype), ids])


def sliding_windows(
    ids, seq_len: int = 3072, context: int = 400
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Evaluation windows over a stream x of N tokens (targets x[1:], each scored once).

    Yields ``(input_ids (T,), labels (T,))`` LongTensors with ``T = min(seq_len, N - 1)``,
    where ``labels[j]`` is the target of position j (the next token) or ``IGNORE_INDEX``
    when that target was scored by an earlier window. Windows start ``seq_len - context``
    apart; the last one ends at the end of the stream. Every scored target after the first
    window has at least ``context`` tokens before it in its window (``context + 1`` counting
    the position that predicts it).
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    if not 0 <= context < seq_len:
        raise ValueError(f"context must be in [0, seq_len={seq_len}), got {context}")
    x = torch.as_tensor(np.asarray(ids, dtype=np.int64))
    n_targets = len(x) - 1  # target t (1..N-1) is predicted at position t - 1
    if n_targets < 1:
        return
    stride = seq_len - context
    scored = 0  # targets 1..scored are done
    start = 0
    while scored < n_targets:
        start = min(start, max(0, n_targets - seq_len))  # align the last window to the end
        end = min(start + seq_len, n_targets)  # positions start..end-1, targets start+1..end
        inputs = x[start:end]
        labels = x[start + 1 : end + 1].clone()
        labels[: scored - start] = IGNORE_INDEX  # targets <= scored were scored earlier
        yield inputs, labels
        scored = end
        start += stride


@torch.no_grad()
def evaluate_perplexity(
    model: Callable[[torch.Tensor], object],
    ids,
    seq_len: int = 3072,
    context: int = 400,
    batch_size: int = 1,
    device: str | torch.device = "cpu",
) -> dict[str, float]:
    """Perplexity of ``model`` on stream ``ids`` (use :func:`eval_stream` to score every token).

    ``model(input_ids (B, T))`` must return logits (B, T, V) or an object with ``.logits``.
    A module whose ``forward`` takes ``labels`` (``SpadeForCausalLM``) is asked for its loss
    instead, the mean NLL over the counted targets: with the adaptive softmax that never
    builds the (B, T, V) log-probabilities (3.3 GB per 3,072-token window at WikiText-103's
    vocabulary).
    Returns ``{"nll": mean NLL per token (nats), "ppl": exp(nll), "tokens": count}``.
    """
    takes_labels = isinstance(model, torch.nn.Module) and (
        "labels" in inspect.signature(model.forward).parameters)
    total, count = 0.0, 0
    windows = list(sliding_windows(ids, seq_len, context))
    for b in range(0, len(windows), batch_size):
        group = windows[b : b + batch_size]  # all windows have the same length
        inputs = torch.stack([w[0] for w in group]).to(device)
        labels = torch.stack([w[1] for w in group]).to(device)
        counted = int((labels != IGNORE_INDEX).sum())
        if takes_labels:
            nll = model(inputs, labels=labels).loss.double() * counted  # mean -> sum
        else:
            out = model(inputs)
            logits = getattr(out, "logits", out)
            nll = torch.nn.functional.cross_entropy(
                logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX,
                reduction="sum",
            )
        if counted:
            total += float(nll)
        count += counted
    if count == 0:
        raise ValueError("the stream has no token to score (need at least 2 tokens)")
    nll = total / count
    return {"nll": nll, "ppl": math.exp(nll), "tokens": count}
