import math

import pytest
import torch

import spadeformer.ops.scan as scan_mod
from spadeformer.ops.scan import associative_scan, associative_scan_ref

LENGTHS = [1, 2, 3, 5, 8, 17, 64, 100, 1000]


def _decays(*shape, dtype=torch.complex128):
    """|a| in (0.5, 1): stable, slowly forgetting -- like discretised S5 poles."""
    mag = 0.5 + 0.5 * torch.rand(*shape, dtype=torch.float64)
    phase = (torch.rand(*shape, dtype=torch.float64) * 2 - 1) * math.pi
    a = torch.polar(mag, phase)
    return a.to(dtype) if dtype.is_complex else a.abs().to(dtype)


@pytest.mark.parametrize("L", LENGTHS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128])
def test_matches_sequential_loop_float64(L, dtype):
    a = _decays(2, L, 3, dtype=dtype)
    b = torch.randn(2, L, 3, dtype=dtype)
    h = associative_scan(a, b, dim=1)
    assert h.shape == b.shape and h.dtype == dtype
    torch.testing.assert_close(h, associative_scan_ref(a, b, dim=1), rtol=1e-12, atol=1e-12)


def test_ref_is_the_recurrence():
    """The ref itself, checked by hand: h0 = b0, h1 = a1 h0 + b1, h2 = a2 h1 + b2."""
    a = torch.tensor([5.0, 2.0, 3.0], dtype=torch.float64)
    b = torch.tensor([1.0, 1.0, -1.0], dtype=torch.float64)
    expected = torch.tensor([1.0, 3.0, 8.0], dtype=torch.float64)
    torch.testing.assert_close(associative_scan_ref(a, b), expected)
    torch.testing.assert_close(associative_scan(a, b), expected)


@pytest.mark.parametrize("L", [7, 257, 4096])
@pytest.mark.parametrize("dtype", [torch.float32, torch.complex64])
def test_single_precision_close_to_float64(L, dtype):
    """fp32 / complex64 against the float64 loop on the same inputs.

    The state is a geometric sum of at most 1 / (1 - max|a|) effective terms, each carrying a
    few roundings, so errors stay ~ eps * log2(L) * max|h| -- we allow 1e-5 relative to max|h|
    (about 80 eps), well above the ~1e-6 seen and far below any real bug.
    """
    a = _decays(L, 8, dtype=dtype)
    b = torch.randn(L, 8, dtype=dtype)
    h = associative_scan(a, b, dim=0)
    assert h.dtype == dtype
    wide = torch.complex128 if dtype.is_complex else torch.float64
    h_ref = associative_scan_ref(a.to(wide), b.to(wide), dim=0)
    err = (h.to(wide) - h_ref).abs().max()
    assert err <= 1e-5 * h_ref.abs().max()
    # and the fp32 ref agrees with the fast path to the same tolerance
    h_ref32 = associative_scan_ref(a, b, dim=0)
    assert (h - h_ref32).abs().max() <= 1e-5 * h_ref.abs().max()


@pytest.mark.parametrize("dim", [0, 1, -1, -2])
def test_any_dim_and_broadcast_decay(dim):
    shape = [4, 5, 6]
    b = torch.randn(*shape, dtype=torch.complex128)
    a_shape = [1, 1, 1]
    a_shape[dim] = shape[dim]  # decay varying along the sequence only
    a = _decays(*a_shape)
    h = associative_scan(a, b, dim=dim)
    torch.testing.assert_close(h, associative_scan_ref(a, b, dim=dim), rtol=1e-12, atol=1e-12)
    # a constant decay (S5's case): shape (6,) broadcast over everything
    a_const = _decays(6)
    h = associative_scan(a_const, b, dim=dim)
    ref = associative_scan_ref(a_const.expand(*shape), b, dim=dim)
    torch.testing.assert_close(h, ref, rtol=1e-12, atol=1e-12)


def test_real_decay_with_complex_input_promotes():
    a = torch.rand(10, 3, dtype=torch.float64)
    b = torch.randn(10, 3, dtype=torch.complex128)
    h = associative_scan(a, b)
    assert h.dtype == torch.complex128
    torch.testing.assert_close(h, associative_scan_ref(a, b), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("L", [1, 2, 5, 1000, 4096])
def test_logarithmic_depth(L, monkeypatch):
    """Parallel: each level halves the length, so floor(log2 L) + 1 levels, not L steps."""
    calls = []
    inner = scan_mod._scan

    def counting(a, b):
        calls.append(a.shape[0])
        return inner(a, b)

    monkeypatch.setattr(scan_mod, "_scan", counting)
    a, b = _decays(L, 2), torch.randn(L, 2, dtype=torch.complex128)
    h = associative_scan(a, b)
    torch.testing.assert_close(h, associative_scan_ref(a, b), rtol=1e-12, atol=1e-12)
    assert len(calls) == L.bit_length()  # floor(log2 L) + 1
    assert calls == sorted(calls, reverse=True) and calls[-1] == 1


def test_gradcheck_and_gradients_match_ref():
    a = _decays(7, 2).requires_grad_()
    b = torch.randn(7, 2, dtype=torch.complex128, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, y: associative_scan(x, y), (a, b))
    w = torch.randn(7, 2, dtype=torch.complex128)
    g = torch.autograd.grad((associative_scan(a, b) * w).real.sum(), (a, b))
    g_ref = torch.autograd.grad((associative_scan_ref(a, b) * w).real.sum(), (a, b))
    for x, y in zip(g, g_ref, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12)


def test_errors():
    b = torch.randn(4, 5)
    with pytest.raises(ValueError, match="broadcastable"):
        associative_scan(torch.rand(3), b)
    with pytest.raises(ValueError, match="dim must be in"):
        associative_scan(torch.rand(5), b, dim=2)
    with pytest.raises(ValueError, match="at least one dimension"):
        associative_scan(torch.tensor(0.5), torch.tensor(1.0))
    with pytest.raises(TypeError, match="torch.Tensor"):
        associative_scan([0.5], b)
    with pytest.raises(ValueError, match="broadcastable"):
        associative_scan_ref(torch.rand(3), b)
