"""The two SPADE layer types and the feed-forward block.

GlobalLayer (paper Sec. 3, the bottom layer), pre-LN form:

    X_local  = Local(LN(X))            X_global = SSM(LN(X))
    X_a      = W [LN(X_local), LN(X_global)] + X        W: Linear(2d -> d)   (combine="concat")
    Y        = FFN(LN(X_a)) + X_a

``combine="add"`` mixes w * LN(X_global) + (1 - w) * LN(X_local) and ``combine="stack"`` feeds
the SSM output into the local attention (X_a = Local(SSM(LN(X))) + X): the official code's
two other modes. With no attention (``attention=None``) the layer is a plain SSM block
(X_a = SSM(LN(X)) + X), which is how the S4 / S5 / Hyena baselines are stacked.

Post-LN (``norm="post"``, the paper's encoder-decoder) moves each LayerNorm after its residual
sum: X_a = LN(X + mix(X)), Y = LN(X_a + FFN(X_a)).

DecoderLayer is the encoder-decoder's T5 decoder layer: causal self-attention, cross-attention
over the encoder output, feed-forward.

LocalLayer and GlobalLayer support ``forward(x, padding_mask)`` and, when causal,
``initial_state`` / ``step`` for streaming decoding (SSM state + attention cache, both of fixed
size for window or chunk attention).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from spadeformer.attention import Attention
from spadeformer.cross_attention import CrossAttention, MemoryKV
from spadeformer.ssm.base import GlobalExtractor, check_dropout

__all__ = ["DecoderLayer", "FeedForward", "LocalLayer", "GlobalLayer", "MaskedBatchNorm",
           "ScaleNorm", "apply_norm", "make_norm", "state_to_device"]

NORMS = ("pre", "post")
COMBINES = ("concat", "add", "stack")
# what make_norm builds; the batch norms' statistics mix positions (no causal model)
NORM_TYPES = ("layernorm", "scalenorm", "rmsnorm", "batchnorm", "syncbatchnorm")
BATCH_NORMS = ("batchnorm", "syncbatchnorm")


class ScaleNorm(nn.Module):
    """g * x / sqrt(mean(x^2) + eps) with one learned scalar g (starts at 1): Nguyen & Salazar
    2019, one of Mega's norms. (..., d) -> (..., d)."""

    def __init__(self, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * x * torch.rsqrt(x.square().mean(-1, keepdim=True) + self.eps)


class MaskedBatchNorm(nn.Module):
    """Batch norm of (..., d) inputs per channel, statistics over every leading position
    except padded ones: in training the batch's mean and (biased) variance over the real
    tokens, running averages (momentum 0.1, unbiased variance) otherwise, as
    ``nn.BatchNorm1d`` does for the unpadded tokens alone. One of Mega's norms (its LRA image
    runs). With ``sync=True`` and a process group of several ranks, the training statistics
    are over the real tokens of every rank's batch (``nn.SyncBatchNorm``'s role; Mega's Path-X
    run): two sums per call are all-reduced over the default process group, with gradients
    flowing back across the ranks, so every rank must call it in training mode equally often
    (a rank whose tokens are all padding still takes part). Otherwise per process.

    forward(x (..., d), padding_mask (...) bool True = padded, or None) -> (..., d).
    """

    def __init__(self, d_model: int, eps: float = 1e-5, momentum: float = 0.1,
                 sync: bool = False):
        super().__init__()
        if not isinstance(sync, bool):
            raise TypeError(f"sync must be a bool, got {sync!r}")
        self.eps, self.momentum, self.sync = eps, momentum, sync
        self.weight = nn.Parameter(torch.ones(d_model))
        self.bias = nn.Parameter(torch.zeros(d_model))
        self.register_buffer("running_mean", torch.zeros(d_model))
        self.register_buffer("running_var", torch.ones(d_model))

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.training:
            flat = x.reshape(-1, x.shape[-1])
            syncing = self._syncing()
            # not when syncing: a rank raising alone would leave the others waiting in the
            # all-reduce (the batch of all ranks together is what counts)
            if flat.shape[0] < 2 and not syncing:
                raise ValueError(f"batch norm (mega_norm='{self._kind}') in training needs at "
                                 f"least 2 tokens in the batch, got {flat.shape[0]}: call "
                                 ".eval() to normalise with the running averages")
            # masked sums rather than a boolean gather: no host sync on the GPU
            real = (torch.ones_like(flat[:, :1]) if padding_mask is None
                    else (~padding_mask).reshape(-1, 1).to(flat.dtype))
            # two passes (sum, then centred squares): no cancellation in E[x^2] - E[x]^2
            sums = torch.cat([(flat * real).sum(0), real.sum().view(1)])
            sums = _SumOverRanks.apply(sums) if syncing else sums
            n = sums[-1]
            mean = sums[:-1] / n.clamp(min=1)
            squares = ((flat - mean).square() * real).sum(0)
            var = (_SumOverRanks.apply(squares) if syncing else squares) / n.clamp(min=1)
            with torch.no_grad():
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), self.momentum)
                unbiased = var.detach() * n / (n - 1).clamp(min=1)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), self.momentum)
        else:
            mean, var = self.running_mean.to(x.dtype), self.running_var.to(x.dtype)
        return (x - mean) * torch.rsqrt(var + self.eps) * self.weight + self.bias

    @property
    def _kind(self) -> str:
        return "syncbatchnorm" if self.sync else "batchnorm"

    def _syncing(self) -> bool:
        return (self.sync and dist.is_available() and dist.is_initialized()
                and dist.get_world_size() > 1)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}, momentum={self.momentum}, " \
               f"sync={self.sync}"


