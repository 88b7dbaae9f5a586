"""Local attention (sliding window, chunk) and full attention: a dense reference + fast paths.

All functions are parameter-free and take q, k, v of shape (batch, heads, L, head_dim).

Patterns (i = query position, j = key position, w = window_size, c = chunk_size):

    window, causal:         i - w <= j <= i          (the w previous tokens and itself)
    window, bidirectional:  |i - j| <= w
    chunk,  causal:         j // c == i // c  and  j <= i
    chunk,  bidirectional:  j // c == i // c
    full,   causal:         j <= i
    full,   bidirectional:  every j

``key_padding_mask`` is (batch, L) bool, True at padded keys, which are never attended. A query
row left with no allowed key outputs zeros (never NaN); the ops do not zero padded *query* rows
(a caller such as :class:`spadeformer.attention.Attention` does that).

Additive bias (``bias=``), added to the scaled scores q.k / sqrt(d) before the softmax:

* a dense tensor (heads or 1, L, L); or
* a callable ``bias(q_pos, k_pos) -> (heads or 1, ..., Lq, Lk)``. ``q_pos`` (..., Lq) and
  ``k_pos`` (..., Lk) are int64 absolute positions with the same leading dims (none, or one
  block axis). The fast paths only ask for the blocks they compute, and key positions may lie
  outside [0, L) (they are masked afterwards), so the callable must accept any integer.
  Optional attributes refine the protocol:
    - ``translation_invariant = True``: the bias depends on k_pos - q_pos only (T5, Shaw,
      Mega's), so the fast paths call it once with 1-D positions of one block and share it by
      all blocks;
    - ``needs_query = True``: the bias also depends on the query (Shaw et al. 2018); it is
      called as ``bias(q_pos, k_pos, q=q_block)`` with q_block (batch, heads, ..., Lq, d) and
      returns (batch, heads, ..., Lq, Lk). See :mod:`spadeformer.ops.position_bias`.

Fast paths: one batched ``scaled_dot_product_attention`` call over blocks of queries. The window
path gathers, for each query block of size b, its keys [start - w, start + b (+ w)) with
``unfold`` (b + w or b + 2w keys) and shares one (b, b + 2w) structure mask by all blocks; it
never builds an L x L tensor and computes no score it then throws away beyond that block band.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from einops import rearrange

from spadeformer.ops import cpu_window_attn
from spadeformer.ops.element_attn import check_attention_fn, element_attend
from spadeformer.ops.flex_attn import flex_local_attention, note_failure, pick_backend

__all__ = [
    "PATTERNS",
    "attention_ref",
    "chunk_attention",
    "dense_attention_mask",
    "full_attention",
    "local_attention",
    "sliding_window_attention",
]

PATTERNS = ("full", "window", "chunk")

BiasLike = torch.Tensor | Callable[..., torch.Tensor]


# --------------------------------------------------------------------------------------------
# argument checks (shared by the reference and the fast paths)
# --------------------------------------------------------------------------------------------


def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must have shape (batch, heads, L, head_dim), got {got}")
    if q.shape != k.shape or k.shape[:3] != v.shape[:3]:
        raise ValueError(
            "q and k must have the same shape and v the same (batch, heads, L), got "
            f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if q.shape[2] < 1:
        raise ValueError(f"q must have length L >= 1, got shape {tuple(q.shape)}")


def _check_size(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return value


def _check_pattern(
    pattern: str, window_size: int | None, chunk_size: int | None
) -> tuple[int | None, int | None]:
    if pattern not in PATTERNS:
        raise ValueError(f"pattern must be one of {PATTERNS}, got {pattern!r}")
    if pattern == "window":
        if window_size is None:
            raise ValueError("pattern='window' needs window_size (an integer >= 1), got None")
        _check_size("window_size", window_size)
    if pattern == "chunk":
        if chunk_size is None:
            raise ValueError("pattern='chunk' needs chunk_size (an integer >= 1), got None")
        _check_size("chunk_size", chunk_size)
    return window_size, chunk_size


def _check_kpm(key_padding_mask: torch.Tensor | None, batch: int, length: int) -> None:
    if key_padding_mask is None:
        return
    if not isinstance(key_padding_mask, torch.Tensor) or key_padding_mask.dtype != torch.bool:
        got = (
            key_padding_mask.dtype
            if isinstance(key_padding_mask, torch.Tensor)
            else type(key_padding_mask).__name__
        )
        raise TypeError(f"key_padding_mask must be a bool tensor (True = padded), got {got}")
    if tuple(key_padding_mask.shape) != (batch, length):
        raise ValueError(
            f"key_padding_mask must have shape (batch, L) = ({batch}, {length}), "
            f"got {tuple(key_padding_mask.shape)}"
        )


def _check_dropout(dropout_p: float) -> None:
    if not (0.0 <= float(dropout_p) < 1.0):
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p!r}")


# --------------------------------------------------------------------------------------------
# bias helpers
# --------------------------------------------------------------------------------------------


class _DenseBias:
    """Wrap a dense (heads or 1, L, L) bias as a positional callable (clamped gather)."""

    translation_invariant = False
    needs_query = False

    def __init__(self, bias: torch.Tensor, length: int, heads: int):
        if (
            bias.dim() != 3
            or bias.shape[0] not in (1, heads)
            or bias.shape[1:]
            != (
                length,
                length,
            )
        ):
            raise ValueError(
                f"a tensor bias must have shape (heads={heads} or 1, L={length}, L={length}), "
                f"got {tuple(bias.shape)}"
            )
        self.bias = bias
        self.length = length

    def __call__(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        qi = q_pos.clamp(0, self.length - 1).unsqueeze(-1)  # (..., Lq, 1)
        ki = k_pos.clamp(0, self.length - 1).unsqueeze(-2)  # (..., 1, Lk)
        return self.bias[:, qi, ki]  # (heads, ..., Lq, Lk)


def _as_bias_fn(bias: BiasLike | None, length: int, heads: int) -> Callable | None:
    if bias is None:
        return None
    if isinstance(bias, torch.Tensor):
        return _DenseBias(bias, length, heads)
    if callable(bias):
        return bias
    raise TypeError(f"bias must be None, a tensor or a callable, got {type(bias).__name__}")


def _call_bias(fn: Callable, q_pos: torch.Tensor, k_pos: torch.Tensor, q: torch.Tensor):
    if getattr(fn, "needs_query", False):
        return fn(q_pos, k_pos, q=q)
    return fn(q_pos, k_pos)


# --------------------------------------------------------------------------------------------
# reference: dense L x L mask + softmax (the specification)
# --------------------------------------------------------------------------------------------


def dense_attention_mask(
    pattern: str,
    length: int,
    window_size: int | None = None,
    chunk_size: int | None = None,
    causal: bool = True,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """(L, L) bool mask, True where query i (row) may attend key j (column)."""
    _check_pattern(pattern, window_size, chunk_size)
    i = torch.arange(length, device=device)[:, None]
    j = torch.arange(length, device=device)[None, :]
    return pattern_allows(pattern, i, j, window_size, chunk_size, causal)


def pattern_allows(
    pattern: str,
    q_idx: torch.Tensor,
    k_idx: torch.Tensor,
    window_size: int | None = None,
    chunk_size: int | None = None,
    causal: bool = True,
) -> torch.Tensor:
    """Whether query position q_idx may attend key position k_idx (int tensors, broadcast):
    the one definition of the patterns in the module docstring, used by the dense mask and
    by the FlexAttention mask_mod. Arguments are not checked (callers have)."""
    rel = k_idx - q_idx
    allowed = rel <= 0 if causal else torch.ones_like(rel, dtype=torch.bool)
    if pattern == "window":
        allowed = allowed & (rel.abs() <= window_size)
    elif pattern == "chunk":
        allowed = allowed & (k_idx // chunk_size == q_idx // chunk_size)
    return allowed


def attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: str,
    window_size: int | None = None,
    chunk_size: int | None = None,
    causal: bool = True,
    key_padding_mask: torch.Tensor | None = None,
    bias: BiasLike | None = None,
    dropout_p: float = 0.0,
    attention_fn: str = "softmax",
) -> torch.Tensor:
    """The specification: dense scores, dense mask, softmax. O(L^2) memory; for tests.

    q, k: (batch, heads, L, d); v: (batch, heads, L, dv) -> (batch, heads, L, dv).
    ``attention_fn`` "laplace" / "relu2" replaces the softmax by Mega's element-wise weights
    (:mod:`spadeformer.ops.element_attn`).
    """
    _check_qkv(q, k, v)
    _check_pattern(pattern, window_size, chunk_size)
    _check_dropout(dropout_p)
    check_attention_fn(attention_fn)
    B, H, L, d = q.shape
    _check_kpm(key_padding_mask, B, L)
    allowed = dense_attention_mask(pattern, L, window_size, chunk_size, causal, q.device)
    allowed = allowed[None, None]  # (1, 1, L, L)
    if key_padding_mask is not None:
        allowed = allowed & ~key_padding_mask[:, None, None, :]  # (B, 1, L, L)
    fn = _as_bias_fn(bias, L, H)
    pos = torch.arange(L, device=q.device)
    b = None if fn is None else _call_bias(fn, pos, pos, q)
    qk = torch.einsum("bhid,bhjd->bhij", q, k)
    if attention_fn != "softmax":
        return element_attend(qk, v, allowed, b, attention_fn, dropout_p)
    scores = qk / math.sqrt(d)
    if b is not None:
        scores = scores + b.to(scores.dtype)
    scores = scores.masked_fill(~allowed, float("-inf"))
    has_key = allowed.any(-1, keepdim=True)  # rows with no allowed key output zeros
    probs = torch.softmax(scores.masked_fill(~has_key, 0.0), dim=-1) * has_key
    if dropout_p > 0.0:
        probs = F.dropout(probs, p=dropout_p)
    return torch.einsum("bhij,bhjd->bhid", probs, v)


# --------------------------------------------------------------------------------------------
# fast paths: one batched SDPA call over query blocks
# --------------------------------------------------------------------------------------------


def _blocked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    block: int,
    left: int,
    right: int,
    lo: int | None,
    hi: int | None,
    key_padding_mask: torch.Tensor | None,
    bias: BiasLike | None,
    dropout_p: float,
    attention_fn: str = "softmax",
) -> torch.Tensor:
    """Queries in blocks of ``block``; block n sees keys [n*block - left, (n+1)*block + right).

    Inside that band, query i may see key j when -lo <= j - i <= hi (None = no limit); keys
    outside [0, L) or padded are masked. One SDPA call on (batch * blocks, heads, block, d);
    for an element-wise ``attention_fn``, two batched matmuls around :func:`element_weights`.
    """
    B, H, L, d = q.shape
    nb = -(-L // block)
    Lp = nb * block
    kb = block + left + right
    dev = q.device

    def blocks_q(t: torch.Tensor) -> torch.Tensor:  # (B, H, L, d) -> (B*nb, H, block, d)
        t = F.pad(t, (0, 0, 0, Lp - L))
        return rearrange(t, "b h (n i) d -> (b n) h i d", i=block)

    def blocks_k(t: torch.Tensor) -> torch.Tensor:  # (B, H, L, d) -> (B*nb, H, kb, d)
        if left == 0 and right == 0:
            return blocks_q(t)
        t = F.pad(t, (0, 0, left, Lp - L + right))
        if left % block == 0 and right % block == 0:
            # the band is whole blocks: concatenate shifted block views. Same values as the
            # unfold below, but its backward is slice-adds (~2x faster than unfold_backward)
            tb = rearrange(t, "b h (n i) d -> b h n i d", i=block)
            band = torch.cat([tb[:, :, s : s + nb] for s in range(kb // block)], dim=-2)
            return rearrange(band, "b h n j d -> (b n) h j d")
        t = t.unfold(2, kb, block)  # (B, H, nb, d, kb): overlapping windows, a strided view
        return rearrange(t, "b h n d j -> (b n) h j d")

    qb, kbk, vbk = blocks_q(q), blocks_k(k), blocks_k(v)

    # pure causal inside the block and nothing to hide: let SDPA build the mask itself (before
    # any structure mask exists: for full attention that would be an L x L tensor). Keys
    # past L in the last block are only visible to the (discarded) query rows past L.
    fn = _as_bias_fn(bias, L, H)
    pure_causal = left == 0 and right == 0 and lo is None and hi == 0
    softmax = attention_fn == "softmax"
    if softmax and pure_causal and key_padding_mask is None and fn is None:
        out = F.scaled_dot_product_attention(qb, kbk, vbk, dropout_p=dropout_p, is_causal=True)
        return rearrange(out, "(b n) h i d -> b h (n i) d", b=B)[:, :, :L]

    # structure mask shared by every block: (block, kb), relative offset j - i
    structure = None
    if lo is not None or hi is not None:
        rel = (torch.arange(kb, device=dev) - left)[None, :] - torch.arange(block, device=dev)[
            :, None
        ]
        structure = torch.ones(block, kb, dtype=torch.bool, device=dev)
        if lo is not None:
            structure &= rel >= -lo
        if hi is not None:
            structure &= rel <= hi

    # key validity per block: in [0, L) and not padded -> (B, nb, kb)
    allowed = structure[None, None] if structure is not None else None  # (1, 1, block, kb)
    need_keys = (
        key_padding_mask is not None or left > 0 or right > 0 or (Lp != L and not pure_causal)
    )
    if need_keys:
        valid = (
            ~key_padding_mask
            if key_padding_mask is not None
            else torch.ones(B, L, dtype=torch.bool, device=dev)
        )
        valid = F.pad(valid, (left, Lp - L + right), value=False)
        valid = valid.unfold(1, kb, block)  # (B, nb, kb)
        valid = rearrange(valid, "b n j -> (b n) 1 1 j")
        allowed = valid if allowed is None else allowed & valid

    b = None
    if fn is not None:
        q5 = rearrange(qb, "(b n) h i d -> b h n i d", b=B)
        b = _block_bias(fn, qb_5d=q5, block=block, nb=nb, left=left, kb=kb)
    if not softmax:  # no NaN risk: an empty row gets zero weights
        out = element_attend(qb @ kbk.transpose(-1, -2), vbk, allowed, b, attention_fn,
                             dropout_p)
        return rearrange(out, "(b n) h i d -> b h (n i) d", b=B)[:, :, :L]

    # Rows with no allowed key (padding, or query rows past L): SDPA may give NaN there, and
    # NaN scores poison every gradient in the backward pass, so such rows see every key of
    # their band and their output is zeroed afterwards. Real rows always see themselves, so
    # this only arises with a padding mask or a ragged last block.
    empty = None
    if allowed is not None and (key_padding_mask is not None or Lp != L):
        empty = ~allowed.any(-1, keepdim=True)
        allowed = allowed | empty

    mask = allowed
    if b is not None:
        mask = b.to(q.dtype)
        if allowed is not None:
            neg_inf = torch.tensor(float("-inf"), dtype=q.dtype, device=dev)
            mask = torch.where(allowed, mask, neg_inf)
    out = F.scaled_dot_product_attention(qb, kbk, vbk, attn_mask=mask, dropout_p=dropout_p)
    if empty is not None:
        out = out.masked_fill(empty, 0.0)
    return rearrange(out, "(b n) h i d -> b h (n i) d", b=B)[:, :, :L]


def _block_bias(
    fn: Callable, *, qb_5d: torch.Tensor, block: int, nb: int, left: int, kb: int
) -> torch.Tensor:
    """Bias for every (query block, key band): broadcastable to (B*nb, heads, block, kb)."""
    B = qb_5d.shape[0]
    dev = qb_5d.device
    if getattr(fn, "translation_invariant", False):
        q_pos = torch.arange(block, device=dev)  # block 0 stands for all blocks
        k_pos = torch.arange(kb, device=dev) - left
        if getattr(fn, "needs_query", False):
            out = fn(q_pos, k_pos, q=qb_5d)  # (B, H, nb, block, kb)
            return rearrange(out, "b h n i j -> (b n) h i j")
        return fn(q_pos, k_pos)[None]  # (1, H', block, kb)
    start = torch.arange(nb, device=dev)[:, None] * block
    q_pos = start + torch.arange(block, device=dev)[None, :]  # (nb, block)
    k_pos = start - left + torch.arange(kb, device=dev)[None, :]  # (nb, kb)
    if getattr(fn, "needs_query", False):
        out = fn(q_pos, k_pos, q=qb_5d)  # (B, H, nb, block, kb)
        return rearrange(out, "b h n i j -> (b n) h i j")
    out = fn(q_pos, k_pos)  # (H', nb, block, kb)
    out = out.unsqueeze(0).expand(B, -1, -1, -1, -1)
    return rearrange(out, "b h n i j -> (b n) h i j")


def sliding_window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window_size: int,
    causal: bool = True,
    key_padding_mask: torch.Tensor | None = None,
    bias: BiasLike | None = None,
    dropout_p: float = 0.0,
    block_size: int | None = None,
    attention_fn: str = "softmax",
) -> torch.Tensor:
    """Sliding-window attention, blocked: (batch, heads, L, d) -> (batch, heads, L, dv).

    Queries go in blocks of ``block_size`` (default: window_size); each block attends to its
    own keys plus the ``window_size`` keys before it (and after it when not causal), so every
    SDPA call sees at most block + 2 * window keys per query. On CPU the common causal softmax
    case (block = window, no mask, bias or dropout) takes :mod:`spadeformer.ops.cpu_window_attn`,
    which reads the key band as a view instead of copying it. ``attention_fn``: as in
    :func:`attention_ref`.
    """
    _check_qkv(q, k, v)
    _check_size("window_size", window_size)
    check_attention_fn(attention_fn)
    if block_size is not None:
        _check_size("block_size", block_size)
    _check_dropout(dropout_p)
    L = q.shape[2]
    _check_kpm(key_padding_mask, q.shape[0], L)
    w = min(window_size, L - 1)  # a window wider than the sequence sees all of it
    block = min(block_size or max(window_size, 1), L)
    if attention_fn == "softmax" and cpu_window_attn.supported(
        q, k, v, window=w, block=block, causal=causal, key_padding_mask=key_padding_mask,
        bias=bias, dropout_p=dropout_p,
    ):
        return cpu_window_attn.causal_window_attention_cpu(q, k, v, w)
    return _blocked_attention(
        q,
        k,
        v,
        block=block,
        left=w,
        right=0 if causal else w,
        lo=w,
        hi=0 if causal else w,
        key_padding_mask=key_padding_mask,
        bias=bias,
        dropout_p=dropout_p,
        attention_fn=attention_fn,
    )


def chunk_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    chunk_size: int,
    causal: bool = True,
    key_padding_mask: torch.Tensor | None = None,
    bias: BiasLike | None = None,
    dropout_p: float = 0.0,
    attention_fn: str = "softmax",
) -> torch.Tensor:
    """Attention inside non-overlapping chunks: (batch, heads, L, d) -> (batch, heads, L, dv).
    ``attention_fn``: as in :func:`attention_ref`."""
    _check_qkv(q, k, v)
    check_attention_fn(attention_fn)
    _check_size("chunk_size", chunk_size)
    _check_dropout(dropout_p)
    L = q.shape[2]
    _check_kpm(key_padding_mask, q.shape[0], L)
    return _blocked_attention(
        q,
        k,
        v,
        block=min(chunk_size, L),
        left=0,
        right=0,
        lo=None,
        hi=0 if causal else None,
        key_padding_mask=key_padding_mask,
        bias=bias,
        dropout_p=dropout_p,
        attention_fn=attention_fn,
    )


def full_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = True,
    key_padding_mask: torch.Tensor | None = None,
    bias: BiasLike | None = None,
    dropout_p: float = 0.0,
    attention_fn: str = "softmax",
) -> torch.Tensor:
    """Full (quadratic) attention via SDPA: (batch, heads, L, d) -> (batch, heads, L, dv).
    An element-wise ``attention_fn`` (see :func:`attention_ref`) has no fused kernel: its
    L x L weights are materialised, as in the Mega reference."""
    _check_qkv(q, k, v)
    check_attention_fn(attention_fn)
    _check_dropout(dropout_p)
    L = q.shape[2]
    _check_kpm(key_padding_mask, q.shape[0], L)
    return _blocked_attention(
        q,
        k,
        v,
        block=L,
        left=0,
        right=0,
        lo=None,
        hi=0 if causal else None,
        key_padding_mask=key_padding_mask,
        bias=bias,
        dropout_p=dropout_p,
        attention_fn=attention_fn,
    )


def local_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: str,
    window_size: int | None = None,
    chunk_size: int | None = None,
    causal: bool = True,
    key_padding_mask: torch.Tensor | None = None,
    bias: BiasLike | None = None,
    dropout_p: float = 0.0,
    backend: str = "auto",
    attention_fn: str = "softmax",
) -> torch.Tensor:
    """Fast twin of :func:`attention_ref` (same arguments): dispatch on ``pattern``.

    q, k: (batch, heads, L, d); v: (batch, heads, L, dv) -> (batch, heads, L, dv).

    ``backend``: "sdpa" = one batched SDPA call over query blocks (every device); "flex" =
    FlexAttention with a block-sparse mask (:mod:`spadeformer.ops.flex_attn`); "auto" = flex
    on CUDA when the call is in its scope (no dropout, no query-dependent bias), else SDPA; a
    failing flex kernel makes auto fall back to SDPA with one warning. An element-wise
    ``attention_fn`` (Mega's laplace / relu2, see :func:`attention_ref`) always takes the
    blocked path: FlexAttention only runs a softmax.
    """
    _check_pattern(pattern, window_size, chunk_size)
    _check_dropout(dropout_p)
    _check_qkv(q, k, v)  # before pick_backend reads q.device
    check_attention_fn(attention_fn)
    if attention_fn != "softmax":
        if backend == "flex":
            raise ValueError(f"backend='flex' runs a softmax only; attention_fn="
                             f"{attention_fn!r} needs backend 'sdpa' or 'auto'")
        pick_backend(backend, q, bias, dropout_p)  # still refuses an unknown backend
        backend = "sdpa"
    if pick_backend(backend, q, bias, dropout_p) == "flex":
        _check_kpm(key_padding_mask, q.shape[0], q.shape[2])
        try:
            return flex_local_attention(
                q, k, v, pattern, window_size, chunk_size, causal, key_padding_mask, bias
            )
        except torch.OutOfMemoryError:
            raise
        except Exception as err:  # a compiler / kernel failure: auto keeps working on SDPA
            if backend == "flex":
                raise
            note_failure(err)
    common = dict(causal=causal, key_padding_mask=key_padding_mask, bias=bias, dropout_p=dropout_p,
                  attention_fn=attention_fn)
    if pattern == "window":
        return sliding_window_attention(q, k, v, window_size, **common)
    if pattern == "chunk":
        return chunk_attention(q, k, v, chunk_size, **common)
    return full_attention(q, k, v, **common)
