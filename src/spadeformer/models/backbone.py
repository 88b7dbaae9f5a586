"""SpadeModel: embeddings, the stack of Global/Local layers, the final norm.

Token embeddings: one table (``nn.Embedding``), or adaptive input bands when
``config.adaptive_cutoffs`` is set (Baevski & Auli 2019, see models/adaptive.py); both are
scaled by sqrt(d_model).

Position schemes (``config.position``): "none" (SPADE: the SSM carries position, paper Sec. 3),
"sinusoidal" or "learned" absolute embeddings added to the tokens (the Transformer baselines),
"t5" / "shaw" relative biases inside attention, "simple" (per offset) / "rotary" Mega's biases
inside its blocks (``config.block="mega"``: every layer a :class:`~spadeformer.mega.MegaLayer`).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from spadeformer.attention import Attention
from spadeformer.config import MEGA_POSITIONS, SpadeConfig
from spadeformer.layers import GlobalLayer, LocalLayer, apply_norm, make_norm
from spadeformer.mega import MegaLayer
from spadeformer.models.adaptive import AdaptiveInput
from spadeformer.models.io import PretrainedMixin
from spadeformer.ssm import build_ssm

__all__ = ["SpadeModel", "sinusoidal_positions"]


def sinusoidal_positions(positions: torch.Tensor, d_model: int) -> torch.Tensor:
    """Vaswani et al. sinusoids. positions: (length,) int -> (length, d_model) float32."""
    half = d_model // 2
    freq = torch.exp(-math.log(10_000.0) * torch.arange(half, dtype=torch.float32,
                                                        device=positions.device) / half)
    angles = positions.float()[:, None] * freq[None, :]
    emb = torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)
    if d_model % 2:
        emb = nn.functional.pad(emb, (0, 1))
    return emb


def _check_ids(input_ids: Any, vocab_size: int, name: str = "input_ids") -> None:
    if not isinstance(input_ids, torch.Tensor) or input_ids.dtype not in (
        torch.int64, torch.int32, torch.int16, torch.uint8
    ):
        got = input_ids.dtype if isinstance(input_ids, torch.Tensor) else type(input_ids)
        raise TypeError(f"{name} must be an integer tensor of token ids, got {got}")
    if input_ids.dim() != 2 or input_ids.shape[1] < 1:
        raise ValueError(f"{name} must have shape (batch, length >= 1), got "
                         f"{tuple(input_ids.shape)}")
    if input_ids.numel() and (input_ids.min() < 0 or input_ids.max() >= vocab_size):
        raise ValueError(f"{name} must hold ids in [0, vocab_size={vocab_size}), got range "
                         f"[{int(input_ids.min())}, {int(input_ids.max())}]")


class SpadeModel(PretrainedMixin, nn.Module):
    """The backbone. forward: input_ids (batch, length) -> hidden (batch, length, d_model)."""

    def __init__(self, config: SpadeConfig):
        super().__init__()
        if not isinstance(config, SpadeConfig):
            raise TypeError(f"config must be a SpadeConfig, got {type(config).__name__}")
        self.config = config
        c = config
        if c.adaptive_cutoffs is not None:
            # Baevski & Auli adaptive input (the paper's WikiText-103 model, Sec. 4.2); it
            # initialises itself as fairseq does (band i: N(0, d_i^-1/2), Xavier projections).
            self.embed = AdaptiveInput(c.vocab_size, c.d_model, c.adaptive_cutoffs,
                                       c.adaptive_factor)
        else:
            self.embed = nn.Embedding(c.vocab_size, c.d_model)
            # fairseq / Vaswani et al.: N(0, d^-1/2) entries, inputs scaled by sqrt(d). Keeps tied
            # output logits O(1) at initialisation (N(0, 1) entries would give std ~sqrt(d)).
            nn.init.normal_(self.embed.weight, std=c.d_model ** -0.5)
        # sqrt(d) for both kinds: fairseq's decoder scales whatever embed_tokens returns
        # (adaptive input included) unless --no-scale-embedding, which wiki103 does not set.
        self.embed_scale = math.sqrt(c.d_model)
        if c.position == "learned":
            self.pos_embed = nn.Embedding(c.max_position, c.d_model)
        self.embed_dropout = nn.Dropout(c.dropout)
        self.layers = nn.ModuleList()
        for kind in c.layer_kinds():
            if c.block == "mega":
                self.layers.append(self._build_mega_layer())
                continue
            attn = self._build_attention() if c.attention != "none" else None
            if kind == "global":
                ssm = build_ssm(c.ssm, c.d_model, bidirectional=not c.causal, **c.ssm_options)
                self.layers.append(GlobalLayer(
                    c.d_model, c.d_ff, ssm=ssm, attention=attn, combine=c.combine,
                    add_weight=c.add_weight, dropout=c.dropout, norm=c.norm))
            else:
                self.layers.append(LocalLayer(c.d_model, c.n_heads, c.d_ff, attention=attn,
                                              dropout=c.dropout, norm=c.norm))
        # Pre-LN stacks need a last norm; post-LN layers already end in one.
        # (a Mega stack ends in its own norm type, as the reference's encoder does)
        final = make_norm(c.mega_norm, c.d_model) if c.block == "mega" else nn.LayerNorm(c.d_model)
        self.final_norm = final if c.norm == "pre" else nn.Identity()

    def _build_mega_layer(self) -> MegaLayer:
        c = self.config
        return MegaLayer(
            c.d_model, c.d_ff,
            ema=build_ssm(c.ssm, c.d_model, bidirectional=not c.causal, **c.ssm_options),
            pattern=c.attention, window_size=c.window_size, chunk_size=c.chunk_size,
            causal=c.causal, z_dim=c.mega_z_dim, v_dim=c.mega_v_dim, dropout=c.dropout,
            attention_dropout=c.attention_dropout, norm=c.norm,
            relative_bias=c.position if c.position in MEGA_POSITIONS else None,
            max_positions=c.max_position,
            attention_fn=c.mega_attention_fn, norm_type=c.mega_norm,
            hidden_dropout=c.mega_hidden_dropout,
        )

    def _build_attention(self) -> Attention:
        c = self.config
        return Attention(
            c.d_model, c.n_heads, pattern=c.attention,
            window_size=c.window_size if c.attention == "window" else None,
            chunk_size=c.chunk_size if c.attention == "chunk" else None,
            causal=c.causal, dropout=c.attention_dropout,
            position_bias=c.position if c.position in ("t5", "shaw") else None,
        )

    def _embed(self, input_ids: torch.Tensor, start: int = 0,
               pos_table: nn.Embedding | None = None) -> torch.Tensor:
        """input_ids (batch, length) -> (batch, length, d_model); start = first position.
        ``pos_table``: the learned positions to add (default this model's; the
        encoder-decoder's decoder passes its own)."""
        x = self.embed(input_ids.long()) * self.embed_scale
        c = self.config
        if c.position in ("sinusoidal", "learned"):
            pos = torch.arange(start, start + input_ids.shape[1], device=input_ids.device)
            if c.position == "learned":
                if start + input_ids.shape[1] > c.max_position:
                    raise ValueError(
                        f"sequence reaches position {start + input_ids.shape[1]} but "
                        f"position='learned' has max_position={c.max_position}"
                    )
                x = x + (self.pos_embed if pos_table is None else pos_table)(pos)
            else:
                x = x + sinusoidal_positions(pos, c.d_model).to(x.dtype)
        return self.embed_dropout(x)

    def forward(self, input_ids: torch.Tensor,
                padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids (batch, length) int, padding_mask (batch, length) bool True = padded
        -> hidden states (batch, length, d_model)."""
        _check_ids(input_ids, self.config.vocab_size)
        if padding_mask is not None and (
            padding_mask.dtype != torch.bool or padding_mask.shape != input_ids.shape
        ):
            raise ValueError(
                "padding_mask must be a bool tensor (True = padded) of shape "
                f"{tuple(input_ids.shape)}, got {padding_mask.dtype} {tuple(padding_mask.shape)}"
            )
        x = self._embed(input_ids)
        for layer in self.layers:
            x = layer(x, padding_mask=padding_mask)
        return apply_norm(self.final_norm, x, padding_mask)

    # ------------------------------------------------------------ streaming
    def initial_state(self, batch_size: int) -> dict[str, Any]:
        """Decoding state: one entry per layer plus the number of tokens consumed."""
        if not self.config.causal:
            raise RuntimeError("initial_state()/step() need a causal model (config.causal=True)")
        p = next(self.parameters())
        return {
            "position": 0,
            "layers": [layer.initial_state(batch_size, device=p.device, dtype=p.dtype)
                       for layer in self.layers],
        }

    def step(self, input_ids_t: torch.Tensor,
             state: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
        """One token per row. input_ids_t (batch,) -> hidden (batch, d_model), new state.

        The ``state`` passed in is consumed: attention caches are updated in place (see
        :meth:`spadeformer.attention.Attention.step`). To branch from one state, pass
        ``copy.deepcopy(state)`` to all but one of the branches.
        """
        if input_ids_t.dim() != 1:
            raise ValueError(
                f"input_ids_t must have shape (batch,), got {tuple(input_ids_t.shape)}"
            )
        _check_ids(input_ids_t[:, None], self.config.vocab_size, "input_ids_t")
        x = self._embed(input_ids_t[:, None], start=state["position"])[:, 0]
        new_layers = []
        for layer, layer_state in zip(self.layers, state["layers"], strict=True):
            x, layer_state = layer.step(x, layer_state)
            new_layers.append(layer_state)
        return self.final_norm(x), {"position": state["position"] + 1, "layers": new_layers}
