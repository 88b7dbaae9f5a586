"""Multi-head attention with full, sliding-window or chunk patterns, and its decode cache.

SPADE's local layers use an efficient local attention (paper Sec. 3: sliding window or chunk);
"full" is the quadratic Transformer baseline. ``window_size`` = how many tokens on each side
a token sees (causal: the w previous tokens and itself); ``chunk_size`` = the length of the
non-overlapping chunks a token attends within. Position information comes from the SSM in
SPADE; the optional relative biases ("t5", "shaw") serve the encoder-decoder (T5 buckets, paper
Sec. 5.1) and the "Transformer (relative)" baseline (Shaw et al. 2018).

Decoding (causal only): ``initial_cache(batch)`` then ``step(x_t, cache) -> (y_t, cache)``.
The window cache is a preallocated ring buffer of exactly window_size + 1 slots (the w previous
tokens and the current one), so memory does not grow with the number of decoded tokens; the
chunk cache holds only the current chunk (chunk_size slots, stale slots masked out after a
chunk boundary); the full cache grows by one slot per token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from spadeformer.ops.element_attn import element_attend
from spadeformer.ops.local_attn import PATTERNS, _call_bias, attention_ref, local_attention
from spadeformer.ops.position_bias import ShawRelativeBias, T5RelativeBias
from spadeformer.ssm.base import (
    check_padding_mask,
    check_positive,
    check_sequence,
    check_step_input,
)

__all__ = ["Attention", "AttentionCache", "POSITION_BIASES", "attend_cached", "cache_append",
           "cache_slots", "empty_cache"]

POSITION_BIASES = (None, "t5", "shaw")


@dataclass
class AttentionCache:
    """Keys and values of the tokens a causal decoder may still attend to.

    key: (batch, heads, num_slots, key_dim), value: (batch, heads, num_slots, value_dim)
    (both head_dim for :class:`Attention`; Mega's z and v). ``position`` is the absolute
    position of the next token to decode (= the number of tokens seen so far); which slot
    holds which position follows from it and the pattern (see :meth:`Attention.step`).
    """

    key: torch.Tensor
    value: torch.Tensor
    position: int = 0

    @property
    def num_slots(self) -> int:
        """Allocated key/value slots (window: window_size + 1, chunk: chunk_size, full: a
        capacity >= the tokens seen, doubled when full)."""
        return self.key.shape[2]


def full_cache_capacity(tokens: int) -> int:
    """Slots a full-attention cache has allocated after ``tokens`` decoding steps: none at
    first, then 16, doubling whenever it is full (amortised O(1) copying per token)."""
    capacity = 0
    while capacity < tokens:
        capacity = max(16, 2 * capacity)
    return capacity


def _reserve(buf: torch.Tensor, pos: int) -> torch.Tensor:
    """A buffer with room for slot ``pos``: ``buf`` itself, or a copy of its first ``pos``
    slots in one of :func:`full_cache_capacity` (pos + 1) slots."""
    if pos < buf.shape[2]:
        return buf
    grown = buf.new_zeros(*buf.shape[:2], full_cache_capacity(pos + 1), buf.shape[3])
    grown[:, :, :pos] = buf[:, :, :pos]
    return grown


def _write_slot(buf: torch.Tensor, slot: int, val: torch.Tensor) -> torch.Tensor:
    """buf[:, :, slot] = val, in place unless that would break autograd of earlier steps."""
    if torch.is_grad_enabled() and (val.requires_grad or buf.requires_grad):
        buf = buf.clone()  # earlier steps saved buf for backward: do not overwrite it
    buf[:, :, slot] = val.to(buf.dtype)
    return buf


def cache_slots(pattern: str, window_size: int | None, chunk_size: int | None) -> int:
    """Key/value slots a fresh decode cache allocates: window_size + 1 (window), chunk_size
    (chunk) or 0 (full, which grows as it fills)."""
    return {"window": (window_size or 0) + 1, "chunk": chunk_size or 0, "full": 0}[pattern]


def empty_cache(batch_size: int, heads: int, slots: int, key_dim: int, value_dim: int,
                device: torch.device | str | None = None,
                dtype: torch.dtype | None = None) -> AttentionCache:
    """Zeroed cache: key (batch, heads, slots, key_dim), value (batch, heads, slots,
    value_dim), position 0. Keys and values may differ in width (Mega's z and v)."""
    return AttentionCache(
        key=torch.zeros(batch_size, heads, slots, key_dim, device=device, dtype=dtype),
        value=torch.zeros(batch_size, heads, slots, value_dim, device=device, dtype=dtype),
        position=0,
    )


def cache_append(
    cache: AttentionCache, k: torch.Tensor, v: torch.Tensor, pattern: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, AttentionCache]:
    """Write the new token's k, v (batch, heads, dim) into ``cache`` (consumed: slots are
    written in place when autograd allows).

    Returns (key, value) to attend over (batch, heads, S, dim), k_pos (S,) their absolute
    positions, valid (S,) bool or None (all valid), and the cache for the next token. The
    ring-buffer slot of absolute position p is p mod num_slots (window) or p mod chunk_size
    (chunk); a full cache keeps slot p = position p and doubles when full.
    """
    if not isinstance(cache, AttentionCache):
        raise TypeError(
            f"cache must be an AttentionCache from initial_cache(), got {type(cache).__name__}"
        )
    if cache.key.shape[0] != k.shape[0]:
        raise ValueError(f"cache holds batch {cache.key.shape[0]} but x_t has batch {k.shape[0]}")
    pos = cache.position
    dev = k.device
    if pattern == "full":
        # amortised O(1) per token instead of copying the whole cache every step
        buf_key = _write_slot(_reserve(cache.key, pos), pos, k)
        buf_value = _write_slot(_reserve(cache.value, pos), pos, v)
        key, value = buf_key[:, :, : pos + 1], buf_value[:, :, : pos + 1]
        k_pos = torch.arange(pos + 1, device=dev)
        valid = None  # every slot up to pos is a real past token
    else:
        slots = cache.num_slots
        slot = pos % slots
        key = buf_key = _write_slot(cache.key, slot, k)
        value = buf_value = _write_slot(cache.value, slot, v)
        s = torch.arange(slots, device=dev)
        if pattern == "window":
            # latest position p <= pos with p = s (mod slots); negative = never written
            k_pos = pos - (pos - s) % slots
            valid = k_pos >= 0
        else:  # chunk: slots hold positions chunk_start + s; later slots are stale
            k_pos = pos - slot + s
            valid = s <= slot
    return key, value, k_pos, valid, AttentionCache(key=buf_key, value=buf_value,
                                                    position=pos + 1)


def attend_cached(q: torch.Tensor, key: torch.Tensor, value: torch.Tensor, k_pos: torch.Tensor,
                  valid: torch.Tensor | None, position: int, bias=None,
                  dropout_p: float = 0.0, attention_fn: str = "softmax") -> torch.Tensor:
    """One query per row against the cached keys: q (batch, heads, dk) at absolute
    ``position``, key (batch, heads, S, dk), value (batch, heads, S, dv) -> (batch, heads, dv),
    in the cache's dtype. ``bias`` is a relative position bias callable (or None);
    ``attention_fn`` as in :func:`spadeformer.ops.local_attn.attention_ref`."""
    mask: torch.Tensor | None = None if valid is None else valid.view(1, 1, 1, -1)
    q = q.unsqueeze(2).to(key.dtype)  # (batch, heads, 1, dk)
    b = None
    if bias is not None:
        q_pos = torch.tensor([position], device=q.device)
        b = _call_bias(bias, q_pos, k_pos, q).to(q.dtype)  # (.., heads, 1, S)
        if b.dim() == 3:
            b = b.unsqueeze(0)
    if attention_fn != "softmax":
        return element_attend(q @ key.transpose(-1, -2), value, mask, b, attention_fn,
                              dropout_p)[:, :, 0]
    if b is not None:
        if mask is not None:
            b = b.masked_fill(~mask, float("-inf"))
        mask = b
    y = F.scaled_dot_product_attention(q, key, value, attn_mask=mask, dropout_p=dropout_p)
    return y[:, :, 0]  # the current token is always visible: no empty row


class Attention(nn.Module):
    """Multi-head self-attention: x (batch, L, d_model) -> (batch, L, d_model).

    Args:
        d_model: model width, divisible by ``n_heads``.
        n_heads: number of heads (head_dim = d_model // n_heads).
        pattern: "full", "window" (needs ``window_size``) or "chunk" (needs ``chunk_size``).
        window_size: tokens seen on each side (causal: the w previous and itself).
        chunk_size: chunk length; a token sees its own chunk (causal: its earlier part).
        causal: no token sees a later one; required for :meth:`step`.
        dropout: dropout on the attention probabilities (training only). Residual dropout is
            the layer's business.
        position_bias: None, "t5" (bucketed relative bias, :class:`T5RelativeBias`, with
            bidirectional buckets when not causal) or "shaw" (:class:`ShawRelativeBias`).
        bias_options: keyword arguments for the position bias (t5: num_buckets,
            max_distance, init_std; shaw: max_relative_position, per_head).
        proj_bias: whether the q/k/v/out projections have a bias.

    Padded positions (``padding_mask`` True) are never attended and their output is zero.
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        pattern: str = "full",
        window_size: int | None = None,
        chunk_size: int | None = None,
        causal: bool = True,
        dropout: float = 0.0,
        position_bias: str | None = None,
        bias_options: dict[str, Any] | None = None,
        proj_bias: bool = True,
    ):
        super().__init__()
        check_positive("d_model", d_model)
        check_positive("n_heads", n_heads)
        if d_model % n_heads != 0:
            raise ValueError(
                f"d_model must be divisible by n_heads, got d_model={d_model}, n_heads={n_heads}"
            )
        if pattern not in PATTERNS:
            raise ValueError(f"pattern must be one of {PATTERNS}, got {pattern!r}")
        for name, value, owner in (
            ("window_size", window_size, "window"),
            ("chunk_size", chunk_size, "chunk"),
        ):
            if pattern == owner:
                if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                    raise ValueError(
                        f"pattern={owner!r} needs {name} as an integer >= 1, got {value!r}"
                    )
            elif value is not None:
                raise ValueError(
                    f"{name} is only used with pattern={owner!r}; got {name}={value!r} with "
                    f"pattern={pattern!r} (leave it None)"
                )
        if not isinstance(causal, bool):
            raise TypeError(f"causal must be a bool, got {causal!r}")
        if (
            isinstance(dropout, bool)
            or not isinstance(dropout, (int, float))
            or not (0.0 <= dropout < 1.0)
        ):
            raise ValueError(f"dropout must be a number in [0, 1), got {dropout!r}")
        if position_bias not in POSITION_BIASES:
            raise ValueError(
                f"position_bias must be one of {POSITION_BIASES}, got {position_bias!r}"
            )
        if not isinstance(proj_bias, bool):
            raise TypeError(f"proj_bias must be a bool, got {proj_bias!r}")

        self.d_model = d_model
        self.n_heads = n_heads
        self.head_dim = d_model // n_heads
        self.pattern = pattern
        self.window_size = window_size
        self.chunk_size = chunk_size
        self.causal = causal
        self.dropout = float(dropout)
        self.position_bias = position_bias

        self.q_proj = nn.Linear(d_model, d_model, bias=proj_bias)
        self.k_proj = nn.Linear(d_model, d_model, bias=proj_bias)
        self.v_proj = nn.Linear(d_model, d_model, bias=proj_bias)
        self.out_proj = nn.Linear(d_model, d_model, bias=proj_bias)
        self.relative_bias = self._build_bias(position_bias, bias_options)

    def _build_bias(self, kind: str | None, options: dict[str, Any] | None) -> nn.Module | None:
        if options is not None and not isinstance(options, dict):
            raise TypeError(f"bias_options must be a dict or None, got {type(options).__name__}")
        if kind is None:
            if options:
                raise ValueError(
                    f"bias_options={options!r} given but position_bias=None; set position_bias "
                    "to 't5' or 'shaw', or drop bias_options"
                )
            return None
        options = dict(options or {})
        allowed = {
            "t5": ("num_buckets", "max_distance", "init_std"),
            "shaw": ("max_relative_position", "per_head"),
        }[kind]
        unknown = sorted(set(options) - set(allowed))
        if unknown:
            raise ValueError(
                f"bias_options for position_bias={kind!r} accepts {allowed}, got unknown {unknown}"
            )
        if kind == "t5":
            # causal attention never looks ahead, so only the past needs buckets (T5 decoder)
            return T5RelativeBias(self.n_heads, bidirectional=not self.causal, **options)
        return ShawRelativeBias(self.head_dim, self.n_heads, **options)

    # ---------------------------------------------------------------------------------------
    # full-sequence forward (fast) and its reference twin
    # ---------------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: (batch, L, d_model), padding_mask: (batch, L) bool or None -> (batch, L, d_model)."""
        return self._attend(x, padding_mask, local_attention)

    def forward_ref(
        self, x: torch.Tensor, padding_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Same as :meth:`forward` through the dense :func:`attention_ref`. For tests."""
        return self._attend(x, padding_mask, attention_ref)

    def _attend(self, x: torch.Tensor, padding_mask: torch.Tensor | None, attn) -> torch.Tensor:
        check_sequence(x, self.d_model)
        check_padding_mask(padding_mask, x.shape[0], x.shape[1])
        q, k, v = (
            rearrange(proj(x), "b l (h d) -> b h l d", h=self.n_heads)
            for proj in (self.q_proj, self.k_proj, self.v_proj)
        )
        y = attn(
            q,
            k,
            v,
            self.pattern,
            window_size=self.window_size,
            chunk_size=self.chunk_size,
            causal=self.causal,
            key_padding_mask=padding_mask,
            bias=self.relative_bias,
            dropout_p=self.dropout if self.training else 0.0,
        )  # (batch, heads, L, head_dim)
        y = self.out_proj(rearrange(y, "b h l d -> b l (h d)"))
        if padding_mask is not None:
            y = y.masked_fill(padding_mask.unsqueeze(-1), 0.0)
        return y

    # ---------------------------------------------------------------------------------------
    # causal decoding
    # ---------------------------------------------------------------------------------------

    def _require_causal(self) -> None:
        if not self.causal:
            raise RuntimeError(
                "step()/initial_cache() need a causal Attention, but this one has causal=False "
                "(it looks at future tokens); build it with causal=True"
            )

    def initial_cache(
        self,
        batch_size: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> AttentionCache:
        """Empty cache for ``batch_size`` sequences (device/dtype default to the weights')."""
        self._require_causal()
        check_positive("batch_size", batch_size)
        weight = self.q_proj.weight
        device = weight.device if device is None else device
        dtype = weight.dtype if dtype is None else dtype
        slots = cache_slots(self.pattern, self.window_size, self.chunk_size)
        return empty_cache(batch_size, self.n_heads, slots, self.head_dim, self.head_dim,
                           device=device, dtype=dtype)

    def step(self, x_t: torch.Tensor, cache: AttentionCache) -> tuple[torch.Tensor, AttentionCache]:
        """One causal decoding step: x_t (batch, d_model) -> y_t (batch, d_model), new cache.

        Equals ``forward`` on the whole sequence at this position. The ring-buffer slot of
        absolute position p is p mod num_slots (window) or p mod chunk_size (chunk); slots are
        written in place when autograd does not need the old contents (no copy of the cache
        per token), so the ``cache`` passed in is consumed: to step twice from one cache
        (beam search, several continuations of one prompt), ``copy.deepcopy`` it first.
        """
        self._require_causal()
        check_step_input(x_t, self.d_model)
        q, k, v = (
            rearrange(proj(x_t), "b (h d) -> b h d", h=self.n_heads)
            for proj in (self.q_proj, self.k_proj, self.v_proj)
        )
        key, value, k_pos, valid, new_cache = cache_append(cache, k, v, self.pattern)
        y = attend_cached(q, key, value, k_pos, valid, cache.position, self.relative_bias,
                          self.dropout if self.training else 0.0)
        # back to the projections' dtype (the cache may be kept in another one)
        y = self.out_proj(rearrange(y, "b h d -> b (h d)").to(v.dtype))
        return y, new_cache

    def extra_repr(self) -> str:
        size = {
            "window": f", window_size={self.window_size}",
            "chunk": f", chunk_size={self.chunk_size}",
            "full": "",
        }[self.pattern]
        return (
            f"d_model={self.d_model}, n_heads={self.n_heads}, pattern={self.pattern!r}{size}, "
            f"causal={self.causal}, dropout={self.dropout}, position_bias={self.position_bias!r}"
        )
