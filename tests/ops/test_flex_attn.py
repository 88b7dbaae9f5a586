"""The FlexAttention path against the dense reference, and the backend choice.

On this CPU-only CI the flex path runs uncompiled and forward-only (PyTorch has no CPU backward
for FlexAttention): that checks our block masks and score_mod (patterns, key padding, T5 bias
tables, ragged lengths, empty rows) against ``attention_ref``. The compiled CUDA kernel is the
same mask_mod / score_mod and is not exercised here.
"""

from __future__ import annotations

import pytest
import torch

from spadeformer.ops import flex_attn
from spadeformer.ops.flex_attn import flex_local_attention, flex_supports, pick_backend
from spadeformer.ops.local_attn import attention_ref, local_attention
from spadeformer.ops.position_bias import ShawRelativeBias, T5RelativeBias

pytestmark = pytest.mark.skipif(not flex_attn.flex_available(), reason="no FlexAttention")

B, H, D = 2, 2, 8


def _qkv(length: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, length, D, generator=g) for _ in range(3)]


@pytest.fixture(autouse=True)
def _fresh_backend_state():
    flex_attn._broken.clear()
    yield
    flex_attn._broken.clear()


@pytest.mark.parametrize("pattern", ["full", "window", "chunk"])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("length", [1, 7, 40, 130])
def test_flex_equals_reference(pattern, causal, length):
    q, k, v = _qkv(length)
    sizes = dict(window_size=5, chunk_size=16)
    with torch.no_grad():
        got = flex_local_attention(q, k, v, pattern, causal=causal, **sizes)
    want = attention_ref(q, k, v, pattern, causal=causal, **sizes)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("pattern", ["full", "window", "chunk"])
@pytest.mark.parametrize("causal", [True, False])
def test_flex_with_padding_and_t5_bias_equals_reference(pattern, causal):
    length = 37
    q, k, v = _qkv(length, seed=1)
    kpm = torch.zeros(B, length, dtype=torch.bool)
    kpm[0, -9:] = True  # padded tail
    kpm[1, :3] = True  # padded head: causal rows 0..2 then have no key at all -> zeros
    bias = T5RelativeBias(H, num_buckets=8, max_distance=16, bidirectional=not causal)
    torch.nn.init.normal_(bias.embedding.weight, std=1.0)  # a bias large enough to matter
    sizes = dict(window_size=6, chunk_size=8)
    with torch.no_grad():
        got = local_attention(q, k, v, pattern, causal=causal, key_padding_mask=kpm, bias=bias,
                              backend="flex", **sizes)
        want = attention_ref(q, k, v, pattern, causal=causal, key_padding_mask=kpm, bias=bias,
                             **sizes)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    if causal:
        assert got[1, :, :3].abs().max() == 0  # rows without keys output zeros, not NaN


def test_flex_shared_head_bias_table():
    """A bias with one row for all heads (H' = 1) broadcasts like the reference."""

    class SharedDistanceBias:
        translation_invariant = True
        needs_query = False

        def __call__(self, q_pos, k_pos):
            return -0.3 * (k_pos[None, None, :] - q_pos[None, :, None]).abs().float()

    q, k, v = _qkv(20, seed=2)
    with torch.no_grad():
        got = flex_local_attention(q, k, v, "window", window_size=4, causal=False,
                                   bias=SharedDistanceBias())
    want = attention_ref(q, k, v, "window", window_size=4, causal=False,
                         bias=SharedDistanceBias())
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_auto_picks_sdpa_on_cpu_and_for_out_of_scope_calls(monkeypatch):
    q = torch.zeros(1, 1, 4, 2)
    t5 = T5RelativeBias(1)
    assert pick_backend("auto", q, None, 0.0) == "sdpa"  # CPU: never flex by itself
    assert pick_backend("flex", q, t5, 0.0) == "flex"
    assert pick_backend("sdpa", q, None, 0.0) == "sdpa"
    assert flex_supports(None, 0.0) and flex_supports(t5, 0.0)
    assert not flex_supports(None, 0.1)  # dropout
    assert not flex_supports(ShawRelativeBias(1, 2), 0.0)  # needs the query
    assert not flex_supports(torch.zeros(1, 4, 4), 0.0)  # dense tensor bias
    with pytest.raises(ValueError, match="backend must be one of"):
        pick_backend("triton", q, None, 0.0)
    with pytest.raises(ValueError, match="backend='flex' needs.*dropout_p=0.1"):
        pick_backend("flex", q, None, 0.1)
    monkeypatch.setenv("SPADEFORMER_ATTENTION_BACKEND", "fast")
    with pytest.raises(ValueError, match="SPADEFORMER_ATTENTION_BACKEND must be one of"):
        pick_backend("auto", q, None, 0.0)


