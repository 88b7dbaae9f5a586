"""An LSTM as the global information extractor (the paper's Figure 4 comparison).

SPADE's global layer needs *some* module that carries coarse information along the whole
sequence; the paper (Sec. 5, Figure 4) compares S4 with an LSTM in that slot. Output width is
always d_model:

    causal:         y = LSTM_fwd(u)                                   LSTM(d, d, num_layers)
    bidirectional:  y = LSTM_fwd(u) + rev(LSTM_bwd(rev(u)))           two independent stacks

where rev reverses each row *within its length*. We sum two independent stacks instead of using
``nn.LSTM(bidirectional=True)``, whose output is 2d wide and whose upper layers read both
directions concatenated; the sum keeps width d and makes the forward half exactly the causal
model.

Padding: only right padding is supported (each row's padded positions form a suffix). It is
exact: rows are packed with ``pack_padded_sequence``, so outputs at real positions equal those of
the unpadded row, whatever padding follows. Any other mask pattern raises ValueError.
``dropout`` is nn.LSTM's dropout between stacked layers (a no-op with num_layers=1).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from spadeformer.ssm.base import GlobalExtractor, check_dropout, check_positive

__all__ = ["LSTMGlobal", "suffix_padding_lengths"]


def suffix_padding_lengths(padding_mask: torch.Tensor) -> torch.Tensor:
    """Real lengths (batch,) of a right-padded mask (batch, length), True = padded.

    Raises ValueError when some row has a real token after a padded one (left padding, holes).
    """
    if padding_mask.shape[1] > 1 and bool((padding_mask[:, :-1] & ~padding_mask[:, 1:]).any()):
        bad = int((padding_mask[:, :-1] & ~padding_mask[:, 1:]).any(dim=1).nonzero()[0, 0])
        raise ValueError(
            "padding_mask must be right padding for LSTMGlobal (the padded positions of each row "
            f"must form a suffix: False...False True...True), but row {bad} has a real token "
            "after a padded one"
        )
    return (~padding_mask).sum(dim=1)


def _reverse_within_length(lengths: torch.Tensor, length: int) -> torch.Tensor:
    """Index (batch, length) that reverses positions 0..n-1 of each row and keeps the rest.

    It is its own inverse, so the same gather undoes it.
    """
    t = torch.arange(length, device=lengths.device)
    n = lengths[:, None]
    return torch.where(t < n, n - 1 - t, t)


def _gather_time(u: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """u (B, L, H), index (B, L) -> u[b, index[b, t], :]."""
    return u.gather(1, index.unsqueeze(-1).expand_as(u))


class LSTMGlobal(GlobalExtractor):
    """LSTM global extractor, width d_model in and out (see the module docstring).

    Args:
        d_model: model width d (LSTM input and hidden size).
        num_layers: stacked LSTM layers per direction.
        bidirectional: add an LSTM over the reversed sequence; outputs summed.
        trainable: False freezes every parameter.
        dropout: dropout between stacked layers (nn.LSTM semantics; no-op when num_layers=1).
    """

    def __init__(
        self,
        d_model: int,
        num_layers: int = 1,
        bidirectional: bool = False,
        trainable: bool = True,
        dropout: float = 0.0,
    ):
        super().__init__(d_model, bidirectional=bidirectional, trainable=trainable)
        check_positive("num_layers", num_layers)
        check_dropout(dropout)
        self.num_layers = num_layers
        self.dropout = float(dropout)
        # nn.LSTM warns when dropout > 0 with a single layer (it has nowhere to apply it).
        layer_dropout = self.dropout if num_layers > 1 else 0.0
        self.lstm = nn.LSTM(d_model, d_model, num_layers, batch_first=True, dropout=layer_dropout)
        self.lstm_reverse = (
            nn.LSTM(d_model, d_model, num_layers, batch_first=True, dropout=layer_dropout)
            if bidirectional
            else None
        )
        self.freeze_if_requested()

    @staticmethod
    def _run_packed(lstm: nn.LSTM, u: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Run ``lstm`` on right-padded u (B, L, d) with real ``lengths`` (B,) -> (B, L, d)."""
        # pack_padded_sequence rejects length 0; such rows are all padding and their output is
        # zeroed by the caller, so running them on one (zero) token is harmless.
        packed = pack_padded_sequence(
            u, lengths.clamp(min=1).cpu(), batch_first=True, enforce_sorted=False
        )
        y, _ = lstm(packed)
        y, _ = pad_packed_sequence(y, batch_first=True, total_length=u.shape[1])
        return y

    def _forward(self, u: torch.Tensor, padding_mask: torch.Tensor | None) -> torch.Tensor:
        """u: (batch, length, d_model) float32 -> (batch, length, d_model)."""
        if padding_mask is None or not bool(padding_mask.any()):
            y, _ = self.lstm(u)
            if self.lstm_reverse is not None:
                y = y + self.lstm_reverse(u.flip(1))[0].flip(1)
            return y
        lengths = suffix_padding_lengths(padding_mask)
        y = self._run_packed(self.lstm, u, lengths)
        if self.lstm_reverse is not None:
            index = _reverse_within_length(lengths, u.shape[1])
            y_rev = self._run_packed(self.lstm_reverse, _gather_time(u, index), lengths)
            y = y + _gather_time(y_rev, index)
        return y

    def _forward_ref(self, u: torch.Tensor, padding_mask: torch.Tensor | None) -> torch.Tensor:
        """Reference twin of ``_forward``: each row cut to its real length and run alone.

        u: (batch, length, d_model) -> (batch, length, d_model), zero at padded positions.
        """
        B, L, _ = u.shape
        if padding_mask is None:
            lengths = torch.full((B,), L, dtype=torch.long)
        else:
            lengths = suffix_padding_lengths(padding_mask)
        y = torch.zeros_like(u)
        for b in range(B):
            n = int(lengths[b])
            if n == 0:
                continue
            row = u[b : b + 1, :n]
            out = self.lstm(row)[0]
            if self.lstm_reverse is not None:
                out = out + self.lstm_reverse(row.flip(1))[0].flip(1)
            y[b, :n] = out[0]
        return y

    def initial_state(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Zero (h, c), each (num_layers, batch_size, d_model). Causal only."""
        check_positive("batch_size", batch_size)
        if self.bidirectional:
            raise RuntimeError(
                "initial_state() needs a causal model, but this LSTMGlobal has "
                "bidirectional=True; build it with bidirectional=False"
            )
        ref = self.lstm.weight_ih_l0
        shape = (self.num_layers, batch_size, self.d_model)
        h = torch.zeros(shape, device=ref.device, dtype=ref.dtype)
        return h, h.clone()

    def _step(
        self, x_t: torch.Tensor, state: Any
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """x_t: (batch, d_model) -> y_t: (batch, d_model), new (h, c). O(1) per token."""
        shape = (self.num_layers, x_t.shape[0], self.d_model)
        ok = isinstance(state, (tuple, list)) and len(state) == 2 and all(
            isinstance(s, torch.Tensor) and tuple(s.shape) == shape for s in state
        )
        if not ok:
            raise ValueError(
                f"state must be (h, c), each of shape {shape}, as made by "
                f"initial_state({x_t.shape[0]})"
            )
        h, c = state
        y, (h, c) = self.lstm(x_t.unsqueeze(1), (h, c))
        return y[:, 0], (h, c)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, num_layers={self.num_layers}, dropout={self.dropout}"
