"""Datasets by name, and what each implies for the model: the glue the CLI uses.

A *source* maps a run config's ``data`` section (``data.name`` plus that name's options, see
``runconfig.DATA_OPTIONS``) to:

* ``.task`` -- a :class:`Task`: the training objective ("lm" or "classify"), the model head
  (a class name in :mod:`spadeformer.models`), the vocabulary size the data needs and the
  number of labels;
* ``.dataset(split)`` -- a map-style dataset for ``split`` in ``"train" | "val" | "test"``;
* ``.collate_fn`` -- how a list of items becomes a batch (``PadCollate`` for the LRA sources:
  it pads and adds ``padding_mask`` / ``padding_mask_1/2``, True = padded; None = the
  trainer's default stacking, enough for equal-length LM blocks);
* ``.baseline(split)`` -- what to beat (unigram bits-per-byte / perplexity, majority accuracy).

Sources (paper Sec. 4.1, Table 1 / Table 10 for LRA; Sec. 4.2 for WikiText-103), with
what ``data.path`` holds and the model head, vocabulary and number of classes::

    stdlib       data.root: Python source files (default: the stdlib)      causal LM, 256 bytes
    listops      basic_{train,val,test}.tsv (LRA listops-1000/)            classifier, 18 ids, 10
    text         aclImdb: {train,test}/{neg,pos}/*.txt                     classifier, 257, 2
    retrieval    new_aan_pairs.{train,eval,test}.tsv (LRA tsv_data/)       two towers, 257, 2
    image        cifar-10-batches-py/{data_batch_1..5,test_batch}          classifier, 256, 10
    pathfinder   imgs/, metadata/ (pathfinder{32,128}/curv_contour_length_14/)  classifier, 256, 2
    wikitext103  wiki.{train,valid,test}.tokens                            causal LM, from data
    seq2seq      {train,val,test}.jsonl: {"source": ..., "target": ...}    encoder-decoder, 514
    span_corruption  {train,val,test}.jsonl: {"text": ...} (C4)            encoder-decoder, 514

Validation splits: ListOps has its own val file, Retrieval its ``eval`` file; Text and Image
have none, so ``val_fraction`` of the training set (default 0.1) is carved out with
:func:`spadeformer.data.lra_common.split_indices` seeded by ``split_seed`` (default 0) -- the
same seed gives the same partition on every run, and train and val never overlap; "test" is
the release's test set. Pathfinder / Path-X come as one pool of images, split 80/10/10 by the
seeded partition of :class:`~spadeformer.data.image.PathfinderDataset` (as LRA and S4 do).

Options are checked when the source is built (bad values raise naming ``data.<option>``);
files are read on first use and kept, so ``dataset("train")`` and ``baseline("train")`` read
the data once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from spadeformer.runconfig import RunConfigError

__all__ = ["Task", "get_task", "SOURCES", "SPLITS"]

SPLITS = ("train", "val", "test")


@dataclass
class Task:
    name: str
    objective: str  # "lm" | "classify"
    model_class: str  # a class name in spadeformer.models
    vocab_size: int
    num_labels: int | None = None
    lm_metric: str = "bpb"  # what the trainer logs for "lm": bpb (byte tokens) or ppl (words)

    def model_cls(self):
        import spadeformer.models as models

        return getattr(models, self.model_class)


# ----------------------------------------------------------------------------- option checks
def _int_option(options: dict[str, Any], name: str, default: int, minimum: int = 1) -> int:
    value = options.get(name, default)
    if value is None:
        value = default
    if isinstance(value, float) and value.is_integer():  # "2e3" from YAML 1.1 text
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise RunConfigError(f"data.{name} must be an integer >= {minimum}, got {value!r}")
    return value


def _fraction_option(options: dict[str, Any], name: str, default: float) -> float:
    value = options.get(name, default)
    if value is None:
        value = default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
        raise RunConfigError(f"data.{name} must be a number in (0, 1), got {value!r}")
    return float(value)


def _bool_option(options: dict[str, Any], name: str, default: bool) -> bool:
    value = options.get(name, default)
    if not isinstance(value, bool):
        raise RunConfigError(f"data.{name} must be true or false, got {value!r}")
    return value


def _folder_option(options: dict[str, Any], name: str) -> Path | None:
    """An optional folder (None = the default): numbers are refused, not read as names."""
    value = options.get(name)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise RunConfigError(f"data.{name} must be a folder path, got {value!r} "
                             f"(quote a numeric folder name: data.{name}=\"'{value}'\")")
    return Path(value).expanduser()


def _path_option(options: dict[str, Any], source: str, layout: str, hint: str = "") -> Path:
    """``data.path``: required, an existing folder. The data modules name missing files."""
    raw = options.get("path")
    extra = f" ({hint})" if hint else ""
    if raw is None or raw == "":
        raise RunConfigError(f"data.path is required for data.name={source!r}: the folder "
                             f"holding {layout}{extra}; e.g. data.path=/data/{source}")
    path = Path(str(raw)).expanduser()
    if not path.is_dir():
        what = "is a file, not a folder" if path.is_file() else "does not exist"
        raise FileNotFoundError(f"data.path={str(raw)!r} {what}; data.name={source!r} expects "
                                f"a folder holding {layout}{extra}")
    return path


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")


def _unigram_nll(train: np.ndarray, ids: np.ndarray, vocab_size: int) -> float:
    """Mean NLL (nats) of ``ids`` under the unigram model of ``train``, counts plus one (an id
    unseen in training still has a finite cost)."""
    counts = np.bincount(train, minlength=vocab_size).astype(np.float64) + 1.0
    return float(-np.mean(np.log(counts[ids] / counts.sum())))


def _labels(dataset: Any) -> np.ndarray:
    """Integer labels of an LRA dataset (or a Subset of one) without decoding its inputs."""
    from torch.utils.data import Subset

    if isinstance(dataset, Subset):
        return _labels(dataset.dataset)[np.asarray(dataset.indices, dtype=np.int64)]
    if hasattr(dataset, "pairs"):  # AANDataset: (N, 3) doc1, doc2, label
        return np.asarray(dataset.pairs)[:, 2]
    return np.asarray(dataset.labels)


# ----------------------------------------------------------------------------- stdlib bytes
class StdlibBytes:
    """Byte-level LM over the Python standard library's source (data/corpus.py)."""

    task = Task("stdlib", "lm", "SpadeForCausalLM", vocab_size=256)
    collate_fn = None

    def __init__(self, options: dict[str, Any]):
        from spadeformer.data.corpus import ByteCorpus

        self.seq_len = _int_option(options, "seq_len", 512)
        self.eval_seq_len = _int_option(options, "eval_seq_len", self.seq_len)
        max_bytes = options.get("max_bytes")
        self.corpus = ByteCorpus(_folder_option(options, "root"),
                                 include_tests=_bool_option(options, "include_tests", False),
                                 max_bytes=None if max_bytes is None else _int_option(
                                     options, "max_bytes", 0))

    def dataset(self, split: str):
        seq_len = self.seq_len if split == "train" else self.eval_seq_len
        return self.corpus.dataset(split, seq_len)

    def baseline(self, split: str) -> dict[str, float]:
        """What to beat: the unigram (byte frequency) model's bits-per-byte."""
        return {"unigram_bpb": self.corpus.unigram_bpb(split)}


