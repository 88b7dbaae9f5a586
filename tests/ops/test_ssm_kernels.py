import math

import pytest
import torch

from spadeformer.ops.ssm_kernels import (
    discretize_bilinear,
    hippo_legs,
    hippo_legs_nplr,
    nplr_real_form,
    nplr_real_output,
    s4_kernel,
    ssm_kernel_ref,
)

# ---------------------------------------------------------------- HiPPO (paper Eq. 5)


@pytest.mark.parametrize("N", [1, 2, 5, 8])
def test_hippo_legs_matches_eq5_entry_by_entry(N):
    A, B = hippo_legs(N)
    assert A.dtype == torch.float64 and A.shape == (N, N) and B.shape == (N,)
    for n in range(N):
        # Eq. 5: B_n = (2n+1)^(1/2)
        assert B[n].item() == pytest.approx(math.sqrt(2 * n + 1), rel=1e-14)
        for k in range(N):
            # A = A^(N) - P P^T with P_n = (n + 1/2)^(1/2)
            pp = math.sqrt(n + 0.5) * math.sqrt(k + 0.5)
            if n > k:
                a_normal = -pp
            elif n == k:
                a_normal = -0.5
            else:
                a_normal = pp
            expected = a_normal - pp
            assert A[n, k].item() == pytest.approx(expected, rel=1e-13, abs=1e-13), (n, k)


def test_hippo_legs_is_the_familiar_lower_triangular_form():
    A, _ = hippo_legs(6)
    for n in range(6):
        for k in range(6):
            want = -math.sqrt((2 * n + 1) * (2 * k + 1)) if n > k else (-(n + 1) if n == k else 0)
            assert A[n, k].item() == pytest.approx(want, abs=1e-12)


# ---------------------------------------------------------------- discretisation


def test_discretize_bilinear_scalar_by_hand():
    a, b, dt = -0.7, 1.3, 0.05
    Ab, Bb = discretize_bilinear(torch.tensor([[a]], dtype=torch.float64),
                                 torch.tensor([b], dtype=torch.float64), dt)
    assert Ab.item() == pytest.approx((1 + dt * a / 2) / (1 - dt * a / 2), rel=1e-14)
    assert Bb.item() == pytest.approx(dt * b / (1 - dt * a / 2), rel=1e-14)


def test_discretize_bilinear_batched_and_close_to_exponential():
    H, N = 3, 6
    A, B = hippo_legs(N)
    A = A.expand(H, N, N)
    B = B.expand(H, N)
    dt = torch.tensor([1e-3, 1e-2, 3e-2], dtype=torch.float64)
    Ab, Bb = discretize_bilinear(A, B, dt)
    assert Ab.shape == (H, N, N) and Bb.shape == (H, N)
    eye = torch.eye(N, dtype=torch.float64)
    for h in range(H):
        lhs = eye - dt[h] / 2 * A[h]
        torch.testing.assert_close(lhs @ Ab[h], eye + dt[h] / 2 * A[h], rtol=0, atol=1e-12)
        torch.testing.assert_close(lhs @ Bb[h], dt[h] * B[h], rtol=0, atol=1e-12)
        # Bilinear is a 2nd-order approximation of exp(dt A): error O((dt |A|)^3).
        err = (Ab[h] - torch.linalg.matrix_exp(dt[h] * A[h])).abs().max().item()
        scale = (dt[h] * A[h].abs().max()).item()
        assert err < scale**3


def test_discretize_bilinear_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"A must have shape \(\.\.\., N, N\)"):
        discretize_bilinear(torch.zeros(3, 4), torch.zeros(4), 0.1)
    with pytest.raises(ValueError, match="B must have shape"):
        discretize_bilinear(torch.zeros(4, 4), torch.zeros(3), 0.1)


# ---------------------------------------------------------------- reference kernel


def test_ssm_kernel_ref_scalar_by_hand():
    a, b, c, dt, L = -0.4, 0.9, 1.7, 0.1, 6
    f64 = dict(dtype=torch.float64)
    K = ssm_kernel_ref(torch.tensor([[a]], **f64), torch.tensor([b], **f64),
                       torch.tensor([c], **f64), dt, L)
    ab = (1 + dt * a / 2) / (1 - dt * a / 2)
    bb = dt * b / (1 - dt * a / 2)
    assert K.dtype == torch.float64 and K.shape == (L,)
    for k in range(L):
        assert K[k].item() == pytest.approx(c * ab**k * bb, rel=1e-12)


@pytest.mark.parametrize("L", [1, 2, 9, 16])
def test_ssm_kernel_ref_equals_plain_loop(L):
    H, N = 2, 5
    A = torch.randn(H, N, N, dtype=torch.float64) - 2 * torch.eye(N, dtype=torch.float64)
    B = torch.randn(H, N, dtype=torch.float64)
    C = torch.randn(3, H, N, dtype=torch.float64)
    dt = torch.tensor([0.1, 0.3], dtype=torch.float64)
    eye = torch.eye(N, dtype=torch.float64)
    K = ssm_kernel_ref(A, B, C, dt, L)
    assert K.shape == (3, H, L)
    for h in range(H):
        lhs = eye - dt[h] / 2 * A[h]
        Ab = torch.linalg.inv(lhs) @ (eye + dt[h] / 2 * A[h])
        x = torch.linalg.inv(lhs) @ (dt[h] * B[h])
        for k in range(L):
            torch.testing.assert_close(K[:, h, k], C[:, h] @ x, rtol=1e-12, atol=1e-12)
            x = Ab @ x


def test_ssm_kernel_ref_rejects_bad_length():
    with pytest.raises(ValueError, match="L .* positive integer, got 0"):
        ssm_kernel_ref(torch.eye(2), torch.ones(2), torch.ones(2), 0.1, 0)


