import pytest
import torch
import torch.nn.functional as F
from ssm_helpers import assert_hinted, run_steps

import spadeformer.ssm.s4 as s4_module
from spadeformer.ops.fftconv import fft_conv_ref
from spadeformer.ops.ssm_kernels import hippo_legs, ssm_kernel_ref
from spadeformer.ssm.s4 import S4


def _perturb_ssm(m: S4, scale: float = 0.3) -> None:
    """Move the SSM away from its initialisation, as training would (stays stable)."""
    with torch.no_grad():
        for name in ("log_neg_lambda_re", "lambda_im", "P", "B", "C"):
            p = getattr(m, name)
            p.add_(scale * torch.randn_like(p))


def _counting_kernel(monkeypatch):
    calls = []
    real = s4_module.s4_kernel

    def counted(*args, **kwargs):
        calls.append(args[-1])
        return real(*args, **kwargs)

    monkeypatch.setattr(s4_module, "s4_kernel", counted)
    return calls


# ---------------------------------------------------------------- initialisation


@pytest.mark.parametrize("N", [4, 16])
def test_init_is_hippo_legs_eq5_and_dt_in_range(N):
    m = S4(5, d_state=N, dt_min=2e-3, dt_max=5e-2).double()
    A, B, C, dt = m.continuous_parameters()
    A0, B0 = hippo_legs(N)
    assert A.shape == (5, N, N) and B.shape == (5, N) and C.shape == (1, 5, N)
    # parameters are stored in fp32, so Eq. 5 is reproduced up to fp32 rounding
    torch.testing.assert_close(A, A0.expand(5, N, N), rtol=0, atol=1e-5 * N)
    torch.testing.assert_close(B, B0.expand(5, N), rtol=0, atol=1e-5 * N)
    assert torch.all(dt >= 2e-3 * (1 - 1e-6)) and torch.all(dt <= 5e-2 * (1 + 1e-6))
    assert dt.unique().numel() == 5  # drawn per feature
    for name in ("log_neg_lambda_re", "lambda_im", "P", "B", "log_dt", "C", "D"):
        assert getattr(S4(3), name).dtype == torch.float32


def test_optimiser_hints_on_ssm_parameters_only():
    m = S4(4, d_state=8, lr=1e-3)
    assert_hinted(m, {"log_neg_lambda_re", "lambda_im", "P", "B", "log_dt"}, 1e-3)
    assert S4(4, d_state=8).log_dt._optim["lr"] is None
    assert getattr(m.double().P, "_optim", None) is not None  # survives dtype casts


# ---------------------------------------------------------------- kernel vs reference


@pytest.mark.parametrize("N", [4, 16, 64])
@pytest.mark.parametrize("L", [1, 7, 300, 4096])
def test_kernel_equals_naive_powers_float64(N, L):
    m = S4(2, d_state=N).double()
    _perturb_ssm(m)
    with torch.no_grad():
        K = m.kernel(L)
        K_ref = ssm_kernel_ref(*m.continuous_parameters(), L)
    assert K.shape == (1, 2, L) and K.dtype == torch.float64
    torch.testing.assert_close(K, K_ref, rtol=0, atol=1e-10 * K_ref.abs().max().item())


def test_kernel_bidirectional_multichannel_float64():
    m = S4(3, d_state=8, channels=2, bidirectional=True).double()
    K = m.kernel(50)
    A, B, C, dt = m.continuous_parameters()
    assert K.shape == (4, 3, 50) and C.shape == (4, 3, 8)
    torch.testing.assert_close(K, ssm_kernel_ref(A, B, C, dt, 50), rtol=0, atol=1e-12)


@pytest.mark.parametrize("N", [4, 64])
def test_kernel_float32_close_to_float64_reference(N):
    # fp32 (complex64) Cauchy sums and Abar^L: ~1e-6 relative error seen; allow 1e-4 of scale.
    m = S4(3, d_state=N, channels=2)
    with torch.no_grad():
        K = m.kernel(1000)
        K_ref = ssm_kernel_ref(*m.double().continuous_parameters(), 1000)
    assert K.dtype == torch.float32
    torch.testing.assert_close(K.double(), K_ref, rtol=0, atol=1e-4 * K_ref.abs().max().item())


# ---------------------------------------------------------------- recurrent mode


