"""spadeformer: SPADE, the State Space Augmented Transformer, for long sequences."""

__version__ = "0.1.0"
