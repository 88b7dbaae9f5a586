"""Relative position biases for attention: T5 buckets, Shaw et al. (2018), and Mega's simple
per-offset scalars and rotary bias (Ma et al. 2022).

All are callables in the bias protocol of :mod:`spadeformer.ops.local_attn`:
``bias(q_pos, k_pos) -> (heads, ..., Lq, Lk)`` with int64 positions of shape (..., Lq) and
(..., Lk); all depend only on k_pos - q_pos (``translation_invariant = True``), so the fast
local-attention paths compute them once per block shape. Shaw's bias also depends on the query
(``needs_query = True``): it is called with ``q=`` the query block.

Although they hold parameters (so they are ``nn.Module``s), they live in ``ops`` beside the
attention functions that consume them; :class:`spadeformer.attention.Attention` builds them.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = [
    "RotaryRelativeBias",
    "ShawRelativeBias",
    "SimpleRelativeBias",
    "T5RelativeBias",
    "t5_relative_bucket",
]


def _check_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _relative(q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
    """(..., Lq), (..., Lk) -> (..., Lq, Lk) relative position k - q (memory minus query)."""
    return k_pos.unsqueeze(-2) - q_pos.unsqueeze(-1)


def t5_relative_bucket(
    relative_position: torch.Tensor,
    bidirectional: bool = True,
    num_buckets: int = 32,
    max_distance: int = 128,
) -> torch.Tensor:
    """T5's bucket of each relative position (key minus query), an int64 tensor of same shape.

    Raffel et al. 2020 (T5), Sec. 2.1: half of the buckets (per direction when bidirectional)
    hold the exact distances 0 .. max_exact-1; the other half are log-spaced up to
    ``max_distance``, beyond which every distance shares the last bucket. When bidirectional,
    keys after the query use the upper ``num_buckets // 2`` buckets; when causal, keys after
    the query fall into bucket 0 (they are masked anyway). Computed in float32 like the
    reference T5 / HF implementations, so pretrained bias tables index the same buckets.
    """
    _check_int("num_buckets", num_buckets, 2)
    _check_int("max_distance", max_distance, 1)
    n = -relative_position.long()  # > 0 for keys in the past
    ret = torch.zeros_like(n)
    if bidirectional:
        num_buckets //= 2
        ret = ret + (n < 0).long() * num_buckets
        n = n.abs()
    else:
        n = n.clamp(min=0)
    max_exact = num_buckets // 2
    if max_exact < 1 or max_distance <= max_exact:
        raise ValueError(
            f"max_distance ({max_distance}) must exceed the exact-bucket count "
            f"{max_exact} implied by num_buckets={num_buckets * (2 if bidirectional else 1)}"
        )
    # log-spaced buckets; clamp n so log() never sees 0 (those n take the exact branch anyway)
    n_large = n.clamp(min=max_exact).float()
    large = (
        max_exact
        + (
            torch.log(n_large / max_exact)
            / math.log(max_distance / max_exact)
            * (num_buckets - max_exact)
        ).long()
    )
    large = large.clamp(max=num_buckets - 1)
    return ret + torch.where(n < max_exact, n, large)


class T5RelativeBias(nn.Module):
    """T5 bucketed relative position bias: one learned scalar per (bucket, head).

    forward(q_pos (..., Lq), k_pos (..., Lk)) -> (n_heads, ..., Lq, Lk), float32.
    """

    translation_invariant = True
    needs_query = False

    def __init__(
        self,
        n_heads: int,
        num_buckets: int = 32,
        max_distance: int = 128,
        bidirectional: bool = True,
        init_std: float = 0.02,
    ):
        super().__init__()
        _check_int("n_heads", n_heads, 1)
        _check_int("num_buckets", num_buckets, 2)
        _check_int("max_distance", max_distance, 1)
        if not isinstance(bidirectional, bool):
            raise TypeError(f"bidirectional must be a bool, got {bidirectional!r}")
        # validate the (num_buckets, max_distance) pair once, here, rather than at first call
        t5_relative_bucket(torch.zeros(1), bidirectional, num_buckets, max_distance)
        self.n_heads = n_heads
        self.num_buckets = num_buckets
        self.max_distance = max_distance
        self.bidirectional = bidirectional
        self.embedding = nn.Embedding(num_buckets, n_heads)
        nn.init.normal_(self.embedding.weight, std=init_std)

    def forward(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        """q_pos (..., Lq), k_pos (..., Lk) int -> bias (n_heads, ..., Lq, Lk)."""
        buckets = t5_relative_bucket(
            _relative(q_pos, k_pos), self.bidirectional, self.num_buckets, self.max_distance
        )
        return self.embedding(buckets).movedim(-1, 0)

    def extra_repr(self) -> str:
        return (
            f"n_heads={self.n_heads}, num_buckets={self.num_buckets}, "
            f"max_distance={self.max_distance}, bidirectional={self.bidirectional}"
        )


class ShawRelativeBias(nn.Module):
    """Shaw, Uszkoreit & Vaswani (2018) relative position representations, key term only.

    score_ij += q_i . a_{clip(j - i, -R, R)} / sqrt(head_dim)   (their Eq. 4's a^K term)

    with learned a_r for r in [-R, R], R = ``max_relative_position``. Like the paper the table
    is shared by all heads (``per_head=False``); ``per_head=True`` gives each head its own.
    The values term a^V of their Eq. 3 is not implemented: the paper (Sec. 4, Table 3) finds
    the key term alone does as well, and the key term is what fits an additive score bias.

    forward(q_pos (..., Lq), k_pos (..., Lk), q=(batch, heads, ..., Lq, head_dim))
        -> (batch, heads, ..., Lq, Lk).
    """

    translation_invariant = True
    needs_query = True

    def __init__(
        self,
        head_dim: int,
        n_heads: int,
        max_relative_position: int = 16,
        per_head: bool = False,
    ):
        super().__init__()
        _check_int("head_dim", head_dim, 1)
        _check_int("n_heads", n_heads, 1)
        _check_int("max_relative_position", max_relative_position, 1)
        if not isinstance(per_head, bool):
            raise TypeError(f"per_head must be a bool, got {per_head!r}")
        self.head_dim = head_dim
        self.n_heads = n_heads
        self.max_relative_position = max_relative_position
        self.per_head = per_head
        tables = n_heads if per_head else 1
        # a_r ~ N(0, 1/head_dim): q . a_r / sqrt(d) starts on the scale of a content score
        self.table = nn.Parameter(
            torch.randn(tables, 2 * max_relative_position + 1, head_dim) * head_dim**-0.5
        )

    def forward(
        self, q_pos: torch.Tensor, k_pos: torch.Tensor, q: torch.Tensor | None = None
    ) -> torch.Tensor:
        """q_pos (..., Lq), k_pos (..., Lk), q (batch, heads, ..., Lq, d).

        Returns (batch, heads, ..., Lq, Lk); q is the unscaled query (the 1/sqrt(d) is here).
        """
        if q is None:
            raise ValueError("ShawRelativeBias needs the query block: call it with q=")
        if q.dim() < 4 or q.shape[1] != self.n_heads or q.shape[-1] != self.head_dim:
            raise ValueError(
                f"q must have shape (batch, heads={self.n_heads}, ..., Lq, "
                f"head_dim={self.head_dim}), got {tuple(q.shape)}"
            )
        R = self.max_relative_position
        idx = _relative(q_pos, k_pos).clamp(-R, R) + R  # (..., Lq, Lk) in [0, 2R]
        # q . a_r for all 2R+1 distances first (cheap: Lq x (2R+1)), then gather per key
        table = self.table.to(q.dtype).transpose(-1, -2)  # (tables, d, 2R+1)
        table = table.view(1, table.shape[0], *([1] * (q.dim() - 4)), *table.shape[1:])
        qa = torch.matmul(q, table) / math.sqrt(self.head_dim)  # (batch, heads, ..., Lq, 2R+1)
        # idx (..., Lq, Lk) broadcasts against qa's leading (batch, heads) axes
        return torch.gather(qa, -1, idx.expand(*qa.shape[:-1], idx.shape[-1]))

    def extra_repr(self) -> str:
        return (
            f"head_dim={self.head_dim}, n_heads={self.n_heads}, "
            f"max_relative_position={self.max_relative_position}, per_head={self.per_head}"
        )


class SimpleRelativeBias(nn.Module):
    """Mega's "simple" relative position bias (Ma et al. 2022, the reference code's
    ``rel_pos_bias='simple'``): one learned scalar per offset k - q, shared by all heads.

    Offsets -(P - 1) .. P - 1 have their own scalar, P = ``max_positions``; farther offsets
    share the outermost one (the reference refuses sequences longer than P instead; Mega-chunk
    sets P = chunk_size, so within its chunks nothing is clipped). Scalars start N(0, 0.02^2).

    forward(q_pos (..., Lq), k_pos (..., Lk)) -> (1, ..., Lq, Lk).
    """

    translation_invariant = True
    needs_query = False

    def __init__(self, max_positions: int, init_std: float = 0.02):
        super().__init__()
        _check_int("max_positions", max_positions, 1)
        self.max_positions = max_positions
        self.table = nn.Parameter(torch.randn(2 * max_positions - 1) * init_std)

    def forward(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        """q_pos (..., Lq), k_pos (..., Lk) int -> bias (1, ..., Lq, Lk)."""
        reach = self.max_positions - 1
        idx = _relative(q_pos, k_pos).clamp(-reach, reach) + reach
        return self.table[idx].unsqueeze(0)

    def extra_repr(self) -> str:
        return f"max_positions={self.max_positions}"


class RotaryRelativeBias(nn.Module):
    """Mega's "rotary" relative position bias (the reference code's ``rel_pos_bias='rotary'``,
    which its language models use): two learned vectors alpha, beta of width ``dim``, turned
    like RoPE (Su et al. 2021) to the query's and the key's position; the bias is their dot
    product, shared by all heads:

        b(q, k) = (R_q alpha) . (R_k beta) = alpha^T R_{k - q} beta

    R_p turns pair j, the coordinates (j, j + dim/2), by the angle p * theta_j with
    theta_j = base^(-j / (dim/2)) (the reference divides by dim/2, not dim/2 - 1). The bias
    depends only on k - q and has no table to outgrow, so any length works. alpha and beta
    start N(0, init_std^2).

    forward(q_pos (..., Lq), k_pos (..., Lk)) -> (1, ..., Lq, Lk), in fp32 (fp64 when the
    parameters are fp64), autocast or not. The angles and turns are computed in fp64 (only
    (Lq + Lk) x dim numbers), so far positions lose nothing: fp32 angles of position 60k
    would be off by ~4e-3 rad, and with fp64 ones R_q alpha . R_k beta equals
    alpha^T R_{k - q} beta at any position.
    """

    translation_invariant = True
    needs_query = False

    def __init__(self, dim: int, base: float = 10000.0, init_std: float = 0.02):
        super().__init__()
        _check_int("dim", dim, 2)
        if dim % 2:
            raise ValueError(f"dim must be even (the rotation turns pairs of coordinates), "
                             f"got {dim}")
        if isinstance(base, bool) or not isinstance(base, (int, float)) or not (
                1 < base < math.inf):
            raise ValueError(f"base must be a finite number > 1, got {base!r}")
        self.dim = dim
        self.base = float(base)
        self.alpha = nn.Parameter(torch.randn(dim) * init_std)
        self.beta = nn.Parameter(torch.randn(dim) * init_std)

    @staticmethod
    def _turn(vector: torch.Tensor, angle: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """vector (dim,) turned by the angles (..., L, dim/2), both fp64 -> (..., L, dim) in
        ``dtype``."""
        cos, sin = angle.cos(), angle.sin()
        x1, x2 = vector.double().chunk(2)
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(dtype)

    def forward(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        """q_pos (..., Lq), k_pos (..., Lk) int -> bias (1, ..., Lq, Lk)."""
        half = self.dim // 2
        dev = self.alpha.device
        theta = torch.exp(torch.arange(half, device=dev, dtype=torch.float64)
                          * (-math.log(self.base) / half))

        def angles(pos: torch.Tensor) -> torch.Tensor:
            return pos.to(device=dev, dtype=torch.float64).unsqueeze(-1) * theta

        dtype = torch.promote_types(self.alpha.dtype, torch.float32)
        with torch.autocast(dev.type, enabled=False):
            a = self._turn(self.alpha, angles(q_pos), dtype)
            b = self._turn(self.beta, angles(k_pos), dtype)
            return torch.matmul(a, b.transpose(-1, -2)).unsqueeze(0)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, base={self.base:g}"
