"""The benchmarked models: their names (and ``NAME:FIELD=VALUE`` variants), the shape they
share, how each is built, and the analytic FLOP count of one training step.

Models (the paper's Figure 5 systems plus the eager baseline):

* ``transformer-full-eager``: softmax(QK^T / sqrt(d)) V with dense L x L scores, i.e. the
  paper's full-attention baseline. Built as ``transformer-full`` whose Attention modules are
  rerouted to :meth:`spadeformer.attention.Attention.forward_ref` (the dense reference path);
  the library has no runtime switch for it, so the bench sets the instance's ``forward``.
* ``transformer-full`` (fused SDPA, causal), ``transformer-window``, ``transformer-chunk``,
  ``s4`` (a stack of trainable S4 blocks), ``spade-s4-window`` and ``spade-s4-chunk`` (frozen
  S4 in the bottom layer, paper Sec. 4.2);
* ``mega-chunk``: Mega blocks (Ma et al. 2022; trained damped EMA, 16 dimensions, and
  single-head gated attention inside chunks of ``chunk_size`` in every layer; Z = d/2, V = 2d
  wide), a linear-cost baseline beside SPADE.

FLOPs are counted analytically (:func:`train_flops`), see its docstring for the formula.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
from dataclasses import asdict, dataclass
from typing import Any

__all__ = [
    "MODELS",
    "REFERENCE_MODEL",
    "BenchShape",
    "FlopCount",
    "attention_pairs",
    "build_model",
    "check_models",
    "model_config",
    "split_model",
    "train_flops",
]

MODELS = (
    "transformer-full-eager",
    "transformer-full",
    "transformer-window",
    "transformer-chunk",
    "s4",
    "spade-s4-window",
    "spade-s4-chunk",
    "mega-chunk",
)
REFERENCE_MODEL = "spade-s4-window"

# --------------------------------------------------------------------------------- models
@dataclass(frozen=True)
class BenchShape:
    """Width / depth / attention sizes shared by every benchmarked model."""

    d_model: int = 512
    n_layers: int = 4
    n_heads: int = 8
    d_ff: int | None = None  # None = 4 * d_model
    d_state: int = 64
    window_size: int = 256
    chunk_size: int = 256
    batch_size: int = 1
    vocab_size: int = 256

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if value is None and name == "d_ff":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads "
                             f"({self.n_heads})")
        if self.d_state % 2:
            raise ValueError(f"d_state must be even (S4 stores conjugate pairs), got "
                             f"{self.d_state}")

    @property
    def ff(self) -> int:
        return self.d_ff if self.d_ff is not None else 4 * self.d_model


# SpadeConfig fields that BenchShape sets for every model alike
_SHAPE_FIELDS = ("vocab_size", "d_model", "n_layers", "n_heads", "d_ff", "window_size",
                 "chunk_size")


def split_model(spec: str) -> tuple[str, dict[str, Any]]:
    """A model of the benchmark, optionally with SpadeConfig fields of its own:
    ``NAME[:FIELD=VALUE[:FIELD=VALUE...]]`` -> (NAME, {FIELD: VALUE}), values read as YAML
    (``mega-chunk:mega_attention_fn=laplace:position=rotary``; a ':' splits only before the next
    ``FIELD=``, so ``s4:ssm_options={n_dims: 4}`` works). The whole spec names the model in the
    CSV, tables and plot. The shape's fields (width, depth, heads, sizes) stay the flags', the
    same for every model; ``ssm_options`` are added to the bench's (S4's d_state)."""
    import yaml

    from spadeformer.config import SpadeConfig
    from spadeformer.runconfig import _parse_value

    name, *options = re.split(r":(?=[A-Za-z_]\w*=)", spec)
    fields = {f.name for f in dataclasses.fields(SpadeConfig)}
    overrides: dict[str, Any] = {}
    for option in options:
        key, eq, raw = option.partition("=")
        if not eq or key not in fields:
            close = difflib.get_close_matches(key, sorted(fields), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close and eq else ""
            raise ValueError(f"model option {option!r} of {spec!r} must be FIELD=VALUE with "
                             f"FIELD a SpadeConfig field{hint}, e.g. mega-chunk:position=rotary")
        if key in _SHAPE_FIELDS:
            raise ValueError(f"model option {option!r} of {spec!r}: {key} is part of the "
                             "shape every model shares; set it with the command's flags")
        if key == "causal":
            raise ValueError(f"model option {option!r} of {spec!r}: the benchmark times a "
                             "causal LM's training step, so causal stays True")
        if key in overrides:
            raise ValueError(f"model option {key!r} appears twice in {spec!r}")
        try:
            overrides[key] = _parse_value(raw)
        except yaml.YAMLError as err:
            raise ValueError(f"model option {option!r} of {spec!r}: its value is not valid "
                             f"YAML ({' '.join(str(err).split())})") from None
    if ":" in name or "=" in name:
        raise ValueError(f"model {spec!r} must be NAME[:FIELD=VALUE...], e.g. "
                         "mega-chunk:position=rotary")
    return name, overrides


def check_models(models: list[str], allowed: tuple[str, ...] = MODELS) -> list[str]:
    """``models`` (specs, see :func:`split_model`) if every name is in ``allowed``."""
    bad = [m for m in models if split_model(m)[0] not in allowed]
    if bad or not models:
        close = [c for m in bad for c in difflib.get_close_matches(split_model(m)[0], allowed, 1)]
        hint = f" (did you mean {', '.join(map(repr, close))}?)" if close else ""
        raise ValueError(f"models must be a non-empty list from {list(allowed)} (each "
                         f"optionally NAME:FIELD=VALUE...), got {bad or models}{hint}")
    if len(set(models)) != len(models):
        raise ValueError(f"models must not repeat, got {models}")
    return list(models)


def model_config(spec: str, shape: BenchShape):
    """The SpadeConfig of a benchmarked model (dropout 0: the bench times the math only);
    ``spec`` is a name of :data:`MODELS` with optional fields (:func:`split_model`)."""
    from spadeformer.config import SpadeConfig

    check_models([spec])
    name, options = split_model(spec)
    system = "transformer-full" if name == "transformer-full-eager" else name
    overrides: dict[str, Any] = dict(
        vocab_size=shape.vocab_size, d_model=shape.d_model, n_layers=shape.n_layers,
        n_heads=shape.n_heads, d_ff=shape.ff, dropout=0.0, window_size=shape.window_size,
        chunk_size=shape.chunk_size,
    )
    if system == "s4":
        # The pure S4 baseline trains its SSM; the preset sizes its stack by the size's depth,
        # so name every layer explicitly for our depth.
        overrides["global_layers"] = list(range(shape.n_layers))
        overrides["ssm_options"] = {"d_state": shape.d_state, "trainable": True}
    elif system.startswith("spade-"):
        # SPADE freezes S4 at its HiPPO initialisation (paper Sec. 4.2, Eq. 5).
        overrides["ssm_options"] = {"d_state": shape.d_state, "trainable": False}
    if isinstance(options.get("ssm_options"), dict):
        if "d_state" in options["ssm_options"]:
            raise ValueError(f"model {spec!r}: d_state is part of the shape every model shares; "
                             "set it with --d-state")
        options["ssm_options"] = {**overrides.get("ssm_options", {}), **options["ssm_options"]}
    return SpadeConfig.from_preset(system, "tiny", **{**overrides, **options})


def build_model(spec: str, shape: BenchShape):
    """SpadeForCausalLM for ``spec``; the eager model runs Attention.forward_ref (dense)."""
    from spadeformer.attention import Attention
    from spadeformer.models.heads import SpadeForCausalLM

    model = SpadeForCausalLM(model_config(spec, shape))
    if split_model(spec)[0] == "transformer-full-eager":
        for module in model.modules():
            if isinstance(module, Attention):
                # instance attribute shadows the class method: nn.Module.__call__ -> forward_ref
                module.forward = module.forward_ref
    return model


# --------------------------------------------------------------------------------- FLOPs
def attention_pairs(
    kind: str, length: int, window_size: int, chunk_size: int, batch: int = 1,
    with_bias: bool = False,
) -> int:
    """(query, key) score pairs one head computes over a batch of sequences, forward pass.

    * eager: the dense L x L score matrix per sequence (masked entries are computed too);
    * full (SDPA, causal): the causal triangle L (L + 1) / 2 per sequence -- fused causal
      kernels skip the tiles above the diagonal (their tile rounding is not counted);
    * window, L > w: what :mod:`spadeformer.ops.cpu_window_attn` computes: the batch's
      ceil(L / w) blocks per sequence, flattened, all but the first against 2w keys, plus one
      causal w x w block per sequence (the sequence starts, redone);
    * window, L <= w (the generic blocked kernel of ``ops.local_attn``): one block of L
      queries against L + (L - 1) keys per sequence;
    * chunk: ceil(L / c) causal blocks of c = min(chunk, L) per sequence: c (c + 1) / 2 pairs
      each.
    ``with_bias`` (an additive position bias, Mega's): SDPA then takes the causal mask as a
    dense mask and computes every pair of its blocks: full L^2, chunk c^2 per block, window
    (the generic blocked kernel) ceil(L / w) blocks of w queries against 2w keys per sequence.
    Ragged last blocks are padded and computed too. The window and chunk counts follow the CPU
    kernels; on CUDA the FlexAttention kernel computes the 128 x 128 tiles its block mask
    keeps instead, which these counts do not model.
    """
    L = length
    if kind == "eager":
        return batch * L * L
    if kind == "full":
        return batch * L * L if with_bias else batch * L * (L + 1) // 2
    if kind == "window":
        if L > window_size:
            w = window_size
            if with_bias:
                return batch * math.ceil(L / w) * w * 2 * w
            return (batch * math.ceil(L / w) - 1) * w * 2 * w + batch * w * (w + 1) // 2
        return batch * L * (2 * L - 1)
    if kind == "chunk":
        block = min(chunk_size, L)
        per_block = block * block if with_bias else block * (block + 1) // 2
        return batch * math.ceil(L / block) * per_block
    raise ValueError(f"kind must be one of ['eager', 'full', 'window', 'chunk'], got {kind!r}")


@dataclass(frozen=True)
class FlopCount:
    """Forward FLOPs of one training step's matmuls, split by how backward treats them."""

    trainable_matmul: float  # weights that get gradients: backward = 2x forward (dX, dW)
    frozen_matmul: float  # frozen weights (frozen S4 output block): backward = 1x (dX only)
    attention: float  # QK^T and PV: backward = 2x forward (dQ, dK, dP, dV)

    @property
    def forward(self) -> float:
        return self.trainable_matmul + self.frozen_matmul + self.attention

    @property
    def train_step(self) -> float:
        return 3 * self.trainable_matmul + 2 * self.frozen_matmul + 3 * self.attention


def train_flops(name: str, shape: BenchShape, length: int) -> FlopCount:
    """Analytic matmul FLOPs of one training step (2 FLOPs per multiply-add).

    Per token, forward, with d = d_model, f = d_ff, V = vocab:
      attention projections q, k, v, out: 8 d^2;  feed-forward: 4 d f;
      global layer: concat mix W (2d -> d): 4 d^2;  S4 output linear (d -> d), only where
      the S4 has its pointwise block (the ``s4`` stack; SPADE's S4 has none): 2 d^2;
      LM head (d -> V, tied to the embedding): 2 d V.
    Per attention layer: 4 d * pairs (QK^T and PV over all heads), pairs from
    :func:`attention_pairs`. Training step = 3 x forward, except frozen weights (no dW):
    2 x forward. Not counted: the S4 FFT convolution and kernel generation, norms,
    activations, softmax, the optimizer step.

    Mega blocks (z, v = Mega's widths): V projection 2 d v, fused gate projection
    2 d (2 d + z + v), U_h 2 v d, feed-forward 4 d f per token; the single head's attention
    2 (z + v) * pairs. Not counted: the EMA's kernel and FFT convolution.
    """
    from spadeformer.config import MEGA_POSITIONS

    cfg = model_config(name, shape)
    d, f, V = shape.d_model, shape.ff, shape.vocab_size
    tokens = shape.batch_size * length
    kind = "eager" if split_model(name)[0] == "transformer-full-eager" else cfg.attention
    trainable = frozen = attention = 0.0
    ssm_trainable = bool(cfg.ssm_options.get("trainable", True))
    ssm_pointwise = bool(cfg.ssm_options.get("pointwise", True))
    if cfg.block == "mega":
        z, v = cfg.mega_z_dim, cfg.mega_v_dim
        pairs = attention_pairs(kind, length, shape.window_size, shape.chunk_size,
                                shape.batch_size, with_bias=cfg.position in MEGA_POSITIONS)
        per_token = 2 * d * v + 2 * d * (2 * d + z + v) + 2 * v * d + 4 * d * f
        trainable = cfg.n_layers * per_token * tokens + 2 * d * V * tokens
        return FlopCount(trainable, 0.0, cfg.n_layers * 2 * (z + v) * pairs)
    for layer in cfg.layer_kinds():
        trainable += 4 * d * f * tokens
        if cfg.attention != "none":
            trainable += 8 * d * d * tokens
            pairs = attention_pairs(
                kind, length, shape.window_size, shape.chunk_size, shape.batch_size
            )
            attention += 4 * d * pairs
        if layer == "global":
            out_linear = 2 * d * d * tokens if ssm_pointwise else 0.0
            if ssm_trainable:
                trainable += out_linear
            else:
                frozen += out_linear
            if cfg.attention != "none" and cfg.combine == "concat":
                trainable += 4 * d * d * tokens
    trainable += 2 * d * V * tokens
    return FlopCount(trainable, frozen, attention)
