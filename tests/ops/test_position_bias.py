import math

import pytest
import torch

from spadeformer.ops.position_bias import ShawRelativeBias, T5RelativeBias, t5_relative_bucket


def t5_bucket_by_hand(rel: int, bidirectional: bool, num_buckets: int, max_distance: int) -> int:
    """The T5 rule (Raffel et al. 2020, Sec. 2.1) written out for one integer, in float64.

    rel = key position - query position. Per direction: distances below half the buckets are
    their own bucket, the rest are log-spaced up to max_distance, then all share the last.
    """
    per_side = num_buckets // 2 if bidirectional else num_buckets
    offset = per_side if (bidirectional and rel > 0) else 0
    distance = abs(rel) if bidirectional else max(-rel, 0)
    exact = per_side // 2
    if distance < exact:
        return offset + distance
    steps = math.log(distance / exact) / math.log(max_distance / exact) * (per_side - exact)
    return offset + min(per_side - 1, exact + math.floor(steps))


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("num_buckets, max_distance", [(32, 128), (16, 64), (8, 20), (64, 256)])
def test_t5_bucket_matches_the_formula(bidirectional, num_buckets, max_distance):
    rel = torch.arange(-3 * max_distance, 3 * max_distance + 1)
    got = t5_relative_bucket(rel, bidirectional, num_buckets, max_distance)
    want = [t5_bucket_by_hand(r, bidirectional, num_buckets, max_distance) for r in rel.tolist()]
    assert got.dtype == torch.int64
    assert got.tolist() == want


def test_t5_bucket_known_values_and_properties():
    # bidirectional 32 / 128 (T5 defaults): 16 buckets per side, 8 exact ones
    rel = torch.tensor([0, -1, 1, -7, -8, 7, 8, -127, -128, -1000, 1000])
    got = t5_relative_bucket(rel, True, 32, 128).tolist()
    # past: exact 0..7, then bucket 8 starts at distance 8; far past shares bucket 15;
    # future: the same shifted by 16
    assert got == [0, 1, 17, 7, 8, 23, 24, 15, 15, 15, 31]
    # causal: every future key falls in bucket 0; the past gets all 32 buckets
    causal = t5_relative_bucket(torch.arange(-300, 301), False, 32, 128)
    assert torch.all(causal[300:] == 0)
    past = causal[:301].flip(0)  # distance 0, 1, 2, ... 300
    assert torch.all(past[:16] == torch.arange(16))
    assert torch.all(past.diff() >= 0) and past.max() == 31 and torch.all(past[128:] == 31)


def test_t5_bucket_rejects_bad_sizes():
    with pytest.raises(ValueError, match="num_buckets must be an integer >= 2"):
        t5_relative_bucket(torch.arange(3), True, 1, 128)
    with pytest.raises(ValueError, match="max_distance"):
        t5_relative_bucket(torch.arange(3), True, 32, 4)


def test_t5_bias_module_gathers_the_bucket_table():
    bias = T5RelativeBias(4, num_buckets=16, max_distance=32, bidirectional=True)
    torch.nn.init.normal_(bias.embedding.weight)
    q_pos, k_pos = torch.arange(5, 12), torch.arange(-3, 20)
    out = bias(q_pos, k_pos)
    assert out.shape == (4, 7, 23)
    table = bias.embedding.weight  # (buckets, heads)
    for i, qi in enumerate(q_pos.tolist()):
        for j, kj in enumerate(k_pos.tolist()):
            bucket = t5_bucket_by_hand(kj - qi, True, 16, 32)
            assert torch.equal(out[:, i, j], table[bucket])
    # translation invariance (what the fast attention paths rely on), batched positions
    torch.testing.assert_close(bias(q_pos + 100, k_pos + 100), out)
    batched = bias(torch.stack([q_pos, q_pos + 7]), torch.stack([k_pos, k_pos + 7]))
    assert batched.shape == (4, 2, 7, 23)
    torch.testing.assert_close(batched[:, 1], out)


def test_t5_bias_module_errors():
    with pytest.raises(ValueError, match="n_heads"):
        T5RelativeBias(0)
    with pytest.raises(TypeError, match="bidirectional"):
        T5RelativeBias(2, bidirectional="yes")
    with pytest.raises(ValueError, match="max_distance"):
        T5RelativeBias(2, num_buckets=32, max_distance=8)


@pytest.mark.parametrize("per_head", [False, True])
def test_shaw_bias_is_query_dot_clipped_embedding(per_head):
    d, heads, R = 6, 3, 2
    bias = ShawRelativeBias(d, heads, max_relative_position=R, per_head=per_head)
    q = torch.randn(2, heads, 5, d)
    q_pos, k_pos = torch.arange(5), torch.arange(-2, 9)
    out = bias(q_pos, k_pos, q=q)
    assert out.shape == (2, heads, 5, 11)
    for h in range(heads):
        table = bias.table[h if per_head else 0]  # (2R+1, d), row r + R holds a_r
        for i in range(5):
            for j, kj in enumerate(k_pos.tolist()):
                r = max(-R, min(R, kj - i))
                want = q[:, h, i] @ table[r + R] / math.sqrt(d)
                torch.testing.assert_close(out[:, h, i, j], want)
    if not per_head:
        assert bias.table.shape == (1, 2 * R + 1, d)  # shared by heads, as in the paper
    # a block axis in q and the positions (the fast paths' per-block calls)
    qb = torch.randn(2, heads, 4, 5, d)
    blocks = bias(q_pos, k_pos, q=qb)
    assert blocks.shape == (2, heads, 4, 5, 11)
    torch.testing.assert_close(blocks[:, :, 2], bias(q_pos, k_pos, q=qb[:, :, 2]))