# ----------------------------------------------------------------------------- LRA
class _LRASource:
    """Shared by the LRA classification sources: cached datasets, PadCollate, baselines."""

    task: Task
    LAYOUT: str  # what data.path must hold, for the errors

    def __init__(self, options: dict[str, Any]):
        from spadeformer.data.lra_common import PadCollate

        self.options = options
        self.collate_fn = PadCollate()
        self._datasets: dict[str, Any] = {}

    def _load(self, split: str):  # pragma: no cover - every subclass overrides it
        raise NotImplementedError

    def _read_max_length_and_path(self, default_max_length: int, hint: str = "") -> None:
        """``data.max_length`` (an integer >= 1) then ``data.path`` (a folder holding LAYOUT)."""
        self.max_length = _int_option(self.options, "max_length", default_max_length)
        self.path = _path_option(self.options, self.task.name, self.LAYOUT, hint)

    def dataset(self, split: str):
        _check_split(split)
        if split not in self._datasets:
            self._datasets[split] = self._load(split)
        return self._datasets[split]

    def baseline(self, split: str) -> dict[str, float]:
        """What to beat: always predicting the split's most common label, and chance."""
        labels = _labels(self.dataset(split))
        counts = np.bincount(labels, minlength=self.task.num_labels)
        return {"majority_accuracy": float(counts.max() / max(len(labels), 1)),
                "chance_accuracy": 1.0 / float(self.task.num_labels)}


