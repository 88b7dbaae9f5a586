"""FlexAttention path for full / window / chunk attention (CUDA), with block-sparse masks.

``torch.nn.attention.flex_attention`` (PyTorch >= 2.5) compiles one fused kernel from two small
functions: a ``mask_mod(b, h, q_idx, kv_idx) -> bool`` (our patterns, plus key padding) turned
into a :class:`BlockMask` that skips every (128 x 128) tile with no allowed pair, and a
``score_mod(score, b, h, q_idx, kv_idx)`` that adds a relative position bias (T5 buckets) to a
score. Unlike the blocked SDPA path it computes no tile of the band it then masks away, and the
bias never exists as an (L, L) or (block, band) tensor.

Scope, checked by :func:`flex_supports` (anything else goes to the SDPA path):

* no dropout (flex has none);
* bias: none, or a translation-invariant callable that does not need the query (T5, Mega's
  simple / rotary): it is tabulated once per call over the relative offsets the pattern can
  reach, and ``score_mod`` indexes the table (gradients reach the bias parameters through it);
* fully masked query rows give zeros, as in :func:`spadeformer.ops.local_attn.attention_ref`.

On CUDA the kernel is ``torch.compile(flex_attention)``. On CPU the *uncompiled* function runs
(a dense reference inside PyTorch, forward only): that is how the tests hold this path to
``attention_ref`` without a GPU; it is never chosen automatically on CPU.
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Callable

import torch

__all__ = [
    "BACKENDS",
    "flex_available",
    "flex_local_attention",
    "flex_supports",
    "note_failure",
    "pick_backend",
]

BACKENDS = ("auto", "sdpa", "flex")
_ENV = "SPADEFORMER_ATTENTION_BACKEND"  # "sdpa" turns the flex path off everywhere
_broken: list[str] = []  # set once a compiled flex call failed: auto then stays on SDPA


@functools.cache
def flex_available() -> bool:
    """True when this PyTorch has FlexAttention (``torch.nn.attention.flex_attention``)."""
    try:
        from torch.nn.attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


def flex_supports(bias: object, dropout_p: float) -> bool:
    """Whether the flex path can compute this call (see the module docstring for the scope)."""
    if dropout_p > 0.0 or not flex_available():
        return False
    if bias is None:
        return True
    return (
        callable(bias)  # a dense tensor bias is not callable
        and getattr(bias, "translation_invariant", False)
        and not getattr(bias, "needs_query", False)
    )


def pick_backend(backend: str, q: torch.Tensor, bias: object, dropout_p: float) -> str:
    """Resolve ``backend`` ("auto" | "sdpa" | "flex") for one call -> "sdpa" or "flex".

    "auto" takes flex on CUDA when :func:`flex_supports` and neither the environment variable
    ``SPADEFORMER_ATTENTION_BACKEND=sdpa`` nor an earlier failure of the compiled kernel says
    otherwise. "flex" insists (and raises when the call is out of its scope).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "sdpa":
        return "sdpa"
    if backend == "flex":
        if not flex_supports(bias, dropout_p):
            raise ValueError(
                "backend='flex' needs FlexAttention (PyTorch >= 2.5), dropout_p=0 and a bias "
                "that is None or translation-invariant without the query (T5, Mega's); got "
                f"dropout_p={dropout_p}, bias={type(bias).__name__}"
            )
        return "flex"
    wanted = os.environ.get(_ENV, "auto")
    if wanted not in BACKENDS:
        raise ValueError(f"{_ENV} must be one of {BACKENDS}, got {wanted!r}")
    if wanted == "sdpa" or _broken or q.device.type != "cuda":
        return "sdpa"
    return "flex" if flex_supports(bias, dropout_p) else "sdpa"


def note_failure(err: BaseException) -> None:
    """Remember that the compiled kernel failed (auto falls back to SDPA from now on)."""
    if not _broken:
        warnings.warn(
            f"FlexAttention failed ({type(err).__name__}: {str(err)[:200]}); attention falls "
            f"back to blocked SDPA for the rest of this process (set {_ENV}=sdpa to skip "
            "the attempt)",
            RuntimeWarning,
            stacklevel=3,
        )
    _broken.append(repr(err))


