"""The SPADE backbone and its task heads."""

from spadeformer.models.backbone import SpadeModel
from spadeformer.models.heads import (
    SpadeForCausalLM,
    SpadeForRetrieval,
    SpadeForSequenceClassification,
)
from spadeformer.models.io import ModelLoadError, load_pretrained_weights
from spadeformer.models.outputs import ModelOutput
from spadeformer.models.seq2seq import SpadeForConditionalGeneration

__all__ = [
    "ModelLoadError",
    "ModelOutput",
    "SpadeForCausalLM",
    "SpadeForConditionalGeneration",
    "SpadeForRetrieval",
    "SpadeForSequenceClassification",
    "SpadeModel",
    "load_pretrained_weights",
]
