import pytest
import torch

from spadeformer.attention import Attention, AttentionCache

D_MODEL, N_HEADS = 16, 4
SIZES = {"full": {}, "window": {"window_size": 4}, "chunk": {"chunk_size": 6}}
# fp32 throughout; the fast and step paths differ from the reference only by round-off of
# softmax sums over <= 30 keys and 16-wide projections (~1e-6), far below any masking error.
TOL = dict(rtol=1e-5, atol=1e-5)


def make(pattern, causal=True, position_bias=None, **kw):
    attn = Attention(
        D_MODEL,
        N_HEADS,
        pattern,
        causal=causal,
        position_bias=position_bias,
        **SIZES[pattern],
        **kw,
    )
    if position_bias == "t5":  # O(1) bias values, so a wrong bucket or position shows
        torch.nn.init.normal_(attn.relative_bias.embedding.weight)
    return attn.eval()


@pytest.mark.parametrize("position_bias", [None, "t5", "shaw"])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("pattern", ["full", "window", "chunk"])
def test_forward_matches_reference(pattern, causal, position_bias):
    attn = make(pattern, causal, position_bias)
    x = torch.randn(2, 23, D_MODEL)
    mask = torch.zeros(2, 23, dtype=torch.bool)
    mask[1, 15:] = True
    mask[0, 3:5] = True
    y = attn(x, padding_mask=mask)
    assert y.shape == x.shape
    torch.testing.assert_close(y, attn.forward_ref(x, padding_mask=mask), **TOL)
    assert torch.all(y[mask] == 0)  # padded positions output zero
    # padded inputs do not reach real positions
    x2 = x.clone()
    x2[mask] = 50 * torch.randn(int(mask.sum()), D_MODEL)
    torch.testing.assert_close(attn(x2, padding_mask=mask), y, **TOL)


@pytest.mark.parametrize("position_bias", [None, "t5", "shaw"])
@pytest.mark.parametrize("pattern", ["full", "window", "chunk"])
def test_step_over_a_sequence_equals_forward(pattern, position_bias):
    attn = make(pattern, True, position_bias)
    L = 21  # several windows and chunks, a ragged last chunk
    x = torch.randn(3, L, D_MODEL)
    with torch.no_grad():
        y = attn(x)
        cache = attn.initial_cache(3)
        steps = []
        for t in range(L):
            y_t, cache = attn.step(x[:, t], cache)
            steps.append(y_t)
    assert cache.position == L
    torch.testing.assert_close(torch.stack(steps, dim=1), y, **TOL)


@pytest.mark.parametrize("pattern", ["full", "window", "chunk"])
def test_step_is_differentiable_and_matches_forward_gradients(pattern):
    attn = make(pattern, True, "t5")
    L = 20  # past the full cache's first capacity (16): its growth is differentiable too
    x = torch.randn(2, L, D_MODEL)
    g = torch.randn(2, L, D_MODEL)
    (attn(x) * g).sum().backward()
    want = [p.grad.clone() for p in attn.parameters()]
    attn.zero_grad()
    cache = attn.initial_cache(2)
    ys = []
    for t in range(L):
        y_t, cache = attn.step(x[:, t], cache)
        ys.append(y_t)
    (torch.stack(ys, 1) * g).sum().backward()  # would fail if steps overwrote saved tensors
    for got, ref in zip([p.grad for p in attn.parameters()], want, strict=True):
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)


