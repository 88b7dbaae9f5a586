"""spadeformer: SPADE, the State Space Augmented Transformer, for long sequences."""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# Public names -> defining module. Imported on first use so `import spadeformer` stays cheap.
_PUBLIC = {
    "SpadeConfig": "spadeformer.config",
    "Attention": "spadeformer.attention",
    "FeedForward": "spadeformer.layers",
    "LocalLayer": "spadeformer.layers",
    "GlobalLayer": "spadeformer.layers",
    "DecoderLayer": "spadeformer.layers",
    "MegaLayer": "spadeformer.mega",
    "CrossAttention": "spadeformer.cross_attention",
    "SpadeModel": "spadeformer.models",
    "SpadeForCausalLM": "spadeformer.models",
    "SpadeForSequenceClassification": "spadeformer.models",
    "SpadeForRetrieval": "spadeformer.models",
    "SpadeForConditionalGeneration": "spadeformer.models",
    "S4": "spadeformer.ssm",
    "S4D": "spadeformer.ssm",
    "S5": "spadeformer.ssm",
    "Hyena": "spadeformer.ssm",
    "LSTMGlobal": "spadeformer.ssm",
    "MultiHeadEMA": "spadeformer.ssm",
}

__all__ = ["__version__", *_PUBLIC]


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'spadeformer' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