# ---------------------------------------------------------------- NPLR real form


def _random_nplr(H, n, S, dtype=torch.complex128):
    Lambda = torch.complex(-torch.rand(H, n, dtype=torch.float64) - 0.1,
                           torch.randn(H, n, dtype=torch.float64) * 3)
    P = torch.randn(H, n, dtype=torch.complex128)
    B = torch.randn(H, n, dtype=torch.complex128)
    C = torch.randn(S, H, n, dtype=torch.complex128)
    dt = torch.exp(torch.empty(H, dtype=torch.float64).uniform_(math.log(1e-3), math.log(1e-1)))
    cast = lambda t: t.to(dtype)  # noqa: E731
    real = torch.float64 if dtype == torch.complex128 else torch.float32
    return cast(Lambda), cast(P), cast(B), cast(C), dt.to(real)


def test_nplr_real_form_equals_full_complex_system():
    """The real form must give the same kernel as the explicit full-size complex system
    A = diag([L, conj L]) - p p^*, p = [P, conj P], B = [B, conj B], C = [C, conj C]."""
    H, n, S, L = 2, 3, 2, 40
    Lambda, P, B, C, dt = _random_nplr(H, n, S)
    A_r, B_r = nplr_real_form(Lambda, P, B)
    assert A_r.shape == (H, 2 * n, 2 * n) and not A_r.is_complex()
    K_real = ssm_kernel_ref(A_r, B_r, nplr_real_output(C), dt, L)

    lam_f = torch.cat([Lambda, Lambda.conj()], -1)
    p_f = torch.cat([P, P.conj()], -1)
    A_f = torch.diag_embed(lam_f) - p_f[..., :, None] * p_f.conj()[..., None, :]
    K_full = ssm_kernel_ref(A_f, torch.cat([B, B.conj()], -1), torch.cat([C, C.conj()], -1),
                            dt, L)
    assert K_full.imag.abs().max() < 1e-12
    torch.testing.assert_close(K_real, K_full.real, rtol=1e-10, atol=1e-12)


def test_nplr_of_hippo_reconstructs_eq5():
    N = 8
    Lambda, P, B, V = hippo_legs_nplr(N)
    A_r, B_r = nplr_real_form(Lambda, P, B)
    W = torch.cat([2 * V.real, -2 * V.imag], -1)
    A, Bh = hippo_legs(N)
    torch.testing.assert_close(W @ A_r @ torch.linalg.inv(W), A, rtol=0, atol=1e-11)
    torch.testing.assert_close(W @ B_r, Bh, rtol=0, atol=1e-12)


# ---------------------------------------------------------------- s4_kernel vs reference


@pytest.mark.parametrize("L", [1, 2, 7, 64, 301])
def test_s4_kernel_matches_reference_random_nplr(L):
    Lambda, P, B, C, dt = _random_nplr(H=3, n=4, S=2)
    K = s4_kernel(Lambda, P, B, C, dt, L)
    A_r, B_r = nplr_real_form(Lambda, P, B)
    K_ref = ssm_kernel_ref(A_r, B_r, nplr_real_output(C), dt, L)
    assert K.shape == (2, 3, L) and K.dtype == torch.float64
    torch.testing.assert_close(K, K_ref, rtol=0, atol=1e-11 * K_ref.abs().max().item())


@pytest.mark.parametrize("block_elements", [1, 37, 1 << 22])
def test_s4_kernel_block_size_does_not_change_result(block_elements):
    Lambda, P, B, C, dt = _random_nplr(H=2, n=3, S=1)
    K = s4_kernel(Lambda, P, B, C, dt, 100, block_elements=block_elements)
    K_one = s4_kernel(Lambda, P, B, C, dt, 100, block_elements=1 << 30)
    torch.testing.assert_close(K, K_one, rtol=0, atol=1e-13)


def test_s4_kernel_float32_close_to_float64_reference():
    # complex64 arithmetic: expect ~1e-6 relative error; allow 1e-4 of the kernel's scale.
    Lambda, P, B, C, dt = _random_nplr(H=2, n=8, S=2, dtype=torch.complex64)
    K = s4_kernel(Lambda, P, B, C, dt, 500)
    assert K.dtype == torch.float32
    A_r, B_r = nplr_real_form(Lambda.to(torch.complex128), P.to(torch.complex128),
                              B.to(torch.complex128))
    K_ref = ssm_kernel_ref(A_r, B_r, nplr_real_output(C.to(torch.complex128)), dt.double(), 500)
    torch.testing.assert_close(K.double(), K_ref, rtol=0, atol=1e-4 * K_ref.abs().max().item())


def test_s4_kernel_rejects_bad_arguments():
    Lambda, P, B, C, dt = _random_nplr(H=2, n=3, S=1)
    with pytest.raises(ValueError, match="L .* positive integer, got 0"):
        s4_kernel(Lambda, P, B, C, dt, 0)
    with pytest.raises(ValueError, match="block_elements must be a positive integer"):
        s4_kernel(Lambda, P, B, C, dt, 5, block_elements=0)
    with pytest.raises(ValueError, match=r"P must have shape \(H, n\) = \(2, 3\)"):
        s4_kernel(Lambda, P[:, :2], B, C, dt, 5)
    with pytest.raises(ValueError, match="C must have shape"):
        s4_kernel(Lambda, P, B, C[0], dt, 5)
    with pytest.raises(ValueError, match="dt must have shape"):
        s4_kernel(Lambda, P, B, C, dt[:1], 5)
    with pytest.raises(ValueError, match="Lambda must have shape"):
        s4_kernel(Lambda[0], P, B, C, dt, 5)
