import math

import pytest
import torch
import torch.nn.functional as F

from spadeformer.ops.local_attn import (
    attention_ref,
    chunk_attention,
    dense_attention_mask,
    full_attention,
    local_attention,
    sliding_window_attention,
)
from spadeformer.ops.position_bias import ShawRelativeBias, T5RelativeBias

W = 8  # window and chunk size in these tests
LENGTHS = [1, 5, W - 1, W, W + 1, 3 * W + 7]
B, H, D = 2, 3, 4
# fast path in fp32 against the reference in fp64: fp32 round-off of a softmax over <= 31 keys
# with O(1) inputs is ~1e-6, so 1e-5 leaves margin while catching any masking error (O(0.1)).
TOL = dict(rtol=1e-5, atol=1e-5)


def sizes(pattern):
    return dict(
        window_size=W if pattern == "window" else None,
        chunk_size=W if pattern == "chunk" else None,
    )


def make_qkv(L, dtype=torch.float32):
    return [torch.randn(B, H, L, D, dtype=dtype) for _ in range(3)]


def make_padding(L):
    """Random padding plus one sequence padded on its right half (a typical batch)."""
    mask = torch.rand(B, L) < 0.3
    mask[1] = False
    mask[1, (L + 1) // 2 :] = True
    return mask


def make_bias(kind, causal):
    if kind is None:
        return None
    if kind == "t5":
        bias = T5RelativeBias(H, num_buckets=8, max_distance=16, bidirectional=not causal)
        torch.nn.init.normal_(bias.embedding.weight)  # O(1) so a wrong bias index shows
        return bias
    return ShawRelativeBias(D, H, max_relative_position=3, per_head=True)


def run_pair(pattern, causal, L, padded, bias):
    q, k, v = make_qkv(L)
    mask = make_padding(L) if padded else None
    kw = dict(causal=causal, key_padding_mask=mask, bias=bias, **sizes(pattern))
    fast = local_attention(q, k, v, pattern, **kw)
    ref = attention_ref(q.double(), k.double(), v.double(), pattern, **kw)
    return fast, ref


# --------------------------------------------------------------------------------------------
# the reference itself
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pattern", ["full", "window", "chunk"])
@pytest.mark.parametrize("causal", [True, False])
def test_dense_mask_matches_the_written_semantics(pattern, causal):
    L, w, c = 23, 3, 5
    got = dense_attention_mask(
        pattern, L, w if pattern == "window" else None, c if pattern == "chunk" else None, causal
    )
    for i in range(L):
        for j in range(L):
            if pattern == "window":
                want = (i - w <= j <= i) if causal else abs(i - j) <= w
            elif pattern == "chunk":
                same = (i // c) * c <= j < (i // c + 1) * c
                want = same and (j <= i or not causal)
            else:
                want = j <= i or not causal
            assert bool(got[i, j]) == want, (i, j)


def test_reference_full_bidirectional_is_plain_softmax_attention():
    q, k, v = make_qkv(9, torch.float64)
    want = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(D), dim=-1) @ v
    got = attention_ref(q, k, v, "full", causal=False)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------------------------
# fast paths against the reference
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bias_kind", [None, "t5", "shaw"])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("L", LENGTHS)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("pattern", ["full", "window", "chunk"])
def test_fast_matches_reference(pattern, causal, L, padded, bias_kind):
    fast, ref = run_pair(pattern, causal, L, padded, make_bias(bias_kind, causal))
    assert fast.shape == (B, H, L, D) and fast.dtype == torch.float32
    torch.testing.assert_close(fast.double(), ref, **TOL)


def _absolute_bias(q_pos, k_pos):
    """A bias that is not translation invariant: exercises the per-block bias path."""
    qp, kp = q_pos.unsqueeze(-1).float(), k_pos.unsqueeze(-2).float()
    return torch.stack([torch.sin(0.3 * qp + 0.1 * kp), torch.cos(0.2 * kp - 0.05 * qp)])[:1]


@pytest.mark.parametrize("bias_kind", ["dense", "absolute"])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("pattern", ["full", "window", "chunk"])
def test_fast_matches_reference_with_position_dependent_bias(pattern, causal, bias_kind):
    L = 3 * W + 7
    bias = torch.randn(H, L, L) if bias_kind == "dense" else _absolute_bias
    fast, ref = run_pair(pattern, causal, L, True, bias)
    torch.testing.assert_close(fast.double(), ref, **TOL)


@pytest.mark.parametrize("block_size", [1, 3, 8, 16, 100])
@pytest.mark.parametrize("causal", [True, False])
def test_window_block_size_does_not_change_the_result(block_size, causal):
    L = 3 * W + 7
    q, k, v = make_qkv(L)
    mask = make_padding(L)
    bias = make_bias("t5", causal)
    fast = sliding_window_attention(q, k, v, W, causal, mask, bias, block_size=block_size)
    ref = attention_ref(
        q.double(),
        k.double(),
        v.double(),
        "window",
        window_size=W,
        causal=causal,
        key_padding_mask=mask,
        bias=bias,
    )
    torch.testing.assert_close(fast.double(), ref, **TOL)


# block 4 and 8 divide the window (K/V bands from shifted whole blocks), 3 and 16 do not (the
# bands come from unfold): both ways of building the band, and their backward passes
@pytest.mark.parametrize("block_size", [3, 4, 8, 16])
@pytest.mark.parametrize("causal", [True, False])
def test_window_gradients_for_both_band_layouts(block_size, causal):
    L = 3 * W + 7
    q, k, v = make_qkv(L)
    mask = make_padding(L)
    g = torch.randn(B, H, L, D)

    def grads(fn, dtype, **extra):
        leaves = [t.detach().to(dtype).requires_grad_(True) for t in (q, k, v)]
        out = fn(*leaves, window_size=W, causal=causal, key_padding_mask=mask, **extra)
        (out * g.to(dtype)).sum().backward()
        return [t.grad for t in leaves]

    fast = grads(sliding_window_attention, torch.float32, block_size=block_size)
    ref = grads(attention_ref, torch.float64, pattern="window")
    for a, b in zip(fast, ref, strict=True):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("pattern", ["window", "chunk"])
def test_sizes_larger_than_the_sequence(pattern):
    L = 6
    q, k, v = make_qkv(L)
    kw = dict(
        window_size=50 if pattern == "window" else None,
        chunk_size=50 if pattern == "chunk" else None,
        causal=False,
    )
    fast = local_attention(q, k, v, pattern, **kw)
    full = attention_ref(q, k, v, "full", causal=False)  # such a window/chunk sees everything
    torch.testing.assert_close(fast, full, **TOL)


def test_named_fast_functions_match_dispatch():
    L = 2 * W + 3
    q, k, v = make_qkv(L)
    mask = make_padding(L)
    torch.testing.assert_close(
        sliding_window_attention(q, k, v, W, False, mask),
        local_attention(q, k, v, "window", window_size=W, causal=False, key_padding_mask=mask),
    )
    torch.testing.assert_close(
        chunk_attention(q, k, v, W, True, mask),
        local_attention(q, k, v, "chunk", chunk_size=W, key_padding_mask=mask),
    )
    torch.testing.assert_close(
        full_attention(q, k, v, True, mask), local_attention(q, k, v, "full", key_padding_mask=mask)
    )


# --------------------------------------------------------------------------------------------
# padding: fully masked rows, isolation
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bias_kind", [None, "t5", "shaw"])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("pattern", ["full", "window", "chunk"])
def test_fully_masked_rows_give_zeros_not_nan(pattern, causal, bias_kind):
    L = 3 * W + 7
    q, k, v = make_qkv(L)
    for t in (q, k, v):
        t.requires_grad_(True)
    mask = torch.zeros(B, L, dtype=torch.bool)
    mask[0] = True  # a sequence that is all padding: every row has no key
    mask[1, : 2 * W + 1] = True  # causal window/chunk/full: early rows see only padding
    bias = make_bias(bias_kind, causal)
    kw = dict(causal=causal, key_padding_mask=mask, bias=bias, **sizes(pattern))
    out = local_attention(q, k, v, pattern, **kw)
    ref = attention_ref(q, k, v, pattern, **kw)
    assert torch.isfinite(out).all() and torch.isfinite(ref).all()
    assert torch.all(out[0] == 0)
    allowed = dense_attention_mask(pattern, L, causal=causal, **sizes(pattern))
    empty = ~(allowed[None] & ~mask[:, None, :]).any(-1)  # (B, L) rows with no key
    assert empty[1].any() or (pattern == "full" and not causal)  # the case is exercised
    assert torch.all(out.transpose(1, 2)[empty] == 0)
    torch.testing.assert_close(out, ref, **TOL)
    out.square().sum().backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
    if bias is not None:
        assert all(torch.isfinite(p.grad).all() for p in bias.parameters())


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("pattern", ["full", "window", "chunk"])
def test_sdpa_never_gets_a_fully_masked_row(monkeypatch, pattern, causal):
    """Some SDPA backends return NaN for a row with no allowed key (and NaN gradients for all):
    the fast paths must never hand one over, whatever this CPU build happens to do."""
    real_sdpa = F.scaled_dot_product_attention
    seen = []

    def strict(q, k, v, attn_mask=None, **kwargs):
        if attn_mask is not None:
            ok = attn_mask if attn_mask.dtype == torch.bool else torch.isfinite(attn_mask)
            assert ok.any(-1).all(), "a query row with no allowed key reached SDPA"
            seen.append(attn_mask.shape)
        return real_sdpa(q, k, v, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", strict)
    L = 3 * W + 7
    q, k, v = make_qkv(L)
    mask = torch.zeros(B, L, dtype=torch.bool)
    mask[0] = True
    mask[1, : 2 * W + 1] = True
    for bias in (None, make_bias("t5", causal)):
        local_attention(
            q, k, v, pattern, causal=causal, key_padding_mask=mask, bias=bias, **sizes(pattern)
        )
    assert len(seen) == 2


@pytest.mark.parametrize("pattern", ["full", "window", "chunk"])
def test_padded_keys_do_not_leak(pattern):
    L = 2 * W + 5
    q, k, v = make_qkv(L)
    mask = make_padding(L)
    kw = dict(causal=False, key_padding_mask=mask, **sizes(pattern))
    out = local_attention(q, k, v, pattern, **kw)
    k2, v2 = k.clone(), v.clone()
    noise = 100 * torch.randn(B, H, L, D)
    k2[mask[:, None].expand(B, H, L)] = noise[mask[:, None].expand(B, H, L)]
    v2[mask[:, None].expand(B, H, L)] = noise[mask[:, None].expand(B, H, L)]
    out2 = local_attention(q, k2, v2, pattern, **kw)
    torch.testing.assert_close(out, out2)


# --------------------------------------------------------------------------------------------
# gradients
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bias_kind", [None, "t5", "shaw"])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("pattern", ["full", "window", "chunk"])
def test_gradients_fast_match_reference(pattern, causal, bias_kind):
    L = 3 * W + 7
    q, k, v = make_qkv(L)
    mask = make_padding(L)
    bias = make_bias(bias_kind, causal)
    g = torch.randn(B, H, L, D)
    kw = dict(causal=causal, key_padding_mask=mask, bias=bias, **sizes(pattern))

    def grads(fn, dtype):
        leaves = [t.detach().to(dtype).requires_grad_(True) for t in (q, k, v)]
        if bias is not None:
            bias.zero_grad()
        (fn(*leaves, pattern, **kw) * g.to(dtype)).sum().backward()
        out = [t.grad for t in leaves]
        if bias is not None:
            out += [p.grad.clone() for p in bias.parameters()]
        return out

    fast = grads(local_attention, torch.float32)
    ref = grads(attention_ref, torch.float64)
    for a, b in zip(fast, ref, strict=True):
        # gradients sum more terms than the forward: a little more room than TOL
        torch.testing.assert_close(a.double(), b.double(), rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------------------------
# the window path never builds an L x L tensor
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("bias_kind", [None, "t5"])
def test_window_attention_calls_sdpa_on_blocks_only(monkeypatch, causal, bias_kind):
    L, w = 203, 8
    calls = []
    real_sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kwargs):
        calls.append((q.shape, k.shape, None if attn_mask is None else attn_mask.shape))
        return real_sdpa(q, k, v, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    q, k, v = make_qkv(L)
    bias = make_bias(bias_kind, causal)
    out = sliding_window_attention(q, k, v, w, causal, make_padding(L), bias)
    assert out.shape == (B, H, L, D)
    assert len(calls) == 1  # one batched call
    ((qs, ks, ms),) = calls
    block = w  # the default block size
    assert qs[-2] == block
    assert ks[-2] == block + (w if causal else 2 * w)
    assert ms is not None and ms[-2:] == (block, ks[-2])
    assert max(ms) < L and max(ks) < L  # no axis as long as the sequence


# --------------------------------------------------------------------------------------------
# dropout and argument checks
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pattern", ["full", "window", "chunk"])
def test_dropout_changes_output_and_zero_dropout_is_deterministic(pattern):
    L = 2 * W + 3
    q, k, v = make_qkv(L)
    kw = dict(causal=True, **sizes(pattern))
    a = local_attention(q, k, v, pattern, **kw)
    b = local_attention(q, k, v, pattern, **kw)
    assert torch.equal(a, b)
    dropped = local_attention(q, k, v, pattern, dropout_p=0.5, **kw)
    assert torch.isfinite(dropped).all()
    assert not torch.allclose(dropped, a)


def test_reference_dropout_is_applied():
    q, k, v = make_qkv(2 * W)
    plain = attention_ref(q, k, v, "window", window_size=W)
    dropped = attention_ref(q, k, v, "window", window_size=W, dropout_p=0.5)
    assert torch.isfinite(dropped).all() and not torch.allclose(dropped, plain)


@pytest.mark.parametrize(
    "call, exc, match",
    [
        (lambda q, k, v: local_attention(q, k, v, "banded"), ValueError, "pattern must be one of"),
        (lambda q, k, v: local_attention(q, k, v, "window"), ValueError, "window_size"),
        (
            lambda q, k, v: local_attention(q, k, v, "chunk", chunk_size=0),
            ValueError,
            "chunk_size must be an integer >= 1, got 0",
        ),
        (
            lambda q, k, v: sliding_window_attention(q, k, v, 4, block_size=0),
            ValueError,
            "block_size",
        ),
        (
            lambda q, k, v: full_attention(q, k, v, key_padding_mask=torch.zeros(2, 9).bool()),
            ValueError,
            "key_padding_mask must have shape",
        ),
        (
            lambda q, k, v: full_attention(q, k, v, key_padding_mask=torch.zeros(2, 10)),
            TypeError,
            "bool",
        ),
        (
            lambda q, k, v: full_attention(q, k, v, bias=torch.zeros(2, 10, 10)),
            ValueError,
            "a tensor bias must have shape",
        ),
        (lambda q, k, v: full_attention(q, k, v, dropout_p=1.0), ValueError, "dropout_p"),
        (lambda q, k, v: full_attention(q[0], k, v), ValueError, "q must have shape"),
        (lambda q, k, v: full_attention(q, k, v, bias="t5"), TypeError, "bias must be"),
        (  # a list, not a tensor: named before the backend choice reads q.device
            lambda q, k, v: local_attention(q.tolist(), k, v, "full"),
            ValueError,
            "q must have shape",
        ),
    ],
)
def test_argument_errors(call, exc, match):
    q, k, v = (torch.randn(2, 3, 10, 4) for _ in range(3))
    with pytest.raises(exc, match=match):
        call(q, k, v)
