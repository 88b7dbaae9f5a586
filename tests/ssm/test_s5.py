import math

import pytest
import torch
from ssm_helpers import assert_hinted, gradcheck_module, run_steps, split_directions
from torch import nn

import spadeformer.ssm.s5 as s5_mod
from spadeformer.ops.ssm_kernels import hippo_legs_normal
from spadeformer.ssm.s5 import S5


def identity_block(m: S5) -> S5:
    """Output block -> identity, so forward shows the SSM output 2 Re(C x) + D u."""
    m.activation = nn.Identity()
    with torch.no_grad():
        m.output_linear.weight.copy_(torch.eye(m.d_model))
        m.output_linear.bias.zero_()
    return m


def sequential_reference(m: S5, u: torch.Tensor) -> torch.Tensor:
    """The documented recurrences, written from continuous_parameters() (full P states,
    conjugates written out, so y = C x is real without 2 Re), as plain Python loops."""
    A, B, C, dt = (t.to(torch.complex128) for t in m.continuous_parameters())
    Abar = torch.exp(dt * A)  # ZOH, elementwise on the diagonal
    Bbar = ((Abar - 1) / A).unsqueeze(-1) * B  # (P, H)
    uc = u.to(torch.complex128)
    Bsz, L, H = u.shape
    C_fwd, C_bwd = (C[0], C[1]) if m.bidirectional else (C, None)
    x = torch.zeros(Bsz, A.shape[0], dtype=torch.complex128)
    y = torch.zeros(Bsz, L, H, dtype=torch.complex128)
    for t in range(L):  # tokens s <= t
        x = Abar * x + uc[:, t] @ Bbar.T
        y[:, t] = x @ C_fwd.T
    if C_bwd is not None:
        x = torch.zeros_like(x)
        for t in reversed(range(L)):  # tokens s >= t: the current one included
            x = Abar * x + uc[:, t] @ Bbar.T
            y[:, t] += x @ C_bwd.T
    assert y.imag.abs().max() <= 1e-9 * max(1.0, y.real.abs().max())
    return y.real + m.D.detach().double() * u.double()


@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("L", [1, 7, 100])
def test_scan_forward_matches_sequential_reference(bidirectional, L):
    m = identity_block(S5(3, d_state=8, bidirectional=bidirectional, blocks=2)).double()
    u = torch.randn(2, L, 3, dtype=torch.float64)
    torch.testing.assert_close(m._forward(u, None), sequential_reference(m, u),
                               rtol=1e-10, atol=1e-10)


def test_fp32_forward_close_to_float64_reference():
    """Public forward (fp32): 1e-5 relative to max|y|, ~100 eps for a 200-step scan."""
    m = identity_block(S5(4, d_state=16, bidirectional=True, dt_min=1e-2, dt_max=0.5))
    u = torch.randn(2, 200, 4)
    y = m(u)
    y_ref = sequential_reference(m, u.double())
    assert (y.double() - y_ref).abs().max() <= 1e-5 * y_ref.abs().max()


