"""Hyena global extractor: fast vs ref, step == forward, bidirectional decomposition, padding,
gradients, freezing/caching and argument errors.

Tolerances: float64 comparisons (fast vs ref, gradcheck) at 1e-10 — both sides are exact
formulas and differ only by FFT round-off (~1e-15 relative). fp32 step == forward at
atol 1e-5 / rtol 1e-4: the forward uses an FFT (round-off ~1e-7 relative, growing with log L)
while step sums the history directly, and the filter MLP is evaluated one row at a time.
"""

import pytest
import torch
from ssm_helpers import run_steps
from torch.func import functional_call

from spadeformer.ssm.hyena import Hyena, hyena_positional_features

D = 6
FP32 = {"atol": 1e-5, "rtol": 1e-4}
FP64 = {"atol": 1e-10, "rtol": 1e-10}


def small(**kw):
    kw.setdefault("filter_order", 16)
    kw.setdefault("time_scale", 64)  # short test sequences see a non-trivial stretch of decay
    return Hyena(D, **kw)


@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("order,K", [(2, 3), (3, 4), (2, 1)])
@pytest.mark.parametrize("masked", [False, True])
def test_fast_matches_ref(bidirectional, order, K, masked):
    m = small(order=order, short_filter_size=K, bidirectional=bidirectional).double()
    u = torch.randn(3, 17, D, dtype=torch.float64)
    mask = None
    if masked:
        mask = torch.zeros(3, 17, dtype=torch.bool)
        mask[0, 11:] = True  # right padding
        mask[1, :4] = True  # left padding
        mask[2, 6:9] = True  # a hole
        u = u.masked_fill(mask[..., None], 0.0)
    y = m._forward(u, mask)
    if mask is not None:
        y = y.masked_fill(mask[..., None], 0.0)
    torch.testing.assert_close(y, m._forward_ref(u, mask), **FP64)


@pytest.mark.parametrize("order,K", [(2, 3), (3, 2), (2, 1)])
def test_step_equals_forward(order, K):
    m = small(order=order, short_filter_size=K).eval()
    x = torch.randn(2, 40, D)
    y = m(x)
    y_steps, state = run_steps(m, x, m.initial_state(2))
    torch.testing.assert_close(y_steps, y, **FP32)
    # The state grows with t: the documented O(t) history.
    assert state[1].shape == (2, order - 1, D, 40) and state[2].shape == (order - 1, D, 40)


