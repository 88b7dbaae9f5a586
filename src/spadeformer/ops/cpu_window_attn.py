"""Causal sliding-window attention on CPU without copying the key band.

The generic blocked path of :mod:`spadeformer.ops.local_attn` gathers, for every query block of
``w`` rows, its band of ``2w`` keys into a fresh tensor (a ``cat`` of shifted blocks), and its
backward zero-fills and copies that band back twice per tensor: at L=8192, 8 heads, ~20% of the
attention's forward + backward. Here the band is a *view*. With q, k, v laid out as
(batch, L, heads, d) -- what a linear projection gives -- and flattened to (batch*L, heads*d),
the band of flattened block m is rows [(m - 1) w, (m + 1) w), so one overlapping ``as_strided``
view gives every block m >= 1 its band without a copy. PyTorch's CPU flash kernel reads strided
inputs; its backward returns each block's band gradient, folded back with one copy and one add.

Where a sequence starts (block 0 of each sequence), the band would reach into the previous
sequence (or before the tensor). Those blocks are computed by a second, small causal flash call
over keys [0, w) of each sequence; in the big call (which covers them for batch > 1) their
output is overwritten, their output gradient is zero and their band gradients are dropped, so
nothing (not even a NaN) crosses from one sequence to another.

The output is a view of a tensor saved for the backward (as with
``F.scaled_dot_product_attention``, which saves its output): modifying it in place before
``backward()`` raises; change a copy instead.

Scope (:func:`supported`): CPU, causal, block = window = w, no padding mask, no bias, no
dropout, q / k / v of one shape, L > w. L need not be a multiple of w: the tail is zero-padded,
and padded keys come after every real query, so causality already hides them. The reference
twin is :func:`spadeformer.ops.local_attn.attention_ref` with ``pattern="window"``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

__all__ = ["causal_window_attention_cpu", "supported"]

_aten = torch.ops.aten
_HAVE_OPS = hasattr(_aten, "_scaled_dot_product_flash_attention_for_cpu") and hasattr(
    _aten, "_scaled_dot_product_flash_attention_for_cpu_backward"
)


def supported(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    window: int,
    block: int,
    causal: bool,
    key_padding_mask: torch.Tensor | None,
    bias: object,
    dropout_p: float,
) -> bool:
    """Whether :func:`causal_window_attention_cpu` computes this call (see the module docstring)."""
    return (
        _HAVE_OPS
        and q.device.type == "cpu"
        and causal
        and window == block
        and q.shape[2] > block
        and q.numel() > 0  # the CPU kernel divides by the head count
        and key_padding_mask is None
        and bias is None
        and dropout_p == 0.0
        and q.shape == k.shape == v.shape
        and q.dtype == k.dtype == v.dtype
        and q.dtype in (torch.float32, torch.float64, torch.bfloat16)
        # the private kernel is not autocast, and this Function has no setup_context for
        # torch.func transforms: both keep the generic (SDPA) path
        and not torch.is_autocast_enabled("cpu")
        and not _functorch_active()
    )


def _functorch_active() -> bool:
    active = getattr(torch._C, "_are_functorch_transforms_active", None)
    return bool(active()) if active is not None else False


def _flash_forward(q, k, v, is_causal: bool, attn_mask: torch.Tensor | None = None):
    """PyTorch's CPU flash attention kernel -> (out, logsumexp)."""
    return _aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, v, 0.0, is_causal, attn_mask=attn_mask
    )[:2]


def _flash_backward(go, q, k, v, out, lse, is_causal: bool, attn_mask=None):
    """The backward of :func:`_flash_forward` -> (grad_q, grad_k, grad_v)."""
    return _aten._scaled_dot_product_flash_attention_for_cpu_backward(
        go, q, k, v, out, lse, 0.0, is_causal, attn_mask=attn_mask
    )


def _band_mask(w: int, dtype: torch.dtype) -> torch.Tensor:
    """(1, 1, w, 2w) additive mask: query i of a block sees band slots i .. i + w (that is,
    keys i - w .. i of the sequence), -inf elsewhere."""
    rel = torch.arange(2 * w)[None, :] - w - torch.arange(w)[:, None]  # key - query
    allowed = (rel >= -w) & (rel <= 0)
    return torch.zeros(w, 2 * w, dtype=dtype).masked_fill(~allowed, float("-inf"))[None, None]


