"""The shared protocol, checked on every global extractor the same way."""

import pytest
import torch
from ssm_helpers import run_steps

from spadeformer.ssm import build_ssm

KINDS = {
    "s4": {"d_state": 8},
    "s4d": {"d_state": 8},
    "s5": {"d_state": 8},
    "hyena": {},
    "lstm": {},
    "ema": {"n_dims": 4},
}


def make(kind, d_model=6, **extra):
    return build_ssm(kind, d_model, **{**KINDS[kind], **extra})


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_step_equals_forward(kind):
    ssm = make(kind, bidirectional=False).eval()
    x = torch.randn(2, 23, 6)
    y = ssm(x)
    y_steps, _ = run_steps(ssm, x, ssm.initial_state(2))
    torch.testing.assert_close(y_steps, y, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("bidirectional", [False, True])
def test_padding_isolates_real_positions(kind, bidirectional):
    ssm = make(kind, bidirectional=bidirectional).eval()
    x = torch.randn(2, 17, 6)
    mask = torch.zeros(2, 17, dtype=torch.bool)
    mask[0, 12:] = True
    y1 = ssm(x, padding_mask=mask)
    x2 = x.clone()
    x2[0, 12:] = 50 * torch.randn(5, 6)
    y2 = ssm(x2, padding_mask=mask)
    torch.testing.assert_close(y1[~mask], y2[~mask])
    assert torch.all(y1[mask] == 0)


# The SSMs whose padding may sit anywhere (LSTMGlobal takes right padding only), with
# several output channels where the SSM has them.
ANY_PADDING = [("hyena", {}), ("s4", {"channels": 2}), ("s4d", {"channels": 2}), ("s5", {}),
               ("ema", {})]


@pytest.mark.parametrize("kind, extra", ANY_PADDING)
@pytest.mark.parametrize("bidirectional", [False, True])
def test_left_and_right_padding_change_nothing(kind, extra, bidirectional):
    B, L, H = 2, 30, 4
    ssm = make(kind, d_model=H, bidirectional=bidirectional, **extra)
    mask = torch.zeros(B, L, dtype=torch.bool)
    mask[0, 22:] = True  # right padding
    mask[1, :5] = True  # left padding
    x = torch.randn(B, L, H)
    x2 = torch.where(mask.unsqueeze(-1), 100 * torch.randn(B, L, H), x)
    y, y2 = ssm(x, padding_mask=mask), ssm(x2, padding_mask=mask)
    torch.testing.assert_close(y, y2)
    assert torch.all(y[mask] == 0)
    assert torch.all(y[~mask].abs().sum(-1) > 0)
    # right padding = the unpadded sequence cut short
    torch.testing.assert_close(y[0, :22], ssm(x[:1, :22])[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("bidirectional", [False, True])
def test_frozen_has_zero_trainable_parameters(kind, bidirectional):
    ssm = make(kind, bidirectional=bidirectional, trainable=False)
    assert ssm.trainable is False
    assert sum(p.numel() for p in ssm.parameters() if p.requires_grad) == 0
    assert sum(p.numel() for p in ssm.parameters()) > 0
    assert not ssm(torch.randn(2, 10, 6)).requires_grad
    assert sum(p.numel() for p in make(kind, bidirectional=bidirectional).parameters()
               if p.requires_grad) > 0


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_step_on_bidirectional_is_an_error(kind):
    ssm = make(kind, bidirectional=True)
    with pytest.raises(RuntimeError, match="bidirectional"):
        ssm.step(torch.randn(2, 6), None)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_bad_input_errors(kind):
    ssm = make(kind, bidirectional=False)
    with pytest.raises(ValueError, match="d_model=6"):
        ssm(torch.randn(2, 5, 7))
    with pytest.raises(ValueError, match="shape"):
        ssm(torch.randn(5, 6))
    with pytest.raises(TypeError, match="floating"):
        ssm(torch.ones(2, 5, 6, dtype=torch.long))
    with pytest.raises(ValueError, match="padding_mask"):
        ssm(torch.randn(2, 5, 6), padding_mask=torch.zeros(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="d_model"):
        make(kind, d_model=0, bidirectional=False)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_runs_in_fp32_under_autocast(kind):
    # exact equalities: a computation in bfloat16 (autocast let through) would miss them
    ssm = make(kind, bidirectional=False).eval()
    x = torch.randn(2, 9, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = ssm(x)
        y_t, _ = ssm.step(x[:, 0], ssm.initial_state(2))
    assert y.dtype == y_t.dtype == torch.float32
    torch.testing.assert_close(y, ssm(x), rtol=0, atol=0)
    torch.testing.assert_close(y_t, ssm.step(x[:, 0], ssm.initial_state(2))[0], rtol=0, atol=0)
    # bfloat16 input: computed in float32 on the upcast input, returned in bfloat16
    xb = x.bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        yb = ssm(xb)
    assert yb.dtype == torch.bfloat16
    torch.testing.assert_close(yb, ssm(xb.float()).bfloat16(), rtol=0, atol=0)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_input_dtype_other_than_the_parameters(kind):
    ssm = make(kind, bidirectional=False).eval()
    x = torch.randn(2, 9, 6, dtype=torch.float64)
    y = ssm(x)  # a float32 module computes in float32 and answers in the input's dtype
    assert y.dtype == torch.float64
    torch.testing.assert_close(y, ssm(x.float()).double(), rtol=0, atol=0)
    y_t, _ = ssm.step(x[:, 0], ssm.initial_state(2))
    assert y_t.dtype == torch.float64
    # a float64 module computes in float64
    ssm64 = make(kind, bidirectional=False).double().eval()
    assert ssm64(x).dtype == torch.float64
    y64, _ = run_steps(ssm64, x, ssm64.initial_state(2))
    torch.testing.assert_close(y64, ssm64(x), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_half_precision_cast_keeps_parameters_fp32(kind):
    ssm = make(kind, bidirectional=False).eval()
    x = torch.randn(2, 9, 6)
    expected = ssm(x.bfloat16().float())
    cast = ssm.to(torch.bfloat16)
    assert all(p.dtype == torch.float32 for p in cast.parameters())
    assert all(b.dtype not in (torch.float16, torch.bfloat16) for b in cast.buffers())
    y = cast(x.bfloat16())
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, expected.bfloat16(), rtol=0, atol=0)
    y_t, _ = cast.step(x[:, 0].bfloat16(), cast.initial_state(2))
    assert y_t.dtype == torch.bfloat16
    assert make(kind, bidirectional=False).double().half()(x.half()).dtype == torch.float16


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_step_refuses_a_state_of_another_batch(kind):
    ssm = make(kind, bidirectional=False)
    for state in (ssm.initial_state(1), ssm.initial_state(4)):
        with pytest.raises(ValueError, match="state"):
            ssm.step(torch.randn(3, 6), state)


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("trainable", [True, False])
def test_torch_func_transforms(kind, trainable):
    # grad and vmap go through every path, the frozen one (constant-kernel convolution) too
    ssm = make(kind, bidirectional=False, trainable=trainable).double().eval()
    x = torch.randn(1, 7, 6, dtype=torch.float64)
    g = torch.func.grad(lambda u: ssm(u).square().sum())(x)
    x_ = x.clone().requires_grad_()
    ssm(x_).square().sum().backward()
    torch.testing.assert_close(g, x_.grad, rtol=1e-10, atol=1e-12)
    if kind != "lstm":  # PyTorch has no vmap rule for aten::lstm
        v = torch.func.vmap(ssm)(torch.stack([x, 2 * x]))
        torch.testing.assert_close(v[1], ssm(2 * x), rtol=1e-10, atol=1e-12)


FROZEN_CACHED = ["s4", "s4d", "hyena", "ema"]  # the kinds that cache values of frozen parameters


@pytest.mark.parametrize("kind", FROZEN_CACHED)
@pytest.mark.parametrize("bidirectional", [False, True])
def test_frozen_cache_follows_swapped_parameters(kind, bidirectional):
    torch.manual_seed(0)
    x = torch.randn(1, 12, 6)
    m = make(kind, bidirectional=bidirectional, trainable=False).eval()
    m(x)  # fill the cache
    other = make(kind, bidirectional=bidirectional, trainable=False).eval()
    expected = other(x)
    # the same tensors, not clones: identical version counters, other storage
    swapped = torch.func.functional_call(m, dict(other.state_dict()), (x,))
    torch.testing.assert_close(swapped, expected, rtol=0, atol=0)
    m.load_state_dict({k: v.clone() for k, v in other.state_dict().items()}, assign=True)
    torch.testing.assert_close(m(x), expected, rtol=0, atol=0)


@pytest.mark.parametrize("kind", FROZEN_CACHED)
def test_frozen_module_trains_through_after_inference_mode(kind):
    m = make(kind, bidirectional=False, trainable=False)
    with torch.inference_mode():
        m(torch.randn(2, 10, 6))
        m.step(torch.randn(2, 6), m.initial_state(2))
    x = torch.randn(2, 10, 6, requires_grad=True)
    m(x).sum().backward()
    x_t = torch.randn(2, 6, requires_grad=True)
    m.step(x_t, m.initial_state(2))[0].sum().backward()
    assert x.grad.abs().sum() > 0 and x_t.grad.abs().sum() > 0


@pytest.mark.parametrize("kind", FROZEN_CACHED)
def test_frozen_module_copies_and_pickles_with_a_filled_cache(kind, tmp_path):
    import copy

    m = make(kind, bidirectional=False, trainable=False).eval()
    x = torch.randn(1, 10, 6)
    y = m(x)
    torch.save(m, tmp_path / "m.pt")
    loaded = torch.load(tmp_path / "m.pt", weights_only=False)
    twin = copy.deepcopy(m)
    with torch.no_grad():  # a copy has its own parameters: changing them must show
        for p in twin.parameters():
            p.mul_(0.5)
    torch.testing.assert_close(loaded(x), y, rtol=0, atol=0)
    assert not torch.equal(twin(x), y)
    torch.testing.assert_close(m(x), y, rtol=0, atol=0)


@pytest.mark.parametrize("kind", FROZEN_CACHED)
def test_frozen_module_built_under_inference_mode(kind):
    x = torch.randn(1, 10, 6)
    with torch.inference_mode():  # its parameters have no version counter: nothing is cached
        m = make(kind, bidirectional=False, trainable=False).eval()
        y1, y2 = m(x), m(x)
    torch.testing.assert_close(y1, y2, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["s4", "s4d", "s5", "hyena", "ema"])
def test_optimiser_hints_survive_deepcopy(kind):
    import copy

    from spadeformer.training.optim import param_groups

    def ssm_group(module):
        groups = {g["name"]: g for g in param_groups(module, 1e-2, 0.1, ssm_lr=1e-3)}
        return groups["ssm"]["lr"], groups["ssm"]["weight_decay"], len(groups["ssm"]["params"])

    m = make(kind, bidirectional=False)
    assert ssm_group(copy.deepcopy(m)) == ssm_group(m)
    assert ssm_group(m)[:2] == (1e-3, 0.0)


def test_mark_ssm_params_refuses_what_is_not_a_parameter():
    from spadeformer.ssm.base import mark_ssm_params

    m = make("s4", bidirectional=False)
    with pytest.raises(TypeError, match="sequence of parameter names"):
        mark_ssm_params(m, "log_dt", None)
    with pytest.raises(ValueError, match="'hippo_V' is not a parameter of this S4"):
        mark_ssm_params(m, ["hippo_V"], None)  # a buffer


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_built_under_a_device_context_every_tensor_follows(kind):
    # `with torch.device(...)` (meta init, fabric / litgpt style): HiPPO initialisers compute
    # on the CPU, and their results must still land on the context's device
    with torch.device("meta"):
        m = make(kind, bidirectional=kind != "lstm")
        y = m(torch.randn(2, 5, 6))
    assert {t.device.type for t in [*m.parameters(), *m.buffers()]} == {"meta"}
    assert y.device.type == "meta" and y.shape == (2, 5, 6)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_an_empty_batch_gives_an_empty_output(kind):
    m = make(kind, bidirectional=False)
    assert m(torch.randn(0, 5, 6)).shape == (0, 5, 6)


FILTER_GETTERS = {"s4": lambda m, n: (m.kernel(n),), "s4d": lambda m, n: m.kernels(n),
                  "hyena": lambda m, n: m.filters(n)}


@pytest.mark.parametrize("kind", sorted(FILTER_GETTERS))
def test_frozen_kernels_are_cached_in_fp32_and_handed_out_as_copies(kind):
    m = make(kind, bidirectional=True, trainable=False).eval()
    x = torch.randn(1, 12, 6)
    y = m(x)
    get = FILTER_GETTERS[kind]
    with torch.autocast("cpu", dtype=torch.bfloat16):  # asked for first inside autocast
        inside = [k for k in get(m, 12) if k is not None]
    outside = [k for k in get(m, 12) if k is not None]
    for a, b in zip(inside, outside, strict=True):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for k in inside:  # the caller's tensors: editing them leaves the cache alone
        k.mul_(0.0)
    torch.testing.assert_close(m(x), y, rtol=0, atol=0)
    torch.testing.assert_close(get(m, 12)[0], outside[0], rtol=0, atol=0)