class _SumOverRanks(torch.autograd.Function):
    """Sum of a tensor over the ranks of the default process group. Its backward sums the
    gradients the same way: every rank's share of the statistics feeds every rank's loss.
    (torch.distributed.nn.functional.all_reduce does this too, but is deprecated.)"""

    @staticmethod
    def forward(ctx, t: torch.Tensor) -> torch.Tensor:
        out = t.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad


def apply_norm(norm: nn.Module, x: torch.Tensor,
               padding_mask: torch.Tensor | None = None) -> torch.Tensor:
    """norm(x); a batch norm also gets the padding mask (the others never need it)."""
    return norm(x, padding_mask) if isinstance(norm, MaskedBatchNorm) else norm(x)


def make_norm(kind: str, d_model: int) -> nn.Module:
    """A normalisation over the last axis of width d_model: "layernorm", "scalenorm",
    "rmsnorm" (per-dimension gain, no centring), "batchnorm" or "syncbatchnorm"
    (:class:`MaskedBatchNorm`, statistics per process / over all ranks; call it through
    :func:`apply_norm`), all with eps 1e-5."""
    if kind == "layernorm":
        return nn.LayerNorm(d_model)
    if kind == "scalenorm":
        return ScaleNorm()
    if kind == "rmsnorm":
        return nn.RMSNorm(d_model, eps=1e-5)
    if kind in BATCH_NORMS:
        return MaskedBatchNorm(d_model, sync=kind == "syncbatchnorm")
    raise ValueError(f"norm type must be one of {list(NORM_TYPES)}, got {kind!r}")


ACTIVATIONS = {"gelu": nn.GELU, "silu": nn.SiLU}


