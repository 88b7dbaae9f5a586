"""The Mega block (Ma et al. 2022, "Mega: Moving Average Equipped Gated Attention", Sec. 3),
the MEGA / MEGA-chunk baselines beside SPADE.

One block, pre-LN (``norm="pre"``), X the block input and X_n = LN(X):

    X'  = SiLU(EMA(X_n))                        (d)   damped EMA, ssm/ema.py (Sec. 3.1)
    Z   = SiLU(X' W_z + b_z)                    (z)   shared representation (Eq. 8)
    Q   = kappa_q * Z + mu_q,  K = kappa_k * Z + mu_k   per-dimension scale and offset (Eq. 9)
    V   = SiLU(X_n W_v + b_v)                   (v)   (Eq. 10)
    O   = softmax(Q K^T / sqrt(z) + b_rel) V    single-head attention over the pattern (Eq. 11)
          or f(Q K^T / n + b_rel) V             f = laplace / relu^2, n = keys seen (Sec. 3.3)
    R   = SiLU(X' W_r + b_r)                    (v)   reset gate (Eq. 12, gamma)
    U   = sigmoid(X' W_u + b_u)                 (d)   update gate (Eq. 13, phi)
    H   = SiLU(X' W_h + (R * O) U_h + b_h)      (d)   (Eq. 14)
    Y   = U * H + (1 - U) * X                         the gate mixes with the raw input
    out = Y + FFN(LN(Y))                              FFN with SiLU (the reference's NFFN)

Post-LN (``norm="post"``) feeds X itself to the EMA and V and normalises after each sum.
MEGA-chunk (Sec. 3.5) restricts the attention to non-overlapping chunks (``pattern="chunk"``);
the EMA carries information across chunks, so the block stays linear in the length. The
attention runs on the same ops as every other layer (blocked SDPA / FlexAttention, with a
dense ``_ref`` twin, :meth:`MegaLayer.forward_ref`).

Reference-code choices kept: W_u, W_z, W_r, W_h are one fused projection of X'; weights
start N(0, 0.02^2), biases and mu at 0, kappa N(0, 0.02^2); b_rel is the "simple" relative
bias (one scalar per offset, :class:`~spadeformer.ops.position_bias.SimpleRelativeBias`;
with full attention, sequences longer than ``max_positions`` are refused, as the reference
does) or the "rotary" one of its language models
(:class:`~spadeformer.ops.position_bias.RotaryRelativeBias`, z wide, any length).
``attention_fn`` "laplace" / "relu2" are the reference's element-wise attention functions
(:mod:`spadeformer.ops.element_attn`; its LRA image and Pathfinder runs use laplace).
``norm_type`` picks the reference's layer / scale / RMS / batch norm for both norms of the
block (its LRA text and retrieval runs use scalenorm, its image runs batch norm; here the
batch statistics leave padded tokens out, and batch norm needs ``causal=False``, since the
statistics mix positions). ``hidden_dropout`` is the reference's rate on V and on the FFN's
hidden activations (its LRA runs: 0; None = ``dropout``). "syncbatchnorm" takes the batch
statistics over every rank of a data-parallel run (its Path-X run, on 8 GPUs).

Weight decay: the reference decays every parameter; here kappa, mu, the biases and the
relative bias (the simple table, the rotary alpha and beta: vectors) are not decayed, and the
EMA's alpha, delta, beta train at the optimiser's ``ssm_lr`` without decay (pass
``MultiHeadEMA(lr=...)``, or set ``train.ssm_lr`` = ``train.lr``, for one lr).

Decoding (causal): ``initial_state`` / ``step`` keep the EMA state (d_model x n_dims) and the
attention cache of the pattern (chunk: the current chunk only), so memory is constant.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from spadeformer.attention import (
    AttentionCache,
    attend_cached,
    cache_append,
    cache_slots,
    empty_cache,
)
from spadeformer.config import MEGA_POSITIONS  # the reference's rel_pos_bias choices
from spadeformer.layers import (
    BATCH_NORMS,
    NORM_TYPES,
    NORMS,
    FeedForward,
    apply_norm,
    make_norm,
    state_to_device,
)
from spadeformer.ops.element_attn import check_attention_fn
from spadeformer.ops.local_attn import PATTERNS, attention_ref, local_attention
from spadeformer.ops.position_bias import RotaryRelativeBias, SimpleRelativeBias
from spadeformer.ssm.base import (
    GlobalExtractor,
    check_dropout,
    check_padding_mask,
    check_positive,
    check_sequence,
    check_step_input,
    mark_no_weight_decay,
)

__all__ = ["MegaLayer", "bias_reach"]

_INIT_STD = 0.02  # the reference code's weight initialisation


def bias_reach(pattern: str, window_size: int | None, chunk_size: int | None,
               max_positions: int) -> int:
    """How many offsets on each side (plus one) the relative bias needs to cover the pattern:
    chunk c -> c, window w -> w + 1, full -> ``max_positions``."""
    if pattern == "chunk":
        return chunk_size
    if pattern == "window":
        return window_size + 1
    return max_positions


class MegaLayer(nn.Module):
    """One Mega block: moving-average gated attention, then the feed-forward. See the module
    docstring for the equations.

    Args:
        d_model: width d.
        d_ff: feed-forward width.
        ema: the moving average (``MultiHeadEMA``, or any global extractor of width d_model
            whose ``bidirectional`` is ``not causal``).
        pattern: "chunk" (MEGA-chunk), "full" (MEGA) or "window".
        window_size, chunk_size: as in :class:`spadeformer.attention.Attention`.
        causal: no token sees a later one; needed for :meth:`step`.
        z_dim: width of the shared representation Z (queries and keys).
        v_dim: width of the values and the reset gate.
        dropout: on X', on H, and on the feed-forward's output (training only).
        hidden_dropout: on V and on the feed-forward's hidden activations (None = dropout).
        attention_dropout: on the attention probabilities.
        norm: "pre" or "post".
        norm_type: "layernorm", "scalenorm", "rmsnorm", "batchnorm" or "syncbatchnorm"
            (batch statistics over every rank of a process group), for both norms.
        relative_bias: the relative position bias b_rel: "simple", "rotary" or None (none);
            True / False mean "simple" / None.
        max_positions: with pattern="full" and the simple bias, the longest sequence (that
            bias has one scalar per offset up to max_positions - 1).
        attention_fn: "softmax", or Mega's element-wise "laplace" / "relu2".

    forward: x (batch, L, d_model), padding_mask (batch, L) bool True = padded
    -> (batch, L, d_model).
    """

    def __init__(self, d_model: int, d_ff: int, *, ema: GlobalExtractor, pattern: str = "chunk",
                 window_size: int | None = None, chunk_size: int | None = None,
                 causal: bool = True, z_dim: int = 64, v_dim: int | None = None,
                 dropout: float = 0.0, attention_dropout: float = 0.0, norm: str = "pre",
                 relative_bias: str | bool | None = "simple", max_positions: int = 4096,
                 attention_fn: str = "softmax", norm_type: str = "layernorm",
                 hidden_dropout: float | None = None):
        super().__init__()
        for name, value in (("d_model", d_model), ("d_ff", d_ff), ("z_dim", z_dim),
                            ("max_positions", max_positions)):
            check_positive(name, value)
        v_dim = 2 * d_model if v_dim is None else v_dim
        check_positive("v_dim", v_dim)
        if pattern not in PATTERNS:
            raise ValueError(f"pattern must be one of {list(PATTERNS)}, got {pattern!r}")
        sizes = {"window": ("window_size", window_size), "chunk": ("chunk_size", chunk_size)}
        if pattern in sizes:
            check_positive(*sizes[pattern])
        if not isinstance(causal, bool):
            raise TypeError(f"causal must be a bool, got {causal!r}")
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {list(NORMS)}, got {norm!r}")
        if norm_type not in NORM_TYPES:
            raise ValueError(f"norm_type must be one of {list(NORM_TYPES)}, got {norm_type!r}")
        if norm_type in BATCH_NORMS and causal:
            raise ValueError(f"norm_type={norm_type!r} needs causal=False: its batch statistics "
                             "mix the positions, so a causal block would see later tokens")
        hidden_dropout = dropout if hidden_dropout is None else hidden_dropout
        for name, p in (("dropout", dropout), ("attention_dropout", attention_dropout),
                        ("hidden_dropout", hidden_dropout)):
            check_dropout(p, name)
        if not isinstance(ema, GlobalExtractor) or ema.d_model != d_model:
            raise ValueError(f"ema must be a global extractor of d_model={d_model}, got "
                             f"{type(ema).__name__}(d_model={getattr(ema, 'd_model', None)})")
        if isinstance(relative_bias, bool):  # the older on / off switch
            relative_bias = "simple" if relative_bias else None
        if relative_bias is not None and relative_bias not in MEGA_POSITIONS:
            raise ValueError(f"relative_bias must be one of {list(MEGA_POSITIONS)} or None, got "
                             f"{relative_bias!r}")
        if relative_bias == "rotary" and z_dim % 2:
            raise ValueError(f"relative_bias='rotary' turns pairs of Z's coordinates: z_dim must "
                             f"be even, got {z_dim}")
        check_attention_fn(attention_fn)
        if ema.bidirectional == causal:
            raise ValueError(f"ema.bidirectional must be {not causal} for causal={causal} "
                             f"(a causal block needs a causal EMA, and the reverse)")
        self.d_model, self.z_dim, self.v_dim = d_model, z_dim, v_dim
        self.pattern, self.causal = pattern, causal
        self.window_size = window_size if pattern == "window" else None
        self.chunk_size = chunk_size if pattern == "chunk" else None
        self.attention_dropout = float(attention_dropout)
        self.attention_fn = attention_fn
        self.max_positions = max_positions
        self.norm_placement = norm

        self.norm_type = norm_type
        self.norm_mix = make_norm(norm_type, d_model)
        self.norm_ffn = make_norm(norm_type, d_model)
        self.ema = ema
        self.v_proj = nn.Linear(d_model, v_dim)
        # X' -> [update gate U (d) | Z (z) | reset gate R (v) | X' W_h (d)], one matmul
        self.mx_proj = nn.Linear(d_model, d_model + z_dim + v_dim + d_model)
        self.h_proj = nn.Linear(v_dim, d_model)  # U_h
        self.qk_scale = nn.Parameter(torch.randn(2, z_dim) * _INIT_STD)  # kappa_q, kappa_k
        self.qk_offset = nn.Parameter(torch.zeros(2, z_dim))  # mu_q, mu_k
        # a per-dimension gain and bias (like LayerNorm's), stored as (2, z) matrices: keep
        # them out of the "decay what has ndim >= 2" rule
        mark_no_weight_decay(self, ("qk_scale", "qk_offset"))
        self.relative_bias: nn.Module | None = None
        if relative_bias == "simple":
            self.relative_bias = SimpleRelativeBias(
                bias_reach(pattern, window_size, chunk_size, max_positions))
        elif relative_bias == "rotary":
            self.relative_bias = RotaryRelativeBias(z_dim)
        self.dropout = nn.Dropout(dropout)
        self.hidden_dropout = nn.Dropout(hidden_dropout)
        self.ffn = FeedForward(d_model, d_ff, dropout, activation="silu",
                               hidden_dropout=hidden_dropout)
        for linear in (self.v_proj, self.mx_proj, self.h_proj, self.ffn.fc1, self.ffn.fc2):
            nn.init.normal_(linear.weight, std=_INIT_STD)
            nn.init.zeros_(linear.bias)

    # ------------------------------------------------------------------------ pieces
    def _inputs(self, x: torch.Tensor, padding_mask: torch.Tensor | None) -> torch.Tensor:
        """What the EMA and V read: LN(x) pre-LN, x itself post-LN."""
        if self.norm_placement == "pre":
            return apply_norm(self.norm_mix, x, padding_mask)
        return x

    def _gates(self, mx: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """X' (..., d) -> update gate U (..., d), Q, K (..., z), reset gate R (..., v),
        X' W_h + b_h (..., d)."""
        u, zr, hx = self.mx_proj(mx).split(
            [self.d_model, self.z_dim + self.v_dim, self.d_model], dim=-1)
        z, r = F.silu(zr).split([self.z_dim, self.v_dim], dim=-1)
        qk = z.unsqueeze(-2) * self.qk_scale + self.qk_offset  # (..., 2, z)
        return torch.sigmoid(u), qk[..., 0, :], qk[..., 1, :], r, hx

    def _finish(self, x: torch.Tensor, u: torch.Tensor, r: torch.Tensor, hx: torch.Tensor,
                o: torch.Tensor, padding_mask: torch.Tensor | None) -> torch.Tensor:
        """H, the gated residual and the feed-forward: (..., d) from the attention output o."""
        h = self.dropout(F.silu(hx + self.h_proj(o * r)))
        y = torch.addcmul(x, u, h - x)  # U * H + (1 - U) * X
        if self.norm_placement == "pre":
            return y + self.ffn(apply_norm(self.norm_ffn, y, padding_mask))
        y = apply_norm(self.norm_mix, y, padding_mask)
        return apply_norm(self.norm_ffn, y + self.ffn(y), padding_mask)

    # ----------------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (batch, L, d_model), padding_mask (batch, L) bool -> (batch, L, d_model)."""
        return self._forward(x, padding_mask, local_attention)

    def forward_ref(self, x: torch.Tensor,
                    padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """:meth:`forward` with the dense :func:`attention_ref`. For tests."""
        return self._forward(x, padding_mask, attention_ref)

    def _forward(self, x: torch.Tensor, padding_mask: torch.Tensor | None, attn) -> torch.Tensor:
        check_sequence(x, self.d_model)
        check_padding_mask(padding_mask, x.shape[0], x.shape[1])
        self._check_reach(x.shape[1])
        xn = self._inputs(x, padding_mask)
        v = self.hidden_dropout(F.silu(self.v_proj(xn)))
        mx = self.dropout(F.silu(self.ema(xn, padding_mask=padding_mask)))
        u, q, k, r, hx = self._gates(mx)
        o = attn(q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1).to(q.dtype), self.pattern,
                 window_size=self.window_size, chunk_size=self.chunk_size, causal=self.causal,
                 key_padding_mask=padding_mask, bias=self.relative_bias,
                 dropout_p=self.attention_dropout if self.training else 0.0,
                 attention_fn=self.attention_fn)[:, 0]
        return self._finish(x, u, r, hx, o.to(x.dtype), padding_mask)

    def _check_reach(self, length: int) -> None:
        """Full attention with the simple bias: refuse what the bias cannot tell apart (the
        other patterns never see an offset beyond their chunk / window; rotary has no limit)."""
        if self.pattern == "full" and isinstance(self.relative_bias, SimpleRelativeBias) \
                and length > self.max_positions:
            raise ValueError(f"sequence length {length} exceeds max_positions="
                             f"{self.max_positions} of the relative bias of a full-attention "
                             "Mega block: build the model with a larger max_positions "
                             "(model.max_position), or use chunk / window attention")

    # ---------------------------------------------------------------------- decoding
    def _require_causal(self) -> None:
        if not self.causal:
            raise RuntimeError("initial_state()/step() need a causal MegaLayer (causal=True)")

    def initial_state(self, batch_size: int, device=None, dtype=None) -> tuple[Any, Any]:
        """(EMA state, attention cache of one head: keys z wide, values v wide)."""
        self._require_causal()
        weight = self.v_proj.weight
        device = weight.device if device is None else device
        ema_state = state_to_device(self.ema.initial_state(batch_size), device)
        slots = cache_slots(self.pattern, self.window_size, self.chunk_size)
        cache = empty_cache(batch_size, 1, slots, self.z_dim, self.v_dim, device=device,
                            dtype=weight.dtype if dtype is None else dtype)
        return ema_state, cache

    def step(self, x_t: torch.Tensor, state: tuple[Any, Any]) -> tuple[torch.Tensor, Any]:
        """One token per row: x_t (batch, d_model) -> (batch, d_model), new state. Equals
        :meth:`forward` at this position; the state is consumed (see Attention.step)."""
        self._require_causal()
        check_step_input(x_t, self.d_model)
        if not (isinstance(state, tuple) and len(state) == 2
                and isinstance(state[1], AttentionCache)):
            raise TypeError("state must be the (EMA state, AttentionCache) pair from "
                            f"MegaLayer.initial_state(), got {type(state).__name__}")
        ema_state, cache = state
        self._check_reach(cache.position + 1)
        xn = self._inputs(x_t, None)
        v = self.hidden_dropout(F.silu(self.v_proj(xn)))
        mx_t, ema_state = self.ema.step(xn, ema_state)
        u, q, k, r, hx = self._gates(self.dropout(F.silu(mx_t)))
        position = cache.position
        key, value, k_pos, valid, cache = cache_append(cache, k.unsqueeze(1), v.unsqueeze(1),
                                                       self.pattern)
        o = attend_cached(q.unsqueeze(1), key, value, k_pos, valid, position,
                          self.relative_bias,
                          self.attention_dropout if self.training else 0.0,
                          self.attention_fn)[:, 0]
        return self._finish(x_t, u, r, hx, o.to(x_t.dtype), None), (ema_state, cache)

    def extra_repr(self) -> str:
        size = {"window": f", window_size={self.window_size}",
                "chunk": f", chunk_size={self.chunk_size}", "full": ""}[self.pattern]
        return (f"d_model={self.d_model}, z_dim={self.z_dim}, v_dim={self.v_dim}, "
                f"pattern={self.pattern!r}{size}, causal={self.causal}, "
                f"norm={self.norm_placement!r}, norm_type={self.norm_type!r}, "
                f"attention_fn={self.attention_fn!r}")
