"""Datasets by name, and what each implies for the model: the glue the CLI uses.

A *task* maps a run config's ``data`` section to datasets for each split, the model head, the
training objective ("lm" or "classify") and the vocabulary size the data needs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from spadeformer.runconfig import RunConfigError

__all__ = ["Task", "get_task"]


@dataclass
class Task:
    name: str
    objective: str  # "lm" | "classify"
    model_class: str  # a class name in spadeformer.models
    vocab_size: int
    num_labels: int | None = None

    def model_cls(self):
        import spadeformer.models as models

        return getattr(models, self.model_class)


class StdlibBytes:
    """Byte-level LM over the Python standard library's source (data/corpus.py)."""

    task = Task("stdlib", "lm", "SpadeForCausalLM", vocab_size=256)

    def __init__(self, options: dict[str, Any]):
        from spadeformer.data.corpus import ByteCorpus

        self.seq_len = int(options.get("seq_len", 512))
        self.eval_seq_len = int(options.get("eval_seq_len") or self.seq_len)
        self.corpus = ByteCorpus(options.get("root"),
                                 include_tests=bool(options.get("include_tests", False)),
                                 max_bytes=options.get("max_bytes"))

    def dataset(self, split: str):
        seq_len = self.seq_len if split == "train" else self.eval_seq_len
        return self.corpus.dataset(split, seq_len)

    def baseline(self, split: str) -> dict[str, float]:
        """What to beat: the unigram (byte frequency) model's bits-per-byte."""
        return {"unigram_bpb": self.corpus.unigram_bpb(split)}


_SOURCES = {"stdlib": StdlibBytes}


def get_task(data_options: dict[str, Any]):
    name = data_options.get("name", "stdlib")
    if name not in _SOURCES:
        raise RunConfigError(f"data.name must be one of {sorted(_SOURCES)}, got {name!r}")
    return _SOURCES[name](data_options)