# --------------------------------------------------------------------------------------------
# masks and score modifications
# --------------------------------------------------------------------------------------------


def _pattern_mask_mod(
    pattern: str, window_size: int | None, chunk_size: int | None, causal: bool,
    key_padding_mask: torch.Tensor | None,
) -> Callable:
    """mask_mod(b, h, q_idx, kv_idx) -> bool tensor, True where the pair is allowed."""
    from spadeformer.ops.local_attn import pattern_allows  # local_attn imports this module

    def allowed(b, h, q_idx, kv_idx):
        ok = pattern_allows(pattern, q_idx, kv_idx, window_size, chunk_size, causal)
        if key_padding_mask is not None:
            ok = ok & ~key_padding_mask[b, kv_idx]
        return ok

    return allowed


def _reach(pattern: str, length: int, window_size: int | None, chunk_size: int | None) -> int:
    """Largest |kv - q| the pattern allows at this length (sizes the bias table)."""
    if pattern == "window":
        return min(window_size, length - 1)
    if pattern == "chunk":
        return min(chunk_size, length) - 1
    return length - 1


def _bias_score_mod(bias: Callable, reach: int, device: torch.device) -> Callable:
    """score_mod adding ``bias`` through a table over relative offsets -reach .. reach."""
    offsets = torch.arange(-reach, reach + 1, device=device)
    table = bias(torch.zeros(1, dtype=torch.long, device=device), offsets)  # (H', 1, 2r + 1)
    table = table[:, 0].float()
    shared = table.shape[0] == 1

    def add_bias(score, b, h, q_idx, kv_idx):
        # clamp: the kernel also evaluates masked pairs of partly allowed tiles
        rel = (kv_idx - q_idx).clamp(-reach, reach) + reach
        return score + (table[0, rel] if shared else table[h, rel])

    return add_bias


@functools.lru_cache(maxsize=16)
def _cached_block_mask(pattern, window_size, chunk_size, causal, length, device_str):
    from torch.nn.attention.flex_attention import create_block_mask

    mask_mod = _pattern_mask_mod(pattern, window_size, chunk_size, causal, None)
    return create_block_mask(mask_mod, None, None, length, length, device=device_str)


def _block_mask(pattern, window_size, chunk_size, causal, key_padding_mask, q):
    from torch.nn.attention.flex_attention import create_block_mask

    B, _, L, _ = q.shape
    if key_padding_mask is None:  # the same for every batch: built once per shape
        return _cached_block_mask(pattern, window_size, chunk_size, causal, L, str(q.device))
    mask_mod = _pattern_mask_mod(pattern, window_size, chunk_size, causal, key_padding_mask)
    return create_block_mask(mask_mod, B, None, L, L, device=q.device)


@functools.cache
def _compiled_flex() -> Callable:
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def flex_local_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: str,
    window_size: int | None = None,
    chunk_size: int | None = None,
    causal: bool = True,
    key_padding_mask: torch.Tensor | None = None,
    bias: Callable | None = None,
) -> torch.Tensor:
    """FlexAttention twin of :func:`~spadeformer.ops.local_attn.attention_ref` (dropout 0).

    q, k: (batch, heads, L, d); v: (batch, heads, L, dv) -> (batch, heads, L, dv). Arguments
    are validated by the caller (:func:`~spadeformer.ops.local_attn.local_attention`).
    """
    from torch.nn.attention.flex_attention import flex_attention

    L = q.shape[2]
    block_mask = _block_mask(pattern, window_size, chunk_size, causal, key_padding_mask, q)
    score_mod = None
    if bias is not None:
        score_mod = _bias_score_mod(bias, _reach(pattern, L, window_size, chunk_size), q.device)
    if q.device.type == "cuda":
        return _compiled_flex()(q, k, v, score_mod=score_mod, block_mask=block_mask)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        raise NotImplementedError(
            "the flex attention path runs on CPU only without gradients (PyTorch has no CPU "
            "backward for FlexAttention); use backend='sdpa' for training on CPU"
        )
    with warnings.catch_warnings():  # uncompiled on purpose: the CPU run is a correctness check
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile")
        return flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask)
