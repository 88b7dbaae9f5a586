"""What models return: a small dataclass with the loss (when labels are given) and logits."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ModelOutput:
    """loss: scalar or None; logits: (batch, length, vocab) for LMs, (batch, num_labels) else."""

    logits: torch.Tensor
    loss: torch.Tensor | None = None
