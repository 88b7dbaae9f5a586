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

__all__ = ["fft_conv", "fft_conv_ref", "fft_conv_spectrum", "fast_fft_length", "kernel_spectrum"]


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


def kernel_spectrum(k: torch.Tensor, n: int, k_reverse: torch.Tensor | None = None
                    ) -> torch.Tensor:
    """The one-sided spectrum (..., n // 2 + 1) of the circular kernel that :func:`fft_conv`
    applies at FFT length ``n``: ``k`` at lags 0..Lk-1 and, if given, ``k_reverse[j - 1]`` at
    lag -j (circular index n - j). A constant kernel's spectrum can be computed once and
    reused with :func:`fft_conv_spectrum` (frozen S4 does). ``n`` must hold the kernel
    (n >= Lk, and n >= 2 Lk with a reverse kernel, whose lags would otherwise overlap the
    forward ones); :func:`fft_conv_spectrum` needs more (n >= L + Lk - 1)."""
    Lk = k.shape[-1]
    if k_reverse is not None and k_reverse.shape[-1] != Lk:
        raise ValueError(
            f"k_reverse must have the same length as k ({Lk}), got {k_reverse.shape[-1]}"
        )
    need = 2 * Lk if k_reverse is not None else Lk
    if isinstance(n, bool) or not isinstance(n, int) or n < need:
        raise ValueError(
            f"n must be an FFT length >= {need} for a kernel of length {Lk}"
            f"{' with a reverse kernel' if k_reverse is not None else ''}, got {n!r}"
        )
    k_f = torch.fft.rfft(k, n=n)
    if k_reverse is not None:
        k_rev_full = torch.nn.functional.pad(k_reverse.flip(-1), (n - Lk, 0))
        k_f = k_f + torch.fft.rfft(k_rev_full, n=n)
    return k_f


class _ConstantKernelConv(torch.autograd.Function):
    """y = irfft(rfft(u, n) * K, n)[..., :L] for a spectrum K that needs no gradient.

    Autograd's own backward of ``rfft`` runs a full complex-to-complex FFT (twice the work of
    a real one) plus padding copies. Here the gradient is the circular correlation with the
    same kernel, two real FFTs: grad_u = irfft(rfft(g, n) * conj(K), n)[..., :L]. No
    wrap-around: n >= L + Lk - 1, so lags that would wrap land on the kernel's zero padding.
    ``setup_context`` and the generated vmap rule let ``torch.func`` transforms (grad, vmap,
    jacrev) go through it. No forward mode (jvp): a custom ``jvp`` would make torch.compile
    break the graph here.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(u: torch.Tensor, k_f: torch.Tensor, n: int) -> torch.Tensor:
        return torch.fft.irfft(torch.fft.rfft(u, n=n) * k_f, n=n)[..., : u.shape[-1]]

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        u, k_f, n = inputs
        ctx.save_for_backward(k_f)
        ctx.n, ctx.length, ctx.u_shape = n, u.shape[-1], u.shape

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        (k_f,) = ctx.saved_tensors
        grad_u = torch.fft.irfft(torch.fft.rfft(grad_y, n=ctx.n) * k_f.conj(), n=ctx.n)
        grad_u = grad_u[..., : ctx.length]
        # u may have been broadcast against the kernel's leading axes: sum those back.
        return grad_u.sum_to_size(ctx.u_shape), None, None


def fft_conv_spectrum(u: torch.Tensor, k_f: torch.Tensor, n: int,
                      padding_mask: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`fft_conv` given the kernel's spectrum ``k_f = kernel_spectrum(k, n, k_reverse)``.

    u (batch, ..., L) real, k_f (..., n // 2 + 1) complex with n >= L + Lk - 1 (Lk = the
    kernel's length) -> (broadcast(batch, ...), L) in u's dtype. A spectrum that needs no
    gradient takes a cheaper backward (:class:`_ConstantKernelConv`). The spectrum does not
    say how long its kernel was, so only n >= L is checked here.
    """
    L = u.shape[-1]
    if isinstance(n, bool) or not isinstance(n, int) or n < L:
        raise ValueError(f"n must be an FFT length >= the input length L={L}, got {n!r}")
    if k_f.shape[-1] != n // 2 + 1:
        raise ValueError(f"k_f must have n // 2 + 1 = {n // 2 + 1} frequencies for n={n}, "
                         f"got {k_f.shape[-1]}")
    if u.numel() == 0:  # an empty batch: MKL's FFT refuses zero transforms
        return (u * 0).expand(*torch.broadcast_shapes(u.shape[:-1], k_f.shape[:-1]), L)
    keep = None
    if padding_mask is not None:
        keep = ~_mask_like(padding_mask, u)
        u = u * keep
    if k_f.requires_grad:
        y = torch.fft.irfft(torch.fft.rfft(u, n=n) * k_f, n=n)[..., :L]
    else:
        y = _ConstantKernelConv.apply(u, k_f, n)
    if keep is not None:
        y = y * keep
    return y.to(u.dtype)


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
    if k_reverse is not None and k_reverse.shape[-1] != k.shape[-1]:
        raise ValueError(f"k_reverse must have the same length as k ({k.shape[-1]}), "
                         f"got {k_reverse.shape[-1]}")
    # lags >= L never reach an output: a longer kernel is cut (it would only cost FFT length)
    k = k[..., :L]
    k_reverse = None if k_reverse is None else k_reverse[..., :L]
    n = fast_fft_length(max(1, L + k.shape[-1]))  # max: an empty input gives an empty output
    return fft_conv_spectrum(u, kernel_spectrum(k, n, k_reverse), n, padding_mask)


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
