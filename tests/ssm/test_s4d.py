import math

import pytest
import torch
from ssm_helpers import assert_hinted, gradcheck_module, run_steps, split_directions
from torch import nn

import spadeformer.ssm.s4d as s4d_mod
from spadeformer.ops.fftconv import fft_conv_ref
from spadeformer.ssm.s4d import S4D


def naive_kernel(m: S4D, L: int, which: int | None = None) -> torch.Tensor:
    """K[k] = C Abar^k Bbar with dense (N, N) matrices built from continuous_parameters().

    Independent of the module's diagonal formulas: matrix_exp / linear solves for the
    discretisation, explicit matrix powers (by doubling) for Abar^k. Returns the complex
    kernel (channels, H, L); its imaginary part must vanish (conjugate pairs written out).
    """
    A, B, C, dt = m.continuous_parameters()
    if which is not None:
        C = C[which]
    H, N = A.shape
    I = torch.eye(N, dtype=A.dtype)
    dA = dt.to(A.dtype)[:, None, None] * torch.diag_embed(A)  # (H, N, N)
    dB = (dt.to(A.dtype)[:, None] * B).unsqueeze(-1)  # (H, N, 1)
    if m.discretization == "zoh":
        Abar = torch.linalg.matrix_exp(dA)
        # Bbar = A^{-1} (Abar - I) B = (dt A)^{-1} (Abar - I) dt B
        Bbar = torch.linalg.solve(dA, (Abar - I) @ dB)
    else:
        Abar = torch.linalg.solve(I - dA / 2, I + dA / 2)
        Bbar = torch.linalg.solve(I - dA / 2, dB)
    X, P = Bbar, Abar  # X[..., k] = Abar^k Bbar for k < X.shape[-1]; P = Abar^(that count)
    while X.shape[-1] < L:
        X = torch.cat([X, P @ X], dim=-1)
        P = P @ P
    return torch.einsum("chn,hnl->chl", C, X[..., :L])


