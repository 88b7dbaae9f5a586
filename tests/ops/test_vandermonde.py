import math

import pytest
import torch

from spadeformer.ops.vandermonde import vandermonde_kernel, vandermonde_kernel_ref

EPS32 = torch.finfo(torch.float32).eps
EPS64 = torch.finfo(torch.float64).eps


def _poles(H, N, *, slow=True, dtype=torch.complex128):
    """Discrete poles like a trained S4D's: |z| slightly below 1 (slow decay) and phases all
    around the circle -- the hard case for long kernels."""
    decay = torch.rand(H, N, dtype=torch.float64) * (1e-3 if slow else 0.5)
    phase = (torch.rand(H, N, dtype=torch.float64) * 2 - 1) * math.pi
    return torch.exp(torch.complex(-decay, phase)).to(dtype)


def _scale(Ct):
    """sum_n |Ct_n| per leading index, broadcast over the lag axis: |K[l]| <= 2 * this."""
    return Ct.abs().sum(-1, keepdim=True).to(torch.float64)


@pytest.mark.parametrize("L", [1, 2, 7, 300, 4096])
@pytest.mark.parametrize("N", [1, 4, 32])
def test_fast_matches_ref_float64(L, N):
    H = 3
    Ct = torch.randn(2, H, N, dtype=torch.complex128)  # channels broadcast against z (H, N)
    z = _poles(H, N)
    K = vandermonde_kernel(Ct, z, L)
    K_ref = vandermonde_kernel_ref(Ct, z, L)
    assert K.shape == (2, H, L) and K.dtype == torch.float64
    # The ref's own error: each z^l = exp(l log z) carries ~ l |log z| eps, |log z| <= pi + 1.
    tol = _scale(Ct) * EPS64 * (16 + 4 * L * (math.pi + 1))
    assert torch.all((K - K_ref).abs() <= tol)


@pytest.mark.parametrize("L", [1, 7, 300, 4096])
@pytest.mark.parametrize("slow", [True, False])
def test_fast_fp32_is_accurate_to_a_few_eps(L, slow):
    """fp32 in, fp32 out; compared with the float64 ref on the *same* fp32 inputs.

    The powers are formed in float64, so the only fp32 rounding left is in Ct z^(aM), z^b and
    the N-term sum of the matmul: a few eps times sum_n |Ct_n| at every lag, independent of L
    (forming the powers in fp32 would give ~ L * pi * eps instead: 1e-3 relative at L = 4096).
    """
    H, N = 4, 32
    Ct = torch.randn(H, N, dtype=torch.complex64)
    z = _poles(H, N, slow=slow, dtype=torch.complex64)
    K = vandermonde_kernel(Ct, z, L)
    assert K.dtype == torch.float32
    K_true = vandermonde_kernel_ref(Ct.to(torch.complex128), z.to(torch.complex128), L)
    tol = 16 * EPS32 * _scale(Ct)
    assert torch.all((K.double() - K_true).abs() <= tol)


@pytest.mark.parametrize("L", [7, 300, 1024])
def test_fast_fp32_matches_ref_fp32(L):
    """Both twins in fp32 agree within the fp32 ref's own error bound (~ l pi eps per term)."""
    H, N = 3, 16
    Ct = torch.randn(H, N, dtype=torch.complex64)
    z = _poles(H, N, dtype=torch.complex64)
    K = vandermonde_kernel(Ct, z, L)
    K_ref = vandermonde_kernel_ref(Ct, z, L)
    assert K_ref.dtype == torch.float32
    l = torch.arange(L, dtype=torch.float64)
    tol = _scale(Ct) * EPS32 * (16 + 4 * l * (math.pi + 1))
    assert torch.all((K.double() - K_ref.double()).abs() <= tol)


