"""Parallel (associative) scan for the diagonal linear recurrence used by S5.

    h_t = a_t * h_{t-1} + b_t,      h_{-1} = 0,      elementwise (real or complex)

The pairs (a, b) compose associatively (S5, Smith et al. 2023, Sec. 2.2 / App. H):

    (a_i, b_i) . (a_j, b_j) = (a_j a_i, a_j b_i + b_j)      (i before j)

and h_t is the b-part of (a_0, b_0) . ... . (a_t, b_t). :func:`associative_scan` evaluates
all prefixes with the odd/even recursion of Blelloch (as in ``jax.lax.associative_scan``):
combine neighbouring pairs, scan the half-length sequence recursively, then fill in the even
positions. That is O(L) work and 2 ceil(log2 L) dependent steps, for any length L (not only
powers of two). :func:`associative_scan_ref` is the sequential loop it must agree with.
"""

from __future__ import annotations

import torch

__all__ = ["associative_scan", "associative_scan_ref"]


def _prepare(a: torch.Tensor, b: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
        raise TypeError(
            f"a and b must be torch.Tensors, got {type(a).__name__} and {type(b).__name__}"
        )
    try:
        shape = torch.broadcast_shapes(a.shape, b.shape)
    except RuntimeError as err:
        raise ValueError(
            f"a and b must be broadcastable, got shapes {tuple(a.shape)} and {tuple(b.shape)}"
        ) from err
    if len(shape) == 0:
        raise ValueError("a and b must have at least one dimension (the scanned one)")
    if not -len(shape) <= dim < len(shape):
        raise ValueError(f"dim must be in [{-len(shape)}, {len(shape)}), got {dim}")
    dtype = torch.promote_types(a.dtype, b.dtype)
    # Broadcast first, then put the scanned axis in front: slicing x[1::2] along dim 0 takes
    # whole contiguous blocks, which is cheaper than strided slices of the last axis.
    a = a.to(dtype).expand(shape).movedim(dim, 0)
    b = b.to(dtype).expand(shape).movedim(dim, 0)
    return a, b, dim % len(shape)


def _interleave(even: torch.Tensor, odd: torch.Tensor) -> torch.Tensor:
    """[e0, o0, e1, o1, ...] along dim 0; len(even) is len(odd) or len(odd) + 1."""
    n_odd = odd.shape[0]
    pairs = torch.stack([even[:n_odd], odd], dim=1).flatten(0, 1)
    return torch.cat([pairs, even[n_odd:]], dim=0)


def _scan(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """h_t for every t along dim 0 (the b-part of the inclusive prefix compositions).

    The a-part of the prefixes is never needed: each level only combines its own elements'
    a with the h of the level below.
    """
    L = a.shape[0]
    if L < 2:
        return b
    n = L // 2
    a_e, b_e = a[0 : 2 * n : 2], b[0 : 2 * n : 2]  # positions 0, 2, 4, ...
    a_o, b_o = a[1 : 2 * n : 2], b[1 : 2 * n : 2]  # positions 1, 3, 5, ...
    # Combine each pair (2i, 2i+1); the recursive scan of the pairs gives h at the odd
    # positions 2i+1.
    h_odd = _scan(a_o * a_e, a_o * b_e + b_o)
    # Even position 2i (i >= 1): one more step from h at 2i-1.
    a_rest, b_rest = a[2::2], b[2::2]
    h_even = torch.cat([b[:1], a_rest * h_odd[: a_rest.shape[0]] + b_rest], dim=0)
    return _interleave(h_even, h_odd)


def associative_scan(a: torch.Tensor, b: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """All states of h_t = a_t * h_{t-1} + b_t (h_{-1} = 0) along ``dim``, in parallel.

    Args:
        a: decay factors, broadcastable against ``b`` (e.g. a constant (N,) for S5).
        b: inputs, (..., L, ...) with the sequence on ``dim``; real or complex.
        dim: the sequence axis.
    Returns:
        h with the broadcast shape of a and b (sequence still on ``dim``), dtype promoted.
    """
    a, b, dim = _prepare(a, b, dim)
    h = _scan(a, b)
    return h.movedim(0, dim)


def associative_scan_ref(a: torch.Tensor, b: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """Reference twin of :func:`associative_scan`: the sequential Python loop, O(L) steps."""
    a, b, dim = _prepare(a, b, dim)
    h = torch.zeros_like(b[0])
    out = []
    for t in range(b.shape[0]):
        h = a[t] * h + b[t]
        out.append(h)
    return torch.stack(out, dim=0).movedim(0, dim)
