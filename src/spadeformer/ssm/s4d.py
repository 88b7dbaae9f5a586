"""S4D: the diagonal state space model (Gu, Gupta, Goel, Re 2022, "On the Parameterization and
Initialization of Diagonal State Space Models") as a SPADE global information extractor.

Per feature h (H = d_model of them) a diagonal SSM with N = d_state complex states in N/2
conjugate pairs; only one member of each pair is stored and the output takes 2 Re(.):

    x'(t) = Lambda x(t) + B u(t),   y(t) = 2 Re(C x(t)) + D u(t)      Lambda, B, C: (N/2,)

    Lambda_n = -exp(log_A_real_n) + i A_imag_n      (real part < 0 by construction: stable)
    S4D-Lin:  Lambda_n = -1/2 + i pi n
    S4D-Inv:  Lambda_n = -1/2 + i (N / pi) (N / (2n + 1) - 1)         n = 0 .. N/2 - 1
    B = 1, C ~ complex normal, D ~ normal, dt log-uniform in [dt_min, dt_max] (one per h).

Discretisation with step dt (S4D paper Sec. 3.2):

    ZOH:       z = exp(dt Lambda),                       Bbar = (z - 1) / Lambda * B
    bilinear:  z = (1 + dt Lambda/2) / (1 - dt Lambda/2), Bbar = dt B / (1 - dt Lambda/2)

and the convolution kernel is K[l] = 2 Re(sum_n C_n Bbar_n z_n^l) (ops/vandermonde.py).
``channels`` > 1 gives several C (and D) per feature, i.e. several kernels, as in S4.

The block (same as S4, so that S4 and S4D are interchangeable in a layer):

    y = output_linear(dropout(GELU(K * u + D u)))      output_linear: Linear(channels*H, H)

Bidirectional: a second set of C (``C_reverse``, same Lambda, B, dt) gives ``k_reverse`` and

    (K * u)[t] = sum_{s <= t} k[t - s] u[s] + sum_{s > t} k_reverse[s - t - 1] u[s]

(ops/fftconv.py): the reverse part is the same SSM run backwards over the *later* tokens only,
so the current token is counted once (by k[0] and D).

``kernel(L)`` is the causal kernel (channels, H, L); ``kernels(L)`` gives (k, k_reverse or
None). ``continuous_parameters()`` returns (A, B, C, dt) with the conjugate pairs written out.

Frozen (``trainable=False``): every parameter has requires_grad False and the kernels are
cached per (length, device, dtype) -- in fact whenever none of the kernel's parameters
requires grad; the cache is dropped when one of them is modified in place (e.g.
``load_state_dict``, tracked by the tensors' version counters) or moved / cast.

Complex parameters (B, C) are stored as real (..., 2) tensors (``torch.view_as_real``) so
that optimisers, safetensors and DDP only ever see real tensors.
"""

from __future__ import annotations

import math

import torch
from einops import rearrange
from torch import nn

from spadeformer.ops.fftconv import fft_conv
from spadeformer.ops.vandermonde import vandermonde_kernel
from spadeformer.ssm.base import (
    CachedKernels,
    FrozenCache,
    GlobalExtractor,
    check_dropout,
    check_dt_range,
    check_lr,
    check_positive,
    check_state,
    check_state_size,
    mark_no_weight_decay,
    mark_ssm_params,
)

__all__ = ["S4D"]

INITS = ("inv", "lin")
DISCRETIZATIONS = ("zoh", "bilinear")
_MAX_CACHED_LENGTHS = 16


def with_conjugates(C: torch.Tensor, C_reverse: torch.Tensor | None) -> torch.Tensor:
    """Stored output matrices -> complex ones with the conjugate partners written out.

    C, C_reverse: real views (..., n, 2) of the kept half of each conjugate pair. Returns
    [C, conj(C)] (..., 2n) complex; with C_reverse, both stacked: (2, ..., 2n), [0] = forward.
    """
    Cs = [torch.view_as_complex(c) for c in (C, C_reverse) if c is not None]
    Cs = [torch.cat([c, c.conj()], dim=-1) for c in Cs]
    return torch.stack(Cs) if C_reverse is not None else Cs[0]


def log_uniform_dt(n: int, dt_min: float, dt_max: float) -> torch.Tensor:
    """(n,) log dt, uniform in [log dt_min, log dt_max] (S4 / S4D / S5 initialisation)."""
    lo, hi = math.log(dt_min), math.log(dt_max)
    return torch.rand(n, dtype=torch.float64) * (hi - lo) + lo


