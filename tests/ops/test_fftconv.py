import pytest
import torch

from spadeformer.ops.fftconv import fast_fft_length, fft_conv, fft_conv_ref


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
@pytest.mark.parametrize("Lk", ["same", "short"])
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("padded", [False, True])
def test_fft_conv_matches_toeplitz_reference(L, Lk, bidirectional, padded):
    B, H = 2, 3
    Lk = L if Lk == "same" else max(1, L // 3)
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
