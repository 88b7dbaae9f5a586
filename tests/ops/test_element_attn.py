"""Mega's element-wise attention (laplace / relu^2): the functions, the dense reference written
out, and the blocked fast paths held to it."""

import math

import pytest
import torch

from spadeformer.ops.element_attn import element_weights, laplace, relu2
from spadeformer.ops.local_attn import attention_ref, dense_attention_mask, local_attention
from spadeformer.ops.position_bias import SimpleRelativeBias, T5RelativeBias

W = 8
B, H, D = 2, 3, 4
FNS = ["laplace", "relu2"]
PATTERNS = ["full", "window", "chunk"]


def sizes(pattern):
    return dict(window_size=W if pattern == "window" else None,
                chunk_size=W if pattern == "chunk" else None)


def qkv(L, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, L, D, generator=g, dtype=dtype) for _ in range(3)]


def test_laplace_is_the_gaussian_cdf_around_mu():
    mu, sigma = math.sqrt(0.5), math.sqrt(1 / (4 * math.pi))
    x = torch.tensor([mu, mu + sigma, mu - sigma, -50.0, 50.0], dtype=torch.float64)
    expected = torch.tensor([0.5, 0.841344746, 0.158655254, 0.0, 1.0], dtype=torch.float64)
    torch.testing.assert_close(laplace(x), expected, rtol=0, atol=1e-9)
    torch.testing.assert_close(relu2(torch.tensor([-2.0, 0.0, 3.0])), torch.tensor([0.0, 0, 9]))


def test_element_weights_divide_by_the_keys_seen_and_zero_the_rest():
    qk = torch.tensor([[2.0, 4.0, 6.0], [3.0, 3.0, 3.0]])
    allowed = torch.tensor([[True, True, False], [False, False, False]])
    w = element_weights(qk, allowed, None, "relu2")
    torch.testing.assert_close(w, torch.tensor([[1.0, 4.0, 0.0], [0.0, 0.0, 0.0]]))
    bias = torch.tensor([1.0, -10.0, 0.0])
    w = element_weights(qk, None, bias, "relu2")  # every key: divide by 3, then add the bias
    torch.testing.assert_close(w, torch.tensor([[(2 / 3 + 1) ** 2, 0.0, 4.0],
                                                [4.0, 0.0, 1.0]]))


def reference_by_hand(q, k, v, pattern, causal, mask, fn):
    """The module docstring's formula, one query at a time."""
    L = q.shape[2]
    ok = dense_attention_mask(pattern, L, causal=causal, **sizes(pattern))
    f = laplace if fn == "laplace" else relu2
    out = torch.zeros(B, H, L, v.shape[-1], dtype=q.dtype)
    for b in range(B):
        for i in range(L):
            seen = ok[i] & (~mask[b] if mask is not None else True)
            n = max(int(seen.sum()), 1)
            w = f(torch.einsum("hd,hjd->hj", q[b, :, i], k[b]) / n) * seen  # (H, L)
            out[b, :, i] = torch.einsum("hj,hjd->hd", w, v[b])
    return out


@pytest.mark.parametrize("fn", FNS)
@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("causal", [True, False])
def test_reference_is_the_formula(fn, pattern, causal):
    q, k, v = qkv(2 * W + 3)
    mask = torch.zeros(B, 2 * W + 3, dtype=torch.bool)
    mask[1, -5:] = True
    kw = dict(causal=causal, key_padding_mask=mask, **sizes(pattern))
    torch.testing.assert_close(attention_ref(q, k, v, pattern, attention_fn=fn, **kw),
                               reference_by_hand(q, k, v, pattern, causal, mask, fn))


@pytest.mark.parametrize("fn", FNS)
@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("L", [1, W - 1, W, 3 * W + 5])
@pytest.mark.parametrize("bias_kind", [None, "simple", "t5"])
def test_fast_matches_reference(fn, pattern, causal, L, bias_kind):
    q, k, v = qkv(L)
    mask = torch.rand(B, L, generator=torch.Generator().manual_seed(1)) < 0.3
    torch.manual_seed(0)
    bias = {None: None, "simple": SimpleRelativeBias(W + 1, init_std=0.5),
            "t5": T5RelativeBias(H, num_buckets=8, max_distance=16,
                                 bidirectional=not causal)}[bias_kind]
    bias = bias.double() if bias is not None else None
    kw = dict(causal=causal, key_padding_mask=mask, bias=bias, attention_fn=fn,
              **sizes(pattern))
    fast, ref = local_attention(q, k, v, pattern, **kw), attention_ref(q, k, v, pattern, **kw)
    torch.testing.assert_close(fast, ref, rtol=1e-10, atol=1e-10)  # padded rows too


@pytest.mark.parametrize("pattern", PATTERNS)
def test_gradients_match_and_empty_rows_are_zero(pattern):
    L = 3 * W + 2
    q, k, v = (t.requires_grad_(True) for t in qkv(L))
    mask = torch.zeros(B, L, dtype=torch.bool)
    mask[0] = True  # every row of sequence 0 sees no key
    kw = dict(causal=True, key_padding_mask=mask, attention_fn="laplace", **sizes(pattern))
    fast = local_attention(q, k, v, pattern, **kw)
    assert torch.all(fast[0] == 0)
    grads = torch.autograd.grad(fast.square().sum(), (q, k, v))
    ref_grads = torch.autograd.grad(attention_ref(q, k, v, pattern, **kw).square().sum(),
                                    (q, k, v))
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-10)


def test_window_path_never_builds_the_full_matrix(monkeypatch):
    """The element path multiplies blocks: no (.., L, L) weight tensor at L = 8 windows."""
    import spadeformer.ops.local_attn as local_attn

    shapes = []
    real = local_attn.element_attend

    def spy(qk, *args):
        shapes.append(tuple(qk.shape))
        return real(qk, *args)

    monkeypatch.setattr(local_attn, "element_attend", spy)
    q, k, v = qkv(8 * W, dtype=torch.float32)
    local_attention(q, k, v, "window", window_size=W, attention_fn="relu2")
    local_attention(q, k, v, "chunk", chunk_size=W, attention_fn="relu2")
    assert shapes == [(B * 8, H, W, 2 * W), (B * 8, H, W, W)]


def test_errors_name_the_argument():
    q, k, v = qkv(4)
    with pytest.raises(ValueError, match="attention_fn must be one of"):
        local_attention(q, k, v, "full", attention_fn="sigmoid")
    with pytest.raises(ValueError, match="attention_fn must be one of"):
        attention_ref(q, k, v, "full", attention_fn="sigmoid")
    with pytest.raises(ValueError, match="backend='flex' runs a softmax only"):
        local_attention(q, k, v, "full", attention_fn="laplace", backend="flex")
    with pytest.raises(ValueError, match="backend must be one of"):
        local_attention(q, k, v, "full", attention_fn="laplace", backend="triton")


@pytest.mark.parametrize("fn", FNS)
def test_bf16_autocast_keeps_the_weights_in_fp32(fn):
    """Under bf16 autocast the matmuls run in bf16 but f runs in fp32 (as a softmax does): in
    bf16, 1 + erf(z) would round every laplace weight below ~1e-3 to 0 (4% output error)."""
    q, k, v = qkv(256, dtype=torch.float32)
    ref = attention_ref(q.double(), k.double(), v.double(), "full", causal=False,
                        attention_fn=fn)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = local_attention(q, k, v, "full", causal=False, attention_fn=fn)
    assert out.dtype == torch.bfloat16
    error = (out.double() - ref).norm() / ref.norm()
    assert error < 0.01, error
