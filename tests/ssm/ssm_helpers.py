"""Helpers shared by the tests of the global extractors (imported as ``ssm_helpers``)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.func import functional_call


def run_steps(ssm: nn.Module, x: torch.Tensor, state: Any) -> tuple[torch.Tensor, Any]:
    """Feed x (batch, length, d_model) to ``ssm.step`` one token at a time, from ``state``.

    Returns the step outputs stacked (batch, length, d_model) and the last state.
    """
    ys = []
    for t in range(x.shape[1]):
        y_t, state = ssm.step(x[:, t], state)
        ys.append(y_t)
    return torch.stack(ys, 1), state


class Float64Forward(nn.Module):
    """forward() runs the SSM in fp32 by design; gradcheck needs the float64 _forward."""

    def __init__(self, m: nn.Module):
        super().__init__()
        self.m = m

    def forward(self, u):
        return self.m._forward(u, None)


def gradcheck_module(m: nn.Module, u: torch.Tensor) -> bool:
    """gradcheck w.r.t. the input and every parameter of m (float64)."""
    wrapper = Float64Forward(m.double())
    names = [n for n, _ in wrapper.named_parameters()]
    params = [p.detach().clone().requires_grad_() for p in wrapper.parameters()]

    def f(u, *ps):
        return functional_call(wrapper, dict(zip(names, ps, strict=True)), (u,), strict=True)

    return torch.autograd.gradcheck(f, (u.requires_grad_(), *params), fast_mode=True)


def split_directions(bi: nn.Module, fwd: nn.Module, rev: nn.Module, shared: tuple) -> None:
    """Make the causal ``fwd`` and ``rev`` the two halves of the bidirectional ``bi``.

    Both get bi's ``shared`` SSM parameters (one SSM, two read-outs); fwd gets C and D, rev
    gets C_reverse and D = 0 (the skip term is counted once, by the forward half).
    """
    with torch.no_grad():
        for part in (fwd, rev):
            for name in shared:
                getattr(part, name).copy_(getattr(bi, name))
        fwd.C.copy_(bi.C)
        fwd.D.copy_(bi.D)
        rev.C.copy_(bi.C_reverse)
        rev.D.zero_()


def assert_hinted(m: nn.Module, names: set[str], lr: float | None) -> None:
    """Exactly the parameters ``names`` of m carry the optimiser hint, with learning rate lr
    and no weight decay."""
    hinted = {name for name, p in m.named_parameters() if hasattr(p, "_optim")}
    assert hinted == names
    for name in hinted:
        assert getattr(m, name)._optim == {"lr": lr, "weight_decay": 0.0}
