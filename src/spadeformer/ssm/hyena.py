"""Hyena (Poli et al. 2023, "Hyena Hierarchy") as a SPADE global information extractor.

The order-N operator (N = ``order``; the Hyena paper's default and ours is N = 2):

    z = ShortConv(in_proj(u))              in_proj: Linear(d, (N+1) d); ShortConv: depthwise,
                                           kernel K = short_filter_size
    x_1, ..., x_N, v = split(z)            each (batch, length, d)
    for i = 1 .. N-1:                      one implicit long filter h_i per extra gate
        v = x_{i+1} * v
        v = (h_i * v) + b_i v              * = long convolution (FFT), b_i = filter bias
    y = out_proj(x_1 * v)                  out_proj: Linear(d, d)

Implicit filters (Hyena paper Sec. 3.3 and the reference HyenaFilter): every filter value is an
MLP (sine activations) of positional features of the lag t, times an exponential decay,

    p(t) = [t / T, cos(2 pi f_k t / T), -sin(2 pi f_k t / T)]   k = 1 .. (emb_dim - 1) / 2
    h(t) = MLP(p(t)) * exp(-alpha_c t / T)                     alpha_c spread over channels c

with f_k = linspace(1e-4, bands - 1) as in the reference PositionalEmbedding and alpha_c spread
linearly between the rates that bring exp(-alpha t/T) to 1e-2 at t/T = 1.5 (slowest) and
t/T = 0.3 (fastest), as the reference ExponentialModulation. One difference from the reference:
time is normalised by a *fixed* ``T = time_scale`` (default: ``max_length``, else 1024), not by
the sequence length L. Then h(t) depends on t only, so a filter generated for length L is the
prefix of the one for any longer length, and step-by-step decoding equals the full forward pass.

Bidirectional mode (decomposition, tested in tests/ssm/test_hyena.py):

    short conv: centred, z[t] = sum_j w_j p[t + j - (K-1)//2]   (sees (K-1)//2 tokens back and
                K-1-(K-1)//2 ahead; causal mode: z[t] = sum_j w_j p[t + j - (K-1)], only back)
    long conv:  (h * v)[t] = sum_{s<=t} h(t-s) v[s] + sum_{s>t} g(s-t-1) v[s]

i.e. ``fft_conv(v, h, k_reverse=g)``: a second filter g (extra output channels of the same MLP,
same decay) reaches the future; g(j) acts at lag -(j+1), so the current token is counted once.

Padding: the projections at padded positions are zeroed before the short conv and padded inputs
never enter the long conv, so a padded token contributes nothing (the in_proj bias included):
a sequence padded on the right or the left gives the same outputs at its real positions as the
unpadded sequence.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from spadeformer.ops.fftconv import fft_conv, fft_conv_ref
from spadeformer.ssm.base import (
    FrozenCache,
    GlobalExtractor,
    check_dropout,
    check_lr,
    check_positive,
    mark_no_weight_decay,
    mark_ssm_params,
)

__all__ = ["Hyena", "hyena_positional_features", "DEFAULT_TIME_SCALE"]

# Time unit of the positional features when neither time_scale nor max_length is given.
DEFAULT_TIME_SCALE = 1024
# Reference ExponentialModulation: the filters decay to TARGET at t/T = FAST .. SLOW.
_DECAY_TARGET, _FAST_DECAY_PCT, _SLOW_DECAY_PCT = 1e-2, 0.3, 1.5
_INNER_MLP_LAYERS = 2  # hidden Linear+Sin blocks after the first, as the reference filter
_MAX_CACHED_LENGTHS = 16


def _check_emb_dim(emb_dim: Any) -> None:
    """One time feature plus cos/sin pairs: an odd integer >= 3."""
    if isinstance(emb_dim, bool) or not isinstance(emb_dim, int) or emb_dim < 3 or emb_dim % 2 == 0:
        raise ValueError(f"emb_dim must be an odd integer >= 3, got {emb_dim!r}")


def hyena_positional_features(t: torch.Tensor, emb_dim: int, time_scale: float) -> torch.Tensor:
    """Positional features of the lags ``t`` (n,) -> (n, emb_dim): [t/T, cos(f w), -sin(f w)].

    w = 2 pi t / T with T = ``time_scale`` fixed, so the features of lag t never depend on the
    sequence length. ``emb_dim`` must be odd and >= 3 (one time feature + cos/sin pairs).
    """
    _check_emb_dim(emb_dim)
    bands = (emb_dim - 1) // 2
    f = torch.linspace(1e-4, bands - 1, bands, dtype=t.dtype, device=t.device)
    w = (2 * math.pi / time_scale) * t
    fw = w[:, None] * f[None, :]  # (n, bands)
    return torch.cat([(t / time_scale)[:, None], torch.cos(fw), -torch.sin(fw)], dim=-1)


class _Sin(nn.Module):
    """sin(freq * x) with a learnable frequency per feature (the reference filter activation)."""

    def __init__(self, dim: int, freq: float = 1.0):
        super().__init__()
        self.freq = nn.Parameter(torch.full((dim,), float(freq)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sin(self.freq * x)


class Hyena(GlobalExtractor):
    """Order-N Hyena operator with implicit long filters (see the module docstring).

    Args:
        d_model: model width d.
        order: N >= 2; N - 1 implicit long filters and N gates.
        filter_order: hidden width of the filter MLP.
        short_filter_size: kernel K of the depthwise short convolution.
        max_length: longest sequence allowed (None = any length); also the default time_scale.
        emb_dim: number of positional features (odd, >= 3).
        bidirectional: centred short conv and a second (anti-causal) long filter.
        trainable: False freezes every parameter; the filters are then cached per length.
        dropout: dropout on the gated value before each long convolution.
        lr: learning rate of the implicit-filter MLP; its parameters get the SSM hint
            ``{"lr": lr, "weight_decay": 0.0}`` (no weight decay, as the reference filter;
            lr None = the optimiser's ``ssm_lr``, else its lr), see
            :func:`~spadeformer.ssm.base.mark_ssm_params`.
        time_scale: T, the time unit of the positional features and decay (None = max_length
            if given, else ``DEFAULT_TIME_SCALE``).
    """

    def __init__(
        self,
        d_model: int,
        order: int = 2,
        filter_order: int = 64,
        short_filter_size: int = 3,
        max_length: int | None = None,
        emb_dim: int = 9,
        bidirectional: bool = False,
        trainable: bool = True,
        dropout: float = 0.0,
        lr: float | None = None,
        time_scale: int | float | None = None,
    ):
        super().__init__(d_model, bidirectional=bidirectional, trainable=trainable)
        if isinstance(order, bool) or not isinstance(order, int) or order < 2:
            raise ValueError(f"order must be an integer >= 2, got {order!r}")
        check_positive("filter_order", filter_order)
        check_positive("short_filter_size", short_filter_size)
        if max_length is not None:
            check_positive("max_length", max_length)
        _check_emb_dim(emb_dim)
        check_dropout(dropout)
        check_lr(lr)
        if time_scale is not None:
            check_positive("time_scale", time_scale, allow_float=True)
        self.order = order
        self.filter_order = filter_order
        self.short_filter_size = short_filter_size
        self.max_length = max_length
        self.emb_dim = emb_dim
        self.lr = lr
        self.time_scale = float(
            time_scale if time_scale is not None else (max_length or DEFAULT_TIME_SCALE)
        )

        width = (order + 1) * d_model
        self.in_proj = nn.Linear(d_model, width)
        self.short_conv = nn.Conv1d(width, width, short_filter_size, groups=width)
        self.out_proj = nn.Linear(d_model, d_model)
        self.dropout = nn.Dropout(dropout)

        n_dirs = 2 if bidirectional else 1
        layers: list[nn.Module] = [nn.Linear(emb_dim, filter_order), _Sin(filter_order)]
        for _ in range(_INNER_MLP_LAYERS):
            layers += [nn.Linear(filter_order, filter_order), _Sin(filter_order)]
        layers.append(nn.Linear(filter_order, n_dirs * (order - 1) * d_model, bias=False))
        self.filter_mlp = nn.Sequential(*layers)
        # b_i of "v = h_i * v + b_i v": a per-channel skip, as the reference filter bias.
        self.filter_bias = nn.Parameter(torch.randn(order - 1, d_model))
        # Decay rates alpha_c (ExponentialModulation): fixed, spread over the channels.
        max_rate = -math.log(_DECAY_TARGET) / _FAST_DECAY_PCT
        min_rate = -math.log(_DECAY_TARGET) / _SLOW_DECAY_PCT
        self.register_buffer(
            "decay_rates", torch.linspace(min_rate, max_rate, d_model), persistent=False
        )
        # the implicit filter trains like an SSM's A, B, dt: no weight decay (the reference
        # filter's wd=0), its own lr if given, else the optimiser's ssm_lr
        mark_ssm_params(self, [f"filter_mlp.{n}" for n, _ in self.filter_mlp.named_parameters()],
                        lr)
        mark_no_weight_decay(self, ("filter_bias",))  # a bias per filter and channel
        self._filter_cache = FrozenCache(_MAX_CACHED_LENGTHS)
        self.freeze_if_requested()

    # ------------------------------------------------------------------ filters
    def _filters_at(self, positions: torch.Tensor) -> torch.Tensor:
        """Filter values at integer lags ``positions`` (n,) -> (dirs, order-1, d_model, n)."""
        ref = self.filter_mlp[0].weight
        t = positions.to(device=ref.device, dtype=ref.dtype)
        h = self.filter_mlp(hyena_positional_features(t, self.emb_dim, self.time_scale))
        h = rearrange(h, "n (r o d) -> r o d n", r=2 if self.bidirectional else 1, o=self.order - 1)
        decay = torch.exp(-self.decay_rates.to(ref.dtype)[:, None] * (t / self.time_scale))
        return h * decay  # (r, o, d, n) * (d, n)

    def filters(self, length: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Long filters for sequences of ``length``.

        Returns k (order-1, d_model, length) and, when bidirectional, k_reverse of the same
        shape (k_reverse[..., j] acts at lag -(j+1)), else None. When no filter parameter
        requires grad (frozen), the result is cached per length
        (:class:`~spadeformer.ssm.base.FrozenCache` says when an entry is stale); the
        tensors returned are the caller's own copies.
        """
        k, k_rev = self._filters(length)
        return k.clone(), None if k_rev is None else k_rev.clone()

    def _filters(self, length: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """:meth:`filters` without the copies (forward only reads them)."""
        check_positive("length", length)
        self._check_length(length)
        params = [*self.filter_mlp.parameters(), self.decay_rates]  # what the filters read

        def compute() -> tuple[torch.Tensor, torch.Tensor | None]:
            h = self._filters_at(torch.arange(length, device=params[0].device))
            return h[0], (h[1] if self.bidirectional else None)

        return self._filter_cache.get_when_frozen((length,), params, compute)

    def _check_length(self, length: int) -> None:
        if self.max_length is not None and length > self.max_length:
            raise ValueError(
                f"sequence length {length} exceeds max_length={self.max_length} of this Hyena; "
                "use sequences of at most max_length tokens or build it with a larger max_length "
                "(or max_length=None for any length)"
            )

    # ------------------------------------------------------------------ forward
    def _short_conv_padding(self) -> tuple[int, int]:
        K = self.short_filter_size
        if self.bidirectional:
            return (K - 1) // 2, K - 1 - (K - 1) // 2  # centred (for even K: one more ahead)
        return K - 1, 0  # causal

    def _project(self, u: torch.Tensor, padding_mask: torch.Tensor | None) -> torch.Tensor:
        """u (B, L, d) -> in_proj output (B, (N+1) d, L), zero at padded positions."""
        z = self.in_proj(u)
        if padding_mask is not None:
            z = z.masked_fill(padding_mask.unsqueeze(-1), 0.0)  # the bias must not leak
        return rearrange(z, "b l c -> b c l")

    def _forward(self, u: torch.Tensor, padding_mask: torch.Tensor | None) -> torch.Tensor:
        """u: (batch, length, d_model) float32 -> (batch, length, d_model)."""
        L = u.shape[1]
        self._check_length(L)
        z = self._project(u, padding_mask)  # (B, C, L)
        z = self.short_conv(F.pad(z, self._short_conv_padding()))  # (B, C, L)
        *gates, v = z.split(self.d_model, dim=1)  # N gates and v, each (B, d, L)
        k, k_rev = self._filters(L)  # (N-1, d, L) each
        for i in range(self.order - 1):
            v = self.dropout(gates[i + 1] * v)
            conv = fft_conv(v, k[i], None if k_rev is None else k_rev[i], padding_mask)
            v = conv + self.filter_bias[i, :, None] * v
        y = gates[0] * v  # (B, d, L)
        return self.out_proj(rearrange(y, "b d l -> b l d"))

    def _forward_ref(self, u: torch.Tensor, padding_mask: torch.Tensor | None) -> torch.Tensor:
        """Reference twin of ``_forward``: explicit short-conv sum and Toeplitz long conv, O(L^2).

        u: (batch, length, d_model) -> (batch, length, d_model). For tests only.
        """
        B, L, _ = u.shape
        self._check_length(L)
        p = self._project(u, padding_mask)  # (B, C, L)
        left, _ = self._short_conv_padding()
        w = self.short_conv.weight[:, 0, :]  # (C, K)
        z = self.short_conv.bias[None, :, None].expand_as(p).clone()
        for j in range(self.short_filter_size):
            src = torch.arange(L, device=u.device) + j - left  # z[t] += w_j p[t + j - left]
            ok = (src >= 0) & (src < L)
            z[..., ok] = z[..., ok] + w[None, :, j, None] * p[..., src[ok]]
        *gates, v = z.split(self.d_model, dim=1)
        h = self._filters_at(torch.arange(L, device=u.device))  # (r, N-1, d, L)
        for i in range(self.order - 1):
            v = self.dropout(gates[i + 1] * v)
            k_rev = h[1, i] if self.bidirectional else None
            v = fft_conv_ref(v, h[0, i], k_rev, padding_mask) + self.filter_bias[i, :, None] * v
        y = rearrange(gates[0] * v, "b d l -> b l d")
        y = self.out_proj(y)
        if padding_mask is not None:
            y = y.masked_fill(padding_mask.unsqueeze(-1), 0.0)
        return y

    # ------------------------------------------------------------------ decoding
    def initial_state(
        self, batch_size: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Empty decoding state (causal only).

        Returns (conv_buffer (B, (N+1) d, K-1), history (B, N-1, d, 0), filter (N-1, d, 0)).
        The history of long-conv inputs and the filter values grow by one column per step:
        Hyena has no constant-size recurrent state, so step t costs O(t d) (a dot product over
        the whole history) and the state holds O(t d) numbers after t steps.
        """
        check_positive("batch_size", batch_size)
        if self.bidirectional:
            raise RuntimeError(
                "initial_state() needs a causal model, but this Hyena has bidirectional=True; "
                "build it with bidirectional=False"
            )
        ref = self.in_proj.weight
        C, d, K, o = self.in_proj.out_features, self.d_model, self.short_filter_size, self.order - 1
        return (
            torch.zeros(batch_size, C, K - 1, device=ref.device, dtype=ref.dtype),
            torch.zeros(batch_size, o, d, 0, device=ref.device, dtype=ref.dtype),
            torch.zeros(o, d, 0, device=ref.device, dtype=ref.dtype),
        )

    def _check_state(self, state: Any, batch: int) -> tuple[torch.Tensor, ...]:
        C, d, K, o = self.in_proj.out_features, self.d_model, self.short_filter_size, self.order - 1
        ok = isinstance(state, (tuple, list)) and len(state) == 3 and all(
            isinstance(s, torch.Tensor) for s in state
        )
        if ok:
            buf, hist, filt = state
            t = hist.shape[-1] if hist.dim() == 4 else -1
            ok = (
                tuple(buf.shape) == (batch, C, K - 1)
                and tuple(hist.shape) == (batch, o, d, t)
                and tuple(filt.shape) == (o, d, t)
            )
        if not ok:
            got = (
                [tuple(s.shape) if isinstance(s, torch.Tensor) else type(s).__name__ for s in state]
                if isinstance(state, (tuple, list))
                else type(state).__name__
            )
            raise ValueError(
                f"state must be (conv_buffer ({batch}, {C}, {K - 1}), history ({batch}, {o}, {d}, "
                f"t), filter ({o}, {d}, t)) as made by initial_state({batch}), got {got}"
            )
        return buf, hist, filt

    def _step(
        self, x_t: torch.Tensor, state: Any
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """x_t: (batch, d_model) -> y_t: (batch, d_model), state with the history one longer.

        Cost O(t) per token (see ``initial_state``): y_t = sum_{s<=t} h(t-s) v[s].
        """
        buf, hist, filt = self._check_state(state, x_t.shape[0])
        t = hist.shape[-1]
        self._check_length(t + 1)
        window = torch.cat([buf, self.in_proj(x_t).unsqueeze(-1)], dim=-1)  # (B, C, K)
        z = (window * self.short_conv.weight[:, 0, :]).sum(-1) + self.short_conv.bias  # (B, C)
        *gates, v = z.split(self.d_model, dim=1)  # each (B, d)
        h_t = self._filters_at(torch.tensor([t], device=x_t.device))[0]  # (N-1, d, 1)
        filt = torch.cat([filt, h_t.to(filt.dtype)], dim=-1)  # (N-1, d, t+1)
        new_hist = []
        for i in range(self.order - 1):
            v = self.dropout(gates[i + 1] * v)
            hist_i = torch.cat([hist[:, i], v.unsqueeze(-1)], dim=-1)  # (B, d, t+1)
            new_hist.append(hist_i)
            # filt[..., j] is h(j); history index s pairs with lag t - s.
            v = (hist_i * filt[i].flip(-1)).sum(-1) + self.filter_bias[i] * v
        y = self.out_proj(gates[0] * v)
        return y, (window[..., 1:], torch.stack(new_hist, dim=1), filt)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, order={self.order}, filter_order={self.filter_order}, "
            f"short_filter_size={self.short_filter_size}, max_length={self.max_length}, "
            f"emb_dim={self.emb_dim}, time_scale={self.time_scale}, lr={self.lr}"
        )