class FeedForward(nn.Module):
    """Linear(d -> d_ff), activation (GELU; Mega: SiLU), dropout, Linear(d_ff -> d), dropout.
    (..., d) -> (..., d). ``hidden_dropout`` sets the first dropout's rate apart (None = the
    same ``dropout``; Mega's ``hidden_dropout``)."""

    def __init__(self, d_model: int, d_ff: int, dropout: float = 0.0, activation: str = "gelu",
                 hidden_dropout: float | None = None):
        super().__init__()
        for name, value in (("d_model", d_model), ("d_ff", d_ff)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {list(ACTIVATIONS)}, got {activation!r}")
        check_dropout(dropout, "dropout")
        if hidden_dropout is not None:
            check_dropout(hidden_dropout, "hidden_dropout")
        self.fc1 = nn.Linear(d_model, d_ff)
        self.fc2 = nn.Linear(d_ff, d_model)
        self.act = ACTIVATIONS[activation]()
        self.dropout = nn.Dropout(dropout)
        self.hidden_dropout = nn.Dropout(dropout if hidden_dropout is None else hidden_dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., d_model) -> (..., d_model)."""
        return self.dropout(self.fc2(self.hidden_dropout(self.act(self.fc1(x)))))


class _Block(nn.Module):
    """Shared residual / norm plumbing: subclasses define the token mixer."""

    def __init__(self, d_model: int, d_ff: int, dropout: float, norm: str):
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {list(NORMS)}, got {norm!r}")
        self.norm_placement = norm
        self.norm_mix = nn.LayerNorm(d_model)
        self.norm_ffn = nn.LayerNorm(d_model)
        self.ffn = FeedForward(d_model, d_ff, dropout)
        self.dropout = nn.Dropout(dropout)

    def _sublayer(self, x: torch.Tensor, f, norm: nn.Module, dropout: bool = True
                  ) -> torch.Tensor:
        """One residual sub-layer: pre-LN x + f(LN(x)), post-LN LN(x + f(x)); residual dropout
        on f's output unless f applies its own (the feed-forward does)."""
        drop = self.dropout if dropout else (lambda y: y)
        if self.norm_placement == "pre":
            return x + drop(f(norm(x)))
        return norm(x + drop(f(x)))

    def _residual(self, x: torch.Tensor, mix) -> torch.Tensor:
        """mix: callable (normalised or raw input) -> token-mixed output, same shape."""
        x = self._sublayer(x, mix, self.norm_mix)
        return self._sublayer(x, self.ffn, self.norm_ffn, dropout=False)


class LocalLayer(_Block):
    """A Transformer layer whose attention is full, sliding-window or chunk attention.

    forward: x (batch, length, d_model), padding_mask (batch, length) bool True = padded
    -> (batch, length, d_model).
    """

    def __init__(self, d_model: int, n_heads: int, d_ff: int, *, attention: Attention,
                 dropout: float = 0.0, norm: str = "pre"):
        super().__init__(d_model, d_ff, dropout, norm)
        self.attn = attention

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (batch, length, d_model), padding_mask (batch, length) bool True = padded
        -> (batch, length, d_model): attention then feed-forward, each in a residual."""
        return self._residual(x, lambda h: self.attn(h, padding_mask=padding_mask))

    def initial_state(self, batch_size: int, device=None, dtype=None) -> Any:
        return self.attn.initial_cache(batch_size, device=device, dtype=dtype)

    def step(self, x_t: torch.Tensor, state: Any) -> tuple[torch.Tensor, Any]:
        """x_t: (batch, d_model) -> (batch, d_model), new state."""
        box = {}

        def mix(h):
            y, box["state"] = self.attn.step(h, state)
            return y

        return self._residual(x_t, mix), box["state"]


class GlobalLayer(_Block):
    """SPADE's global layer: an SSM beside the local attention, mixed (paper Sec. 3, Fig. 2).

    forward: x (batch, length, d_model), padding_mask (batch, length) bool True = padded
    -> (batch, length, d_model).
    """

    def __init__(self, d_model: int, d_ff: int, *, ssm: GlobalExtractor,
                 attention: Attention | None, combine: str = "concat", add_weight: float = 0.5,
                 dropout: float = 0.0, norm: str = "pre"):
        super().__init__(d_model, d_ff, dropout, norm)
        if combine not in COMBINES:
            raise ValueError(f"combine must be one of {list(COMBINES)}, got {combine!r}")
        if not 0.0 <= add_weight <= 1.0:
            raise ValueError(f"add_weight must be in [0, 1], got {add_weight!r}")
        self.ssm = ssm
        self.attn = attention
        self.combine = combine if attention is not None else "ssm-only"
        self.add_weight = add_weight
        if self.combine in ("concat", "add"):
            self.norm_local = nn.LayerNorm(d_model)
            self.norm_global = nn.LayerNorm(d_model)
        if self.combine == "concat":
            self.mix_proj = nn.Linear(2 * d_model, d_model)  # W in the paper's equation

    def _merge(self, x_local: torch.Tensor | None, x_global: torch.Tensor) -> torch.Tensor:
        if self.combine == "concat":
            both = torch.cat([self.norm_local(x_local), self.norm_global(x_global)], dim=-1)
            return self.mix_proj(both)
        if self.combine == "add":
            w = self.add_weight
            return w * self.norm_global(x_global) + (1 - w) * self.norm_local(x_local)
        return x_local if self.combine == "stack" else x_global

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (batch, length, d_model), padding_mask (batch, length) bool True = padded
        -> (batch, length, d_model). The residual branch is ``combine`` of the SSM output
        and the local attention's: "concat" = W [LN(x_local), LN(x_global)] (the paper),
        "add" = w LN(x_global) + (1 - w) LN(x_local), "stack" = attention over the SSM
        output; then the feed-forward, each in a residual."""

        def mix(h):
            x_global = self.ssm(h, padding_mask=padding_mask)
            if self.attn is None:
                return x_global
            attn_in = x_global if self.combine == "stack" else h
            return self._merge(self.attn(attn_in, padding_mask=padding_mask), x_global)

        return self._residual(x, mix)

    def initial_state(self, batch_size: int, device=None, dtype=None) -> Any:
        ssm_state = self.ssm.initial_state(batch_size)
        if device is not None:
            ssm_state = state_to_device(ssm_state, device)
        attn_cache = None
        if self.attn is not None:
            attn_cache = self.attn.initial_cache(batch_size, device=device, dtype=dtype)
        return (ssm_state, attn_cache)

    def step(self, x_t: torch.Tensor, state: Any) -> tuple[torch.Tensor, Any]:
        """x_t: (batch, d_model) -> (batch, d_model), new state."""
        ssm_state, attn_cache = state
        box = {}

        def mix(h):
            x_global, box["ssm"] = self.ssm.step(h, ssm_state)
            box["attn"] = attn_cache
            if self.attn is None:
                return x_global
            attn_in = x_global if self.combine == "stack" else h
            x_local, box["attn"] = self.attn.step(attn_in, attn_cache)
            return self._merge(x_local, x_global)

        y = self._residual(x_t, mix)
        return y, (box["ssm"], box["attn"])


class DecoderLayer(_Block):
    """A Transformer decoder layer (T5, the paper's encoder-decoder, Sec. 5.1): causal
    self-attention, cross-attention over the encoder output, feed-forward, each in a residual
    (pre-LN: X = X + f(LN(X)); post-LN: X = LN(X + f(X))).

    forward: x (batch, T, d_model), memory_kv (the cross-attention's projected encoder output,
    :meth:`CrossAttention.project_memory`) -> (batch, T, d_model).
    """

    def __init__(self, d_model: int, d_ff: int, *, self_attention: Attention,
                 cross_attention: CrossAttention, dropout: float = 0.0, norm: str = "pre"):
        super().__init__(d_model, d_ff, dropout, norm)
        if not self_attention.causal:
            raise ValueError("DecoderLayer needs a causal self_attention (causal=True)")
        self.attn = self_attention
        self.cross_attn = cross_attention
        self.norm_cross = nn.LayerNorm(d_model)

    def _sublayers(self, x: torch.Tensor, self_mix, memory_kv: MemoryKV) -> torch.Tensor:
        """Self-attention, cross-attention, feed-forward, each with its residual and norm."""
        x = self._sublayer(x, self_mix, self.norm_mix)
        x = self._sublayer(x, lambda h: self.cross_attn.attend(h, memory_kv), self.norm_cross)
        return self._sublayer(x, self.ffn, self.norm_ffn, dropout=False)

    def forward(self, x: torch.Tensor, memory_kv: MemoryKV) -> torch.Tensor:
        """x (batch, T, d_model) -> (batch, T, d_model)."""
        return self._sublayers(x, self.attn, memory_kv)

    def initial_state(self, batch_size: int, device=None, dtype=None) -> Any:
        return self.attn.initial_cache(batch_size, device=device, dtype=dtype)

    def step(self, x_t: torch.Tensor, state: Any,
             memory_kv: MemoryKV) -> tuple[torch.Tensor, Any]:
        """x_t: (batch, d_model) -> (batch, d_model), new self-attention cache."""
        box = {}

        def self_mix(h):
            y, box["state"] = self.attn.step(h, state)
            return y

        y = self._sublayers(x_t[:, None], lambda h: self_mix(h[:, 0])[:, None], memory_kv)
        return y[:, 0], box["state"]


def state_to_device(state: Any, device) -> Any:
    """Tensors of a (nested tuple / list) decoding state moved to ``device``."""
    if isinstance(state, torch.Tensor):
        return state.to(device)
    if isinstance(state, (tuple, list)):
        return type(state)(state_to_device(s, device) for s in state)
    return state
