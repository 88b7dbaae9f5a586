"""S5: the simplified (MIMO, diagonal) state space layer (Smith, Warrington, Linderman 2023,
"Simplified State Space Layers for Sequence Modeling") as a SPADE global information extractor.

One multi-input multi-output SSM over all H = d_model features with P = d_state real states,
kept as P/2 complex modes in conjugate pairs (S5 Sec. 4.3 "conjugate symmetry"):

    x_k = Lambda_bar x_{k-1} + B_bar u_k,     y_k = 2 Re(C x_k) + D u_k
    Lambda: (P/2,) complex, B: (P/2, H) complex, C: (H, P/2) complex, D: (H,) real

Initialisation (S5 Sec. 4.2 / App. B.1, "HiPPO-N"): Lambda are the eigenvalues of the normal
part of HiPPO-LegS (``hippo_legs_nplr``), optionally block-diagonal: ``blocks`` = J copies of
the P/J-state HiPPO-N, V = blockdiag(V_1 .. V_J) its unitary eigenvectors. B = V^H B0 and
C = C0 V with B0 (P, H) real and C0 (H, P) complex drawn LeCun-normal (the paper's default);
D ~ N(0, 1). One step size per state, log-uniform in [dt_min, dt_max]. Lambda is stored as
Re = -exp(log_Lambda_real) (always stable, like S4D) and Im = Lambda_imag.
Discretisation: ZOH (S5 Eq. 6), Lambda_bar = exp(dt Lambda), B_bar = (Lambda_bar - 1)/Lambda B.

The recurrence is evaluated over the whole sequence with the parallel associative scan
(ops/scan.py), O(L) work and O(log L) dependent steps, exactly the one that ``step()`` unrolls.

Bidirectional (S5 App. "bidirectional", as the reference implementation): the same Lambda,
B and dt are scanned a second time over the reversed sequence, with its own output matrix:

    x_fwd_t = Lambda_bar x_fwd_{t-1} + B_bar u_t      (tokens s <= t)
    x_bwd_t = Lambda_bar x_bwd_{t+1} + B_bar u_t      (tokens s >= t)
    y_t     = 2 Re(C x_fwd_t) + 2 Re(C_reverse x_bwd_t) + D u_t

so, unlike S4/S4D's reverse kernel, the backward scan *includes* the current token: u_t
reaches y_t through C B_bar, C_reverse B_bar and D.

Output block, the same as S4/S4D so that every SSM is a drop-in replacement in a layer:

    y = output_linear(dropout(GELU(ssm(u))))      output_linear: Linear(H, H)

Complex parameters are stored as real (..., 2) tensors (``torch.view_as_real``).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from spadeformer.ops.scan import associative_scan
from spadeformer.ops.ssm_kernels import hippo_legs_nplr
from spadeformer.ssm.base import (
    GlobalExtractor,
    check_dropout,
    check_dt_range,
    check_lr,
    check_positive,
    check_state,
    default_device,
    mark_no_weight_decay,
    mark_ssm_params,
)
from spadeformer.ssm.s4d import log_uniform_dt, with_conjugates

__all__ = ["S5", "hippo_n_init"]


def hippo_n_init(d_state: int, blocks: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-diagonal HiPPO-N: eigenvalues (P/2,) and eigenvectors V (P, P/2), complex128.

    Each of the ``blocks`` diagonal blocks is the (P/blocks)-state normal part of
    HiPPO-LegS, diagonalised; only the eigenvalue with positive imaginary part of each
    conjugate pair is kept, and V's columns are the matching (orthonormal) eigenvectors.
    """
    size = d_state // blocks
    Lam_b, _, _, V_b = hippo_legs_nplr(size)
    Lam = Lam_b.repeat(blocks)
    V = torch.block_diag(*([V_b] * blocks))
    return Lam, V