def test_shaw_bias_errors():
    bias = ShawRelativeBias(4, 2)
    with pytest.raises(ValueError, match="needs the query"):
        bias(torch.arange(3), torch.arange(3))
    with pytest.raises(ValueError, match="head_dim=4"):
        bias(torch.arange(3), torch.arange(3), q=torch.randn(1, 2, 3, 5))
    with pytest.raises(ValueError, match="max_relative_position"):
        ShawRelativeBias(4, 2, max_relative_position=0)


def test_simple_bias_is_one_scalar_per_clipped_offset():
    from spadeformer.ops.position_bias import SimpleRelativeBias

    torch.manual_seed(0)
    bias = SimpleRelativeBias(4)
    assert bias.table.shape == (7,)  # offsets -3 .. 3
    q_pos, k_pos = torch.arange(6), torch.arange(-2, 8)
    out = bias(q_pos, k_pos)
    assert out.shape == (1, 6, 10)
    for i, qp in enumerate(q_pos.tolist()):
        for j, kp in enumerate(k_pos.tolist()):
            offset = max(-3, min(3, kp - qp))
            assert out[0, i, j] == bias.table[offset + 3]
    blocks = bias(q_pos.view(2, 3), k_pos[:6].view(2, 3))  # a leading block axis
    assert blocks.shape == (1, 2, 3, 3)
    assert bias.translation_invariant and not bias.needs_query
    with pytest.raises(ValueError, match="max_positions"):
        SimpleRelativeBias(0)


def _rotary_by_the_offset(bias, offsets: torch.Tensor) -> torch.Tensor:
    """alpha^T R_r beta written out per pair j = (j, j + dim/2) turned by r * theta_j."""
    half = bias.dim // 2
    theta = bias.base ** (-torch.arange(half, dtype=torch.float64) / half)
    a1, a2 = bias.alpha.detach().double().split(half)
    b1, b2 = bias.beta.detach().double().split(half)
    phi = offsets.double().unsqueeze(-1) * theta
    return (phi.cos() * (a1 * b1 + a2 * b2) + phi.sin() * (a2 * b1 - a1 * b2)).sum(-1)


def test_rotary_bias_is_alpha_turned_by_the_offset_against_beta():
    from spadeformer.ops.position_bias import RotaryRelativeBias

    torch.manual_seed(0)
    bias = RotaryRelativeBias(8, init_std=1.0).double()
    q_pos, k_pos = torch.arange(6), torch.arange(-3, 9)  # keys outside [0, L) too
    out = bias(q_pos, k_pos)
    assert out.shape == (1, 6, 12) and out.dtype == torch.float64
    expected = _rotary_by_the_offset(bias, k_pos[None, :] - q_pos[:, None])
    torch.testing.assert_close(out[0], expected, rtol=1e-12, atol=1e-12)
    # the reference's recipe: sin / cos tables per position, turn the expanded vectors, dot
    n, half = 7, 4
    angle = torch.arange(n, dtype=torch.float64)[:, None] * bias.base ** (
        -torch.arange(half, dtype=torch.float64) / half)
    sin, cos = angle.sin(), angle.cos()

    def turn(vec):
        x1, x2 = vec.detach().expand(n, 8).chunk(2, dim=-1)
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=1)

    torch.testing.assert_close(bias(torch.arange(n), torch.arange(n))[0],
                               turn(bias.alpha) @ turn(bias.beta).T, rtol=1e-12, atol=1e-12)
    blocks = bias(q_pos.view(2, 3), k_pos[:8].view(2, 4))  # a leading block axis
    assert blocks.shape == (1, 2, 3, 4)
    torch.testing.assert_close(blocks[0, 1], out[0, 3:6, 4:8])
    assert bias.translation_invariant and not bias.needs_query
    assert set(bias.state_dict()) == {"alpha", "beta"}
    assert not torch.allclose(out[0, :, :1], out[0, :, 1:2])  # it does vary with the offset


def test_rotary_bias_stays_exact_far_out_and_under_autocast():
    from spadeformer.ops.position_bias import RotaryRelativeBias

    torch.manual_seed(0)
    bias = RotaryRelativeBias(16, init_std=1.0)  # fp32
    near = bias(torch.arange(4), torch.arange(-4, 4))
    # decoding at position 60k: fp32 angles of 60k would be off by ~4e-3 rad; only k - q counts
    far = bias(torch.arange(60_000, 60_004), torch.arange(59_996, 60_004))
    torch.testing.assert_close(far, near, rtol=1e-6, atol=1e-6)
    # far offsets too (full attention at 60k): the turns are computed in fp64
    q_pos, k_pos = torch.tensor([60_003]), torch.arange(0, 60_004, 997)
    torch.testing.assert_close(bias(q_pos, k_pos)[0].double(),
                               _rotary_by_the_offset(bias, k_pos - q_pos[:, None]),
                               rtol=1e-5, atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = bias(torch.arange(4), torch.arange(-4, 4))
    assert auto.dtype == torch.float32
    torch.testing.assert_close(auto, near)


def test_rotary_bias_errors():
    from spadeformer.ops.position_bias import RotaryRelativeBias

    with pytest.raises(ValueError, match="dim must be even"):
        RotaryRelativeBias(7)
    with pytest.raises(ValueError, match="dim must be an integer >= 2"):
        RotaryRelativeBias(0)
    for base in (1.0, float("inf")):
        with pytest.raises(ValueError, match="base must be a finite number > 1"):
            RotaryRelativeBias(8, base=base)
