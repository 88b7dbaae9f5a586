"""SpadeForConditionalGeneration: the encoder-decoder of the paper's Sec. 5.1 (T5-style).

Encoder: the SPADE backbone (:class:`SpadeModel`), bidirectional (``config.causal=False``):
its bottom layer(s) add the SSM's global information to local attention, so long sources cost
O(L) instead of O(L^2). Decoder: ``config.n_decoder_layers`` T5 decoder layers (causal full
self-attention, cross-attention over the encoder output, feed-forward; pre- or post-LN as
``config.norm``). The paper augments the encoder, where the long inputs are; outputs
(summaries, answers) are short, so the decoder keeps full attention.

Positions in the decoder: it has no SSM to carry them, so with ``position`` "none", "t5",
"simple" or "rotary" (a Mega encoder) its self-attention uses T5 relative buckets (causal: the
past only); "sinusoidal" / "learned" add absolute embeddings to the decoder input as to the
encoder's; "shaw" uses Shaw biases. The encoder, decoder input and output layer share one
embedding table (T5) unless ``tie_embeddings=False`` gives the output its own Linear.

Decoding: the encoder runs once; each cross-attention projects the encoder output to keys and
values once (:meth:`initial_state`), and each step then costs O(source + generated tokens).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from spadeformer.attention import Attention
from spadeformer.config import SpadeConfig
from spadeformer.cross_attention import CrossAttention, keep_mask
from spadeformer.layers import DecoderLayer
from spadeformer.models.backbone import SpadeModel, _check_ids
from spadeformer.models.heads import IGNORE_INDEX, _padding_mask
from spadeformer.models.io import PretrainedMixin
from spadeformer.models.outputs import ModelOutput
from spadeformer.ssm.base import check_padding_mask, check_sequence

__all__ = ["SpadeForConditionalGeneration", "shift_right"]


def shift_right(labels: torch.Tensor, start_token_id: int, pad_token_id: int) -> torch.Tensor:
    """Teacher forcing: decoder inputs = [start, labels[:, :-1]], ignored labels (-100) read
    as ``pad_token_id``. labels (batch, T) -> (batch, T)."""
    inputs = labels.new_full(labels.shape, start_token_id)
    inputs[:, 1:] = labels[:, :-1]
    return inputs.masked_fill(inputs == IGNORE_INDEX, pad_token_id)


class SpadeForConditionalGeneration(PretrainedMixin, nn.Module):
    """Source ids (batch, S) -> logits over the target vocabulary (batch, T, vocab).

    ``labels`` (batch, T) are the target tokens (-100 = ignored); without
    ``decoder_input_ids`` the decoder reads them shifted right behind
    ``config.decoder_start_token_id``. ``self.backbone`` is the encoder (the name the other
    heads use, so :func:`~spadeformer.models.load_pretrained_weights` can start it from a
    saved bidirectional SPADE model).
    """

    def __init__(self, config: SpadeConfig):
        super().__init__()
        if not isinstance(config, SpadeConfig):
            raise TypeError(f"config must be a SpadeConfig, got {type(config).__name__}")
        if config.causal:
            raise ValueError("SpadeForConditionalGeneration reads the whole source: it needs "
                             "config.causal=False (a bidirectional encoder), got causal=True")
        if config.adaptive_cutoffs is not None:
            raise ValueError("SpadeForConditionalGeneration has a plain output layer: "
                             "adaptive_cutoffs must be None, got "
                             f"{config.adaptive_cutoffs!r}")
        if config.d_model % config.n_heads:  # a Mega encoder alone would not need it
            raise ValueError("SpadeForConditionalGeneration's decoder attention has n_heads "
                             f"heads: d_model ({config.d_model}) must be divisible by n_heads "
                             f"({config.n_heads})")
        self.config = c = config
        self.backbone = SpadeModel(config)
        bias = {"none": "t5", "t5": "t5", "simple": "t5", "rotary": "t5",
                "shaw": "shaw"}.get(c.position)
        self.decoder_layers = nn.ModuleList(
            DecoderLayer(
                c.d_model, c.d_ff,
                self_attention=Attention(c.d_model, c.n_heads, pattern="full", causal=True,
                                         dropout=c.attention_dropout, position_bias=bias),
                cross_attention=CrossAttention(c.d_model, c.n_heads, c.attention_dropout),
                dropout=c.dropout, norm=c.norm)
            for _ in range(c.n_decoder_layers))
        if c.position == "learned":
            self.decoder_pos_embed = nn.Embedding(c.max_position, c.d_model)
        self.decoder_final_norm = nn.LayerNorm(c.d_model) if c.norm == "pre" else nn.Identity()
        self.lm_head = nn.Linear(c.d_model, c.vocab_size, bias=False)
        if c.tie_embeddings:
            self.lm_head.weight = self.backbone.embed.weight

    @property
    def encoder(self) -> SpadeModel:
        return self.backbone

    # ------------------------------------------------------------------ pieces
    def encode(self, input_ids: torch.Tensor, padding_mask: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Source (batch, S) -> memory (batch, S, d_model) and its padding mask (given, or
        ``input_ids == config.pad_token_id`` when that is set)."""
        padding_mask = _padding_mask(self.config, input_ids, padding_mask)
        return self.backbone(input_ids, padding_mask=padding_mask), padding_mask

    def _embed_decoder(self, ids: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Decoder ids (batch, T) -> (batch, T, d_model): the shared table, scaled as the
        encoder's, plus absolute positions (the decoder's own learned table) when
        ``config.position`` has them."""
        return self.backbone._embed(ids, start, getattr(self, "decoder_pos_embed", None))

    def _memory_kv(self, memory: torch.Tensor, padding_mask: torch.Tensor | None) -> list:
        """Each decoder layer's projected memory; the memory is checked once, not per layer."""
        check_sequence(memory, self.config.d_model, "memory")
        check_padding_mask(padding_mask, memory.shape[0], memory.shape[1])
        keep = keep_mask(padding_mask, "padding_mask")
        return [layer.cross_attn.project(memory, keep) for layer in self.decoder_layers]

    def decode(self, decoder_input_ids: torch.Tensor, memory: torch.Tensor,
               memory_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Decoder ids (batch, T) over memory (batch, S, d_model) -> logits (batch, T, vocab)."""
        _check_ids(decoder_input_ids, self.config.vocab_size, "decoder_input_ids")
        if decoder_input_ids.shape[0] != memory.shape[0]:
            raise ValueError(f"decoder_input_ids has batch {decoder_input_ids.shape[0]} but "
                             f"the source has batch {memory.shape[0]}")
        x = self._embed_decoder(decoder_input_ids)
        for layer, kv in zip(self.decoder_layers, self._memory_kv(memory, memory_padding_mask),
                             strict=True):
            x = layer(x, kv)
        return self.lm_head(self.decoder_final_norm(x))

    # ------------------------------------------------------------------ forward
    def forward(self, input_ids: torch.Tensor, decoder_input_ids: torch.Tensor | None = None,
                labels: torch.Tensor | None = None,
                padding_mask: torch.Tensor | None = None) -> ModelOutput:
        """input_ids (batch, S), padding_mask (batch, S) bool True = padded; labels (batch, T)
        and / or decoder_input_ids (batch, T) -> logits (batch, T, vocab), loss (mean
        cross-entropy over labels != -100) when labels are given."""
        c = self.config
        if decoder_input_ids is None:
            if labels is None:
                raise ValueError("give labels (teacher forcing) or decoder_input_ids")
            _check_labels(labels, c.vocab_size)
            pad = c.pad_token_id if c.pad_token_id is not None else c.decoder_start_token_id
            decoder_input_ids = shift_right(labels, c.decoder_start_token_id, pad)
        elif labels is not None and labels.shape != decoder_input_ids.shape:
            raise ValueError(f"labels must have the shape of decoder_input_ids "
                             f"{tuple(decoder_input_ids.shape)}, got {tuple(labels.shape)}")
        memory, mask = self.encode(input_ids, padding_mask)
        logits = self.decode(decoder_input_ids, memory, mask)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten().long(),
                                   ignore_index=IGNORE_INDEX)
        return ModelOutput(logits=logits, loss=loss)

    # ------------------------------------------------------------------ decoding
    def initial_state(self, memory: torch.Tensor,
                      memory_padding_mask: torch.Tensor | None = None) -> dict[str, Any]:
        """Decoding state for a batch of encoded sources (:meth:`encode`): each layer's
        projected memory (computed once) and its empty self-attention cache."""
        p = next(self.parameters())
        return {
            "position": 0,
            "memory_kv": self._memory_kv(memory, memory_padding_mask),
            "layers": [layer.initial_state(memory.shape[0], device=p.device, dtype=p.dtype)
                       for layer in self.decoder_layers],
        }

    def step(self, decoder_ids_t: torch.Tensor, state: dict[str, Any]
             ) -> tuple[torch.Tensor, dict[str, Any]]:
        """One target token per row: (batch,) -> logits (batch, vocab), new state. Equals
        :meth:`decode` at this position; consumes ``state`` (self-attention caches are
        written in place, see :meth:`spadeformer.attention.Attention.step`)."""
        if not isinstance(decoder_ids_t, torch.Tensor) or decoder_ids_t.dim() != 1:
            got = tuple(decoder_ids_t.shape) if isinstance(decoder_ids_t, torch.Tensor) else (
                type(decoder_ids_t).__name__)
            raise ValueError(f"decoder_ids_t must have shape (batch,), got {got}")
        _check_ids(decoder_ids_t[:, None], self.config.vocab_size, "decoder_ids_t")
        x = self._embed_decoder(decoder_ids_t[:, None], start=state["position"])[:, 0]
        layers = []
        for layer, cache, kv in zip(self.decoder_layers, state["layers"], state["memory_kv"],
                                    strict=True):
            x, cache = layer.step(x, cache, kv)
            layers.append(cache)
        logits = self.lm_head(self.decoder_final_norm(x))
        return logits, {**state, "position": state["position"] + 1, "layers": layers}

    @property
    def max_steps(self) -> int | None:
        """Decoder steps the learned positions allow (None = unbounded)."""
        return self.config.max_position if self.config.position == "learned" else None

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                 padding_mask: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
        """Encode ``input_ids`` (batch, S) once, then sample up to ``max_new_tokens`` target
        tokens after ``decoder_start_token_id``: -> (batch, <= max_new_tokens) (fewer when
        every row reached ``eos_token_id``; finished rows repeat it). Sampling arguments as
        :func:`spadeformer.generation.generate` (temperature 0 = greedy)."""
        from spadeformer.generation import check_decoding_length, check_generate_args, generate

        check_generate_args(max_new_tokens, temperature, top_k, top_p, seed)
        check_decoding_length(self, 1, max_new_tokens)  # before encoding a long source
        eos = kwargs.get("eos_token_id")
        if eos is not None and not (isinstance(eos, int) and 0 <= eos < self.config.vocab_size):
            raise ValueError(f"eos_token_id must be None or an id in [0, vocab_size="
                             f"{self.config.vocab_size}), got {eos!r}")
        device = next(self.parameters()).device
        was_training = self.training
        self.eval()
        try:
            memory, mask = self.encode(input_ids.to(device), None if padding_mask is None
                                       else padding_mask.to(device))
            start = torch.full((input_ids.shape[0], 1), self.config.decoder_start_token_id,
                               dtype=torch.long, device=device)
            bound = _BoundDecoder(self, memory, mask)
            bound.training = False  # generate() restores this, not the module's own mode
            out = generate(bound, start, max_new_tokens, temperature=temperature, top_k=top_k,
                           top_p=top_p, seed=seed, **kwargs)
        finally:
            self.train(was_training)
        return out[:, 1:]


class _BoundDecoder(nn.Module):
    """The decoder with one batch's memory bound to it: the ``initial_state(batch)`` /
    ``step`` interface :func:`spadeformer.generation.generate` drives."""

    def __init__(self, model: SpadeForConditionalGeneration, memory: torch.Tensor,
                 padding_mask: torch.Tensor | None):
        super().__init__()
        self.model = model
        self.memory, self.padding_mask = memory, padding_mask

    @property
    def max_steps(self) -> int | None:
        return self.model.max_steps

    def initial_state(self, batch_size: int) -> dict[str, Any]:
        return self.model.initial_state(self.memory, self.padding_mask)

    def step(self, ids_t: torch.Tensor, state: dict[str, Any]):
        return self.model.step(ids_t, state)


def _check_labels(labels: Any, vocab_size: int) -> None:
    if not isinstance(labels, torch.Tensor) or labels.dim() != 2 or labels.shape[1] < 1:
        got = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise ValueError(f"labels must have shape (batch, target_length >= 1), got {got}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor of token ids (-100 = ignored), got "
                        f"{labels.dtype}")
    real = labels[labels != IGNORE_INDEX]
    if real.numel() and (real.min() < 0 or real.max() >= vocab_size):
        raise ValueError(f"labels must hold ids in [0, vocab_size={vocab_size}) or -100, got "
                         f"range [{int(real.min())}, {int(real.max())}]")
