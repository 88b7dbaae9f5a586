"""Encoder-decoder (cross) attention: decoder queries over the encoder's output ("memory").

The decoder of :class:`~spadeformer.models.SpadeForConditionalGeneration` attends to every
real source token (T5, paper Sec. 5.1; no position bias, as in T5's cross-attention). The
memory's keys and values depend only on the source, so decoding projects them once
(:meth:`CrossAttention.project_memory`) and reuses them for every generated token: a decoding
step costs O(source length), independent of how many tokens were generated.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from spadeformer.ssm.base import check_padding_mask, check_positive, check_sequence

__all__ = ["CrossAttention", "MemoryKV", "keep_mask"]

MemoryKV = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]
"""(key, value, keep): key / value (batch, heads, source_length, head_dim), keep (batch, 1, 1,
source_length) bool (True = a real source token) or None when nothing is padded."""


def keep_mask(padding_mask: torch.Tensor | None,
              name: str = "memory_padding_mask") -> torch.Tensor | None:
    """(batch, S) bool, True = padded -> (batch, 1, 1, S) bool, True = attended (None stays
    None). A row with no real token would give softmax over nothing: refused, naming
    ``name``."""
    if padding_mask is None:
        return None
    empty = padding_mask.all(dim=1)
    if empty.any():
        rows = empty.nonzero().flatten().tolist()
        raise ValueError(f"{name} pads every source token of rows {rows}; each row needs at "
                         "least one real token to attend to")
    return ~padding_mask[:, None, None, :]


class CrossAttention(nn.Module):
    """x (batch, T, d_model) attends over memory (batch, S, d_model) -> (batch, T, d_model).

    ``memory_padding_mask`` (batch, S) bool, True = padded: those source tokens are never
    attended; every row needs at least one real token.
    """

    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0, proj_bias: bool = True):
        super().__init__()
        check_positive("d_model", d_model)
        check_positive("n_heads", n_heads)
        if d_model % n_heads:
            raise ValueError(
                f"d_model must be divisible by n_heads, got d_model={d_model}, n_heads={n_heads}"
            )
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not (
            0.0 <= dropout < 1.0
        ):
            raise ValueError(f"dropout must be a number in [0, 1), got {dropout!r}")
        self.d_model, self.n_heads, self.head_dim = d_model, n_heads, d_model // n_heads
        self.dropout = float(dropout)
        self.q_proj = nn.Linear(d_model, d_model, bias=proj_bias)
        self.k_proj = nn.Linear(d_model, d_model, bias=proj_bias)
        self.v_proj = nn.Linear(d_model, d_model, bias=proj_bias)
        self.out_proj = nn.Linear(d_model, d_model, bias=proj_bias)

    def project_memory(self, memory: torch.Tensor,
                       memory_padding_mask: torch.Tensor | None = None) -> MemoryKV:
        """memory (batch, S, d_model) -> its keys, values and keep-mask (see :data:`MemoryKV`)."""
        check_sequence(memory, self.d_model, "memory")
        check_padding_mask(memory_padding_mask, memory.shape[0], memory.shape[1])
        return self.project(memory, keep_mask(memory_padding_mask))

    def project(self, memory: torch.Tensor, keep: torch.Tensor | None) -> MemoryKV:
        """:meth:`project_memory` given the :func:`keep_mask`, without the input checks (a
        model with many layers checks its memory once)."""
        key = rearrange(self.k_proj(memory), "b s (h d) -> b h s d", h=self.n_heads)
        value = rearrange(self.v_proj(memory), "b s (h d) -> b h s d", h=self.n_heads)
        return key, value, keep

    def attend(self, x: torch.Tensor, memory_kv: MemoryKV) -> torch.Tensor:
        """x (batch, T, d_model) over projected memory -> (batch, T, d_model). SDPA path."""
        key, value, keep = memory_kv
        q = rearrange(self.q_proj(x), "b t (h d) -> b h t d", h=self.n_heads)
        y = F.scaled_dot_product_attention(
            q, key, value, attn_mask=keep, dropout_p=self.dropout if self.training else 0.0)
        return self.out_proj(rearrange(y, "b h t d -> b t (h d)"))

    def forward(self, x: torch.Tensor, memory: torch.Tensor,
                memory_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (batch, T, d_model), memory (batch, S, d_model) -> (batch, T, d_model)."""
        check_sequence(x, self.d_model)
        if memory.shape[0] != x.shape[0]:
            raise ValueError(f"memory has batch {memory.shape[0]} but x has batch {x.shape[0]}")
        return self.attend(x, self.project_memory(memory, memory_padding_mask))

    def forward_ref(self, x: torch.Tensor, memory: torch.Tensor,
                    memory_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """:meth:`forward` written out: softmax(Q K^T / sqrt(head_dim)) V per head. For tests."""
        key, value, keep = self.project_memory(memory, memory_padding_mask)
        q = rearrange(self.q_proj(x), "b t (h d) -> b h t d", h=self.n_heads)
        scores = q @ key.transpose(-1, -2) / math.sqrt(self.head_dim)  # (b, h, T, S)
        if keep is not None:
            scores = scores.masked_fill(~keep, float("-inf"))
        y = scores.softmax(-1) @ value
        return self.out_proj(rearrange(y, "b h t d -> b t (h d)"))

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, n_heads={self.n_heads}, dropout={self.dropout}"
