"""Vandermonde kernel of a diagonal SSM (S4D), computed without an (H, N, L) tensor.

A diagonal SSM with discrete poles z_n and output weights Ct_n = C_n Bbar_n has the
convolution kernel (S4D, Gu et al. 2022, Eq. 6; conjugate partners implied, hence the 2 Re):

    K[l] = 2 Re( sum_n Ct_n z_n^l ),      l = 0 .. L-1

i.e. Ct times the (N, L) Vandermonde matrix V[n, l] = z_n^l. Materialising V costs O(H N L)
memory, the bottleneck of a naive S4D. Write l = a M + b with M = ceil(sqrt(L)),
0 <= b < M, 0 <= a < ceil(L / M):

    K[a M + b] = 2 Re( sum_n (Ct_n z_n^(a M)) z_n^b )

which is a batched complex matmul (..., L/M, N) x (..., N, M): only O(N sqrt(L)) powers are
formed and the product writes the (..., L) output directly.

Accuracy: every power is exp(l log z) with the magnitude and phase kept apart
(|z|^l = exp(l log|z|), arg z^l = l arg z, reduced inside cos/sin), never a running product
of z^M, so nothing accumulates over the a blocks. In single precision the rounding of log z
itself (about pi * eps in the phase) would still be multiplied by l -- a phase error of ~1e-3
rad at l = 4096 for |z| close to 1 -- so the O(N sqrt(L)) powers are formed in float64 and
only then cast back for the O(N L) matmul: the fp32 kernel is then accurate to a few eps
times sum_n |Ct_n| at every lag (float64 is unavailable on MPS, which keeps fp32 powers).
"""

from __future__ import annotations

import math

import torch

__all__ = ["decay_kernel", "decay_kernel_ref", "vandermonde_kernel", "vandermonde_kernel_ref"]


def _check(Ct: torch.Tensor, z: torch.Tensor, L: int) -> None:
    if isinstance(L, bool) or not isinstance(L, int) or L < 1:
        raise ValueError(f"L (the kernel length) must be a positive integer, got {L!r}")
    if not (Ct.is_complex() and z.is_complex()):
        raise TypeError(f"Ct and z must be complex tensors, got {Ct.dtype} and {z.dtype}")
    if Ct.shape[-1] != z.shape[-1]:
        raise ValueError(
            f"Ct and z must share the state axis (last), got {Ct.shape[-1]} and {z.shape[-1]}"
        )


