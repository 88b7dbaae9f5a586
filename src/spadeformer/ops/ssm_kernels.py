"""HiPPO matrices, discretisation and SSM convolution kernels (Cauchy / Vandermonde).

Paper Eq. 5 (HiPPO-LegS), written as a normal matrix minus a rank-one term:

    A = A^(N) - P P^T,   A^(N)_nk = -(n+1/2)^(1/2) (k+1/2)^(1/2)  if n > k
                                    -1/2                          if n = k
                                    +(n+1/2)^(1/2) (k+1/2)^(1/2)  if n < k
    P_n = (n + 1/2)^(1/2),   B_n = (2n + 1)^(1/2)

which gives the familiar A_nk = -(2n+1)^(1/2)(2k+1)^(1/2) (n > k), -(n+1) (n = k), 0 (n < k).
"""

from __future__ import annotations

import math

import torch
from einops import rearrange
from torch.utils.checkpoint import checkpoint

__all__ = ["hippo_legs", "hippo_legs_normal", "hippo_legs_nplr"]


def _check_state_size(N: int) -> None:
    if isinstance(N, bool) or not isinstance(N, int) or N < 1:
        raise ValueError(f"N (the state size) must be a positive integer, got {N!r}")


def hippo_legs(N: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense HiPPO-LegS transition, Eq. 5. Returns A (N, N) and B (N,), float64."""
    _check_state_size(N)
    A_normal, P, B = hippo_legs_normal(N)
    return A_normal - torch.outer(P, P), B


def hippo_legs_normal(N: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The normal part A^(N), low-rank factor P and input matrix B of Eq. 5, float64.

    Returns A_normal (N, N), P (N,), B (N,).
    """
    _check_state_size(N)
    n = torch.arange(N, dtype=torch.float64, device="cpu")  # CPU even under a meta context
    P = torch.sqrt(n + 0.5)
    B = torch.sqrt(2 * n + 1)
    outer = torch.outer(P, P)
    A_normal = torch.where(n[:, None] > n[None, :], -outer, outer)
    A_normal.fill_diagonal_(-0.5)
    return A_normal, P, B


def hippo_legs_nplr(N: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Diagonalise the normal part: A = V (diag(Lambda) - (V^H P)(V^H P)^H) V^H.

    A^(N) = -1/2 I + S with S skew-symmetric, so its eigenvalues are -1/2 + i w (w real) and
    its eigenvectors are unitary. Eigenvalues come in conjugate pairs; for even N only the
    N/2 with w > 0 are returned (the other half is implied by conjugate symmetry, as in S4).

    Returns (all complex128):
        Lambda (N//2,), P (N//2,) = V^H P, B (N//2,) = V^H B, V (N, N//2).
    """
    _check_state_size(N)
    if N % 2:
        raise ValueError(f"N (the state size) must be even for the conjugate-pair form, got {N}")
    A_normal, P, B = hippo_legs_normal(N)
    S = A_normal + 0.5 * torch.eye(N, dtype=torch.float64, device="cpu")
    # S is real skew-symmetric, so -i S is Hermitian: S = V diag(i w) V^H.
    w, V = torch.linalg.eigh(S.to(torch.complex128) * -1j)
    keep = w > 0
    V = V[:, keep]
    Lambda = (-0.5 + 1j * w[keep]).to(torch.complex128)
    Vh = V.conj().T
    return Lambda, Vh @ P.to(torch.complex128), Vh @ B.to(torch.complex128), V


# --------------------------------------------------------------------------------------------
# Discretisation and the S4 convolution kernel
# --------------------------------------------------------------------------------------------
#
# A conjugate-pair NPLR SSM (S4, Gu et al. 2022, Sec. 3) is stored as half vectors of size
# n = N/2: Lambda, P, B (..., n) and C (..., n), complex. In the full eigenbasis the state is
# x = [x_h, conj(x_h)] and
#
#     A = diag([Lambda, conj Lambda]) - p p^*,  p = [P, conj P],  B = [B, conj B],
#     C = [C, conj C]   (so that y = C x = 2 Re(C_h x_h) is real).
#
# The same SSM on the real state (Re x_h, Im x_h) in R^N is (see `nplr_real_form`)
#
#     A_r = [[diag Re L, -diag Im L], [diag Im L, diag Re L]] - 2 q q^T,  q = [Re P, Im P]
#     B_r = [Re B, Im B],  C_r = [2 Re C, -2 Im C].
#
# It is used where a dense matrix is needed (Abar^L for the truncation term, recurrent
# step); the long kernel itself comes from the Cauchy/Woodbury formula below.

__all__ += [
    "discretize_bilinear",
    "nplr_real_form",
    "nplr_real_output",
    "s4_kernel",
    "ssm_kernel_ref",
]


def _check_length(L: int) -> None:
    if isinstance(L, bool) or not isinstance(L, int) or L < 1:
        raise ValueError(f"L (the kernel length) must be a positive integer, got {L!r}")


def discretize_bilinear(
    A: torch.Tensor, B: torch.Tensor, dt: torch.Tensor | float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Bilinear (Tustin) discretisation, as in S4 and the SPADE paper (Sec. 2):

        Abar = (I - dt/2 A)^{-1} (I + dt/2 A),   Bbar = (I - dt/2 A)^{-1} dt B.

    Args:
        A: (..., N, N) real or complex.
        B: (..., N).
        dt: scalar or (...) broadcastable against the batch axes of A.
    Returns:
        Abar (..., N, N), Bbar (..., N).
    """
    if A.dim() < 2 or A.shape[-1] != A.shape[-2]:
        raise ValueError(f"A must have shape (..., N, N), got {tuple(A.shape)}")
    N = A.shape[-1]
    if B.shape[-1] != N:
        raise ValueError(f"B must have shape (..., N={N}), got {tuple(B.shape)}")
    dt = torch.as_tensor(dt, dtype=A.real.dtype, device=A.device)
    eye = torch.eye(N, dtype=A.dtype, device=A.device)
    half = (dt / 2)[..., None, None]
    # Both results solve with the same matrix: factor it once, then two cheap triangular solves.
    lu, pivots = torch.linalg.lu_factor(eye - half * A)
    Abar = torch.linalg.lu_solve(lu, pivots, eye + half * A)
    Bbar = torch.linalg.lu_solve(lu, pivots, (dt[..., None] * B).unsqueeze(-1)).squeeze(-1)
    return Abar, Bbar


def ssm_kernel_ref(
    A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, dt: torch.Tensor | float, L: int
) -> torch.Tensor:
    """Reference SSM kernel K_k = C Abar^k Bbar for k < L, by explicit dense products.

    Test-only twin of :func:`s4_kernel`: dense bilinear discretisation in float64 (complex128
    if any input is complex). The states Abar^k Bbar are built by doubling,
    [x_0 .. x_{m-1}] -> [x_0 .. x_{m-1}, Abar^m x_0 .. Abar^m x_{m-1}] with Abar^m from
    squaring, so only log2(L) Python steps are needed (the test machine is small and shared).

    Args:
        A: (..., N, N), B: (..., N), C: (..., N) (batch axes broadcast, e.g. A (H, N, N),
            B (H, N), C (channels, H, N)), dt: scalar or (...) matching A's batch axes.
        L: kernel length.
    Returns:
        (broadcast batch, L), float64 (complex128 for complex inputs).
    """
    _check_length(L)
    cplx = any(t.is_complex() for t in (A, B, C))
    dtype = torch.complex128 if cplx else torch.float64
    A, B, C = A.to(dtype), B.to(dtype), C.to(dtype)
    # Python floats go straight to float64 (as_tensor alone would round them to float32).
    dt = dt.to(torch.float64) if torch.is_tensor(dt) else torch.tensor(dt, dtype=torch.float64)
    dt = dt.to(A.device)
    Abar, Bbar = discretize_bilinear(A, B, dt)
    X = Bbar.unsqueeze(-2)  # (..., m, N): row k is Abar^k Bbar
    power = Abar  # Abar^m
    while X.shape[-2] < L:
        X = torch.cat([X, X @ power.transpose(-1, -2)], dim=-2)
        power = power @ power
    return (C.unsqueeze(-2) * X[..., :L, :]).sum(-1)


def nplr_real_form(
    Lambda: torch.Tensor, P: torch.Tensor, B: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Conjugate-pair NPLR (Lambda, P, B), each (..., n) complex -> real A_r (..., 2n, 2n),
    B_r (..., 2n): the same SSM acting on the real state (Re x_h, Im x_h).

    Why: p p^* couples x_h with conj(x_h) (it contains P P^T terms), so the half state is not
    closed under complex-linear maps; (Re x_h, Im x_h) is, and stays real.
    """
    lr, li = torch.diag_embed(Lambda.real), torch.diag_embed(Lambda.imag)
    rot = torch.cat([torch.cat([lr, -li], -1), torch.cat([li, lr], -1)], -2)
    q = torch.cat([P.real, P.imag], -1)
    # p^* x_full = 2 Re(conj(P) . x_h) = 2 q . x_r, and p maps back to q in real coordinates.
    A_r = rot - 2 * q.unsqueeze(-1) * q.unsqueeze(-2)
    B_r = torch.cat([B.real, B.imag], -1)
    return A_r, B_r


def nplr_real_output(C: torch.Tensor) -> torch.Tensor:
    """Half output vector C (..., n) complex -> C_r (..., 2n) real: y = 2 Re(C . x_h) = C_r x_r."""
    return torch.cat([2 * C.real, -2 * C.imag], -1)


def s4_kernel(
    Lambda: torch.Tensor,
    P: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    dt: torch.Tensor,
    L: int,
    *,
    block_elements: int = 1 << 22,
) -> torch.Tensor:
    """S4 convolution kernel K_k = C Abar^k Bbar, k < L, without forming powers Abar^k.

    S4 (Gu et al. 2022, Sec. 3.3 and Alg. 1): the truncated generating function
    sum_{k<L} K_k z^k = Ct (I - Abar z)^{-1} Bbar with Ct = C (I - Abar^L) is evaluated at the
    L-th roots of unity z_j = exp(-2 pi i j / L) (where z^L = 1), then K = irfft. For the
    bilinear Abar this is

        Khat(z) = dt * Ct (a I - b A)^{-1} B,      a = 1 - z,  b = dt/2 (1 + z),

    (written without the 2/(1+z) factor of the paper so that z = -1 needs no special case).
    With A = Lambda - p p^*, Woodbury's identity reduces it to four Cauchy sums
    k_xy = sum_n x_n y_n / (a - b lambda_n) (taken over both members of each conjugate pair):

        Khat = dt * ( k_{Ct,B} - b k_{Ct,p} k_{p*,B} / (1 + b k_{p*,p}) ).

    Abar^L is needed once, for Ct: it comes from repeated squaring of the dense real-form
    Abar (O(N^3 log L) per feature), never from a list of powers.

    Memory: frequencies are processed in blocks of `block = max(1, block_elements // (H N))`;
    outside autograd the peak extra memory is about 2 * block_elements complex numbers for the
    Cauchy denominators (H N/2 block each, plus conjugates and reciprocals) plus the
    (H, 2S + 2, block) sums, regardless of L. Under autograd each block is checkpointed
    (recomputed in backward), so training keeps only O(H S L) of outputs plus one block.

    Args:
        Lambda, P, B: (H, n) complex; diagonal, low-rank factor and input in the eigenbasis.
            Re(Lambda) < 0 keeps the SSM stable.
        C: (S, H, n) complex output vectors (S = channels, or 2 * channels bidirectional).
        dt: (H,) positive step sizes, real.
        L: kernel length.
        block_elements: memory budget for one frequency block, in complex numbers.
    Returns:
        (S, H, L) real, in the real dtype matching Lambda's complex dtype.
    """
    _check_length(L)
    if isinstance(block_elements, bool) or not isinstance(block_elements, int) or (
        block_elements < 1
    ):
        raise ValueError(f"block_elements must be a positive integer, got {block_elements!r}")
    if Lambda.dim() != 2:
        raise ValueError(f"Lambda must have shape (H, n), got {tuple(Lambda.shape)}")
    H, n = Lambda.shape
    for name, t in (("P", P), ("B", B)):
        if tuple(t.shape) != (H, n):
            raise ValueError(f"{name} must have shape (H, n) = ({H}, {n}), got {tuple(t.shape)}")
    if C.dim() != 3 or tuple(C.shape[1:]) != (H, n):
        raise ValueError(f"C must have shape (S, H={H}, n={n}), got {tuple(C.shape)}")
    if tuple(dt.shape) != (H,):
        raise ValueError(f"dt must have shape (H,) = ({H},), got {tuple(dt.shape)}")
    S = C.shape[0]
    cdtype = Lambda.dtype
    device = Lambda.device

    # Truncation term: Ct = C (I - Abar^L), computed in the real form.
    A_r, B_r = nplr_real_form(Lambda, P, B)
    Abar, _ = discretize_bilinear(A_r, B_r, dt)
    AbarL = torch.linalg.matrix_power(Abar, L)  # repeated squaring, (H, N, N)
    C_r = nplr_real_output(C)
    Ct_r = C_r - torch.einsum("shm,hmn->shn", C_r, AbarL)
    Ct = torch.complex(Ct_r[..., :n], -Ct_r[..., n:]) / 2  # back to the half vector

    # Cauchy numerators, one row per sum: Ct*B (S rows), Ct*P (S rows), conj(P)*B, |P|^2.
    v = torch.cat([Ct * B, Ct * P, (P.conj() * B)[None], (P.conj() * P)[None]], dim=0)
    v = rearrange(v, "s h n -> h s n")  # (H, 2S + 2, n)
    v_conj = v.conj()

    J = L // 2 + 1  # rfft frequencies suffice: the kernel is real
    j = torch.arange(J, dtype=torch.float64, device=device)
    z = torch.polar(torch.ones_like(j), -2 * math.pi * j / L).to(cdtype)  # roots of unity
    a = 1 - z  # (J,)
    b = (dt.to(cdtype) / 2)[:, None] * (1 + z)  # (H, J)
    lam = Lambda[:, :, None]  # (H, n, 1)
    lam_conj = lam.conj()

    block = max(1, block_elements // (H * 2 * n))
    # Under autograd each block is checkpointed: only its (small) inputs are kept and its
    # Cauchy denominators are recomputed in backward, so training memory stays
    # O(H N block + H S L) instead of O(H N L) (a trainable S4 at 8k tokens would otherwise
    # keep gigabytes of reciprocals), for one extra block forward per backward.
    tracked = torch.is_grad_enabled() and any(
        t.requires_grad for t in (Lambda, P, B, C, dt))
    pieces = []
    for start in range(0, J, block):
        sl = slice(start, min(J, start + block))
        args = (a[sl], b[:, sl], lam, lam_conj, v, v_conj, S)
        if tracked:
            pieces.append(checkpoint(_cauchy_block, *args, use_reentrant=False))
        else:
            pieces.append(_cauchy_block(*args))
    Khat = torch.cat(pieces, dim=-1) * dt.to(cdtype)[:, None, None]
    K = torch.fft.irfft(Khat, n=L)  # (H, S, L)
    return rearrange(K, "h s l -> s h l")


def _cauchy_block(a: torch.Tensor, b: torch.Tensor, lam: torch.Tensor, lam_conj: torch.Tensor,
                  v: torch.Tensor, v_conj: torch.Tensor, S: int) -> torch.Tensor:
    """Khat / dt at one block of Jb frequencies (see :func:`s4_kernel`): a (Jb,), b (H, Jb),
    lam (H, n, 1), v (H, 2S + 2, n) -> (H, S, Jb) complex."""
    r = torch.reciprocal(a - b[:, None, :] * lam)  # (H, n, Jb)
    r_conj = torch.reciprocal(a - b[:, None, :] * lam_conj)
    k = v @ r + v_conj @ r_conj  # (H, 2S + 2, Jb): sums over both pair members
    k_cb, k_cp, k_pb, k_pp = k[:, :S], k[:, S : 2 * S], k[:, 2 * S], k[:, 2 * S + 1]
    corr = (b * k_pb / (1 + b * k_pp))[:, None, :]  # Woodbury, rank one
    return k_cb - corr * k_cp