@pytest.mark.parametrize("channels", [1, 2])
def test_step_equals_forward_fp32(channels):
    m = S4(4, d_state=16, channels=channels).eval()
    _perturb_ssm(m, 0.1)
    x = torch.randn(2, 120, 4)
    state = m.initial_state(2)
    shape = tuple(state.shape)
    ys = []
    with torch.no_grad():  # decoding; the recurrent matrices are then built once
        y = m(x)
        for t in range(x.shape[1]):
            y_t, state = m.step(x[:, t], state)
            assert tuple(state.shape) == shape == (2, 4, 16)  # fixed size, independent of t
            ys.append(y_t)
    # fp32 FFT convolution vs fp32 recurrence: errors ~1e-6 of the output scale.
    torch.testing.assert_close(torch.stack(ys, 1), y, rtol=1e-4, atol=1e-5)


def test_step_sees_parameter_updates():
    m = S4(3, d_state=8).eval()
    x = torch.randn(2, 3)
    with torch.no_grad():
        y1, _ = m.step(x, m.initial_state(2))
        m.B.add_(1.0)  # in-place update, as an optimiser does
        y2, _ = m.step(x, m.initial_state(2))
    fresh = S4(3, d_state=8).eval()
    fresh.load_state_dict(m.state_dict())
    y_fresh, _ = fresh.step(x, fresh.initial_state(2))
    assert not torch.allclose(y1, y2)
    torch.testing.assert_close(y2, y_fresh)


# ---------------------------------------------------------------- bidirectional


def test_bidirectional_is_forward_part_plus_reversed_part():
    H, C, L = 3, 2, 20
    m = S4(H, d_state=8, channels=C, bidirectional=True).double()
    x = torch.randn(2, L, H, dtype=torch.float64)
    y = m(x)

    u = x.transpose(1, 2).unsqueeze(1)  # (batch, 1, H, L)
    K = m.kernel(L)
    k_fwd, k_rev = K[:C], K[C:]
    forward_part = fft_conv_ref(u, k_fwd)
    # reversed part: sum_{s > t} k_rev[s - t - 1] u[s] = causal conv of the flipped input with
    # k_rev delayed by one step (so lag 0 is never used), flipped back.
    k_rev_delayed = F.pad(k_rev, (1, 0))[..., :L]
    reversed_part = fft_conv_ref(u.flip(-1), k_rev_delayed).flip(-1)
    pre = forward_part + reversed_part + m.D[:, :, None] * u
    expected = m.output_linear(F.gelu(pre.flatten(1, 2).transpose(1, 2)))
    torch.testing.assert_close(y, expected, rtol=1e-10, atol=1e-10)

    # Both parts are kernels of the same SSM: a causal S4 with C[:C] gives k_fwd, C[C:] k_rev.
    for part, want in ((slice(0, C), k_fwd), (slice(C, 2 * C), k_rev)):
        causal = S4(H, d_state=8, channels=C).double()
        state = dict(m.state_dict())
        state["C"] = state["C"][part]
        causal.load_state_dict(state)
        torch.testing.assert_close(causal.kernel(L), want, rtol=0, atol=1e-14)

    # and the model does look ahead: the last input changes the first output
    x2 = x.clone()
    x2[:, -1] += 1.0
    assert not torch.allclose(m(x2)[:, 0], y[:, 0])


# ------------------------------------------------------- without the pointwise block (SPADE)


@pytest.mark.parametrize("trainable", [True, False])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_without_pointwise_the_output_is_the_ssm_output(trainable, bidirectional):
    """pointwise=False: y = K * u + D u, nothing after it (the official SPADE global layer)."""
    torch.manual_seed(0)
    H, L = 3, 20
    m = S4(H, d_state=8, bidirectional=bidirectional, trainable=trainable,
           pointwise=False).double()
    assert not hasattr(m, "output_linear")
    assert not any("output_linear" in k for k in m.state_dict())
    x = torch.randn(2, L, H, dtype=torch.float64)
    u = x.transpose(1, 2).unsqueeze(1)  # (batch, 1, H, L)
    K = m.kernel(L)
    expected = fft_conv_ref(u, K[:1]) + m.D[:, :, None] * u
    if bidirectional:
        k_rev_delayed = F.pad(K[1:], (1, 0))[..., :L]
        expected = expected + fft_conv_ref(u.flip(-1), k_rev_delayed).flip(-1)
    torch.testing.assert_close(m(x), expected[:, 0].transpose(1, 2), rtol=1e-10, atol=1e-10)
    if not trainable:
        assert sum(p.numel() for p in m.parameters() if p.requires_grad) == 0


