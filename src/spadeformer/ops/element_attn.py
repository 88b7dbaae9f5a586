"""Element-wise attention weights: Mega's alternatives to the softmax (Ma et al. 2022, Sec. 3.3
and the reference code's ``attention_activation`` "laplace" / "relu2").

A query i with n_i allowed keys (its pattern, minus padded keys) weighs key j by

    w_ij = f(q_i . k_j / n_i + b_ij)        and 0 for keys it may not see,

with no normalisation over j and no 1 / sqrt(d) scale. f is

    laplace(x) = 0.5 * (1 + erf((x - mu) / (sigma * sqrt(2)))),
                 mu = sqrt(1/2), sigma = sqrt(1/(4 pi))
    relu2(x)   = max(x, 0)^2

The laplace function is the reference's approximation of relu^2 that stays bounded and smooth
(Mega Sec. 3.3); the reference's LRA image and Pathfinder runs use it.

The reference divides by the chunk's count of unpadded keys, or, with a causal mask, by the
query's count of earlier keys; n_i (allowed and unpadded) is both of these where they apply.
The fast paths (:mod:`spadeformer.ops.local_attn`) and the dense reference share
:func:`element_weights`, so the two only differ in which blocks they compute.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["ATTENTION_FNS", "ELEMENT_FNS", "check_attention_fn", "element_attend",
           "element_weights", "laplace", "relu2"]

_LAPLACE_MU = math.sqrt(0.5)
_LAPLACE_SIGMA = math.sqrt(1.0 / (4.0 * math.pi))


def laplace(x: torch.Tensor) -> torch.Tensor:
    """The Gaussian CDF at (x - mu) / sigma: near relu^2 around mu, bounded in (0, 1).
    Written with erfc: 1 + erf(z) cancels for the negative z that most scores give."""
    return 0.5 * torch.erfc((_LAPLACE_MU - x) / (_LAPLACE_SIGMA * math.sqrt(2.0)))


def relu2(x: torch.Tensor) -> torch.Tensor:
    """max(x, 0)^2 (So et al. 2021, "Primer")."""
    return torch.square(F.relu(x))


ELEMENT_FNS = {"laplace": laplace, "relu2": relu2}
ATTENTION_FNS = ("softmax", *ELEMENT_FNS)


def check_attention_fn(attention_fn: object) -> str:
    if attention_fn not in ATTENTION_FNS:
        raise ValueError(f"attention_fn must be one of {list(ATTENTION_FNS)}, got "
                         f"{attention_fn!r}")
    return attention_fn


def element_weights(qk: torch.Tensor, allowed: torch.Tensor | None, bias: torch.Tensor | None,
                    attention_fn: str) -> torch.Tensor:
    """Raw scores q.k (..., Lq, Lk) -> weights (..., Lq, Lk) by the module docstring.

    ``allowed``: bool, broadcastable to ``qk``, True where the query may see the key (None =
    every key). ``bias``: additive, broadcastable (None = no bias). A row with no allowed key
    gets zero weights. Computed in at least fp32 (under bf16 autocast too, as a softmax is),
    returned in ``qk``'s dtype.
    """
    work = torch.promote_types(qk.dtype, torch.float32)
    x = qk.to(work)
    if allowed is None:
        x = x / qk.shape[-1]
    else:
        allowed = allowed.expand_as(qk)
        x = x / allowed.sum(-1, keepdim=True).clamp(min=1).to(work)
    if bias is not None:
        x = x + bias.to(work)
    weights = ELEMENT_FNS[attention_fn](x)
    if allowed is not None:
        weights = weights * allowed
    return weights.to(qk.dtype)


def element_attend(qk: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor | None,
                   bias: torch.Tensor | None, attention_fn: str,
                   dropout_p: float = 0.0) -> torch.Tensor:
    """:func:`element_weights`, dropout on the weights, then the weighted sum of the values:
    qk (..., Lq, Lk), v (..., Lk, dv) -> (..., Lq, dv)."""
    weights = element_weights(qk, allowed, bias, attention_fn)
    if dropout_p > 0.0:
        weights = F.dropout(weights, p=dropout_p)
    return weights @ v.to(weights.dtype)