@pytest.mark.parametrize("blocks", [1, 2, 4])
def test_hippo_n_initialisation(blocks):
    P, H = 16, 64
    m = S5(H, d_state=P, blocks=blocks)
    A, B, C, dt = m.continuous_parameters()
    # eigenvalues of the normal part of HiPPO-LegS, one block of size P/blocks per block
    ev = torch.linalg.eigvals(hippo_legs_normal(P // blocks)[0])
    expected = ev.repeat(blocks)
    got = A.to(torch.complex128)
    torch.testing.assert_close(got[got.imag.argsort()], expected[expected.imag.argsort()],
                               rtol=0, atol=1e-5)  # Lambda is stored in fp32
    assert torch.allclose(A.real, torch.full_like(A.real, -0.5))
    # B = V^H B0 with B0 real LeCun normal (std 1/sqrt(H)): V B (conjugates included) is
    # the real B0 back.
    _, V = s5_mod.hippo_n_init(P, blocks)
    B0 = V.to(torch.complex64) @ B[: P // 2] + V.conj().to(torch.complex64) @ B[P // 2 :]
    assert B0.imag.abs().max() < 1e-5
    assert abs(B0.real.std().item() * math.sqrt(H) - 1) < 0.1  # 1024 samples: +-4 % (1 sigma)
    assert dt.shape == (P,) and torch.all((dt >= 1e-3 * 0.999) & (dt <= 1e-1 * 1.001))
    assert C.shape == (H, P) and B.shape == (P, H)


def test_optimiser_hints():
    assert_hinted(S5(4, d_state=8, lr=2e-3, bidirectional=True),
                  {"log_Lambda_real", "Lambda_imag", "B", "log_dt"}, 2e-3)


def test_step_matches_forward_fp32():
    """Scan vs step-by-step recurrence in fp32: same arithmetic in a different order; errors
    ~ eps * log2(L) * max|x|. Tolerance 1e-5 abs / 1e-4 rel."""
    B, L, H = 2, 97, 4
    m = S5(H, d_state=16, blocks=2, dt_min=1e-2, dt_max=0.5)
    x = torch.randn(B, L, H)
    y = m(x)
    state = m.initial_state(B)
    assert state.shape == (B, 8) and state.is_complex()
    y_steps, _ = run_steps(m, x, state)
    torch.testing.assert_close(y_steps, y, rtol=1e-4, atol=1e-5)


def test_bidirectional_decomposition():
    """y = [causal S5 with C, D](u) + reverse([causal S5 with C_reverse, D = 0](reverse(u))):
    the backward scan is the forward scan of the reversed sequence and includes token t."""
    B, L, H = 2, 33, 3
    bi = identity_block(S5(H, d_state=8, bidirectional=True)).double()
    fwd = identity_block(S5(H, d_state=8)).double()
    rev = identity_block(S5(H, d_state=8)).double()
    split_directions(bi, fwd, rev, ("log_Lambda_real", "Lambda_imag", "B", "log_dt"))
    u = torch.randn(B, L, H, dtype=torch.float64)
    expected = fwd._forward(u, None) + rev._forward(u.flip(1), None).flip(1)
    torch.testing.assert_close(bi._forward(u, None), expected, rtol=1e-10, atol=1e-10)

    # The backward part alone (C = 0, D = 0) sees u[t] and later tokens, never earlier ones.
    with torch.no_grad():
        bi.C.zero_()
        bi.D.zero_()
    t = 10
    u2 = u.clone()
    u2[:, :t] += 1.0  # earlier tokens: no effect at t
    torch.testing.assert_close(bi._forward(u2, None)[:, t], bi._forward(u, None)[:, t])
    u3 = u.clone()
    u3[:, t] += 1.0  # the current token: an effect at t
    assert (bi._forward(u3, None)[:, t] - bi._forward(u, None)[:, t]).abs().max() > 1e-3


@pytest.mark.parametrize("bidirectional", [False, True])
def test_gradcheck_float64(bidirectional):
    m = S5(2, d_state=4, bidirectional=bidirectional)
    assert gradcheck_module(m, torch.randn(1, 6, 2, dtype=torch.float64))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"d_model": 0}, "d_model must be a positive integer, got 0"),
        ({"d_state": 0}, "d_state must be a positive integer, got 0"),
        ({"d_state": 7}, "d_state must be a multiple of 2 \\* blocks .*got d_state=7"),
        ({"d_state": 12, "blocks": 4}, "blocks=4 .*got d_state=12"),
        ({"blocks": 0}, "blocks must be a positive integer, got 0"),
        ({"dt_min": 0.2, "dt_max": 0.1}, "dt_min must be <= dt_max, got dt_min=0.2 > dt_max=0.1"),
        ({"dt_min": -1e-3}, "dt_min must be a positive finite number"),
        ({"lr": -1.0}, "lr must be a positive finite number"),
        ({"dropout": -0.1}, r"dropout must be a number in \[0, 1\)"),
    ],
)
def test_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        S5(**{"d_model": 4, **kwargs})


def test_runtime_errors():
    m = S5(4, d_state=8, bidirectional=True)
    with pytest.raises(RuntimeError, match="bidirectional=True"):
        m.step(torch.randn(2, 4), None)
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        S5(4, d_state=8).initial_state(-1)
    with pytest.raises(ValueError, match="d_model=4"):
        S5(4, d_state=8)(torch.randn(2, 3, 6))
