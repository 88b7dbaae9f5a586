"""Streaming generation on top of ``step()``: constant memory in the number of tokens.

The SSM carries a fixed-size state and window / chunk attention a fixed-size rolling cache, so
neither memory nor per-token time grows with how many tokens were already produced. Two
exceptions: a "full"-attention model keeps a growing key/value cache, as any Transformer does,
and Hyena's state keeps its whole input history (its implicit filter has no recurrent form:
O(t) memory and time per token, see :mod:`spadeformer.ssm.hyena`). The prompt is consumed
token by token through the same ``step()``, which is exact by construction.
"""

from __future__ import annotations

import math
import numbers
import operator
from collections.abc import Callable

import torch

__all__ = ["check_decoding_length", "check_generate_args", "filter_logits", "generate",
           "sample_next"]


def _is_number(value) -> bool:
    """A real number (numpy scalars too), not a bool."""
    return not isinstance(value, bool) and isinstance(value, numbers.Real)


def _as_int(value) -> int | None:
    """``value`` as a Python int when it is an integer (numpy integers too, not bools)."""
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def _check_sampling(temperature, top_k, top_p) -> None:
    if not _is_number(temperature) or not math.isfinite(temperature) or temperature < 0:
        raise ValueError(
            f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}"
        )
    _check_filters(top_k, top_p)


def _check_filters(top_k, top_p) -> None:
    if top_k is not None and (_as_int(top_k) is None or top_k < 1):
        raise ValueError(f"top_k must be None or an integer >= 1, got {top_k!r}")
    if top_p is not None and (not _is_number(top_p) or not 0 < top_p <= 1):
        raise ValueError(f"top_p must be None or a number in (0, 1], got {top_p!r}")


def check_generate_args(max_new_tokens, temperature, top_k, top_p, seed=None) -> None:
    """Raise ValueError naming the first bad argument of :func:`generate`."""
    n = _as_int(max_new_tokens)
    if n is None or n < 0:
        raise ValueError(f"max_new_tokens must be a non-negative integer, got {max_new_tokens!r}")
    _check_sampling(temperature, top_k, top_p)
    if seed is not None:
        value = _as_int(seed)
        if value is None or not -(2**63) <= value < 2**64:  # what torch.Generator takes
            raise ValueError(f"seed must be None or an integer in [-2**63, 2**64), got {seed!r}")


def check_decoding_length(model, prompt_length: int, max_new_tokens: int) -> None:
    """Raise ValueError when ``model.max_steps`` (the positions' limit, see
    ``SpadeConfig.position_limit``; None or absent = no limit) cannot hold the prompt plus
    ``max_new_tokens`` (the last token is never stepped)."""
    steps = prompt_length + max(int(max_new_tokens) - 1, 0)
    limit = getattr(model, "max_steps", None)
    if limit is not None and steps > limit:
        raise ValueError(
            f"prompt length {prompt_length} + max_new_tokens={max_new_tokens} needs "
            f"{steps} decoding steps, but the model takes at most {limit} (its positions end at "
            f"max_position={limit}); shorten the prompt or ask for fewer tokens"
        )


def filter_logits(logits: torch.Tensor, top_k: int | None = None,
                  top_p: float | None = None) -> torch.Tensor:
    """Set to -inf every logit outside the top-k and outside the nucleus of mass top_p.

    logits: (batch, vocab) -> (batch, vocab). top_k >= 1, top_p in (0, 1]: the most likely
    token always survives.
    """
    _check_filters(top_k, top_p)
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, int(top_k), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the mass strictly before it already reaches top_p
        drop_sorted = (probs.cumsum(-1) - probs) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """logits (batch, vocab) -> token ids (batch,). temperature 0 = greedy (argmax)."""
    _check_sampling(temperature, top_k, top_p)
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float()
    # shift the best logit to 0 first: a tiny temperature then gives -inf, never inf - inf
    logits = (logits - logits.amax(-1, keepdim=True)) / temperature
    logits = filter_logits(logits, top_k, top_p)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
             on_token: Callable[[torch.Tensor], None] | None = None,
             eos_token_id: int | None = None) -> torch.Tensor:
    """Continue ``input_ids`` (batch, prompt_length >= 1) by up to ``max_new_tokens`` tokens.

    ``model`` needs ``initial_state(batch)`` and ``step(ids (batch,), state) -> (logits, state)``
    (e.g. :class:`SpadeForCausalLM`); its optional ``max_steps`` (int or None) bounds the
    decoding steps, checked before the first. ``on_token`` is called with each new (batch,)
    id tensor as soon as it is sampled (the CLI streams text this way). With
    ``eos_token_id``, a row that has produced it keeps producing it, and decoding stops
    once every row has. Returns (batch, prompt + new) ids.
    """
    check_generate_args(max_new_tokens, temperature, top_k, top_p, seed)
    if eos_token_id is not None and (_as_int(eos_token_id) is None or eos_token_id < 0):
        raise ValueError(f"eos_token_id must be None or a token id >= 0, got {eos_token_id!r}")
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[1] < 1:
        got = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids)
        raise ValueError(f"input_ids must have shape (batch, prompt_length >= 1), got {got}")
    check_decoding_length(model, input_ids.shape[1], max_new_tokens)
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        input_ids = input_ids.to(device)
        generator = None
        if seed is not None:
            generator = torch.Generator(device=device).manual_seed(operator.index(seed))
        state = model.initial_state(input_ids.shape[0])
        for t in range(input_ids.shape[1]):
            logits, state = model.step(input_ids[:, t], state)
        if eos_token_id is not None and eos_token_id >= logits.shape[-1]:
            raise ValueError(f"eos_token_id={eos_token_id} is not an id of this model's "
                             f"vocabulary of {logits.shape[-1]} tokens")
        out = [input_ids]
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=device)
        for i in range(max_new_tokens):
            next_ids = sample_next(logits, temperature, top_k, top_p, generator)
            if eos_token_id is not None:
                next_ids = next_ids.masked_fill(done, eos_token_id)
                done = done | (next_ids == eos_token_id)
            out.append(next_ids[:, None])
            if on_token is not None:
                on_token(next_ids)
            if eos_token_id is not None and bool(done.all()):  # (a sync: only when asked)
                break
            if i + 1 < max_new_tokens:  # the last token's logits would never be used
                logits, state = model.step(next_ids, state)
        return torch.cat(out, dim=1)
    finally:
        model.train(was_training)