@pytest.mark.parametrize("trainable", [True, False])
def test_without_pointwise_step_equals_forward(trainable):
    torch.manual_seed(1)
    m = S4(5, d_state=8, trainable=trainable, pointwise=False).eval()
    x = torch.randn(2, 19, 5)
    y_steps, _ = run_steps(m, x, m.initial_state(2))
    torch.testing.assert_close(y_steps, m(x), rtol=1e-4, atol=1e-5)


def test_causal_does_not_look_ahead():
    m = S4(3, d_state=8)
    x = torch.randn(1, 30, 3)
    x2 = x.clone()
    x2[:, 20:] = torch.randn(1, 10, 3)
    torch.testing.assert_close(m(x)[:, :20], m(x2)[:, :20])


# ---------------------------------------------------------------- gradients


@pytest.mark.parametrize("bidirectional", [False, True])
def test_gradcheck_float64(bidirectional):
    m = S4(2, d_state=4, bidirectional=bidirectional).double()
    x = torch.randn(1, 8, 2, dtype=torch.float64)
    names = [n for n, _ in m.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_(True) for _, p in m.named_parameters())

    def through_forward(*ps):
        return torch.func.functional_call(m, dict(zip(names, ps, strict=True)), (x,))

    # fast_mode: checks a random projection of the Jacobian (one backward instead of one per
    # output), enough to catch a wrong derivative and far cheaper on the shared CPU.
    assert torch.autograd.gradcheck(through_forward, params, fast_mode=True)
    xg = x.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(m, (xg,))


# ---------------------------------------------------------------- frozen


def test_frozen_has_no_trainable_parameters():
    m = S4(4, d_state=8, channels=2, bidirectional=True, trainable=False)
    assert sum(p.numel() for p in m.parameters() if p.requires_grad) == 0
    assert sum(p.numel() for p in m.parameters()) > 0
    assert not m(torch.randn(1, 5, 4)).requires_grad


def test_frozen_kernel_is_computed_once_per_length(monkeypatch):
    calls = _counting_kernel(monkeypatch)
    m = S4(4, d_state=8, trainable=False)
    x16, x10 = torch.randn(2, 16, 4), torch.randn(2, 10, 4)
    y1 = m(x16)
    y2 = m(x16)
    assert calls == [16]
    torch.testing.assert_close(y1, y2, rtol=0, atol=0)
    m(x10)
    assert calls == [16, 10]
    m(x16)
    assert calls == [16, 10]
    # forward keeps only the spectrum; kernel() computes the kernel once and caches it
    m.kernel(10)
    m.kernel(10)
    assert calls == [16, 10, 10]
    calls.clear()
    m.double()
    y3 = m(x16.double())
    assert calls == [16]
    torch.testing.assert_close(y3, y1.double(), rtol=1e-5, atol=1e-6)
    # loading other weights must not reuse the stale kernel
    other = S4(4, d_state=8, trainable=False).double()
    m.load_state_dict(other.state_dict())
    torch.testing.assert_close(m(x16.double()), other(x16.double()))
    assert calls == [16, 16, 16]  # m recomputed, other computed its own


def test_frozen_cache_not_reused_for_swapped_parameters():
    m = S4(4, d_state=8, trainable=False)
    other = S4(4, d_state=8, trainable=False)
    x = torch.randn(1, 12, 4)
    m(x)  # fills m's cache
    swapped = torch.func.functional_call(m, dict(other.named_parameters()), (x,))
    torch.testing.assert_close(swapped, other(x))


def test_trainable_kernel_is_recomputed_and_gets_gradients(monkeypatch):
    calls = _counting_kernel(monkeypatch)
    m = S4(4, d_state=8)
    x = torch.randn(2, 16, 4)
    m(x)
    m(x).sum().backward()
    assert calls == [16, 16]
    for name in ("log_neg_lambda_re", "lambda_im", "P", "B", "log_dt", "C", "D"):
        g = getattr(m, name).grad
        assert g is not None and g.abs().sum() > 0, name


