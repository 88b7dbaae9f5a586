"""Mega's damped EMA: the kernel is the unrolled recurrence, step() is forward, both directions
are the explicit sums of the module docstring."""

import math

import pytest
import torch
from ssm_helpers import assert_hinted, gradcheck_module, run_steps

from spadeformer.ops.fftconv import fft_conv_ref
from spadeformer.ssm.ema import MultiHeadEMA


def recurrence(m: MultiHeadEMA, x: torch.Tensor, direction: int = 0) -> torch.Tensor:
    """The EMA written from Ma et al. (2022) Sec. 3.1 with its raw parameters, one token at a
    time: u = beta x, s = alpha u + (1 - alpha delta) s, y = sum_j eta s / sqrt(h).
    x (batch, L, d) -> (batch, L, d), without the omega skip."""
    alpha = torch.sigmoid(m.alpha_logit[direction])
    delta = torch.sigmoid(m.delta_logit[direction])
    beta, eta = m.beta[direction], m.eta[direction]
    s = torch.zeros(x.shape[0], m.d_model, m.n_dims, dtype=x.dtype)
    out = []
    for t in range(x.shape[1]):
        s = alpha * (beta * x[:, t, :, None]) + (1 - alpha * delta) * s
        out.append((eta * s).sum(-1) / math.sqrt(m.n_dims))
    return torch.stack(out, 1)


def test_kernel_equals_the_powers_of_the_decay():
    torch.manual_seed(0)
    m = MultiHeadEMA(5, n_dims=3).double()
    L = 40
    alpha = torch.sigmoid(m.alpha_logit[0])
    q = 1 - alpha * torch.sigmoid(m.delta_logit[0])
    lags = torch.arange(L, dtype=torch.float64)
    expected = (m.eta[0, :, :, None] / math.sqrt(3) * alpha[..., None] * m.beta[0, :, :, None]
                * q[..., None] ** lags).sum(1)  # (d, L)
    torch.testing.assert_close(m.kernel(L)[0], expected, rtol=1e-12, atol=1e-12)


def test_forward_equals_the_recurrence_plus_skip():
    torch.manual_seed(1)
    m = MultiHeadEMA(6, n_dims=4).double()
    x = torch.randn(2, 30, 6, dtype=torch.float64)
    torch.testing.assert_close(m._forward(x, None), recurrence(m, x) + m.omega * x,
                               rtol=1e-10, atol=1e-10)


def test_step_equals_forward_and_state_is_constant():
    torch.manual_seed(2)
    m = MultiHeadEMA(6, n_dims=4)
    x = torch.randn(3, 25, 6)
    state = m.initial_state(3)
    y_steps, last = run_steps(m, x, state)
    torch.testing.assert_close(y_steps, m(x), rtol=1e-5, atol=1e-5)
    assert last.shape == state.shape == (3, 6, 4)


def test_bidirectional_adds_the_backward_ema_over_later_tokens_only():
    torch.manual_seed(3)
    m = MultiHeadEMA(4, n_dims=3, bidirectional=True).double()
    x = torch.randn(2, 17, 4, dtype=torch.float64)
    forward = recurrence(m, x, 0)
    # the backward EMA over x reversed, at t, has read x[t:]; the current token is dropped
    backward = recurrence(m, x.flip(1), 1).flip(1)
    current = (torch.sigmoid(m.alpha_logit[1]) * m.beta[1] * m.eta[1]).sum(-1) / math.sqrt(3)
    expected = forward + backward - current * x + m.omega * x
    torch.testing.assert_close(m._forward(x, None), expected, rtol=1e-10, atol=1e-10)
    k, k_rev = m.kernels(17)
    y_ref = fft_conv_ref(x.transpose(1, 2), k[0], k_rev[0]).transpose(1, 2) + m.omega * x
    torch.testing.assert_close(m._forward(x, None), y_ref, rtol=1e-10, atol=1e-10)


def test_init_follows_the_reference():
    torch.manual_seed(4)
    fresh = MultiHeadEMA(64, n_dims=16)
    signs = torch.tensor([1.0, -1.0] * 8)
    assert torch.allclose(fresh.beta.mean((0, 1)), signs, atol=0.02)
    assert 0.15 < fresh.alpha_logit.std() < 0.25 and 0.15 < fresh.delta_logit.std() < 0.25
    assert 0.9 < fresh.eta.std() < 1.1 and 0.7 < fresh.omega.std() < 1.3


def test_gradients_flow_to_every_parameter_and_gradcheck():
    torch.manual_seed(5)
    m = MultiHeadEMA(3, n_dims=2, bidirectional=True)
    assert gradcheck_module(m, torch.randn(1, 6, 3, dtype=torch.float64))


def test_optimiser_hints_and_frozen():
    assert_hinted(MultiHeadEMA(4, lr=1e-3), {"alpha_logit", "delta_logit", "beta"}, 1e-3)
    frozen = MultiHeadEMA(4, trainable=False)
    assert sum(p.numel() for p in frozen.parameters() if p.requires_grad) == 0
    assert frozen._kernels(9)[0] is frozen._kernels(9)[0]  # cached while frozen


@pytest.mark.parametrize("bad, match", [
    (dict(n_dims=0), "n_dims"),
    (dict(n_dims=2.5), "n_dims"),
    (dict(lr=-1.0), "lr"),
])
def test_bad_arguments(bad, match):
    with pytest.raises(ValueError, match=match):
        MultiHeadEMA(4, **bad)


def test_step_refuses_a_state_of_another_shape():
    m = MultiHeadEMA(4, n_dims=3)
    with pytest.raises(ValueError, match="batch, d_model, n_dims"):
        m.step(torch.randn(2, 4), torch.zeros(2, 4, 2))