class _CarvedValidation(_LRASource):
    """A release without a validation split: carve ``val_fraction`` of train (seeded)."""

    def __init__(self, options: dict[str, Any]):
        super().__init__(options)
        self.val_fraction = _fraction_option(options, "val_fraction", 0.1)
        self.split_seed = _int_option(options, "split_seed", 0, minimum=0)
        self._full_train = None

    def _release(self, split: str):  # "train" | "test" of the release
        raise NotImplementedError  # pragma: no cover

    def carve(self) -> tuple[np.ndarray, np.ndarray]:
        """(train indices, val indices) into the release's training set: a seeded partition."""
        from spadeformer.data.lra_common import split_indices

        if self._full_train is None:
            self._full_train = self._release("train")
        n = len(self._full_train)
        train, val = split_indices(n, [1.0 - self.val_fraction, self.val_fraction],
                                   seed=self.split_seed)
        if len(train) == 0 or len(val) == 0:
            raise ValueError(f"data.val_fraction={self.val_fraction} of {n} training examples "
                             f"leaves {len(train)} for train and {len(val)} for val; both "
                             "need at least one")
        return train, val

    def _load(self, split: str):
        from spadeformer.data.lra_common import subset

        if split == "test":
            return self._release("test")
        train, val = self.carve()
        return subset(self._full_train, train if split == "train" else val)


class ListOps(_LRASource):
    """LRA ListOps: ``data.path`` holds ``basic_{train,val,test}.tsv``; max_length 2000."""

    task = Task("listops", "classify", "SpadeForSequenceClassification", vocab_size=18,
                num_labels=10)
    LAYOUT = "basic_{train,val,test}.tsv"

    def __init__(self, options: dict[str, Any]):
        super().__init__(options)
        self._read_max_length_and_path(
            2000, "LRA release listops-1000/, or `spadeformer data listops --out DIR`")

    def _load(self, split: str):
        from spadeformer.data.listops import ListOpsDataset

        return ListOpsDataset(self.path / f"basic_{split}.tsv", max_length=self.max_length)


class Text(_CarvedValidation):
    """LRA Text (IMDB, byte level): ``data.path`` is the aclImdb root; max_length 4096."""

    task = Task("text", "classify", "SpadeForSequenceClassification", vocab_size=257,
                num_labels=2)
    LAYOUT = "train/{neg,pos}/*.txt and test/{neg,pos}/*.txt (the aclImdb release)"

    def __init__(self, options: dict[str, Any]):
        super().__init__(options)
        self._read_max_length_and_path(4096)

    def _release(self, split: str):
        from spadeformer.data.text import imdb

        return imdb(self.path, split, max_length=self.max_length)


class Retrieval(_LRASource):
    """LRA Retrieval (AAN pairs): ``data.path`` holds ``new_aan_pairs.*.tsv``; 4000 bytes per
    document (8000 for the pair)."""

    task = Task("retrieval", "classify", "SpadeForRetrieval", vocab_size=257, num_labels=2)
    LAYOUT = "new_aan_pairs.{train,eval,test}.tsv"

    def __init__(self, options: dict[str, Any]):
        super().__init__(options)
        self._read_max_length_and_path(4000, "LRA release tsv_data/")

    def _load(self, split: str):
        from spadeformer.data.retrieval import AANDataset

        return AANDataset(self.path, split, max_length=self.max_length)  # val = eval file


class Image(_CarvedValidation):
    """LRA Image (grayscale CIFAR-10, 1024 pixels): ``data.path`` is the python release."""

    task = Task("image", "classify", "SpadeForSequenceClassification", vocab_size=256,
                num_labels=10)
    LAYOUT = "cifar-10-batches-py/{data_batch_1..5,test_batch} (or that folder itself)"

    def __init__(self, options: dict[str, Any]):
        super().__init__(options)
        self.path = _path_option(options, "image", self.LAYOUT)

    def _release(self, split: str):
        from spadeformer.data.image import Cifar10GrayDataset

        return Cifar10GrayDataset(self.path, split)


