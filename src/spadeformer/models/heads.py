"""Task heads on the SpadeModel backbone: causal LM, sequence classification, retrieval."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from spadeformer.config import SpadeConfig
from spadeformer.models.adaptive import AdaptiveSoftmax
from spadeformer.models.backbone import SpadeModel
from spadeformer.models.io import PretrainedMixin
from spadeformer.models.outputs import ModelOutput

__all__ = ["SpadeForCausalLM", "SpadeForSequenceClassification", "SpadeForRetrieval", "pool"]

IGNORE_INDEX = -100


def pool(hidden: torch.Tensor, padding_mask: torch.Tensor | None, how: str) -> torch.Tensor:
    """(batch, length, d) -> (batch, d). "mean" averages real positions only (masked mean);
    "first" takes the first real position and "last" the last one, wherever the padding is
    (left, right or in between). A row with no real position gives its position 0."""
    if padding_mask is None:
        padding_mask = torch.zeros(hidden.shape[:2], dtype=torch.bool, device=hidden.device)
    keep = (~padding_mask).to(hidden.dtype).unsqueeze(-1)  # (batch, length, 1)
    if how == "mean":
        return (hidden * keep).sum(1) / keep.sum(1).clamp_min(1.0)
    positions = torch.arange(hidden.shape[1], device=hidden.device).expand_as(padding_mask)
    if how == "first":  # smallest real position (length if none: then 0 below)
        index = positions.masked_fill(padding_mask, hidden.shape[1]).amin(1)
        index = index.masked_fill(index == hidden.shape[1], 0)
    else:  # largest real position (-1 if none: then 0)
        index = positions.masked_fill(padding_mask, -1).amax(1).clamp_min(0)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), index]


def _padding_mask(config: SpadeConfig, input_ids: torch.Tensor,
                  padding_mask: torch.Tensor | None) -> torch.Tensor | None:
    """The mask given, else ``input_ids == config.pad_token_id`` when that is set. Only the
    classification and retrieval heads use it: a causal LM has no padding to infer (its
    ``step()`` could not skip such tokens, so forward and generation would disagree)."""
    if padding_mask is None and config.pad_token_id is not None:
        return input_ids == config.pad_token_id
    return padding_mask


class SpadeForCausalLM(PretrainedMixin, nn.Module):
    """Next-token prediction. ``labels`` are aligned with ``input_ids`` (labels[:, t] is the
    target at position t, i.e. already shifted); -100 is ignored.

    Output layer: a Linear over the vocabulary (tied to the input table when
    ``tie_embeddings``), or, when ``config.adaptive_cutoffs`` is set, an
    :class:`~spadeformer.models.adaptive.AdaptiveSoftmax` (tied to the adaptive input's band
    embeddings and projections when ``tie_embeddings``). With the adaptive softmax the
    "logits" that ``forward`` and ``step`` return are **log-probabilities** (each row's
    logsumexp is 0): softmax, argmax, top-k / top-p sampling and cross-entropy on them give
    the same results as on logits, so generation and evaluation code need not care.
    """

    def __init__(self, config: SpadeConfig):
        super().__init__()
        if not config.causal:
            raise ValueError("SpadeForCausalLM needs config.causal=True, got causal=False")
        self.config = config
        self.backbone = SpadeModel(config)
        if config.adaptive_cutoffs is not None:
            self.lm_head = AdaptiveSoftmax(
                config.d_model, config.vocab_size, config.adaptive_cutoffs,
                config.adaptive_factor,
                tie_to=self.backbone.embed if config.tie_embeddings else None,
                dropout=config.adaptive_dropout)
        else:
            self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
            if config.tie_embeddings:
                self.lm_head.weight = self.backbone.embed.weight

    @property
    def adaptive(self) -> bool:
        """True when the output layer is an adaptive softmax (logits are log-probabilities)."""
        return isinstance(self.lm_head, AdaptiveSoftmax)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                padding_mask: torch.Tensor | None = None,
                return_logits: bool | None = None) -> ModelOutput:
        """input_ids (batch, length) -> logits (batch, length, vocab); loss if labels given.

        ``return_logits``: True always fills ``.logits``, False leaves it None (training only
        needs ``.loss``). The default (None) returns them unless labels are given *and* the
        output layer is an adaptive softmax: there the loss takes the efficient path that
        scores each tail band only for its own targets, and the full (batch, length, vocab)
        log-probabilities would be pure extra cost (~268k floats per token at the
        wikitext103 size). With the plain head the loss needs the logits anyway, so they come
        back for free. The trainer calls ``model(input_ids=..., labels=...)`` and gets the
        cheap path; pass ``return_logits=True`` to get both.
        """
        if return_logits is not None and not isinstance(return_logits, bool):
            raise ValueError(f"return_logits must be None, True or False, got {return_logits!r}")
        if return_logits is None:
            return_logits = labels is None or not self.adaptive
        hidden = self.backbone(input_ids, padding_mask=padding_mask)  # (batch, length, d)
        if labels is not None and labels.shape != input_ids.shape:
            raise ValueError(f"labels must have the shape of input_ids "
                             f"{tuple(input_ids.shape)}, got {tuple(labels.shape)}")
        logits = None
        if return_logits or (labels is not None and not self.adaptive):
            logits = self.lm_head(hidden)  # (batch, length, vocab)
        loss = None
        if labels is not None:
            if self.adaptive:
                loss = self.lm_head.loss(hidden.flatten(0, 1), labels.flatten(),
                                         ignore_index=IGNORE_INDEX)
            else:
                loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten().long(),
                                       ignore_index=IGNORE_INDEX)
        return ModelOutput(logits=logits if return_logits else None, loss=loss)

    def initial_state(self, batch_size: int) -> dict[str, Any]:
        return self.backbone.initial_state(batch_size)

    @property
    def max_steps(self) -> int | None:
        """How many tokens ``step()`` can take from the initial state (None = unbounded):
        ``SpadeConfig.position_limit``."""
        return self.config.position_limit

    def step(self, input_ids_t: torch.Tensor, state: dict[str, Any]):
        """input_ids_t (batch,) -> logits (batch, vocab) (log-probabilities with the adaptive
        softmax), new state. Consumes ``state`` (see :meth:`SpadeModel.step`): deep-copy it
        to step twice from it."""
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
        padding_mask = _padding_mask(self.config, input_ids, padding_mask)
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
        padding_mask = _padding_mask(self.config, input_ids, padding_mask)
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