class S5(GlobalExtractor):
    """MIMO diagonal SSM computed with a parallel scan. See the module docstring.

    Args:
        d_model: H, features in and out.
        d_state: P, the real state size (P/2 complex conjugate pairs); a multiple of
            2 * blocks.
        bidirectional: add the backward scan (no step() then).
        trainable: False freezes every parameter at initialisation.
        dt_min, dt_max: range of the per-state log-uniform step size.
        lr: learning rate hint for Lambda, B and log_dt (None = the global SSM lr).
        dropout: after the GELU.
        blocks: J, number of HiPPO-N blocks on the diagonal of the initial Lambda.
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 64,
        bidirectional: bool = False,
        trainable: bool = True,
        dt_min: float = 1e-3,
        dt_max: float = 1e-1,
        lr: float | None = None,
        dropout: float = 0.0,
        blocks: int = 1,
    ):
        super().__init__(d_model, bidirectional=bidirectional, trainable=trainable)
        check_positive("d_state", d_state)
        check_positive("blocks", blocks)
        if d_state % (2 * blocks):
            raise ValueError(
                f"d_state must be a multiple of 2 * blocks (each of the blocks={blocks} HiPPO-N "
                f"blocks holds complex conjugate pairs), got d_state={d_state}"
            )
        check_dt_range(dt_min, dt_max)
        check_lr(lr)
        check_dropout(dropout)
        self.d_state, self.blocks = d_state, blocks
        H, P, p2 = d_model, d_state, d_state // 2

        Lam, V = (t.to(default_device()) for t in hippo_n_init(P, blocks))  # (P/2,), (P, P/2)
        B0 = torch.randn(P, H, dtype=torch.float64) / math.sqrt(H)  # LeCun normal, fan_in H
        B = V.conj().T @ B0.to(torch.complex128)  # (P/2, H)
        self.log_Lambda_real = nn.Parameter(torch.log(-Lam.real).float())
        self.Lambda_imag = nn.Parameter(Lam.imag.float())
        self.B = nn.Parameter(torch.view_as_real(B.to(torch.complex64)).clone())
        self.C = nn.Parameter(self._init_C(V))
        if bidirectional:
            self.C_reverse = nn.Parameter(self._init_C(V))
        self.D = nn.Parameter(torch.randn(H))
        self.log_dt = nn.Parameter(log_uniform_dt(p2, dt_min, dt_max).float())
        mark_ssm_params(self, ("log_Lambda_real", "Lambda_imag", "B", "log_dt"), lr)
        mark_no_weight_decay(self, ("D",))  # a skip per channel, not a weight

        self.activation = nn.GELU()
        self.dropout = nn.Dropout(dropout)
        self.output_linear = nn.Linear(H, H)
        self.freeze_if_requested()

    def _init_C(self, V: torch.Tensor) -> torch.Tensor:
        """C = C0 V, C0 (H, P) complex with LeCun-normal real and imaginary parts (fan_in P)."""
        P = V.shape[0]
        C0 = torch.randn(self.d_model, P, dtype=torch.complex128) * math.sqrt(2.0 / P)
        return torch.view_as_real((C0 @ V).to(torch.complex64)).clone()

    # ------------------------------------------------------------------ parameters
    def _lambda(self) -> torch.Tensor:
        """(P/2,) complex continuous eigenvalues, real part < 0."""
        return torch.complex(-torch.exp(self.log_Lambda_real), self.Lambda_imag)

    def _discrete(self) -> tuple[torch.Tensor, torch.Tensor]:
        """ZOH: Lambda_bar (P/2,) and B_bar (P/2, H), complex."""
        Lam = self._lambda()
        dtL = torch.exp(self.log_dt) * Lam
        # (Lambda_bar - 1) / Lambda via expm1: no cancellation when |dt Lambda| << 1.
        Bbar = (torch.expm1(dtL) / Lam).unsqueeze(-1) * torch.view_as_complex(self.B)
        return torch.exp(dtL), Bbar

    def continuous_parameters(
        self,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(A, B, C, dt) of the full P-state complex diagonal system, detached.

        Conjugate partners written out (real output, no 2 Re(.)):

            A:  (P,) complex diagonal of the state matrix, [Lambda, conj(Lambda)]
            B:  (P, H) complex, [B; conj(B)]
            C:  (H, P) complex, [C, conj(C)]; bidirectional: (2, H, P), C[1] = reverse
            dt: (P,) real step sizes (each conjugate partner has its pair's dt)
        """
        with torch.no_grad():
            Lam = self._lambda()
            B = torch.view_as_complex(self.B)
            C = with_conjugates(self.C, self.C_reverse if self.bidirectional else None)
            dt = torch.exp(self.log_dt)
            return (
                torch.cat([Lam, Lam.conj()]),
                torch.cat([B, B.conj()], dim=0),
                C,
                torch.cat([dt, dt]),
            )

    # --------------------------------------------------------------------- forward
    def _output(self, y: torch.Tensor) -> torch.Tensor:
        return self.output_linear(self.dropout(self.activation(y)))

    def _forward(self, u: torch.Tensor, padding_mask: torch.Tensor | None) -> torch.Tensor:
        """u: (batch, length, H) float (padded positions zero) -> (batch, length, H)."""
        Lam_bar, Bbar = self._discrete()
        Bu = torch.einsum("ph,blh->blp", Bbar, u.to(Bbar.dtype))  # (batch, length, P/2)
        x = associative_scan(Lam_bar, Bu, dim=1)
        y = 2 * torch.einsum("hp,blp->blh", torch.view_as_complex(self.C), x).real
        if self.bidirectional:
            # Backward scan = forward scan of the reversed sequence, reversed back; it
            # includes the current token (see the module docstring).
            x_bwd = associative_scan(Lam_bar, Bu.flip(1), dim=1).flip(1)
            C_rev = torch.view_as_complex(self.C_reverse)
            y = y + 2 * torch.einsum("hp,blp->blh", C_rev, x_bwd).real
        return self._output(y + self.D * u)

    # ----------------------------------------------------------------- recurrence
    def initial_state(self, batch_size: int) -> torch.Tensor:
        """Zero state, (batch, P/2) complex, on the parameters' device."""
        check_positive("batch_size", batch_size)
        dtype = torch.complex128 if self.log_dt.dtype == torch.float64 else torch.complex64
        return torch.zeros(batch_size, self.d_state // 2, dtype=dtype, device=self.log_dt.device)

    def _step(self, x_t: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x_t: (batch, H); state (batch, P/2) -> y_t (batch, H), new state."""
        check_state(state, (x_t.shape[0], self.d_state // 2), "batch, d_state / 2")
        Lam_bar, Bbar = self._discrete()
        state = Lam_bar * state + torch.einsum("ph,bh->bp", Bbar, x_t.to(Bbar.dtype))
        y = 2 * torch.einsum("hp,bp->bh", torch.view_as_complex(self.C), state).real
        return self._output(y + self.D * x_t), state

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, d_state={self.d_state}, blocks={self.blocks}"
