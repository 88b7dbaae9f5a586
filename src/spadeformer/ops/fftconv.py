"""Long convolutions computed with the FFT, causal or bidirectional, with padding masks.

Convention used everywhere in spadeformer: ``padding_mask`` is a bool tensor of shape
(batch, length) that is True at *padded* positions (as PyTorch's ``key_padding_mask``).

Semantics (t = output position, s = input position):

    causal:         y[t] = sum_{s <= t} k[t - s] u[s]
    bidirectional:  y[t] = sum_{s <= t} k[t - s] u[s] + sum_{s > t} k_reverse[s - t - 1] u[s]

so the reverse kernel never touches lag 0 (the current token is counted once, by ``k``). The
FFT is taken at a length n >= L + Lk with only factors 2, 3, 5 (fast for pocketfft and cuFFT),
which is never shorter than needed, so nothing wraps around.
"""

from __future__ import annotations

import torch

__all__ = ["fft_conv", "fft_conv_ref", "fast_fft_length"]


def fast_fft_length(n: int) -> int:
    """Smallest integer >= n whose prime factors are only 2, 3 and 5."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    best = 1 << (n - 1).bit_length()  # the power of two is always a candidate
    p5 = 1
    while p5 < best:
        p35 = p5
        while p35 < best:
            m = p35
            while m < n:
                m *= 2
            best = min(best, m)
            p35 *= 3
        p5 *= 5
    return best


def _mask_like(padding_mask: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """(batch, length) mask -> broadcastable to u of shape (batch, ..., length)."""
    if padding_mask.dim() != 2 or padding_mask.shape[0] != u.shape[0] or (
        padding_mask.shape[1] != u.shape[-1]
    ):
        raise ValueError(
            f"padding_mask must have shape (batch, length) = ({u.shape[0]}, {u.shape[-1]}), "
            f"got {tuple(padding_mask.shape)}"
        )
    if padding_mask.dtype != torch.bool:
        raise TypeError(
            f"padding_mask must be a bool tensor (True = padded), got {padding_mask.dtype}"
        )
    return padding_mask.view(u.shape[0], *([1] * (u.dim() - 2)), u.shape[-1])


def fft_conv(
    u: torch.Tensor,
    k: torch.Tensor,
    k_reverse: torch.Tensor | None = None,
    padding_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Long convolution of ``u`` with kernel ``k`` along the last axis.

    Args:
        u: (batch, ..., L) real input.
        k: (..., Lk) real kernel, broadcastable against u's leading axes; Lk <= L is typical
            but any Lk works (lags >= L simply never reach an output).
        k_reverse: optional (..., Lk) kernel for the anti-causal direction (bidirectional).
        padding_mask: optional (batch, L) bool, True at padded positions; padded inputs do not
            contribute and padded outputs are zero.
    Returns:
        (broadcast(batch, ...), L) in the dtype of ``u``.
    """
    L = u.shape[-1]
    Lk = k.shape[-1]
    if k_reverse is not None and k_reverse.shape[-1] != Lk:
        raise ValueError(
            f"k_reverse must have the same length as k ({Lk}), got {k_reverse.shape[-1]}"
        )
    keep = None
    if padding_mask is not None:
        keep = ~_mask_like(padding_mask, u)
        u = u * keep
    n = fast_fft_length(L + Lk)
    k_f = torch.fft.rfft(k, n=n)
    if k_reverse is not None:
        # k_reverse[j - 1] sits at circular index n - j, i.e. lag -j for j = 1..Lk.
        k_rev_full = torch.nn.functional.pad(k_reverse.flip(-1), (n - Lk, 0))
        k_f = k_f + torch.fft.rfft(k_rev_full, n=n)
    u_f = torch.fft.rfft(u, n=n)
    y = torch.fft.irfft(u_f * k_f, n=n)[..., :L]
    if keep is not None:
        y = y * keep
    return y.to(u.dtype)


def fft_conv_ref(
    u: torch.Tensor,
    k: torch.Tensor,
    k_reverse: torch.Tensor | None = None,
    padding_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reference twin of :func:`fft_conv`: the explicit Toeplitz sum, O(L^2). For tests only."""
    L = u.shape[-1]
    Lk = k.shape[-1]
    if padding_mask is not None:
        keep = ~_mask_like(padding_mask, u)
        u = u * keep
    t = torch.arange(L, device=u.device)
    lag = t[:, None] - t[None, :]  # (t, s) -> t - s
    lag_c = lag.clamp(0, Lk - 1)
    toeplitz = torch.where((lag >= 0) & (lag < Lk), k[..., lag_c], torch.zeros((), dtype=k.dtype))
    if k_reverse is not None:
        rlag = -lag - 1  # s - t - 1
        rlag_c = rlag.clamp(0, Lk - 1)
        toeplitz = toeplitz + torch.where(
            (rlag >= 0) & (rlag < Lk), k_reverse[..., rlag_c], torch.zeros((), dtype=k.dtype)
        )
    y = (toeplitz * u.unsqueeze(-2)).sum(-1)  # (..., t, s) * (..., 1, s)
    if padding_mask is not None:
        y = y * keep
    return y