@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("padded", [False, True])
def test_frozen_and_trainable_give_the_same_output_and_input_grads(bidirectional, padded):
    """The frozen path (cached spectrum with D folded in, hand-written FFT backward) against
    the trainable path (kernel + autograd + explicit D u), float64."""
    torch.manual_seed(1)
    a = S4(4, d_state=8, channels=2, bidirectional=bidirectional, trainable=True).double()
    torch.manual_seed(1)
    b = S4(4, d_state=8, channels=2, bidirectional=bidirectional, trainable=False).double()
    x = torch.randn(2, 33, 4, dtype=torch.float64, requires_grad=True)
    mask = None
    if padded:
        mask = torch.zeros(2, 33, dtype=torch.bool)
        mask[1, 20:] = True
    ya, yb = a(x, padding_mask=mask), b(x, padding_mask=mask)
    torch.testing.assert_close(ya, yb, rtol=1e-10, atol=1e-12)
    w = torch.randn_like(ya)
    (ga,) = torch.autograd.grad((ya * w).sum(), x)
    (gb,) = torch.autograd.grad((yb * w).sum(), x)
    torch.testing.assert_close(ga, gb, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------- padding and dtypes


@pytest.mark.parametrize("bidirectional", [False, True])
def test_padded_positions_do_not_leak(bidirectional):
    m = S4(3, d_state=8, channels=2, bidirectional=bidirectional)
    x = torch.randn(2, 25, 3)
    mask = torch.zeros(2, 25, dtype=torch.bool)
    mask[0, 18:] = True
    mask[1, :4] = True  # left padding too
    x2 = x.clone()
    x2[mask] = torch.randn(int(mask.sum()), 3) * 100
    y1, y2 = m(x, padding_mask=mask), m(x2, padding_mask=mask)
    torch.testing.assert_close(y1, y2)
    assert torch.all(y1[mask] == 0)


def test_output_dtype_follows_input():
    m = S4(4, d_state=8)
    y = m(torch.randn(1, 9, 4, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16 and y.shape == (1, 9, 4)


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"d_model": 0}, "d_model must be a positive integer, got 0"),
        ({"d_state": 0}, "d_state must be a positive integer, got 0"),
        ({"d_state": 7}, "d_state must be even .* got 7"),
        ({"channels": 0}, "channels must be a positive integer, got 0"),
        ({"channels": 1.5}, "channels must be a positive integer, got 1.5"),
        ({"dt_min": 0.0}, "dt_min must be a positive finite number, got 0.0"),
        ({"dt_min": float("nan")}, "dt_min must be a positive finite number, got nan"),
        ({"dt_max": float("inf")}, "dt_max must be a positive finite number, got inf"),
        ({"dt_min": -1e-3}, "dt_min must be a positive finite number"),
        ({"dt_max": 0}, "dt_max must be a positive finite number"),
        ({"dt_min": 0.2, "dt_max": 0.1}, "dt_min must be <= dt_max, got dt_min=0.2, dt_max=0.1"),
        ({"dropout": 1.0}, r"dropout must be a number in \[0, 1\), got 1.0"),
        ({"dropout": -0.1}, "dropout must be a number in"),
        ({"dropout": True}, "dropout must be a number in"),
        ({"lr": 0.0}, "lr must be a positive finite number, got 0.0"),
        ({"pointwise": False, "channels": 2}, "pointwise=False needs channels=1.*got channels=2"),
        ({"pointwise": False, "dropout": 0.1}, "with pointwise=False it must be 0, got dropout"),
    ],
)
def test_bad_config_raises(kwargs, match):
    kwargs = {"d_model": 4, **kwargs}
    with pytest.raises(ValueError, match=match):
        S4(**kwargs)


def test_bad_flags_raise():
    with pytest.raises(TypeError, match="bidirectional must be a bool"):
        S4(4, bidirectional="yes")
    with pytest.raises(TypeError, match="trainable must be a bool"):
        S4(4, trainable=1)
    with pytest.raises(TypeError, match="pointwise must be a bool, got 'no'"):
        S4(4, pointwise="no")


def test_bad_inputs_raise():
    m = S4(4, d_state=8)
    with pytest.raises(ValueError, match="must have shape"):
        m(torch.randn(4, 10))
    with pytest.raises(ValueError, match="last dimension d_model=4, got 3"):
        m(torch.randn(1, 10, 3))
    with pytest.raises(TypeError, match="floating-point"):
        m(torch.ones(1, 10, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="padding_mask must have shape"):
        m(torch.randn(1, 10, 4), padding_mask=torch.zeros(1, 9, dtype=torch.bool))
    with pytest.raises(ValueError, match="length must be a positive integer, got 0"):
        m.kernel(0)
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        m.initial_state(0)
    with pytest.raises(ValueError, match=r"state must have shape \(batch, d_model, d_state\)"):
        m.step(torch.randn(2, 4), torch.zeros(2, 4, 6))
    with pytest.raises(ValueError, match="x_t must have shape"):
        m.step(torch.randn(2, 5), m.initial_state(2))


def test_step_on_bidirectional_raises():
    m = S4(4, d_state=8, bidirectional=True)
    with pytest.raises(RuntimeError, match="bidirectional=True"):
        m.step(torch.randn(1, 4), torch.zeros(1, 4, 8))