def _blocks(t: torch.Tensor, w: int) -> torch.Tensor:
    """(B, Lp, H, d) contiguous -> (B*Lp/w, H, w, d) view: flattened query blocks."""
    B, Lp, H, d = t.shape
    return t.view(B * Lp // w, w, H, d).transpose(1, 2)


def _bands(t: torch.Tensor, w: int) -> torch.Tensor:
    """(B, Lp, H, d) contiguous -> (B*Lp/w - 1, H, 2w, d) overlapping view: entry m - 1 is the
    band of flattened block m >= 1, rows [(m - 1) * w, (m + 1) * w)."""
    B, Lp, H, d = t.shape
    return t.as_strided((B * Lp // w - 1, H, 2 * w, d), (w * H * d, d, H * d, 1))


def _fold_band_grad(g: torch.Tensor, w: int, like: torch.Tensor) -> torch.Tensor:
    """Band gradients (M - 1, H, 2w, d) of blocks 1 .. M-1 -> (B, Lp, H, d) like ``like``: slot
    w + i is row i of its own block, slot i row i of the block before."""
    g = g.transpose(1, 2)  # (M - 1, 2w, H, d): the kernel's memory layout, a view
    # Sequence starts after the first (flattened blocks nb, 2 nb, ... = entries nb - 1, ...)
    # were scored against the previous sequence: their output gradient was zero, but 0 * inf
    # or NaN there would leak into both sequences, so their band gradients are dropped.
    nb = like.shape[1] // w
    g[nb - 1 :: nb] = 0.0
    out = torch.empty_like(like)
    blocks = out.view(-1, w, *out.shape[2:])  # (M, w, H, d)
    blocks[0] = 0.0
    blocks[1:] = g[:, w:]
    blocks[:-1] += g[:, :w]
    return out


def _starts(t: torch.Tensor, w: int) -> torch.Tensor:
    """(B, Lp, H, d) -> (B, H, w, d) view: the first block of every sequence."""
    return t[:, :w].transpose(1, 2)


def _pad_rows(t: torch.Tensor, Lp: int) -> torch.Tensor:
    """(B, H, L, d) -> (B, Lp, H, d) contiguous, zero rows appended (no copy when L = Lp and
    t is already a transposed (B, L, H, d) tensor, as a linear projection gives)."""
    t = t.transpose(1, 2)
    if t.shape[1] != Lp:
        t = F.pad(t, (0, 0, 0, 0, 0, Lp - t.shape[1]))
    return t.contiguous()


class _CausalWindowAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, w: int):
        B, H, L, d = q.shape
        Lp = -(-L // w) * w
        qm, km, vm = (_pad_rows(t, Lp) for t in (q, k, v))  # (B, Lp, H, d)
        mask = _band_mask(w, q.dtype)
        # flattened blocks 1 .. M-1 with their bands; blocks starting a sequence (other than
        # the first) see the previous sequence in their band: redone below
        out_b, lse = _flash_forward(
            _blocks(qm, w)[1:], _bands(km, w), _bands(vm, w), False, attn_mask=mask
        )
        out0, lse0 = _flash_forward(_starts(qm, w), _starts(km, w), _starts(vm, w), True)
        out = torch.empty_like(qm)
        _blocks(out, w)[1:] = out_b
        out[:, :w] = out0.transpose(1, 2)
        ctx.save_for_backward(qm, km, vm, out, lse, lse0, mask)
        ctx.length, ctx.window = L, w
        return out[:, :L].transpose(1, 2)  # (B, H, L, d)

    @staticmethod
    @once_differentiable  # the flash backward has no derivative
    def backward(ctx, grad):
        qm, km, vm, out, lse, lse0, mask = ctx.saved_tensors
        L, w = ctx.length, ctx.window
        # the big call's output gradient; zero at sequence-start blocks (the small call owns
        # them, and their bands hold another sequence) and at padded rows past L
        go = torch.empty_like(qm)
        go[:, :w] = 0.0
        go[:, w:L] = grad.transpose(1, 2)[:, w:]
        go[:, L:] = 0.0
        # out: the big call's own output except at sequence starts, where go is zero
        gq, gk, gv = _flash_backward(
            _blocks(go, w)[1:], _blocks(qm, w)[1:], _bands(km, w), _bands(vm, w),
            _blocks(out, w)[1:], lse, False, attn_mask=mask,
        )
        dq = torch.empty_like(qm)
        _blocks(dq, w)[1:] = gq
        dk, dv = _fold_band_grad(gk, w, km), _fold_band_grad(gv, w, vm)
        q0, k0, v0, o0 = (_starts(t, w) for t in (qm, km, vm, out))
        gq0, gk0, gv0 = _flash_backward(grad[:, :, :w], q0, k0, v0, o0, lse0, True)
        dq[:, :w] = gq0.transpose(1, 2)  # the big call gave exact zeros there
        dk[:, :w] += gk0.transpose(1, 2)
        dv[:, :w] += gv0.transpose(1, 2)
        return (*(t[:, :L].transpose(1, 2) for t in (dq, dk, dv)), None)


def causal_window_attention_cpu(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int
) -> torch.Tensor:
    """Causal sliding-window attention (query i sees keys i - window .. i), queries in blocks
    of ``window``: (batch, heads, L, d) x3 -> (batch, heads, L, d). Arguments are not checked
    here: call it through :func:`spadeformer.ops.local_attn.sliding_window_attention`, which
    checks them and asks :func:`supported` first."""
    return _CausalWindowAttention.apply(q, k, v, window)