class Pathfinder(_LRASource):
    """LRA Pathfinder (``size: 32``, 1024 pixels) or Path-X (``size: 128``, 16384 pixels)."""

    task = Task("pathfinder", "classify", "SpadeForSequenceClassification", vocab_size=256,
                num_labels=2)
    LAYOUT = "imgs/<batch>/sample_<i>.png and metadata/<batch>.npy"
    SIZES = (32, 128)

    def __init__(self, options: dict[str, Any]):
        super().__init__(options)
        self.size = _int_option(options, "size", 32)
        if self.size not in self.SIZES:
            raise RunConfigError(f"data.size must be one of {list(self.SIZES)} (32 = "
                                 f"Pathfinder, 128 = Path-X), got {self.size!r}")
        self.split_seed = _int_option(options, "split_seed", 0, minimum=0)
        self.path = _path_option(
            options, "pathfinder", self.LAYOUT,
            f"LRA release pathfinder{self.size}/curv_contour_length_14/, or `spadeformer data "
            f"pathfinder --size {self.size} --out DIR`")

    def _load(self, split: str):
        from spadeformer.data.image import PathfinderDataset

        return PathfinderDataset(self.path, split, seed=self.split_seed, size=self.size)


# ----------------------------------------------------------------------------- WikiText-103
class WikiText103:
    """Word-level WikiText-103 (paper Sec. 4.2): blocks of ``seq_len`` (3072) for training and
    validation; :meth:`perplexity` is the paper's evaluation (sequences of ``eval_seq_len``,
    default ``seq_len``, with a context window of ``context`` = 400).

    The vocabulary is built from ``wiki.train.tokens`` (ids sorted by frequency, as the
    adaptive input / softmax bands need) or read from ``vocab_path``; its size is the
    model's ``vocab_size`` (267,735 words + ``<pad>``, ``<eos>`` on the release). Files are
    read on first use of :attr:`task` or :meth:`dataset`.
    """

    collate_fn = None
    LAYOUT = "wiki.{train,valid,test}.tokens (the WikiText-103 release, wikitext-103/)"
    _FILE_SPLIT = {"train": "train", "val": "valid", "test": "test"}

    def __init__(self, options: dict[str, Any]):
        self.seq_len = _int_option(options, "seq_len", 3072)
        self.eval_seq_len = _int_option(options, "eval_seq_len", self.seq_len)
        self.context = _int_option(options, "context", 400, minimum=0)
        if self.context >= self.eval_seq_len:
            raise RunConfigError(f"data.context must be < the evaluation sequence length "
                                 f"{self.eval_seq_len} (data.eval_seq_len, default "
                                 f"data.seq_len), got {self.context}")
        self.path = _path_option(options, "wikitext103", self.LAYOUT)
        self.vocab_path, self.cache_dir = (
            None if options.get(k) in (None, "") else Path(str(options[k])).expanduser()
            for k in ("vocab_path", "cache_dir"))
        self._vocab = None
        self._streams: dict[str, np.ndarray] = {}

    def _load(self):
        if self._vocab is None:
            from spadeformer.data.wikitext import load_wikitext103

            if self.vocab_path is not None:
                self.vocab_path.parent.mkdir(parents=True, exist_ok=True)
            self._vocab, self._streams = load_wikitext103(self.path, self.vocab_path,
                                                          self.cache_dir)
        return self._vocab, self._streams

    @property
    def vocab(self):
        return self._load()[0]

    @property
    def task(self) -> Task:
        return Task("wikitext103", "lm", "SpadeForCausalLM", vocab_size=len(self.vocab),
                    lm_metric="ppl")

    def stream(self, split: str) -> np.ndarray:
        """The split's token ids (int32, every line's words then ``<eos>``)."""
        _check_split(split)
        return self._load()[1][self._FILE_SPLIT[split]]

    def dataset(self, split: str):
        from spadeformer.data.wikitext import LMBlockDataset

        ids = self.stream(split)
        block = self.seq_len if split == "train" else self.eval_seq_len
        data = LMBlockDataset(ids, block)
        if len(data) == 0:
            name = "data.seq_len" if split == "train" else "data.eval_seq_len"
            raise ValueError(f"the {split} split has {len(ids)} tokens, fewer than one block of "
                             f"{name}={block} + 1; lower {name}")
        return data

    def baseline(self, split: str) -> dict[str, float]:
        """What to beat: the unigram perplexity on the split (counts from train, plus one, so
        a token unseen in training still has a finite cost), every token scored once as in
        :func:`~spadeformer.data.wikitext.eval_stream`."""
        train, ids = self.stream("train"), self.stream(split)
        return {"unigram_ppl": math.exp(_unigram_nll(train, ids, len(self.vocab)))}

    def perplexity(self, model, split: str, batch_size: int = 1,
                   max_windows: int | None = None, device: Any = "cpu") -> dict[str, Any]:
        """The paper's evaluation: sliding windows of ``eval_seq_len`` tokens, each scored
        target seeing at least ``context`` earlier tokens (Sec. 4.2, after Baevski & Auli).

        ``max_windows`` scores only the first windows (a quick estimate). Returns ``{"ppl",
        "loss" (mean NLL per token, nats), "tokens", "seq_len", "context"}``.
        """
        from spadeformer.data.wikitext import eval_stream, evaluate_perplexity

        if model.config.vocab_size != len(self.vocab):
            raise ValueError(f"the model's vocab_size={model.config.vocab_size} does not match "
                             f"this data's vocabulary ({len(self.vocab)} tokens); evaluate "
                             "with the data (and data.vocab_path) the run trained on")
        stream = eval_stream(self.stream(split), eos_id=self.vocab.eos_id)
        if max_windows is not None:  # windows start (seq_len - context) apart
            stride = self.eval_seq_len - self.context
            stream = stream[: self.eval_seq_len + (max_windows - 1) * stride + 1]
        was_training = model.training
        model.eval()
        try:
            out = evaluate_perplexity(model, stream, seq_len=self.eval_seq_len,
                                      context=self.context, batch_size=batch_size,
                                      device=device)
        finally:
            model.train(was_training)
        return {"ppl": out["ppl"], "loss": out["nll"], "tokens": out["tokens"],
                "seq_len": self.eval_seq_len, "context": self.context}