def test_filter_at_lag_t_does_not_depend_on_length():
    m = small(bidirectional=True)
    k40, r40 = m.filters(40)
    k13, r13 = m.filters(13)
    assert k40.shape == (1, D, 40) and r40.shape == (1, D, 40)
    torch.testing.assert_close(k40[..., :13], k13, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(r40[..., :13], r13, atol=1e-6, rtol=1e-5)
    # Features themselves are a pure function of t (exactly).
    t = torch.arange(40.0)
    assert torch.equal(hyena_positional_features(t, 9, 64.0)[:13],
                       hyena_positional_features(t[:13], 9, 64.0))


def test_filters_decay_with_per_channel_rates():
    m = small()
    with torch.no_grad():  # a constant MLP output, so only the decay shapes h
        m.filter_mlp[4].weight.zero_()
        m.filter_mlp[4].bias.fill_(1.0)
        m.filter_mlp[-1].weight.fill_(0.1)
    k, _ = m.filters(64)
    k = k[0].detach()
    assert (k[:, 1:] < k[:, :-1]).all()  # decays in t
    assert (k[1:, 20] < k[:-1, 20]).all()  # faster for later channels
    # At t = T (= time_scale) the slowest channel has decayed to 1e-2^(1/1.5).
    torch.testing.assert_close(k[0, 63] / k[0, 0], torch.tensor(0.01 ** (63 / 64 / 1.5)))


def test_causal_output_ignores_the_future():
    m = small(short_filter_size=3).eval()
    x = torch.randn(1, 30, D)
    x2 = x.clone()
    x2[:, 15:] = torch.randn(1, 15, D) * 10
    torch.testing.assert_close(m(x)[:, :15], m(x2)[:, :15], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(m(x)[:, 15:], m(x2)[:, 15:], atol=1e-3)


def _zero_reverse_filter(m: Hyena) -> None:
    last = m.filter_mlp[-1].weight  # rows laid out as (dir, order-1, d)
    with torch.no_grad():
        last[last.shape[0] // 2 :] = 0.0


def test_bidirectional_decomposition():
    """bidirectional = centred short conv + causal filter h + anti-causal filter g (k_reverse)."""
    L, t = 30, 14
    x = torch.randn(1, L, D)

    def moved(m, pos):  # does output at t move when input at pos changes?
        x2 = x.clone()
        x2[:, pos] += 5.0
        return not torch.allclose(m(x)[:, t], m(x2)[:, t], atol=1e-4)

    # Centred short conv with K=3 reaches t+1; the reverse filter reaches any s > t.
    m = small(short_filter_size=3, bidirectional=True).eval()
    assert moved(m, t + 1) and moved(m, t + 12)
    _zero_reverse_filter(m)
    assert moved(m, t + 1) and not moved(m, t + 2) and not moved(m, t + 12)
    assert moved(m, t - 1) and moved(m, t - 12)  # the causal filter still reaches the past

    # With K=1 and g = 0 the bidirectional model is exactly the causal one (same weights).
    bi = small(short_filter_size=1, bidirectional=True).eval()
    _zero_reverse_filter(bi)
    causal = small(short_filter_size=1).eval()
    state = bi.state_dict()
    w = state["filter_mlp.6.weight"]
    state["filter_mlp.6.weight"] = w[: w.shape[0] // 2]
    causal.load_state_dict(state)
    torch.testing.assert_close(bi(x), causal(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("bidirectional", [False, True])
def test_padding_right_and_left_equal_unpadded(bidirectional):
    m = small(bidirectional=bidirectional).eval()
    x = torch.randn(1, 12, D)
    ref = m(x)[0]
    padded = torch.randn(2, 20, D) * 100  # garbage at padded positions
    padded[0, :12] = x[0]  # right padding
    padded[1, 8:] = x[0]  # left padding
    mask = torch.ones(2, 20, dtype=torch.bool)
    mask[0, :12] = False
    mask[1, 8:] = False
    y = m(padded, mask)
    torch.testing.assert_close(y[0, :12], ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(y[1, 8:], ref, atol=1e-5, rtol=1e-4)
    assert (y[mask] == 0).all()


def test_padded_values_change_nothing_with_holes():
    m = small(bidirectional=True).eval()
    x = torch.randn(2, 16, D)
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[0, 5:9] = True
    mask[1, ::3] = True
    x2 = x.clone()
    x2[mask] = torch.randn(int(mask.sum()), D) * 1e3
    torch.testing.assert_close(m(x, mask), m(x2, mask), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("bidirectional", [False, True])
def test_gradcheck_float64(bidirectional):
    m = Hyena(2, order=3, filter_order=3, emb_dim=3, short_filter_size=2,
              bidirectional=bidirectional, time_scale=8).double()
    names = [n for n, _ in m.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_(True) for p in m.parameters())
    u = torch.randn(2, 5, 2, dtype=torch.float64, requires_grad=True)
    mask = torch.zeros(2, 5, dtype=torch.bool)
    mask[1, 3:] = True

    def f(u, *ps):
        return functional_call(m, dict(zip(names, ps, strict=True)), (u, mask))

    # The public forward casts to fp32, so check the fp64 computation behind it.
    m.forward = m._forward
    assert torch.autograd.gradcheck(f, (u, *params), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_all_parameters_get_gradients():
    m = small(order=3, bidirectional=True)
    m(torch.randn(2, 10, D)).square().sum().backward()
    for n, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, n


def test_frozen_has_no_trainable_parameters_and_caches_filters(monkeypatch):
    m = small(trainable=False)
    assert sum(p.numel() for p in m.parameters() if p.requires_grad) == 0
    calls = []
    inner = m._filters_at
    monkeypatch.setattr(m, "_filters_at", lambda pos: calls.append(len(pos)) or inner(pos))
    x = torch.randn(2, 12, D)
    y1 = m(x)
    y2 = m(x)
    m(torch.randn(1, 7, D))
    m(torch.randn(3, 7, D))
    assert calls == [12, 7]
    assert m._filters(12)[0] is m._filters(12)[0]  # served from the cache (filters() copies)
    torch.testing.assert_close(y1, y2, atol=0, rtol=0)

    # Same weights, trainable: identical output (the cache changes nothing).
    live = small()
    live.load_state_dict(m.state_dict())
    torch.testing.assert_close(live(x), y1, atol=1e-6, rtol=1e-5)  # grad vs no-grad kernels

    # Loading new weights into the frozen module drops the stale cache.
    other = small()
    m.load_state_dict(other.state_dict())
    m(x)
    assert calls == [12, 7, 12]
    torch.testing.assert_close(m(x), other(x), atol=1e-6, rtol=1e-5)


def test_only_implicit_filter_parameters_get_the_ssm_hint():
    m = small(lr=1e-3)
    marked = {n for n, p in m.named_parameters() if hasattr(p, "_optim")}
    assert marked == {n for n, _ in m.named_parameters() if n.startswith("filter_mlp.")}
    assert all(p._optim == {"lr": 1e-3, "weight_decay": 0.0} for p in m.filter_mlp.parameters())
    # without lr: no weight decay still (the reference filter's wd=0), the optimiser's ssm_lr
    assert all(p._optim == {"lr": None, "weight_decay": 0.0}
               for p in small().filter_mlp.parameters())


def test_runs_fp32_under_autocast_and_keeps_input_dtype():
    m = small()
    x = torch.randn(2, 10, D)
    y = m(x.bfloat16())
    assert y.dtype == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, m(x), atol=0, rtol=0)


def test_max_length():
    m = small(max_length=10, time_scale=None)
    assert m.time_scale == 10.0
    assert m(torch.randn(1, 10, D)).shape == (1, 10, D)
    with pytest.raises(ValueError, match="max_length=10"):
        m(torch.randn(1, 11, D))
    state = m.initial_state(1)
    for _ in range(10):
        _, state = m.step(torch.randn(1, D), state)
    with pytest.raises(ValueError, match="max_length=10"):
        m.step(torch.randn(1, D), state)
    assert Hyena(D).time_scale == 1024.0


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"order": 1}, "order"),
        ({"order": 2.0}, "order"),
        ({"filter_order": 0}, "filter_order"),
        ({"short_filter_size": 0}, "short_filter_size"),
        ({"max_length": 0}, "max_length"),
        ({"emb_dim": 4}, "emb_dim"),
        ({"emb_dim": 1}, "emb_dim"),
        ({"dropout": 1.0}, "dropout"),
        ({"lr": -1.0}, "lr"),
        ({"time_scale": 0}, "time_scale"),
    ],
)
def test_bad_config_raises(kw, match):
    with pytest.raises(ValueError, match=match):
        Hyena(D, **kw)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="d_model"):
        Hyena(0)
    m = small()
    with pytest.raises(ValueError, match="shape"):
        m(torch.randn(10, D))
    with pytest.raises(ValueError, match="d_model"):
        m(torch.randn(1, 10, D + 1))
    with pytest.raises(TypeError, match="floating"):
        m(torch.ones(1, 10, D, dtype=torch.long))
    with pytest.raises(ValueError, match="padding_mask"):
        m(torch.randn(1, 10, D), torch.zeros(1, 9, dtype=torch.bool))
    with pytest.raises(ValueError, match="x_t"):
        m.step(torch.randn(1, 3, D), m.initial_state(1))
    with pytest.raises(ValueError, match="state"):
        m.step(torch.randn(2, D), m.initial_state(1))
    with pytest.raises(ValueError, match="batch_size"):
        m.initial_state(0)


def test_step_on_bidirectional_raises():
    m = small(bidirectional=True)
    with pytest.raises(RuntimeError, match="bidirectional"):
        m.step(torch.randn(1, D), None)
    with pytest.raises(RuntimeError, match="bidirectional"):
        m.initial_state(1)