def test_matches_explicit_sum_and_handles_zero_pole():
    # Written out by hand: K[l] = 2 Re(sum_n Ct_n z_n^l), with 0^0 = 1.
    Ct = torch.tensor([1 + 2j, 0.5 - 1j, 3 + 0j], dtype=torch.complex128)
    z = torch.tensor([0.9 * complex(math.cos(0.3), math.sin(0.3)), -0.5 + 0j, 0j])
    z = z.to(torch.complex128)
    L = 6
    pairs = list(zip(Ct.tolist(), z.tolist(), strict=True))  # Python complex: 0j ** 0 == 1
    expected = torch.tensor(
        [2 * sum((c * zz**l).real for c, zz in pairs) for l in range(L)], dtype=torch.float64
    )
    torch.testing.assert_close(vandermonde_kernel(Ct, z, L), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(vandermonde_kernel_ref(Ct, z, L), expected, rtol=1e-12, atol=1e-12)


def _largest_saved_tensor(fn):
    """numel of the largest tensor autograd saves while running fn()."""
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return max(sizes)


def test_never_materialises_state_by_length():
    """No tensor saved for backward is anywhere near (H, N, L): only O(N sqrt(L)) powers."""
    H, N, L = 4, 32, 4096
    Ct = torch.randn(H, N, dtype=torch.complex64, requires_grad=True)
    z = _poles(H, N, dtype=torch.complex64).requires_grad_()
    fast = _largest_saved_tensor(lambda: vandermonde_kernel(Ct, z, L))
    ref = _largest_saved_tensor(lambda: vandermonde_kernel_ref(Ct, z, L))
    assert fast <= 2 * H * N * (math.isqrt(L) + 1)
    assert ref >= H * N * L  # the ref does build it, so the measurement can see it


def test_gradients_match_ref_and_gradcheck():
    H, N, L = 2, 3, 11
    Ct = torch.randn(H, N, dtype=torch.complex128, requires_grad=True)
    z = _poles(H, N, slow=False).requires_grad_()
    assert torch.autograd.gradcheck(lambda c, zz: vandermonde_kernel(c, zz, L), (Ct, z))
    w = torch.randn(H, L, dtype=torch.float64)
    g = torch.autograd.grad((vandermonde_kernel(Ct, z, L) * w).sum(), (Ct, z))
    g_ref = torch.autograd.grad((vandermonde_kernel_ref(Ct, z, L) * w).sum(), (Ct, z))
    for a, b in zip(g, g_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_errors():
    Ct, z = torch.randn(2, 4, dtype=torch.cfloat), torch.randn(2, 4, dtype=torch.cfloat)
    for bad in (0, -3, 2.0, True):
        with pytest.raises(ValueError, match="L .*positive integer"):
            vandermonde_kernel(Ct, z, bad)
        with pytest.raises(ValueError, match="L .*positive integer"):
            vandermonde_kernel_ref(Ct, z, bad)
    with pytest.raises(TypeError, match="complex"):
        vandermonde_kernel(Ct.real, z, 5)
    with pytest.raises(ValueError, match="state axis"):
        vandermonde_kernel(Ct, z[:, :3], 5)


# ------------------------------------------------------------------ real decays (Mega's EMA)
@pytest.mark.parametrize("L", [1, 2, 7, 300, 4096])
def test_decay_kernel_matches_running_products(L):
    from spadeformer.ops.vandermonde import decay_kernel, decay_kernel_ref

    torch.manual_seed(L)
    c = torch.randn(2, 3, 5, dtype=torch.float64)
    q = torch.rand(3, 5, dtype=torch.float64) * 0.5 + 0.5  # slow and fast decays
    q[0, 0] = 1.0  # no decay at all
    K = decay_kernel(c, q, L)
    assert K.shape == (2, 3, L) and K.dtype == torch.float64
    # the ref's running products carry ~ l eps; the fast path's exp(l log q) ~ l |log q| eps
    tol = c.abs().sum(-1, keepdim=True) * EPS64 * (16 + 4 * L)
    assert torch.all((K - decay_kernel_ref(c, q, L)).abs() <= tol)


def test_decay_kernel_fp32_gradients_and_errors():
    from spadeformer.ops.vandermonde import decay_kernel, decay_kernel_ref

    torch.manual_seed(0)
    c = torch.randn(4, 6)
    q = torch.rand(4, 6) * 0.9 + 0.05
    K = decay_kernel(c, q, 500)
    assert K.dtype == torch.float32
    K_true = decay_kernel_ref(c.double(), q.double(), 500)
    assert torch.all((K.double() - K_true).abs() <= 16 * EPS32 * c.abs().sum(-1, keepdim=True))
    c64, q64 = c.double().requires_grad_(), q.double().requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: decay_kernel(a, b, 20), (c64, q64))
    assert torch.all(decay_kernel(c, torch.zeros(4, 6), 3)[:, 1:] == 0)  # 0^0 = 1, then 0
    with pytest.raises(TypeError, match="real floating-point"):
        decay_kernel(c.to(torch.complex64), q, 4)
    with pytest.raises(ValueError, match="decay axis"):
        decay_kernel(c, q[:, :5], 4)
    with pytest.raises(ValueError, match="kernel length"):
        decay_kernel(c, q, 0)