# ----------------------------------------------------------------------------- seq2seq
class Seq2Seq:
    """Source -> target pairs (summarisation-style, paper Sec. 5.1) for the encoder-decoder:
    ``data.path`` holds ``{train,val,test}.jsonl`` (see :mod:`spadeformer.data.seq2seq`).
    Trained as an LM over the target bytes (teacher forcing): the loss is per target byte
    (end-of-target included), logged as bits per byte."""

    # 514 = data.seq2seq.SEQ2SEQ_VOCAB_SIZE: padding / start, 256 bytes, end of target, and
    # 256 span-corruption sentinels (shared with the pre-training source)
    task = Task("seq2seq", "lm", "SpadeForConditionalGeneration", vocab_size=514)

    def __init__(self, options: dict[str, Any]):
        from spadeformer.data.lra_common import PadCollate

        self.max_source_length = _int_option(options, "max_source_length", 4096)
        self.max_target_length = _int_option(options, "max_target_length", 256)
        self.keys = {}
        for name, default in (("source_key", "source"), ("target_key", "target")):
            value = options.get(name, default)
            if not isinstance(value, str) or not value:
                raise RunConfigError(f"data.{name} must be a JSON key (text), got {value!r}")
            self.keys[name] = value
        self.path = _path_option(options, "seq2seq", "{train,val,test}.jsonl")
        self.collate_fn = PadCollate()
        self._datasets: dict[str, Any] = {}

    def dataset(self, split: str):
        from spadeformer.data.seq2seq import Seq2SeqDataset

        _check_split(split)
        if split not in self._datasets:
            self._datasets[split] = Seq2SeqDataset(
                self.path / f"{split}.jsonl", self.max_source_length, self.max_target_length,
                **self.keys)
        return self._datasets[split]

    def baseline(self, split: str) -> dict[str, float]:
        """What to beat: bits per target byte of the unigram model of the training targets
        (counts plus one), every target id of ``split`` scored once."""
        train, ids = self.dataset("train").target_ids(), self.dataset(split).target_ids()
        return {"unigram_bpb": _unigram_nll(train, ids, self.task.vocab_size) / math.log(2)}

    def rouge(self, model, split: str, batch_size: int, max_examples: int | None = None,
              device: Any = "cpu") -> dict[str, Any]:
        """Greedy targets for the first ``max_examples`` sources of ``split`` (all: None), up
        to ``data.max_target_length`` tokens each, scored against the whole references:
        ``{"rouge1", "rouge2", "rougeL" (F1 x100), "rouge_examples"}``."""
        from spadeformer.data.seq2seq import EOS_ID, decode_target
        from spadeformer.metrics import rouge

        data = self.dataset(split)
        n = len(data) if max_examples is None else min(max_examples, len(data))
        predictions = []
        model.to(device)
        for start in range(0, n, batch_size):
            batch = self.collate_fn([data[i] for i in range(start, min(n, start + batch_size))])
            out = model.generate(batch["input_ids"].to(device), self.max_target_length,
                                 temperature=0, padding_mask=batch["padding_mask"].to(device),
                                 eos_token_id=EOS_ID)
            predictions += [decode_target(row) for row in out.cpu()]
        return {**rouge(predictions, data.target_texts[:n]), "rouge_examples": n}


