"""Task heads on the SpadeModel backbone: causal LM, sequence classification, retrieval."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from spadeformer.config import SpadeConfig
from spadeformer.models.backbone import SpadeModel
from spadeformer.models.io import PretrainedMixin
from spadeformer.models.outputs import ModelOutput

__all__ = ["SpadeForCausalLM", "SpadeForSequenceClassification", "SpadeForRetrieval", "pool"]

IGNORE_INDEX = -100


def pool(hidden: torch.Tensor, padding_mask: torch.Tensor | None, how: str) -> torch.Tensor:
    """(batch, length, d) -> (batch, d). "mean" averages real positions only (masked mean);
    "first" takes position 0; "last" the last real position."""
    if padding_mask is None:
        padding_mask = torch.zeros(hidden.shape[:2], dtype=torch.bool, device=hidden.device)
    keep = (~padding_mask).to(hidden.dtype).unsqueeze(-1)  # (batch, length, 1)
    if how == "mean":
        return (hidden * keep).sum(1) / keep.sum(1).clamp_min(1.0)
    if how == "first":
        return hidden[:, 0]
    last = (keep.squeeze(-1).sum(1).long() - 1).clamp_min(0)  # index of last real token
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


class SpadeForCausalLM(PretrainedMixin, nn.Module):
    """Next-token prediction. ``labels`` are aligned with ``input_ids`` (labels[:, t] is the
    target at position t, i.e. already shifted); -100 is ignored."""

    def __init__(self, config: SpadeConfig):
        super().__init__()
        if not config.causal:
            raise ValueError("SpadeForCausalLM needs config.causal=True, got causal=False")
        self.config = config
        self.backbone = SpadeModel(config)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.backbone.embed.weight

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                padding_mask: torch.Tensor | None = None) -> ModelOutput:
        """input_ids (batch, length) -> logits (batch, length, vocab); loss if labels given."""
        logits = self.lm_head(self.backbone(input_ids, padding_mask=padding_mask))
        loss = None
        if labels is not None:
            if labels.shape != input_ids.shape:
                raise ValueError(f"labels must have the shape of input_ids "
                                 f"{tuple(input_ids.shape)}, got {tuple(labels.shape)}")
            loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten().long(),
                                   ignore_index=IGNORE_INDEX)
        return ModelOutput(logits=logits, loss=loss)

    def initial_state(self, batch_size: int) -> dict[str, Any]:
        return self.backbone.initial_state(batch_size)

    def step(self, input_ids_t: torch.Tensor, state: dict[str, Any]):
        """input_ids_t (batch,) -> logits (batch, vocab), new state."""
        hidden, state = self.backbone.step(input_ids_t, state)
        return self.lm_head(hidden), state

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None,
                 seed: int | None = None, **kwargs: Any) -> torch.Tensor:
        """Streaming generation; see :func:`spadeformer.generation.generate`."""
        from spadeformer.generation import generate

        return generate(self, input_ids, max_new_tokens, temperature=temperature, top_k=top_k,
                        top_p=top_p, seed=seed, **kwargs)


class SpadeForSequenceClassification(PretrainedMixin, nn.Module):
    """Pooled (masked mean by default) hidden states -> Linear -> num_labels logits."""

    def __init__(self, config: SpadeConfig):
        super().__init__()
        self.config = config
        self.backbone = SpadeModel(config)
        self.classifier = nn.Linear(config.d_model, config.num_labels)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                padding_mask: torch.Tensor | None = None) -> ModelOutput:
        """input_ids (batch, length) -> logits (batch, num_labels); loss if labels (batch,)."""
        hidden = self.backbone(input_ids, padding_mask=padding_mask)
        logits = self.classifier(pool(hidden, padding_mask, self.config.pooling))
        loss = None if labels is None else F.cross_entropy(logits.float(), labels.long())
        return ModelOutput(logits=logits, loss=loss)


class SpadeForRetrieval(PretrainedMixin, nn.Module):
    """LRA Retrieval: two towers sharing one encoder; features [u, v, u*v, u-v] -> MLP."""

    def __init__(self, config: SpadeConfig):
        super().__init__()
        self.config = config
        self.backbone = SpadeModel(config)
        d = config.d_model
        self.mlp = nn.Sequential(nn.Linear(4 * d, d), nn.GELU(), nn.Linear(d, config.num_labels))

    def encode(self, input_ids: torch.Tensor,
               padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(batch, length) -> pooled (batch, d_model)."""
        return pool(self.backbone(input_ids, padding_mask=padding_mask), padding_mask,
                    self.config.pooling)

    def forward(self, input_ids_1: torch.Tensor, input_ids_2: torch.Tensor,
                labels: torch.Tensor | None = None,
                padding_mask_1: torch.Tensor | None = None,
                padding_mask_2: torch.Tensor | None = None) -> ModelOutput:
        """Two documents (batch, L1), (batch, L2) -> logits (batch, num_labels)."""
        u = self.encode(input_ids_1, padding_mask_1)
        v = self.encode(input_ids_2, padding_mask_2)
        logits = self.mlp(torch.cat([u, v, u * v, u - v], dim=-1))
        loss = None if labels is None else F.cross_entropy(logits.float(), labels.long())
        return ModelOutput(logits=logits, loss=loss)