def _lag_blocks(L: int) -> tuple[int, int]:
    """Lags 0 .. L-1 as l = a M + b: M = ceil(sqrt(L)) consecutive lags per block and
    A = ceil(L / M) blocks, so A * M >= L (at most M - 1 lags wasted)."""
    M = math.isqrt(L - 1) + 1
    return M, -(-L // M)


def _powers(log_r: torch.Tensor, theta: torch.Tensor, exponents: torch.Tensor) -> torch.Tensor:
    """z^e for z = exp(log_r + i theta): (..., N) x (E,) -> (..., E, N).

    Magnitude and phase are kept apart so that a z of modulus 0 (log_r = -big) gives 0 for
    e > 0 without forming 0 * inf in a complex product.
    """
    e = exponents[:, None]  # (E, 1)
    return torch.polar(torch.exp(e * log_r.unsqueeze(-2)), e * theta.unsqueeze(-2))


def vandermonde_kernel(Ct: torch.Tensor, z: torch.Tensor, L: int) -> torch.Tensor:
    """K[..., l] = 2 Re(sum_n Ct[..., n] z[..., n]^l), factorised as l = a M + b.

    Args:
        Ct: (..., N) complex output weights (C times the discretised B).
        z: (..., N) complex discrete poles, broadcastable against Ct's leading axes.
        L: kernel length.
    Returns:
        (broadcast(...), L) real tensor, the real dtype matching Ct and z.

    z = 0 is allowed (0^0 = 1 as usual); its gradient is undefined there, as for any log.
    """
    _check(Ct, z, L)
    dtype = torch.promote_types(Ct.dtype, z.dtype)
    Ct, z = Ct.to(dtype), z.to(dtype)
    real = z.real.dtype
    # Powers in float64 (cheap: O(N sqrt(L)) numbers), see the module docstring.
    work = torch.float64 if z.device.type != "mps" else real
    M, A = _lag_blocks(L)
    # log|z| clamped to a finite number so that exponent 0 gives exactly 1 even at z = 0.
    zw = z.to(torch.complex128 if work == torch.float64 else dtype)
    log_r = torch.log(zw.abs()).clamp_min(torch.finfo(work).min)
    theta = torch.angle(zw)
    b = torch.arange(M, device=z.device, dtype=work)
    aM = torch.arange(A, device=z.device, dtype=work) * M  # exact integers
    right = _powers(log_r, theta, b).transpose(-1, -2).to(dtype)  # (..., N, M): z^b
    left = Ct.unsqueeze(-2) * _powers(log_r, theta, aM).to(dtype)  # (..., A, N): Ct z^(aM)
    blocks = torch.matmul(left, right)  # (..., A, M): entry (a, b) is lag a M + b
    K = blocks.flatten(-2)[..., :L]
    return 2 * K.real


def vandermonde_kernel_ref(Ct: torch.Tensor, z: torch.Tensor, L: int) -> torch.Tensor:
    """Reference twin: builds the full (..., N, L) Vandermonde matrix of direct powers.

    Same contract as :func:`vandermonde_kernel`; O(N L) memory, for tests only.
    """
    _check(Ct, z, L)
    dtype = torch.promote_types(Ct.dtype, z.dtype)
    Ct, z = Ct.to(dtype), z.to(dtype)
    l = torch.arange(1, L, device=z.device, dtype=z.real.dtype)
    ones = torch.ones((*z.shape, 1), dtype=dtype, device=z.device)
    V = torch.cat([ones, z.unsqueeze(-1) ** l], dim=-1)  # (..., N, L); z^0 = 1 even at z = 0
    return 2 * (Ct.unsqueeze(-1) * V).sum(-2).real


# --------------------------------------------------------------------------------------------
# real decays (Mega's damped EMA): the same factorisation without the complex arithmetic
# --------------------------------------------------------------------------------------------


def _check_real(c: torch.Tensor, q: torch.Tensor, L: int) -> None:
    if isinstance(L, bool) or not isinstance(L, int) or L < 1:
        raise ValueError(f"L (the kernel length) must be a positive integer, got {L!r}")
    if c.is_complex() or q.is_complex() or not (c.is_floating_point() and q.is_floating_point()):
        raise TypeError(f"c and q must be real floating-point tensors, got {c.dtype} and "
                        f"{q.dtype}")
    if c.shape[-1] != q.shape[-1]:
        raise ValueError(
            f"c and q must share the decay axis (last), got {c.shape[-1]} and {q.shape[-1]}"
        )


def decay_kernel(c: torch.Tensor, q: torch.Tensor, L: int) -> torch.Tensor:
    """K[..., l] = sum_n c[..., n] q[..., n]^l for real decays q in (0, 1], factorised as
    l = a M + b like :func:`vandermonde_kernel` (no (..., N, L) tensor is formed).

    Args:
        c: (..., N) real weights.
        q: (..., N) real decay factors in (0, 1] (Mega's 1 - alpha delta), broadcastable
            against c's leading axes.
        L: kernel length.
    Returns:
        (broadcast(...), L) in the promoted dtype of c and q.

    The powers exp(e log q) are formed in float64 (O(N sqrt(L)) of them) for the same reason
    as in :func:`vandermonde_kernel`: fp32 rounding of log q would grow with the exponent.
    """
    _check_real(c, q, L)
    dtype = torch.promote_types(c.dtype, q.dtype)
    work = torch.float64 if q.device.type != "mps" else dtype
    M, A = _lag_blocks(L)
    log_q = torch.log(q.to(work)).clamp_min(torch.finfo(work).min)  # q = 0 -> 0^0 = 1
    b = torch.arange(M, device=q.device, dtype=work)
    aM = torch.arange(A, device=q.device, dtype=work) * M
    right = torch.exp(b[:, None] * log_q.unsqueeze(-2)).transpose(-1, -2).to(dtype)  # (.., N, M)
    left = c.to(dtype).unsqueeze(-2) * torch.exp(aM[:, None] * log_q.unsqueeze(-2)).to(dtype)
    return torch.matmul(left, right).flatten(-2)[..., :L]  # (..., A, M) -> (..., L)


def decay_kernel_ref(c: torch.Tensor, q: torch.Tensor, L: int) -> torch.Tensor:
    """Reference twin of :func:`decay_kernel`: the full (..., N, L) matrix of powers q^l,
    each a running product (q^l = q^(l-1) q), as the recurrence h_l = q h_(l-1) forms them."""
    _check_real(c, q, L)
    dtype = torch.promote_types(c.dtype, q.dtype)
    c, q = c.to(dtype), q.to(dtype)
    powers = [torch.ones_like(q)]
    for _ in range(L - 1):
        powers.append(powers[-1] * q)
    return (c.unsqueeze(-1) * torch.stack(powers, dim=-1)).sum(-2)
