"""Tiny stand-in models for the trainer tests (and the DDP worker script).

They follow the trainer's contract: ``model(**batch)`` returns an object with ``.loss`` (scalar)
and ``.logits``. Deliberately not SPADE: the trainer must not depend on any model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class Out:
    logits: torch.Tensor
    loss: torch.Tensor


class TinyLM(nn.Module):
    """A causal bigram-plus-context model: the embeddings of the current and the previous
    byte -> MLP -> dropout -> tied output projection. Tied weights exercise the checkpoint's
    shared-tensor handling; dropout makes exact resume depend on the RNG. (No RNN: small
    recurrent kernels crawl on a busy 2-core CI machine.)"""

    def __init__(self, vocab_size: int = 256, d: int = 16, dropout: float = 0.1) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, d)
        nn.init.normal_(self.embed.weight, std=0.02)  # small logits at init: loss ~ ln 256
        self.mix = nn.Linear(2 * d, d)
        self.norm = nn.LayerNorm(d)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(d, vocab_size, bias=False)
        self.head.weight = self.embed.weight  # tied
        self.poison_at: int | None = None  # training forward call that returns a NaN loss
        self.crash_at: int | None = None  # training forward call that raises (a "kill")
        self.train_calls = 0

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                padding_mask: torch.Tensor | None = None) -> Out:
        """input_ids (batch, length) -> logits (batch, length, vocab)."""
        if self.training:
            self.train_calls += 1
            if self.crash_at is not None and self.train_calls == self.crash_at:
                raise KeyboardInterrupt("simulated kill")
        e = self.embed(input_ids)  # (batch, length, d)
        prev = F.pad(e, (0, 0, 1, 0))[:, :-1]  # the previous byte's embedding (zeros at t=0)
        h = torch.tanh(self.mix(torch.cat([e, prev], dim=-1)))
        logits = self.head(self.drop(self.norm(h)))
        loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
        if self.training and self.poison_at is not None and self.train_calls >= self.poison_at:
            loss = loss * float("nan")
        return Out(logits=logits, loss=loss)


class TinyClassifier(nn.Module):
    """Masked mean of embeddings -> linear: (batch, length) ids -> (batch, num_labels)."""

    def __init__(self, vocab_size: int = 16, d: int = 8, num_labels: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, d)
        self.out = nn.Linear(d, num_labels)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor,
                padding_mask: torch.Tensor | None = None) -> Out:
        h = self.embed(input_ids)  # (batch, length, d)
        keep = torch.ones_like(input_ids, dtype=h.dtype) if padding_mask is None else (
            (~padding_mask).to(h.dtype))
        pooled = (h * keep[..., None]).sum(1) / keep.sum(1, keepdim=True).clamp_min(1.0)
        logits = self.out(pooled)
        return Out(logits=logits, loss=F.cross_entropy(logits, labels))


def make_tree(root: Path, num_files: int = 60, seed: int = 0) -> Path:
    """A fake source tree: python-looking files (learnable bytes), plus a site-packages and a
    test folder the corpus must skip (by default)."""
    g = torch.Generator().manual_seed(seed)
    words = ["def", "return", "self", "import", "class", "if", "else", "for", "in", "x", "y"]
    for i in range(num_files):
        sub = root / ("pkg" if i % 3 == 0 else "") / f"mod_{i:03d}.py"
        sub.parent.mkdir(parents=True, exist_ok=True)
        lines = []
        for _ in range(40):
            n = int(torch.randint(2, 7, (1,), generator=g))
            idx = torch.randint(0, len(words), (n,), generator=g).tolist()
            lines.append("    " + " ".join(words[j] for j in idx) + ":")
        sub.write_text(f"# module {i}\n" + "\n".join(lines) + "\n")
    for skipped in ("site-packages/evil.py", "test/test_thing.py", "pkg/tests/test_more.py",
                    "__pycache__/junk.py"):
        (root / skipped).parent.mkdir(parents=True, exist_ok=True)
        (root / skipped).write_bytes(b"SKIPPED\n" * 10)
    (root / "notes.txt").write_text("not python\n")
    return root
