"""S4, the structured state space sequence model SPADE uses as its global extractor.

Continuous SSM (SPADE paper Eq. 1-2), one per feature h of d_model:

    x'(t) = A x(t) + B u(t),   y(t) = C x(t) + D u(t)

with A initialised as HiPPO-LegS (paper Eq. 5), written in normal plus low-rank (NPLR) form
A = V (Lambda - p p^*) V^* (Gu et al. 2022, "Efficiently Modeling Long Sequences with
Structured State Spaces", Sec. 3). Only half of each conjugate pair of Lambda, p, B, C is
stored. It is discretised with the bilinear method (paper Eq. 3). The layer output is either the
S4 paper's block (``pointwise=True``, the default: what the ``s4`` baseline stacks)

    y = output_linear(dropout(GELU(K * u + D u)))      output_linear: channels*d_model -> d_model

or the SSM output itself (``pointwise=False``), y = K * u + D u: the official SPADE code builds
its global layer's S4 without the pointwise block (its S4 has ``use_pointwise=False``), since the
global layer's own mixing projection W follows. Here K * u is the causal long convolution
with the kernel K_k = C Abar^k Bbar (paper Eq. 4), one kernel per channel. With
``bidirectional=True`` a second set of C (the official S4 doubles the channels) gives a
reverse kernel K_rev of the same SSM, and

    (K * u)[t] = sum_{s <= t} K[t - s] u[s]  +  sum_{s > t} K_rev[s - t - 1] u[s]
               = forward-direction part      +  reversed-direction part

The reversed part never touches lag 0 (the current token is counted once, by K), see
:func:`spadeformer.ops.fftconv.fft_conv`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from spadeformer.ops.fftconv import fast_fft_length, fft_conv, fft_conv_spectrum, kernel_spectrum
from spadeformer.ops.ssm_kernels import (
    discretize_bilinear,
    hippo_legs_nplr,
    nplr_real_form,
    nplr_real_output,
    s4_kernel,
)
from spadeformer.ssm.base import (
    FrozenCache,
    GlobalExtractor,
    check_dropout,
    check_lr,
    check_positive,
    check_state,
    check_state_size,
    default_device,
    mark_no_weight_decay,
    mark_ssm_params,
)

__all__ = ["S4"]

# Names of the SSM parameters that get the optimiser hint (A, B and dt, as the official
# `--s4-lr` option does); C, D and output_linear (when pointwise) are ordinary weights.
_HINTED = ("log_neg_lambda_re", "lambda_im", "P", "B", "log_dt")


class S4(GlobalExtractor):
    """S4 layer (HiPPO-LegS init, bilinear discretisation, FFT convolution).

    Args:
        d_model: number of features H; each feature has its own SSM (per-feature Lambda, P, B
            and dt, all initialised to the same HiPPO-LegS matrices, dt drawn per feature).
        d_state: state size N (even: conjugate pairs are stored as N/2 complex numbers).
        channels: number of output kernels per feature (the official S4's ``channels``); the
            output block mixes channels * d_model features back to d_model.
        bidirectional: add an anti-causal kernel (second set of C), see the module docstring.
        trainable: False freezes every parameter at initialisation (as the paper does for
            WikiText-103 and pre-training). The convolution kernel of a frozen module is then a
            constant: it and its FFT are computed once per (length, device, dtype) and
            cached (up to ``kernel_cache_size`` lengths, least recently used dropped), and the
            convolution's backward then needs no kernel gradient (two real FFTs). Entries
            follow the parameters' storage, layout and version counters
            (:class:`~spadeformer.ssm.base.FrozenCache`), so ``load_state_dict`` and
            ``torch.func.functional_call`` do not see a stale kernel; ``.to()``, ``.double()``
            etc. clear it. Edits through ``param.data`` are invisible to the version
            counters: call :meth:`clear_cache` after those.
        dt_min, dt_max: step sizes are drawn log-uniformly in [dt_min, dt_max].
        lr: learning rate hint for the SSM parameters (Lambda, P, B, log_dt), stored as
            ``param._optim = {"lr": lr, "weight_decay": 0.0}``; None means "the global ssm_lr"
            of :func:`spadeformer.training.optim.param_groups`.
        dropout: dropout after the GELU (pointwise block only).
        pointwise: True = GELU, dropout and ``output_linear`` after the convolution (S4 paper);
            False = return K * u + D u as it is (the official SPADE global layer; SPADE presets
            use it). False needs ``channels=1`` (nothing would mix the channels back) and
            ``dropout=0``.
    """

    kernel_cache_size = 8

    def __init__(
        self,
        d_model: int,
        d_state: int = 64,
        channels: int = 1,
        bidirectional: bool = False,
        trainable: bool = True,
        dt_min: float = 1e-3,
        dt_max: float = 1e-1,
        lr: float | None = None,
        dropout: float = 0.0,
        pointwise: bool = True,
    ):
        super().__init__(d_model, bidirectional=bidirectional, trainable=trainable)
        if not isinstance(pointwise, bool):
            raise TypeError(f"pointwise must be a bool, got {pointwise!r}")
        check_state_size(
            d_state,
            2,
            "d_state must be even (conjugate pairs are stored as d_state/2 complex numbers), "
            "got {d_state}",
        )
        check_positive("channels", channels)
        check_positive("dt_min", dt_min, allow_float=True)
        check_positive("dt_max", dt_max, allow_float=True)
        # Not check_dt_range: S4 words this error its own way ("got dt_min=.., dt_max=.."),
        # and that message is pinned by its tests.
        if dt_min > dt_max:
            raise ValueError(f"dt_min must be <= dt_max, got dt_min={dt_min}, dt_max={dt_max}")
        check_dropout(dropout)
        check_lr(lr)
        if not pointwise and channels != 1:
            raise ValueError(f"pointwise=False needs channels=1 (no output_linear would mix the "
                             f"channels back to d_model), got channels={channels}")
        if not pointwise and dropout > 0:
            raise ValueError(f"dropout acts in the pointwise block only; with pointwise=False "
                             f"it must be 0, got dropout={dropout}")
        self.pointwise = pointwise
        self.d_state = d_state
        self.channels = channels
        H, n = d_model, d_state // 2
        n_kernels = 2 * channels if bidirectional else channels

        # HiPPO-LegS in NPLR form, paper Eq. 5: A = V (diag(Lambda) - p p^*) V^*.
        Lambda, P, B, V = (t.to(default_device()) for t in hippo_legs_nplr(d_state))
        # Re(Lambda) is kept negative (stable SSM) by storing log(-Re Lambda), as official S4.
        self.log_neg_lambda_re = nn.Parameter(_per_feature(torch.log(-Lambda.real), H))
        self.lambda_im = nn.Parameter(_per_feature(Lambda.imag, H))
        # Complex parameters are stored as real views (..., 2) so .double()/.float() work.
        self.P = nn.Parameter(_per_feature(torch.view_as_real(P), H))  # (H, n, 2)
        self.B = nn.Parameter(_per_feature(torch.view_as_real(B), H))  # (H, n, 2)
        log_dt = torch.rand(H, dtype=torch.float64) * (math.log(dt_max) - math.log(dt_min))
        self.log_dt = nn.Parameter((log_dt + math.log(dt_min)).float())  # (H,)
        C = torch.randn(n_kernels, H, n, dtype=torch.complex64)
        self.C = nn.Parameter(torch.view_as_real(C).contiguous())  # (n_kernels, H, n, 2)
        self.D = nn.Parameter(torch.randn(channels, H))
        # Eigenbasis of the normal part, kept only to map back to the HiPPO basis
        # (continuous_parameters). Persistent so the mapping stays valid after loading.
        self.register_buffer("hippo_V", torch.view_as_real(V).contiguous())  # (N, n, 2) f64
        if pointwise:
            self.dropout = nn.Dropout(dropout)
            self.output_linear = nn.Linear(channels * H, H)

        mark_ssm_params(self, _HINTED, lr)
        mark_no_weight_decay(self, ("D",))  # a skip per channel, not a weight
        # kernels and spectra of kernel_cache_size lengths, plus the recurrent matrices
        self._cache = FrozenCache(2 * self.kernel_cache_size + 1)
        self.freeze_if_requested()

    # ------------------------------------------------------------------ parameters

    def _ssm_parameters(self) -> list[nn.Parameter]:
        return [self.log_neg_lambda_re, self.lambda_im, self.P, self.B, self.log_dt, self.C]

    def _nplr(self) -> tuple[torch.Tensor, ...]:
        """Lambda, P, B (H, n), C (S, H, n) complex and dt (H,) real, in the compute dtype."""
        rd = self._compute_dtype()
        Lambda = torch.complex(-torch.exp(self.log_neg_lambda_re.to(rd)), self.lambda_im.to(rd))
        P = torch.view_as_complex(self.P.to(rd))
        B = torch.view_as_complex(self.B.to(rd))
        C = torch.view_as_complex(self.C.to(rd))
        dt = torch.exp(self.log_dt.to(rd))
        return Lambda, P, B, C, dt

    def continuous_parameters(
        self,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The continuous SSM in the HiPPO basis, real, in the compute dtype.

        Returns A (d_model, N, N), B (d_model, N), C (S, d_model, N) with S = channels
        (2 * channels when bidirectional: rows [:channels] forward, [channels:] reverse) and
        dt (d_model,). At initialisation A and B are exactly paper Eq. 5 (up to fp32 rounding).
        The kernel of this module is C Abar^k Bbar with the bilinear Abar, Bbar of (A, B, dt).
        """
        Lambda, P, B, C, dt = self._nplr()
        A_r, B_r = nplr_real_form(Lambda, P, B)
        C_r = nplr_real_output(C)
        V = torch.view_as_complex(self.hippo_V.to(dt.dtype))  # (N, n)
        # x_hippo = V x_h + conj(V x_h) = W x_r with W = [2 Re V, -2 Im V]; V = [V, conj V] is
        # unitary, which gives W^{-1} = [Re V^T; -Im V^T].
        W = torch.cat([2 * V.real, -2 * V.imag], dim=-1)
        W_inv = torch.cat([V.real.T, -V.imag.T], dim=0)
        A = W @ A_r @ W_inv
        B_h = torch.einsum("mn,hn->hm", W, B_r)
        C_h = C_r @ W_inv
        return A, B_h, C_h, dt

    # ------------------------------------------------------------------ kernel

    def _cache_allowed(self) -> bool:
        # Only a constant kernel may be cached: frozen (no SSM parameter needs a gradient).
        return not any(p.requires_grad for p in self._ssm_parameters())

    def kernel(self, length: int) -> torch.Tensor:
        """Convolution kernels K_k = C Abar^k Bbar, k < length.

        Returns (channels, d_model, length); when bidirectional (2 * channels, d_model,
        length), rows [:channels] the forward kernels and [channels:] the reverse kernels
        (used at lags -1, -2, ..., see the module docstring). Compute dtype (float32, or float64
        after .double()). Frozen modules return a copy of a cached constant.
        """
        return self._kernel(length).clone() if self._cache_allowed() else self._kernel(length)

    def _kernel(self, length: int) -> torch.Tensor:
        """:meth:`kernel` without the copy of a cached kernel (forward only reads it)."""
        check_positive("length", length)
        if not self._cache_allowed():
            return s4_kernel(*self._nplr(), length)
        return self._cache.get(
            ("kernel", length), self._ssm_parameters(), lambda: s4_kernel(*self._nplr(), length)
        )

    def _spectrum(self, length: int) -> tuple[torch.Tensor, int, bool]:
        """Frozen modules only: the FFT of the (forward + reverse) kernel at the FFT length
        used for ``length`` tokens, cached like the kernel: a frozen global layer then costs
        two real FFTs forward and two backward per call. A frozen skip D is folded in (D u is
        a convolution with D at lag 0, whose spectrum is D at every frequency). Returns
        (spectrum, FFT length, whether D is folded in)."""
        n = fast_fft_length(2 * length)
        fold_d = not self.D.requires_grad

        def compute() -> torch.Tensor:
            # not self.kernel(): the forward pass needs only the spectrum, so the kernel is
            # not kept beside it (d_model x L floats per cached length)
            k = s4_kernel(*self._nplr(), length)
            if self.bidirectional:
                k_f = kernel_spectrum(k[: self.channels], n, k[self.channels :])
            else:
                k_f = kernel_spectrum(k, n)
            return k_f + self.D.to(k.dtype)[:, :, None] if fold_d else k_f

        params = self._ssm_parameters() + ([self.D] if fold_d else [])
        return self._cache.get(("spectrum", length, fold_d), params, compute), n, fold_d

    def clear_cache(self) -> None:
        """Drop cached kernels and recurrent matrices."""
        self._cache.clear()

    # ------------------------------------------------------------------ forward

    def _output(self, y: torch.Tensor) -> torch.Tensor:
        """(..., channels * d_model) SSM output -> (..., d_model)."""
        if not self.pointwise:
            return y  # channels == 1
        y = self.dropout(F.gelu(y))
        dtype = y.dtype  # keep the compute dtype even if the module was cast to half
        bias = self.output_linear.bias
        return F.linear(y, self.output_linear.weight.to(dtype), bias.to(dtype))

    def _forward(self, u: torch.Tensor, padding_mask: torch.Tensor | None) -> torch.Tensor:
        """u: (batch, length, d_model), padded positions zero -> (batch, length, d_model).

        u is float32 (float64 for float64 input); the work runs in the compute dtype.
        """
        dtype = self._compute_dtype()
        u = rearrange(u.to(dtype), "b l h -> b 1 h l")
        if self._cache_allowed():  # frozen: the kernel's spectrum is a cached constant
            k_f, n, d_folded = self._spectrum(u.shape[-1])
            y = fft_conv_spectrum(u, k_f, n, padding_mask=padding_mask)  # (B, channels, H, L)
        else:
            k = self._kernel(u.shape[-1])  # (S, H, L)
            k_fwd, k_rev = ((k[: self.channels], k[self.channels :]) if self.bidirectional
                            else (k, None))
            y = fft_conv(u, k_fwd, k_rev, padding_mask=padding_mask)  # (B, channels, H, L)
            d_folded = False
        if not d_folded:
            y = y + self.D.to(dtype)[:, :, None] * u  # skip term D u
        y = rearrange(y, "b c h l -> b l (c h)")
        return self._output(y)

    # ------------------------------------------------------------------ recurrent mode

    def initial_state(self, batch_size: int) -> torch.Tensor:
        """Zero state (batch_size, d_model, d_state), real, compute dtype.

        The state is (Re x_h, Im x_h) of the eigenbasis half state: fixed size, whatever the
        position.
        """
        check_positive("batch_size", batch_size)
        return torch.zeros(
            batch_size, self.d_model, self.d_state,
            device=self.log_dt.device, dtype=self._compute_dtype(),
        )

    def _step_matrices(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Abar (H, N, N), Bbar (H, N), C_r (S, H, N) in the real eigen coordinates.

        Cached while no gradient is needed (decoding), like the kernels.
        """

        def compute() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            Lambda, P, B, C, dt = self._nplr()
            A_r, B_r = nplr_real_form(Lambda, P, B)
            Abar, Bbar = discretize_bilinear(A_r, B_r, dt)
            return Abar, Bbar, nplr_real_output(C)

        params = self._ssm_parameters()
        if torch.is_grad_enabled() and any(p.requires_grad for p in params):
            return compute()
        return self._cache.get(("step",), params, compute)

    def _step(self, x_t: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x_t: (batch, d_model), state: (batch, d_model, d_state) -> y_t (batch, d_model), state.

        x_k = Abar x_{k-1} + Bbar u_k,  y_k = C x_k + D u_k (paper Eq. 3), then the output block.
        """
        check_state(state, (x_t.shape[0], self.d_model, self.d_state), "batch, d_model, d_state")
        dtype = self._compute_dtype()
        Abar, Bbar, C_r = self._step_matrices()
        u = x_t.to(dtype)
        state = torch.einsum("hmn,bhn->bhm", Abar, state.to(dtype)) + Bbar * u[:, :, None]
        y = torch.einsum("chn,bhn->bch", C_r, state) + self.D.to(dtype) * u[:, None, :]
        return self._output(rearrange(y, "b c h -> b (c h)")), state

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, d_state={self.d_state}, channels={self.channels}, "
            f"pointwise={self.pointwise}"
        )


def _per_feature(t: torch.Tensor, H: int) -> torch.Tensor:
    """Copy one HiPPO tensor to every feature: (...) -> (H, ...) contiguous float32."""
    return t.to(torch.float32).unsqueeze(0).expand(H, *t.shape).contiguous()