def identity_block(m: nn.Module) -> nn.Module:
    """Make the output block the identity (channels summed) so forward shows K * u + D u."""
    m.activation = nn.Identity()
    H = m.d_model
    with torch.no_grad():
        m.output_linear.weight.copy_(torch.eye(H).repeat(1, m.output_linear.in_features // H))
        m.output_linear.bias.zero_()
    return m


@pytest.mark.parametrize("N", [4, 16, 64])
@pytest.mark.parametrize("init", ["inv", "lin"])
@pytest.mark.parametrize("discretization", ["zoh", "bilinear"])
def test_kernel_matches_naive_powers_float64(N, init, discretization):
    m = S4D(3, d_state=N, channels=2, init=init, discretization=discretization).double()
    with torch.no_grad():  # move away from the init so every parameter matters
        m.log_A_real.add_(0.3 * torch.randn_like(m.log_A_real))
        m.B.add_(0.5 * torch.randn_like(m.B))
    K_naive = naive_kernel(m, 4096)
    scale = K_naive.real.abs().max()
    # conjugate pairs are written out by continuous_parameters(): the naive kernel is real
    assert K_naive.imag.abs().max() <= 1e-12 * scale
    for L in (1, 7, 300, 4096):
        K = m.kernel(L)
        assert K.shape == (2, 3, L) and K.dtype == torch.float64
        # dense matrix_exp / solves / repeated squaring: errors ~ 1e-13 relative; 1e-10 is
        # far above that and far below any formula error (those are O(dt) or O(1)).
        assert (K - K_naive.real[..., :L]).abs().max() <= 1e-10 * scale


@pytest.mark.parametrize("bidirectional", [False, True])
def test_reverse_kernel_matches_naive(bidirectional):
    m = S4D(4, d_state=8, channels=1, bidirectional=bidirectional).double()
    k, k_rev = m.kernels(50)
    A, B, C, dt = m.continuous_parameters()
    if not bidirectional:
        assert k_rev is None and C.shape == (1, 4, 8)
        torch.testing.assert_close(k, naive_kernel(m, 50).real, rtol=1e-10, atol=1e-12)
        return
    assert C.shape == (2, 1, 4, 8)
    torch.testing.assert_close(k, naive_kernel(m, 50, which=0).real, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(k_rev, naive_kernel(m, 50, which=1).real, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(m.kernel(50), k)


def test_initialisations_follow_the_paper():
    N, H = 16, 3
    n = torch.arange(N // 2, dtype=torch.float64)
    for init, imag in [
        ("lin", math.pi * n),
        ("inv", (N / math.pi) * (N / (2 * n + 1) - 1)),
    ]:
        m = S4D(H, d_state=N, init=init, dt_min=1e-3, dt_max=1e-1)
        A, B, C, dt = m.continuous_parameters()
        assert A.shape == (H, N) and B.shape == (H, N) and dt.shape == (H,)
        expected = torch.complex(torch.full_like(imag, -0.5), imag)
        torch.testing.assert_close(A[:, : N // 2].to(torch.complex128), expected.expand(H, -1),
                                   rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(A[:, N // 2 :], A[:, : N // 2].conj())
        torch.testing.assert_close(B, torch.ones_like(B))
        assert torch.all((dt >= 1e-3 * (1 - 1e-6)) & (dt <= 1e-1 * (1 + 1e-6)))


def test_optimiser_hints():
    assert_hinted(S4D(4, d_state=8, lr=1e-3, bidirectional=True),
                  {"log_A_real", "A_imag", "B", "log_dt"}, 1e-3)
    assert S4D(4, d_state=8).log_dt._optim == {"lr": None, "weight_decay": 0.0}


@pytest.mark.parametrize("discretization", ["zoh", "bilinear"])
def test_step_matches_forward_fp32(discretization):
    """Recurrence vs FFT convolution in fp32. Tolerance 1e-5 abs + 1e-4 rel: the FFT of length
    ~2L adds ~eps * log2(L) * ||k||_1 * max|u| (~1e-6 here) and the recurrence ~L eps."""
    B, L, H = 2, 96, 4
    m = S4D(H, d_state=16, channels=2, discretization=discretization, dt_min=1e-2, dt_max=0.5)
    x = torch.randn(B, L, H)
    y = m(x)
    state = m.initial_state(B)
    assert state.shape == (B, H, 8)
    y_steps, _ = run_steps(m, x, state)
    torch.testing.assert_close(y_steps, y, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("channels", [1, 2])
def test_bidirectional_decomposition(channels):
    """y = causal part (C, D) + reverse part (C_reverse on the *later* tokens only):

    reverse[t] = sum_{s > t} k_rev[s - t - 1] u[s] = the causal SSM with C_reverse (and D = 0)
    run over the reversed sequence, read one position further back (it never sees u[t]).
    """
    B, L, H = 2, 40, 3
    bi = identity_block(S4D(H, d_state=8, channels=channels, bidirectional=True)).double()
    fwd = identity_block(S4D(H, d_state=8, channels=channels)).double()
    rev = identity_block(S4D(H, d_state=8, channels=channels)).double()
    split_directions(bi, fwd, rev, ("log_A_real", "A_imag", "B", "log_dt"))
    u = torch.randn(B, L, H, dtype=torch.float64)
    y = bi._forward(u, None)
    w = rev._forward(u.flip(1), None).flip(1)  # w[t] = reverse SSM over tokens s >= t
    reverse = torch.cat([w[:, 1:], torch.zeros_like(w[:, :1])], dim=1)  # tokens s > t
    torch.testing.assert_close(y, fwd._forward(u, None) + reverse, rtol=1e-10, atol=1e-10)
    # and the same thing through the Toeplitz reference of the documented formula
    k, k_rev = bi.kernels(L)
    u_t = u.transpose(1, 2).unsqueeze(1)  # (B, 1, H, L)
    conv = fft_conv_ref(u_t, k, k_rev) + bi.D.unsqueeze(-1) * u_t  # (B, channels, H, L)
    torch.testing.assert_close(y, conv.sum(1).transpose(1, 2), rtol=1e-10, atol=1e-10)


def test_bidirectional_sees_the_future_and_causal_does_not():
    L, H = 20, 3
    u = torch.randn(1, L, H)
    u2 = u.clone()
    u2[:, 15:] += 1.0
    causal, bi = S4D(H, d_state=8), S4D(H, d_state=8, bidirectional=True)
    torch.testing.assert_close(causal(u)[:, :15], causal(u2)[:, :15])
    assert (bi(u)[:, :15] - bi(u2)[:, :15]).abs().max() > 1e-4


@pytest.mark.parametrize("discretization", ["zoh", "bilinear"])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_gradcheck_float64(discretization, bidirectional):
    m = S4D(2, d_state=4, bidirectional=bidirectional, discretization=discretization)
    assert gradcheck_module(m, torch.randn(1, 5, 2, dtype=torch.float64))


def test_frozen_has_no_trainable_parameters_and_caches_kernel(monkeypatch):
    calls = []
    inner = s4d_mod.vandermonde_kernel

    def counting(Ct, z, L):
        calls.append(L)
        return inner(Ct, z, L)

    monkeypatch.setattr(s4d_mod, "vandermonde_kernel", counting)
    m = S4D(4, d_state=8, trainable=False, bidirectional=True)
    assert sum(p.numel() for p in m.parameters() if p.requires_grad) == 0
    assert sum(p.numel() for p in m.parameters()) > 0
    x10, x20 = torch.randn(2, 10, 4), torch.randn(2, 20, 4)
    y1 = m(x10)
    m(x20)
    y2 = m(x10)
    m(x20)
    torch.testing.assert_close(y1, y2)
    assert calls == [10, 20]  # once per length (both directions in one call)
    k = m.kernel(10)
    assert calls == [10, 20] and not k.requires_grad
    # an in-place change (load_state_dict) invalidates the cache
    state = {k: v.clone() for k, v in m.state_dict().items()}
    state["log_dt"] += 0.5
    m.load_state_dict(state)
    y3 = m(x10)
    assert calls == [10, 20, 10]
    assert (y3 - y1).abs().max() > 1e-6
    # per dtype: .double() drops the fp32 kernels and makes float64 ones
    assert m.double().kernel(10).dtype == torch.float64
    assert calls == [10, 20, 10, 10]
    # a kernel cached under inference_mode does not leak into training (the paper evaluates
    # and then keeps training around a frozen SSM)
    m.float()
    with torch.inference_mode():
        m(x10)
    x = x10.clone().requires_grad_()
    m(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    calls.clear()
    # a trainable model recomputes every time (its kernel depends on the live parameters)
    t = S4D(4, d_state=8)
    t(x10)
    t(x10)
    assert calls == [10, 10]


def test_dropout_only_in_training():
    m = S4D(4, d_state=8, dropout=0.5)
    x = torch.randn(2, 10, 4)
    m.eval()
    torch.testing.assert_close(m(x), m(x))
    m.train()
    assert (m(x) - m(x)).abs().max() > 0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"d_model": 0}, "d_model must be a positive integer, got 0"),
        ({"d_state": 0}, "d_state must be a positive integer, got 0"),
        ({"d_state": -4}, "d_state must be a positive integer, got -4"),
        ({"d_state": 7}, "d_state must be even .*got d_state=7"),
        ({"channels": 0}, "channels must be a positive integer, got 0"),
        ({"dt_min": 0.2, "dt_max": 0.1}, "dt_min must be <= dt_max, got dt_min=0.2 > dt_max=0.1"),
        ({"dt_min": 0.0}, "dt_min must be a positive finite number, got 0.0"),
        ({"dt_max": -1.0}, "dt_max must be a positive finite number"),
        ({"init": "legs"}, r"init must be one of \('inv', 'lin'\), got 'legs'"),
        ({"discretization": "euler"},
         r"discretization must be one of \('zoh', 'bilinear'\), got 'euler'"),
        ({"lr": 0.0}, "lr must be a positive finite number, got 0.0"),
        ({"dropout": 1.0}, r"dropout must be a number in \[0, 1\), got 1.0"),
    ],
)
def test_config_errors(kwargs, match):
    args = {"d_model": 4, **kwargs}
    with pytest.raises(ValueError, match=match):
        S4D(**args)


def test_runtime_errors():
    with pytest.raises(RuntimeError, match="bidirectional=True"):
        m = S4D(4, d_state=8, bidirectional=True)
        m.step(torch.randn(2, 4), None)
    m = S4D(4, d_state=8)
    with pytest.raises(ValueError, match="length must be a positive integer, got 0"):
        m.kernel(0)
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        m.initial_state(0)
    with pytest.raises(ValueError, match="d_model=4"):
        m(torch.randn(2, 10, 5))
