"""Mega's multi-dimensional damped exponential moving average (Ma et al. 2022, "Mega: Moving
Average Equipped Gated Attention", Sec. 3.1) as a global information extractor.

Each feature c (d_model of them) is expanded into h = ``n_dims`` EMA dimensions j:

    u_t[c, j] = beta[c, j] x_t[c]
    s_t[c, j] = alpha[c, j] u_t[c, j] + (1 - alpha[c, j] delta[c, j]) s_(t-1)[c, j]
    y_t[c]    = sum_j eta[c, j] s_t[c, j] / sqrt(h)  +  omega[c] x_t[c]

alpha = sigmoid(alpha_logit) and delta = sigmoid(delta_logit) keep the decay
q = 1 - alpha delta inside (0, 1), so the EMA is stable by construction. Unrolled, the EMA is a
convolution with the kernel

    K[c, l] = sum_j (eta[c, j] / sqrt(h)) alpha[c, j] beta[c, j] q[c, j]^l

(:func:`spadeformer.ops.vandermonde.decay_kernel`, then the FFT convolution). The 1 / sqrt(h)
and omega (a learned skip) are the reference code's; so is the initialisation: alpha_logit,
delta_logit ~ N(0, 0.2^2), beta ~ N(+-1, 0.02^2) with alternating signs, eta, omega ~ N(0, 1).

Bidirectional: a second parameter set (index 1 of every (2, d_model, h) parameter) runs the EMA
backwards over the *later* tokens only, as the reference's ``shift=True``:

    (K * x)[t] = sum_{s <= t} k[t - s] x[s] + sum_{s > t} k_reverse[s - t - 1] x[s]

with k_reverse[m] = sum_j (eta'/sqrt(h)) alpha' beta' q'^(m + 1), so the current token is
counted once (by k[0] and omega).

Mega applies SiLU to this output inside its layer (:class:`spadeformer.mega.MegaLayer`); the
module itself is linear, so it also fits a SPADE global layer (``ssm="ema"``).

Frozen (``trainable=False``): every parameter has requires_grad False and kernels are cached
per length (:class:`~spadeformer.ssm.base.FrozenCache`).
"""

from __future__ import annotations

import math

import torch
from einops import rearrange
from torch import nn

from spadeformer.ops.fftconv import fft_conv
from spadeformer.ops.vandermonde import decay_kernel
from spadeformer.ssm.base import (
    CachedKernels,
    FrozenCache,
    GlobalExtractor,
    check_lr,
    check_positive,
    check_state,
    mark_ssm_params,
)

__all__ = ["MultiHeadEMA"]

_MAX_CACHED_LENGTHS = 16


class MultiHeadEMA(CachedKernels, GlobalExtractor):
    """Mega's damped EMA. See the module docstring.

    Args:
        d_model: features in and out.
        n_dims: h, EMA dimensions per feature (Mega's ``ndim``; its LRA configs use 16).
        bidirectional: add the backward EMA over later tokens (no step() then).
        trainable: False freezes everything at initialisation (and caches kernels).
        lr: learning-rate hint for alpha, delta and beta (None = the optimiser's ssm_lr).
    """

    def __init__(self, d_model: int, n_dims: int = 16, bidirectional: bool = False,
                 trainable: bool = True, lr: float | None = None):
        super().__init__(d_model, bidirectional=bidirectional, trainable=trainable)
        check_positive("n_dims", n_dims)
        check_lr(lr)
        self.n_dims = n_dims
        directions = 2 if bidirectional else 1
        shape = (directions, d_model, n_dims)
        self.alpha_logit = nn.Parameter(torch.randn(shape) * 0.2)
        self.delta_logit = nn.Parameter(torch.randn(shape) * 0.2)
        # beta = [1, -1, 1, -1, ...] plus a little noise (the reference finds it more stable)
        signs = torch.ones(n_dims)
        signs[1::2] = -1.0
        self.beta = nn.Parameter(torch.randn(shape) * 0.02 + signs)
        self.eta = nn.Parameter(torch.randn(shape))
        self.omega = nn.Parameter(torch.randn(d_model))
        # alpha, delta, beta are the EMA's dynamics (like S4's A, B, dt): no weight decay
        mark_ssm_params(self, ("alpha_logit", "delta_logit", "beta"), lr)
        self._cache = FrozenCache(_MAX_CACHED_LENGTHS)
        self.freeze_if_requested()

    # ----------------------------------------------------------------------- parameters
    def coefficients(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(input weight alpha beta, decay q = 1 - alpha delta, output weight eta / sqrt(h)),
        each (directions, d_model, n_dims); directions = 2 when bidirectional ([1] = reverse)."""
        alpha = torch.sigmoid(self.alpha_logit)
        q = 1.0 - alpha * torch.sigmoid(self.delta_logit)
        return alpha * self.beta, q, self.eta / math.sqrt(self.n_dims)

    # --------------------------------------------------------------------------- kernel
    def _compute_kernels(self, length: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        b, q, c = self.coefficients()
        k = decay_kernel(c[0] * b[0], q[0], length).unsqueeze(0)  # (1, d, L)
        if not self.bidirectional:
            return k, None
        # reverse direction: lag m >= 1 uses q'^m, stored at index m - 1 (the shift)
        k_rev = decay_kernel(c[1] * b[1] * q[1], q[1], length).unsqueeze(0)
        return k, k_rev

    def _kernel_params(self) -> list[nn.Parameter]:
        return [self.alpha_logit, self.delta_logit, self.beta, self.eta]

    # -------------------------------------------------------------------------- forward
    def _forward(self, u: torch.Tensor, padding_mask: torch.Tensor | None) -> torch.Tensor:
        """u: (batch, length, d_model) float (padded positions zero) -> same shape."""
        k, k_rev = self._kernels(u.shape[1])
        y = fft_conv(rearrange(u, "b l d -> b d l"), k[0],
                     None if k_rev is None else k_rev[0], padding_mask=padding_mask)
        return rearrange(y, "b d l -> b l d") + self.omega * u

    # ----------------------------------------------------------------------- recurrence
    def initial_state(self, batch_size: int) -> torch.Tensor:
        """Zero EMA state s, (batch, d_model, n_dims), on the parameters' device."""
        check_positive("batch_size", batch_size)
        p = self.eta
        return torch.zeros(batch_size, self.d_model, self.n_dims, dtype=p.dtype, device=p.device)

    def _step(self, x_t: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x_t (batch, d_model), state (batch, d_model, n_dims) -> y_t, new state: the
        recurrence of the module docstring, one token."""
        check_state(state, (x_t.shape[0], self.d_model, self.n_dims), "batch, d_model, n_dims")
        b, q, c = (t[0] for t in self.coefficients())
        state = q * state + b * x_t.unsqueeze(-1)
        return (state * c).sum(-1) + self.omega * x_t, state

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, n_dims={self.n_dims}"