def test_auto_falls_back_to_sdpa_when_flex_fails(monkeypatch):
    """What happens on a GPU whose compiler fails: one warning, then SDPA for good."""
    import spadeformer.ops.local_attn as la

    def broken(*args, **kwargs):
        raise RuntimeError("Cannot find a working triton installation")

    calls = []

    def pick(backend, q, bias, dropout_p):  # pretend to be on CUDA
        calls.append(backend)
        return "sdpa" if flex_attn._broken or backend == "sdpa" else "flex"

    monkeypatch.setattr(la, "flex_local_attention", broken)
    monkeypatch.setattr(la, "pick_backend", pick)
    q, k, v = _qkv(12)
    with pytest.warns(RuntimeWarning, match="triton.*falls back to blocked SDPA"):
        got = la.local_attention(q, k, v, "window", window_size=3)
    torch.testing.assert_close(got, attention_ref(q, k, v, "window", window_size=3))
    assert len(flex_attn._broken) == 1
    la.local_attention(q, k, v, "window", window_size=3)  # no second warning, no flex try
    assert len(flex_attn._broken) == 1
    with pytest.raises(RuntimeError, match="triton"):  # an explicit request is not masked
        flex_attn._broken.clear()
        la.local_attention(q, k, v, "window", window_size=3, backend="flex")


def test_flex_on_cpu_refuses_gradients():
    q, k, v = (t.requires_grad_() for t in _qkv(8))
    with pytest.raises(NotImplementedError, match="backend='sdpa'"):
        flex_local_attention(q, k, v, "full")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (compiled flex kernel)")
@pytest.mark.parametrize("pattern", ["full", "window", "chunk"])
def test_compiled_flex_on_cuda_equals_reference_with_gradients(pattern):
    """Runs only where a GPU is present (never in CI here): the compiled kernel, auto-picked,
    against the reference in values and in the gradients of q, k, v and the T5 table."""
    torch.manual_seed(0)
    length, heads = 300, 4
    q, k, v = (torch.randn(2, heads, length, 64, device="cuda", requires_grad=True)
               for _ in range(3))
    kpm = torch.zeros(2, length, dtype=torch.bool, device="cuda")
    kpm[1, -50:] = True
    bias = T5RelativeBias(heads, bidirectional=False).cuda()
    sizes = dict(window_size=64, chunk_size=128)
    assert pick_backend("auto", q, bias, 0.0) == "flex"
    outs, grads = [], []
    for fn in (local_attention, attention_ref):
        out = fn(q, k, v, pattern, key_padding_mask=kpm, bias=bias, **sizes)
        out = out.masked_fill(kpm[:, None, :, None], 0.0)  # padded query rows are not compared
        outs.append(out)
        grads.append(torch.autograd.grad(out.square().sum(), [q, k, v, bias.embedding.weight]))
    assert not flex_attn._broken
    torch.testing.assert_close(outs[0], outs[1], atol=2e-4, rtol=2e-4)
    for got, want in zip(*grads, strict=True):
        torch.testing.assert_close(got, want, atol=2e-3, rtol=2e-3)