class S4D(CachedKernels, GlobalExtractor):
    """Diagonal SSM (S4D) with the S4 output block. See the module docstring.

    Args:
        d_model: H, features in and out.
        d_state: N, the (real) state size: N/2 complex conjugate pairs; must be even.
        channels: kernels per feature (output_linear mixes channels * H -> H).
        bidirectional: add the anti-causal kernel (no step() then).
        trainable: False freezes everything at initialisation (and caches kernels).
        init: "inv" (S4D-Inv) or "lin" (S4D-Lin) imaginary parts.
        discretization: "zoh" or "bilinear".
        dt_min, dt_max: range of the log-uniform step size.
        lr: learning rate hint for Lambda, B and log_dt (None = the global SSM lr).
        dropout: after the GELU.
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 64,
        channels: int = 1,
        bidirectional: bool = False,
        trainable: bool = True,
        init: str = "inv",
        discretization: str = "zoh",
        dt_min: float = 1e-3,
        dt_max: float = 1e-1,
        lr: float | None = None,
        dropout: float = 0.0,
    ):
        super().__init__(d_model, bidirectional=bidirectional, trainable=trainable)
        check_state_size(
            d_state, 2, "d_state must be even (N/2 complex conjugate pairs), got d_state={d_state}"
        )
        check_positive("channels", channels)
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        if discretization not in DISCRETIZATIONS:
            raise ValueError(
                f"discretization must be one of {DISCRETIZATIONS}, got {discretization!r}"
            )
        check_dt_range(dt_min, dt_max)
        check_lr(lr)
        check_dropout(dropout)
        self.d_state, self.channels = d_state, channels
        self.init, self.discretization = init, discretization
        H, N, n2 = d_model, d_state, d_state // 2

        n = torch.arange(n2, dtype=torch.float64)
        if init == "lin":
            imag = math.pi * n
        else:  # S4D-Inv: approximates the imaginary parts of diagonalised HiPPO-LegS
            imag = (N / math.pi) * (N / (2 * n + 1) - 1)
        self.log_A_real = nn.Parameter(torch.full((H, n2), math.log(0.5)))
        self.A_imag = nn.Parameter(imag.expand(H, n2).float().clone())
        self.B = nn.Parameter(torch.view_as_real(torch.ones(H, n2, dtype=torch.cfloat)).clone())
        self.C = nn.Parameter(torch.view_as_real(torch.randn(channels, H, n2, dtype=torch.cfloat)))
        if bidirectional:
            self.C_reverse = nn.Parameter(
                torch.view_as_real(torch.randn(channels, H, n2, dtype=torch.cfloat))
            )
        self.D = nn.Parameter(torch.randn(channels, H))
        self.log_dt = nn.Parameter(log_uniform_dt(H, dt_min, dt_max).float())
        mark_ssm_params(self, ("log_A_real", "A_imag", "B", "log_dt"), lr)
        mark_no_weight_decay(self, ("D",))  # a skip per channel, not a weight

        self.activation = nn.GELU()
        self.dropout = nn.Dropout(dropout)
        self.output_linear = nn.Linear(channels * H, H)
        self._cache = FrozenCache(_MAX_CACHED_LENGTHS)
        self.freeze_if_requested()

    # ------------------------------------------------------------------ parameters
    def _lambda(self) -> torch.Tensor:
        """(H, N/2) complex continuous eigenvalues, real part -exp(log_A_real) < 0."""
        return torch.complex(-torch.exp(self.log_A_real), self.A_imag)

    def _discrete(self) -> tuple[torch.Tensor, torch.Tensor]:
        """z (H, N/2) and Bbar (H, N/2), complex: the discretised diagonal system."""
        Lam = self._lambda()
        B = torch.view_as_complex(self.B)
        dtL = torch.exp(self.log_dt).unsqueeze(-1) * Lam
        if self.discretization == "zoh":
            z = torch.exp(dtL)
            # (z - 1) / Lambda, with expm1: z - 1 cancels badly in fp32 when |dt Lambda| << 1.
            # Lambda != 0 since its real part is < 0.
            Bbar = torch.expm1(dtL) / Lam * B
        else:
            denom = 1 - dtL / 2
            z = (1 + dtL / 2) / denom
            Bbar = torch.exp(self.log_dt).unsqueeze(-1) * B / denom
        return z, Bbar

    def _C_all(self) -> torch.Tensor:
        """(directions * channels, H, N/2) complex: C, then C_reverse when bidirectional."""
        C = torch.view_as_complex(self.C)
        if self.bidirectional:
            C = torch.cat([C, torch.view_as_complex(self.C_reverse)], dim=0)
        return C

    def continuous_parameters(
        self,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(A, B, C, dt) of the full N-state complex diagonal system, detached, for inspection.

        The conjugate partners are written out, so x' = diag(A) x + B u, y = C x is a system
        with real output and no 2 Re(.):

            A:  (H, N) complex, the diagonal of the state matrix: [Lambda, conj(Lambda)]
            B:  (H, N) complex, [B, conj(B)]
            C:  (channels, H, N) complex, [C, conj(C)]; bidirectional: (2, channels, H, N)
                with C[0] the forward and C[1] the reverse output matrix
            dt: (H,) real step sizes
        """
        with torch.no_grad():
            Lam = self._lambda()
            B = torch.view_as_complex(self.B)
            C = with_conjugates(self.C, self.C_reverse if self.bidirectional else None)
            A = torch.cat([Lam, Lam.conj()], dim=-1)
            return A, torch.cat([B, B.conj()], dim=-1), C, torch.exp(self.log_dt)

    # ---------------------------------------------------------------------- kernel
    def _compute_kernels(self, length: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        z, Bbar = self._discrete()
        Ct = self._C_all() * Bbar  # (directions * channels, H, N/2)
        K = vandermonde_kernel(Ct, z, length)  # one call for both directions
        if self.bidirectional:
            k, k_rev = K.chunk(2, dim=0)
            return k, k_rev
        return K, None

    def _kernel_params(self) -> list[nn.Parameter]:
        """The parameters the kernel depends on (not D or output_linear)."""
        names = ["log_A_real", "A_imag", "B", "C", "log_dt"]
        names += ["C_reverse"] if self.bidirectional else []
        return [getattr(self, n) for n in names]

    # --------------------------------------------------------------------- forward
    def _output(self, y: torch.Tensor) -> torch.Tensor:
        """(batch, channels, H) or (batch, length, channels, H) -> same without channels."""
        y = self.dropout(self.activation(y))
        return self.output_linear(y.flatten(-2))

    def _forward(self, u: torch.Tensor, padding_mask: torch.Tensor | None) -> torch.Tensor:
        """u: (batch, length, H) float (padded positions zero) -> (batch, length, H)."""
        L = u.shape[1]
        k, k_rev = self._kernels(L)  # (channels, H, L) each
        u_t = rearrange(u, "b l h -> b 1 h l")
        y = fft_conv(u_t, k, k_rev, padding_mask=padding_mask)  # (b, channels, h, l)
        y = y + self.D.unsqueeze(-1) * u_t
        return self._output(rearrange(y, "b c h l -> b l c h"))

    # ----------------------------------------------------------------- recurrence
    def initial_state(self, batch_size: int) -> torch.Tensor:
        """Zero state, (batch, H, N/2) complex, on the parameters' device."""
        check_positive("batch_size", batch_size)
        dtype = torch.complex128 if self.log_dt.dtype == torch.float64 else torch.complex64
        return torch.zeros(
            batch_size, self.d_model, self.d_state // 2, dtype=dtype, device=self.log_dt.device
        )

    def _step(self, x_t: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x_t: (batch, H); state (batch, H, N/2) -> y_t (batch, H), new state.

        x_k = z x_{k-1} + Bbar u_k,  y_k = 2 Re(C x_k) + D u_k: the kernel form unrolled.
        """
        check_state(state, (x_t.shape[0], self.d_model, self.d_state // 2),
                    "batch, d_model, d_state / 2")
        z, Bbar = self._discrete()
        state = z * state + Bbar * x_t.unsqueeze(-1)
        C = torch.view_as_complex(self.C)  # (channels, H, N/2)
        y = 2 * torch.einsum("chn,bhn->bch", C, state).real + self.D * x_t.unsqueeze(1)
        return self._output(y), state

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, d_state={self.d_state}, channels={self.channels}, "
            f"init={self.init!r}, discretization={self.discretization!r}"
        )
