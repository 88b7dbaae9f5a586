"""LSTMGlobal: step == forward, bidirectional decomposition, exact right padding via packing,
gradients, freezing and argument errors.

Tolerances: fp32 comparisons at atol 1e-5 / rtol 1e-4 — the paths compute the same recurrence
but the kernels batch the gate matmuls differently (packed vs unpacked, one step
vs a whole sequence), giving round-off ~1e-7 per step that stays bounded (sigmoid/tanh are
contractive). float64 gradcheck at its defaults scaled to atol 1e-7.
"""

import pytest
import torch
from ssm_helpers import run_steps

from spadeformer.ssm.lstm import LSTMGlobal, suffix_padding_lengths

D = 5
FP32 = {"atol": 1e-5, "rtol": 1e-4}


def right_mask(lengths, L):
    return torch.arange(L)[None, :] >= torch.tensor(lengths)[:, None]


@pytest.mark.parametrize("num_layers", [1, 2])
def test_step_equals_forward(num_layers):
    m = LSTMGlobal(D, num_layers).eval()
    x = torch.randn(3, 25, D)
    y = m(x)
    state = m.initial_state(3)
    assert state[0].shape == (num_layers, 3, D)
    y_steps, _ = run_steps(m, x, state)
    torch.testing.assert_close(y_steps, y, **FP32)


@pytest.mark.parametrize("num_layers", [1, 2])
def test_bidirectional_is_forward_plus_reversed(num_layers):
    bi = LSTMGlobal(D, num_layers, bidirectional=True).eval()
    x = torch.randn(2, 15, D)
    fwd = bi.lstm(x)[0]
    bwd = bi.lstm_reverse(x.flip(1))[0].flip(1)
    torch.testing.assert_close(bi(x), fwd + bwd, **FP32)
    # The forward half is exactly the causal model with the same weights.
    causal = LSTMGlobal(D, num_layers).eval()
    causal.lstm.load_state_dict(bi.lstm.state_dict())
    torch.testing.assert_close(bi(x) - bwd, causal(x), **FP32)
    # And it sees the future: changing the last token moves the first output.
    x2 = x.clone()
    x2[:, -1] += 3.0
    assert not torch.allclose(bi(x)[:, 0], bi(x2)[:, 0], atol=1e-4)
    torch.testing.assert_close(causal(x)[:, 0], causal(x2)[:, 0], atol=0, rtol=0)


@pytest.mark.parametrize("bidirectional", [False, True])
def test_right_padding_equals_unpadded_rows(bidirectional):
    m = LSTMGlobal(D, 2, bidirectional=bidirectional).eval()
    L = 12
    lengths = [12, 7, 1, 0]
    mask = right_mask(lengths, L)
    x = torch.randn(4, L, D)
    x[mask] = torch.randn(int(mask.sum()), D) * 100  # garbage in the padding
    y = m(x, mask)
    for b, n in enumerate(lengths):
        if n:
            torch.testing.assert_close(y[b, :n], m(x[b : b + 1, :n])[0], **FP32)
    assert (y[mask] == 0).all()
    torch.testing.assert_close(y, m._forward_ref(x.masked_fill(mask[..., None], 0.0), mask), **FP32)


def test_padded_values_and_amount_of_padding_change_nothing():
    m = LSTMGlobal(D, bidirectional=True).eval()
    x = torch.randn(2, 10, D)
    mask = right_mask([6, 10], 10)
    y = m(x, mask)
    x2 = x.clone()
    x2[mask] = 1e3
    torch.testing.assert_close(m(x2, mask), y, atol=0, rtol=0)
    # More padding after the same real tokens: the same outputs.
    longer = torch.cat([x, torch.randn(2, 5, D)], dim=1)
    y_long = m(longer, right_mask([6, 10], 15))
    torch.testing.assert_close(y_long[:, :10], y, **FP32)


@pytest.mark.parametrize("bidirectional", [False, True])
def test_fast_matches_ref_without_mask(bidirectional):
    m = LSTMGlobal(D, bidirectional=bidirectional).eval()
    x = torch.randn(2, 9, D)
    torch.testing.assert_close(m(x), m._forward_ref(x, None), **FP32)


def test_non_suffix_mask_raises():
    m = LSTMGlobal(D)
    x = torch.randn(2, 6, D)
    left = torch.zeros(2, 6, dtype=torch.bool)
    left[1, :2] = True
    with pytest.raises(ValueError, match="right padding.*row 1"):
        m(x, left)
    hole = torch.zeros(2, 6, dtype=torch.bool)
    hole[0, 2] = True
    with pytest.raises(ValueError, match="suffix"):
        m(x, hole)
    assert suffix_padding_lengths(right_mask([3, 0], 6)).tolist() == [3, 0]


@pytest.mark.parametrize("bidirectional", [False, True])
def test_gradcheck_float64(bidirectional):
    m = LSTMGlobal(2, 2, bidirectional=bidirectional).double()
    u = torch.randn(2, 4, 2, dtype=torch.float64, requires_grad=True)
    mask = right_mask([4, 2], 4)
    # The public forward casts to fp32, so check the fp64 computation behind it.
    assert torch.autograd.gradcheck(lambda u: m._forward(u, mask), (u,), atol=1e-7)
    u_free = torch.randn(1, 3, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda u: m._forward(u, None), (u_free,), atol=1e-7)


def test_parameters_get_gradients_through_packing():
    m = LSTMGlobal(D, bidirectional=True)
    m(torch.randn(3, 8, D), right_mask([8, 5, 2], 8)).square().sum().backward()
    for n, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, n


def test_frozen_has_no_trainable_parameters():
    m = LSTMGlobal(D, 2, bidirectional=True, trainable=False)
    assert sum(p.numel() for p in m.parameters()) > 0
    assert sum(p.numel() for p in m.parameters() if p.requires_grad) == 0
    assert not m(torch.randn(1, 4, D)).requires_grad


def test_dropout_is_between_layers():
    assert LSTMGlobal(D, 2, dropout=0.3).lstm.dropout == 0.3
    assert LSTMGlobal(D, 1, dropout=0.3).lstm.dropout == 0.0  # nowhere to apply it


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"num_layers": 0}, "num_layers"),
        ({"num_layers": 1.5}, "num_layers"),
        ({"dropout": -0.1}, "dropout"),
        ({"dropout": 1.0}, "dropout"),
    ],
)
def test_bad_config_raises(kw, match):
    with pytest.raises(ValueError, match=match):
        LSTMGlobal(D, **kw)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="d_model"):
        LSTMGlobal(-1)
    m = LSTMGlobal(D)
    with pytest.raises(ValueError, match="shape"):
        m(torch.randn(4, D))
    with pytest.raises(ValueError, match="d_model"):
        m(torch.randn(1, 4, D + 2))
    with pytest.raises(TypeError, match="padding_mask"):
        m(torch.randn(1, 4, D), torch.zeros(1, 4))
    with pytest.raises(ValueError, match="state"):
        m.step(torch.randn(2, D), m.initial_state(3))
    with pytest.raises(ValueError, match="batch_size"):
        m.initial_state(0)


def test_step_on_bidirectional_raises():
    m = LSTMGlobal(D, bidirectional=True)
    with pytest.raises(RuntimeError, match="bidirectional"):
        m.step(torch.randn(1, D), None)
    with pytest.raises(RuntimeError, match="bidirectional"):
        m.initial_state(1)
