"""The CPU causal-window path (key band as a view) against the dense reference and the
generic blocked path, forward and backward, and the dispatch that picks it."""

import pytest
import torch

from spadeformer.ops import cpu_window_attn
from spadeformer.ops.local_attn import _blocked_attention, attention_ref, sliding_window_attention
from spadeformer.ops.position_bias import T5RelativeBias

W = 8


def projection_layout(B, H, L, D, dtype=torch.float64, seed=0):
    """q, k, v as a linear projection lays them out: (B, H, L, D) views of (B, L, H, D)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, L, 3, H, D, dtype=dtype, generator=gen)
    return [t.transpose(1, 2).detach().requires_grad_(True) for t in x.unbind(2)]


def forward_and_grads(fn, leaves, g, **kw):
    leaves = [t.detach().clone().requires_grad_(True) for t in leaves]
    out = fn(*leaves, **kw)
    (out * g).sum().backward()
    return out, [t.grad for t in leaves]


# batch 1 and 3 (block 0 of a later sequence sees the previous one in the flattened view),
# lengths a multiple of W, ragged, and just past one block
@pytest.mark.parametrize(
    "B,L", [(1, 4 * W), (3, 4 * W), (2, 3 * W + 5), (3, W + 1), (1, 2 * W - 1)]
)
@pytest.mark.parametrize("layout", ["projection", "contiguous"])
def test_forward_and_gradients_match_the_reference(B, L, layout):
    H, D = 3, 4
    q, k, v = projection_layout(B, H, L, D)
    if layout == "contiguous":
        q, k, v = (t.detach().contiguous().requires_grad_(True) for t in (q, k, v))
    g = torch.randn(B, H, L, D, dtype=torch.float64)
    assert cpu_window_attn.supported(
        q, k, v, window=W, block=W, causal=True, key_padding_mask=None, bias=None, dropout_p=0.0
    )
    fast, fast_grads = forward_and_grads(cpu_window_attn.causal_window_attention_cpu, (q, k, v),
                                         g, window=W)
    ref, ref_grads = forward_and_grads(attention_ref, (q, k, v), g, pattern="window",
                                       window_size=W)
    torch.testing.assert_close(fast, ref, rtol=1e-12, atol=1e-12)
    for name, a, b in zip("qkv", fast_grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-11, msg=f"grad of {name}")


def test_matches_the_generic_blocked_path_in_fp32():
    B, H, L, D = 2, 4, 5 * 16 + 3, 8
    q, k, v = projection_layout(B, H, L, D, dtype=torch.float32, seed=1)
    g = torch.randn(B, H, L, D)
    fast, fast_grads = forward_and_grads(cpu_window_attn.causal_window_attention_cpu, (q, k, v),
                                         g, window=16)
    generic, generic_grads = forward_and_grads(
        _blocked_attention, (q, k, v), g, block=16, left=16, right=0, lo=16, hi=0,
        key_padding_mask=None, bias=None, dropout_p=0.0,
    )
    torch.testing.assert_close(fast, generic, rtol=1e-5, atol=1e-6)
    for a, b in zip(fast_grads, generic_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_gradcheck():
    q, k, v = projection_layout(2, 2, 2 * 4 + 1, 3, seed=2)
    assert torch.autograd.gradcheck(
        lambda q, k, v: cpu_window_attn.causal_window_attention_cpu(q, k, v, 4), (q, k, v)
    )


def test_no_grad_forward_and_inputs_untouched():
    q, k, v = projection_layout(2, 2, 3 * W, 4)
    before = [t.detach().clone() for t in (q, k, v)]
    with torch.no_grad():
        out = cpu_window_attn.causal_window_attention_cpu(q, k, v, W)
    want = attention_ref(*before, "window", window_size=W)
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    for t, b in zip((q, k, v), before, strict=True):
        assert torch.equal(t, b)


@pytest.fixture
def calls(monkeypatch):
    """Records each call sliding_window_attention hands to the CPU window path."""
    seen = []
    real = cpu_window_attn.causal_window_attention_cpu

    def spy(q, k, v, window):
        seen.append(window)
        return real(q, k, v, window)

    monkeypatch.setattr(cpu_window_attn, "causal_window_attention_cpu", spy)
    return seen


def test_sliding_window_attention_takes_the_view_path_for_the_plain_causal_case(calls):
    q, k, v = projection_layout(2, 2, 3 * W, 4)
    out = sliding_window_attention(q, k, v, W)
    assert calls == [W]
    torch.testing.assert_close(out, attention_ref(q, k, v, "window", window_size=W))


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(causal=False),
        dict(block_size=W // 2),
        dict(key_padding_mask=torch.zeros(2, 3 * W, dtype=torch.bool)),
        dict(bias=T5RelativeBias(2, num_buckets=4, max_distance=8, bidirectional=False)),
        dict(dropout_p=0.1),
    ],
    ids=["bidirectional", "block-not-window", "padding", "bias", "dropout"],
)
def test_other_calls_stay_on_the_generic_path(calls, kwargs):
    q, k, v = projection_layout(2, 2, 3 * W, 4)
    sliding_window_attention(q, k, v, W, **kwargs)
    assert calls == []


def test_a_window_as_long_as_the_sequence_stays_generic(calls):
    q, k, v = projection_layout(1, 2, W, 4)  # L = W: one block, nothing to band
    sliding_window_attention(q, k, v, W)
    assert calls == []


def test_a_nan_in_one_sequence_stays_in_it():
    # the flattened view scores block 0 of sequence 1 against the end of sequence 0
    q, k, v = projection_layout(2, 1, 2 * W, 2)
    with torch.no_grad():
        k[0, 0, -1, 0] = float("nan")
    out = cpu_window_attn.causal_window_attention_cpu(q, k, v, W)
    assert torch.isfinite(out[1]).all()
    out[1].sum().backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad[1]).all()


def test_backward_cannot_be_differentiated_again():
    q, k, v = projection_layout(1, 2, 2 * W, 4)
    out = cpu_window_attn.causal_window_attention_cpu(q, k, v, W)
    g = torch.randn_like(out, requires_grad=True)
    (gq,) = torch.autograd.grad(out, q, g, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        gq.sum().backward()


def test_empty_heads_stay_generic(calls):
    q = torch.randn(2, 0, 3 * W, 4)
    assert sliding_window_attention(q, q, q, W).shape == q.shape
    assert calls == []


def test_autocast_and_torch_func_stay_generic(calls):
    q, k, v = projection_layout(1, 2, 3 * W, 4, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        sliding_window_attention(q, k, v, W)
    grad = torch.func.grad(lambda q: sliding_window_attention(q, k, v, W).sum())(q.detach())
    assert calls == []
    want = torch.autograd.grad(attention_ref(q, k, v, "window", window_size=W).sum(), q)[0]
    torch.testing.assert_close(grad, want, rtol=1e-5, atol=1e-6)
