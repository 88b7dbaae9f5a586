"""HiPPO matrices, discretisation and SSM convolution kernels (Cauchy / Vandermonde).

Paper Eq. 5 (HiPPO-LegS), written as a normal matrix minus a rank-one term:

    A = A^(N) - P P^T,   A^(N)_nk = -(n+1/2)^(1/2) (k+1/2)^(1/2)  if n > k
                                    -1/2                          if n = k
                                    +(n+1/2)^(1/2) (k+1/2)^(1/2)  if n < k
    P_n = (n + 1/2)^(1/2),   B_n = (2n + 1)^(1/2)

which gives the familiar A_nk = -(2n+1)^(1/2)(2k+1)^(1/2) (n > k), -(n+1) (n = k), 0 (n < k).
"""

from __future__ import annotations

import torch

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
