import pytest
import torch

from spadeformer.ops.fftconv import (
    fast_fft_length,
    fft_conv,
    fft_conv_ref,
    fft_conv_spectrum,
    kernel_spectrum,
)


@pytest.mark.parametrize("n", [1, 2, 7, 11, 97, 250, 1000, 4097, 10001])
def test_fast_fft_length_is_smallest_5_smooth(n):
    m = fast_fft_length(n)
    assert m >= n

    def smooth(v):
        for p in (2, 3, 5):
            while v % p == 0:
                v //= p
        return v == 1

    assert smooth(m)
    assert not any(smooth(v) for v in range(n, m))


@pytest.mark.parametrize("L", [1, 7, 64, 300])
@pytest.mark.parametrize("Lk", ["same", "short", "long"])
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("padded", [False, True])
def test_fft_conv_matches_toeplitz_reference(L, Lk, bidirectional, padded):
    B, H = 2, 3
    Lk = {"same": L, "short": max(1, L // 3), "long": 3 * L + 1}[Lk]
    u = torch.randn(B, H, L, dtype=torch.float64)
    k = torch.randn(H, Lk, dtype=torch.float64)
    k_rev = torch.randn(H, Lk, dtype=torch.float64) if bidirectional else None
    mask = None
    if padded:
        mask = torch.zeros(B, L, dtype=torch.bool)
        mask[1, L // 2 :] = True
    y = fft_conv(u, k, k_rev, padding_mask=mask)
    y_ref = fft_conv_ref(u, k, k_rev, padding_mask=mask)
    torch.testing.assert_close(y, y_ref, rtol=1e-9, atol=1e-9)


def test_fft_conv_padding_isolates_real_positions():
    B, H, L = 2, 4, 50
    u = torch.randn(B, H, L)
    k, k_rev = torch.randn(H, L), torch.randn(H, L)
    mask = torch.zeros(B, L, dtype=torch.bool)
    mask[:, 40:] = True
    y1 = fft_conv(u, k, k_rev, padding_mask=mask)
    u2 = u.clone()
    u2[:, :, 40:] = torch.randn(B, H, 10) * 100
    y2 = fft_conv(u2, k, k_rev, padding_mask=mask)
    torch.testing.assert_close(y1, y2)
    assert torch.all(y1[:, :, 40:] == 0)


def test_fft_conv_rejects_bad_mask():
    u, k = torch.randn(2, 3, 10), torch.randn(3, 10)
    with pytest.raises(ValueError, match="padding_mask must have shape"):
        fft_conv(u, k, padding_mask=torch.zeros(2, 9, dtype=torch.bool))
    with pytest.raises(TypeError, match="bool"):
        fft_conv(u, k, padding_mask=torch.zeros(2, 10))


@pytest.mark.parametrize("L", [1, 7, 300])
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("padded", [False, True])
def test_constant_spectrum_path_matches_reference_values_and_input_grads(L, bidirectional,
                                                                          padded):
    """A spectrum that needs no gradient takes the hand-written backward (correlation with the
    same kernel); hold values and input gradients to the Toeplitz reference, with u broadcast
    against the kernel's channel axis as S4 does ((B, 1, H, L) against (C, H, Lk))."""
    B, C, H = 2, 2, 3
    u = torch.randn(B, 1, H, L, dtype=torch.float64, requires_grad=True)
    k = torch.randn(C, H, L, dtype=torch.float64)
    k_rev = torch.randn(C, H, L, dtype=torch.float64) if bidirectional else None
    mask = None
    if padded:
        mask = torch.zeros(B, L, dtype=torch.bool)
        mask[1, L // 2 + 1 :] = True
    n = fast_fft_length(2 * L)
    k_f = kernel_spectrum(k, n, k_rev)
    assert not k_f.requires_grad
    y = fft_conv_spectrum(u, k_f, n, padding_mask=mask)
    y_ref = fft_conv_ref(u, k, k_rev, padding_mask=mask)
    assert y.shape == (B, C, H, L)
    torch.testing.assert_close(y, y_ref, rtol=1e-9, atol=1e-9)
    w = torch.randn_like(y)
    (g,) = torch.autograd.grad((y * w).sum(), u)
    (g_ref,) = torch.autograd.grad((y_ref * w).sum(), u)
    torch.testing.assert_close(g, g_ref, rtol=1e-9, atol=1e-9)


def test_constant_spectrum_path_passes_gradcheck():
    u = torch.randn(2, 3, 9, dtype=torch.float64, requires_grad=True)
    k, k_rev = torch.randn(3, 9, dtype=torch.float64), torch.randn(3, 9, dtype=torch.float64)
    n = fast_fft_length(18)
    k_f = kernel_spectrum(k, n, k_rev)
    assert torch.autograd.gradcheck(lambda x: fft_conv_spectrum(x, k_f, n), (u,))


def test_trainable_spectrum_keeps_autograd_and_matches_fft_conv():
    u = torch.randn(2, 3, 20, dtype=torch.float64)
    k = torch.randn(3, 20, dtype=torch.float64, requires_grad=True)
    n = fast_fft_length(40)
    y = fft_conv_spectrum(u, kernel_spectrum(k, n), n)
    torch.testing.assert_close(y, fft_conv(u, k), rtol=1e-12, atol=1e-12)
    (gk,) = torch.autograd.grad(y.sum(), k)
    (gk_ref,) = torch.autograd.grad(fft_conv_ref(u, k).sum(), k)
    torch.testing.assert_close(gk, gk_ref, rtol=1e-9, atol=1e-9)


def test_spectrum_length_is_checked():
    k_f = kernel_spectrum(torch.randn(3, 8), 16)
    with pytest.raises(ValueError, match=r"k_f must have n // 2 \+ 1 = 9 frequencies for n=16"):
        fft_conv_spectrum(torch.randn(1, 3, 8), k_f[..., :5], 16)
    with pytest.raises(ValueError, match="k_reverse must have the same length as k"):
        kernel_spectrum(torch.randn(3, 8), 16, torch.randn(3, 7))
    # an FFT length that cannot hold the kernel (or the input) would wrap around silently
    with pytest.raises(ValueError, match="n must be an FFT length >= 8 for a kernel of length 8"):
        kernel_spectrum(torch.randn(3, 8), 7)
    with pytest.raises(ValueError, match=">= 16 for a kernel of length 8 with a reverse kernel"):
        kernel_spectrum(torch.randn(3, 8), 15, torch.randn(3, 8))
    with pytest.raises(ValueError, match="n must be an FFT length >= the input length L=20"):
        fft_conv_spectrum(torch.randn(1, 3, 20), kernel_spectrum(torch.randn(3, 8), 16), 16)


@pytest.mark.parametrize("bidirectional", [False, True])
def test_torch_func_grad_and_vmap_through_the_constant_kernel_path(bidirectional):
    u = torch.randn(2, 3, 11, dtype=torch.float64)
    k = torch.randn(3, 11, dtype=torch.float64)
    k_rev = torch.randn(3, 11, dtype=torch.float64) if bidirectional else None

    def loss(conv):
        return lambda x: conv(x, k, k_rev).square().sum()

    g = torch.func.grad(loss(fft_conv))(u)
    torch.testing.assert_close(g, torch.func.grad(loss(fft_conv_ref))(u), rtol=1e-9, atol=1e-9)
    v = torch.func.vmap(lambda x: fft_conv(x, k, k_rev))(u.unsqueeze(1))
    torch.testing.assert_close(v.squeeze(1), fft_conv_ref(u, k, k_rev), rtol=1e-9, atol=1e-9)



def test_empty_input_gives_an_empty_output():
    for k_rev in (None, torch.randn(3, 5)):
        assert fft_conv(torch.randn(2, 3, 0), torch.randn(3, 5), k_rev).shape == (2, 3, 0)