def test_window_cache_is_a_fixed_ring_buffer():
    w = 5
    attn = Attention(D_MODEL, N_HEADS, "window", window_size=w, position_bias="t5").eval()
    cache = attn.initial_cache(2)
    assert isinstance(cache, AttentionCache)
    assert cache.num_slots == w + 1 and cache.key.shape == (2, N_HEADS, w + 1, D_MODEL // N_HEADS)
    ptr = cache.key.data_ptr()
    x = torch.randn(2, 200, D_MODEL)
    outs = []
    with torch.no_grad():
        for t in range(200):
            y_t, cache = attn.step(x[:, t], cache)
            outs.append(y_t)
            assert cache.num_slots == w + 1
            assert cache.key.shape[2] == w + 1 and cache.value.shape[2] == w + 1
        assert cache.key.data_ptr() == ptr  # preallocated, written in place
        assert cache.position == 200
        # and still right after 200 steps: the last outputs equal forward on the tail
        tail = attn(x[:, -3 * w :])
    torch.testing.assert_close(torch.stack(outs[-w:], 1), tail[:, -w:], **TOL)


def test_chunk_cache_holds_one_chunk_and_full_cache_grows():
    chunk = Attention(D_MODEL, N_HEADS, "chunk", chunk_size=6).eval()
    full = Attention(D_MODEL, N_HEADS, "full").eval()
    c_cache, f_cache = chunk.initial_cache(1), full.initial_cache(1)
    x = torch.randn(1, 20, D_MODEL)
    with torch.no_grad():
        for t in range(20):
            _, c_cache = chunk.step(x[:, t], c_cache)
            _, f_cache = full.step(x[:, t], f_cache)
            assert c_cache.num_slots == 6
            # full: capacity doubles (16, 32, ...) and always holds every token seen
            assert f_cache.position == t + 1 and f_cache.num_slots == (16 if t < 16 else 32)


def test_step_and_cache_errors():
    bidir = Attention(D_MODEL, N_HEADS, "window", window_size=3, causal=False)
    with pytest.raises(RuntimeError, match="causal=True"):
        bidir.initial_cache(1)
    causal = Attention(D_MODEL, N_HEADS, "window", window_size=3)
    with pytest.raises(RuntimeError, match="causal=True"):
        bidir.step(torch.randn(1, D_MODEL), causal.initial_cache(1))
    cache = causal.initial_cache(2)
    with pytest.raises(ValueError, match="x_t must have shape"):
        causal.step(torch.randn(2, 3, D_MODEL), cache)
    with pytest.raises(ValueError, match="cache holds batch 2"):
        causal.step(torch.randn(3, D_MODEL), cache)
    with pytest.raises(TypeError, match="AttentionCache"):
        causal.step(torch.randn(2, D_MODEL), (cache.key, cache.value))
    with pytest.raises(ValueError, match="batch_size"):
        causal.initial_cache(0)


def test_dropout_only_in_training():
    attn = Attention(D_MODEL, N_HEADS, "window", window_size=4, dropout=0.5)
    x = torch.randn(2, 17, D_MODEL)
    attn.eval()
    assert torch.equal(attn(x), attn(x))
    attn.train()
    assert not torch.allclose(attn(x), attn(x))


def test_bias_options_reach_the_bias_module():
    t5 = Attention(
        D_MODEL,
        N_HEADS,
        "full",
        causal=False,
        position_bias="t5",
        bias_options={"num_buckets": 16, "max_distance": 40},
    )
    assert t5.relative_bias.num_buckets == 16 and t5.relative_bias.max_distance == 40
    assert t5.relative_bias.bidirectional  # bidirectional buckets for non-causal attention
    assert not Attention(D_MODEL, N_HEADS, position_bias="t5").relative_bias.bidirectional
    shaw = Attention(
        D_MODEL,
        N_HEADS,
        position_bias="shaw",
        bias_options={"max_relative_position": 7, "per_head": True},
    )
    assert shaw.relative_bias.table.shape == (N_HEADS, 15, D_MODEL // N_HEADS)
    no_proj_bias = Attention(D_MODEL, N_HEADS, proj_bias=False)
    assert no_proj_bias.q_proj.bias is None and no_proj_bias.out_proj.bias is None


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(d_model=10, n_heads=4), ValueError, "d_model must be divisible by n_heads"),
        (dict(n_heads=0), ValueError, "n_heads must be a positive integer"),
        (dict(d_model=-16), ValueError, "d_model must be a positive integer"),
        (dict(pattern="sparse"), ValueError, r"pattern must be one of \('full', 'window'"),
        (dict(pattern="window"), ValueError, "pattern='window' needs window_size"),
        (dict(pattern="window", window_size=0), ValueError, "window_size as an integer >= 1"),
        (dict(pattern="window", window_size=2.5), ValueError, "window_size"),
        (dict(pattern="chunk"), ValueError, "pattern='chunk' needs chunk_size"),
        (dict(pattern="chunk", chunk_size=-1), ValueError, "chunk_size as an integer >= 1"),
        (
            dict(pattern="full", window_size=8),
            ValueError,
            "window_size is only used with pattern='window'",
        ),
        (
            dict(pattern="chunk", chunk_size=8, window_size=8),
            ValueError,
            "window_size is only used with pattern='window'",
        ),
        (
            dict(pattern="window", window_size=8, chunk_size=8),
            ValueError,
            "chunk_size is only used with pattern='chunk'",
        ),
        (dict(causal="yes"), TypeError, "causal must be a bool"),
        (dict(dropout=1.0), ValueError, r"dropout must be a number in \[0, 1\)"),
        (dict(dropout=-0.1), ValueError, "dropout"),
        (dict(position_bias="alibi"), ValueError, r"position_bias must be one of \(None, 't5'"),
        (dict(bias_options={"num_buckets": 8}), ValueError, "position_bias=None"),
        (
            dict(position_bias="t5", bias_options={"max_relative_position": 3}),
            ValueError,
            "unknown \\['max_relative_position'\\]",
        ),
        (
            dict(position_bias="shaw", bias_options=[("per_head", True)]),
            TypeError,
            "bias_options must be a dict",
        ),
        (dict(proj_bias=None), TypeError, "proj_bias"),
    ],
)
def test_init_errors(kwargs, exc, match):
    args = dict(d_model=D_MODEL, n_heads=N_HEADS)
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        Attention(**args)


def test_forward_input_errors():
    attn = Attention(D_MODEL, N_HEADS, "chunk", chunk_size=4)
    with pytest.raises(ValueError, match="d_model=16"):
        attn(torch.randn(2, 5, 8))
    with pytest.raises(ValueError, match="padding_mask must have shape"):
        attn(torch.randn(2, 5, D_MODEL), padding_mask=torch.zeros(2, 4, dtype=torch.bool))