class SpanCorruption:
    """T5's span-corruption pre-training for the encoder-decoder (paper Sec. 5.1), on
    documents: ``data.path`` holds ``{train,val,test}.jsonl`` of ``{"text": ...}`` lines
    (C4's format; see :mod:`spadeformer.data.span_corruption`). The vocabulary is the seq2seq
    source's, so a pre-trained run fine-tunes there with ``model.init_from``."""

    task = Task("span_corruption", "lm", "SpadeForConditionalGeneration", vocab_size=514)

    def __init__(self, options: dict[str, Any]):
        from spadeformer.data.lra_common import PadCollate

        self.seq_len = _int_option(options, "seq_len", 512, minimum=2)
        self.noise_density = options.get("noise_density", 0.15)
        self.mean_span_length = options.get("mean_span_length", 3.0)
        self.text_key = options.get("text_key", "text")
        if not isinstance(self.text_key, str) or not self.text_key:
            raise RunConfigError(f"data.text_key must be a JSON key (text), got "
                                 f"{self.text_key!r}")
        self.path = _path_option(options, "span_corruption", "{train,val,test}.jsonl")
        self.collate_fn = PadCollate()
        self._datasets: dict[str, Any] = {}
        self._check_noise()

    def _check_noise(self) -> None:
        from spadeformer.data.span_corruption import check_noise_settings

        try:
            check_noise_settings(self.noise_density, self.mean_span_length)
        except ValueError as err:
            raise RunConfigError(f"data.{err}") from None

    @property
    def max_source_length(self) -> int:  # what `generate` cuts a source to
        return self.seq_len

    def dataset(self, split: str):
        from spadeformer.data.span_corruption import SpanCorruptionDataset

        _check_split(split)
        if split not in self._datasets:
            self._datasets[split] = SpanCorruptionDataset(
                self.path / f"{split}.jsonl", self.seq_len, self.noise_density,
                self.mean_span_length, self.text_key, seed=SPLITS.index(split))
        return self._datasets[split]

    def baseline(self, split: str) -> dict[str, float]:
        """What to beat: bits per target token of the unigram model of the split's own
        corrupted targets (counts plus one; an upper bound a model should go far below)."""
        data = self.dataset(split)
        ids = np.concatenate([data[i]["labels"].numpy() for i in range(len(data))])
        return {"unigram_bpb": _unigram_nll(ids, ids, self.task.vocab_size) / math.log(2)}


SOURCES = {"stdlib": StdlibBytes, "listops": ListOps, "text": Text, "retrieval": Retrieval,
           "image": Image, "pathfinder": Pathfinder, "wikitext103": WikiText103,
           "seq2seq": Seq2Seq, "span_corruption": SpanCorruption}


def get_task(data_options: dict[str, Any]):
    """The source for a run config's ``data`` section (options checked, files not yet read)."""
    name = data_options.get("name", "stdlib")
    if name not in SOURCES:
        raise RunConfigError(f"data.name must be one of {sorted(SOURCES)}, got {name!r}")
    return SOURCES[name](data_options)
