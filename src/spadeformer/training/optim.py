"""Optimiser parameter groups: weight decay on weights only, SSM parameters on their own.

SSM parameters (A, B, dt of S4 and friends) carry a hint, as in the official S4 code:

    param._optim = {"lr": 1e-3 or None, "weight_decay": 0.0}

A module may also keep the hints by attribute name in ``module._optim_hints`` (a dict
{param_name: hint}); that copy survives ``copy.deepcopy``, which drops attributes of
Parameters. The hint on the parameter wins when both exist.
"""

from __future__ import annotations

from typing import Any

from torch import nn

__all__ = ["param_groups"]


def _check_rate(name: str, value: Any, *, allow_zero: bool) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = ok and (value >= 0 if allow_zero else value > 0)
    if not ok:
        allowed = "a number >= 0" if allow_zero else "a positive number"
        raise ValueError(f"{name} must be {allowed}, got {value!r}")


def _module_hints(model: nn.Module) -> dict[int, dict]:
    """id(param) -> hint, from every submodule's ``_optim_hints``."""
    hints: dict[int, dict] = {}
    for module in model.modules():
        table = getattr(module, "_optim_hints", None)
        if not isinstance(table, dict):
            continue
        for name, hint in table.items():
            p = module._parameters.get(name)
            if p is not None:
                hints[id(p)] = hint
    return hints


def _no_decay_ids(model: nn.Module) -> set[int]:
    """id(param) of every parameter a module lists in ``_no_weight_decay``."""
    out: set[int] = set()
    for module in model.modules():
        for name in getattr(module, "_no_weight_decay", ()):
            p = module._parameters.get(name)
            if p is not None:
                out.add(id(p))
    return out


def param_groups(
    model: nn.Module, lr: float, weight_decay: float, ssm_lr: float | None = None,
    no_decay_marks: bool = True,
) -> list[dict]:
    """Parameter groups for ``torch.optim.AdamW`` (or any torch optimiser).

    Groups, in this order, empty ones left out:
        "decay":    params with ndim >= 2 (weight matrices, embeddings), ``lr``, ``weight_decay``;
        "no_decay": params with ndim < 2 (biases, norm scales) and those a module lists in
                    ``_no_weight_decay`` (per-channel vectors kept as matrices, e.g. S4's D;
                    see :func:`~spadeformer.ssm.base.mark_no_weight_decay`), ``lr``, weight
                    decay 0;
        "ssm", ... : params with an ``_optim`` hint: lr = hint["lr"], else ``ssm_lr``, else
                    ``lr``; weight decay = hint.get("weight_decay", 0.0); other hint keys are
                    copied into the group. One group per distinct setting, named "ssm" for the
                    first and "ssm_<k>" for the others.
    Frozen params (requires_grad False) are left out, and a parameter shared by several
    modules (tied weights) appears once. ``no_decay_marks=False`` ignores ``_no_weight_decay``
    (the grouping of spadeformer before it existed: resuming such a checkpoint needs it).

    Each group is a dict with keys "params", "lr", "weight_decay" and "name" (for logging).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    _check_rate("lr", lr, allow_zero=False)
    _check_rate("weight_decay", weight_decay, allow_zero=True)
    if ssm_lr is not None:
        _check_rate("ssm_lr", ssm_lr, allow_zero=False)
    module_hints = _module_hints(model)
    no_decay_ids = _no_decay_ids(model) if no_decay_marks else set()

    decay, no_decay = [], []
    hinted: dict[tuple, dict] = {}
    # named_parameters() yields a shared Parameter once (remove_duplicate=True).
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        hint = getattr(p, "_optim", None)
        if hint is None:
            hint = module_hints.get(id(p))
        if hint is None:
            (decay if p.ndim >= 2 and id(p) not in no_decay_ids else no_decay).append(p)
            continue
        if not isinstance(hint, dict):
            raise TypeError(f"parameter {name!r} has an _optim hint that is not a dict: {hint!r}")
        settings = dict(hint)
        hint_lr = settings.get("lr")
        settings["lr"] = hint_lr if hint_lr is not None else (ssm_lr if ssm_lr is not None else lr)
        settings.setdefault("weight_decay", 0.0)
        if settings["weight_decay"] is None:
            settings["weight_decay"] = 0.0
        _check_rate(f"_optim['lr'] of {name!r}", settings["lr"], allow_zero=False)
        _check_rate(f"_optim['weight_decay'] of {name!r}", settings["weight_decay"],
                    allow_zero=True)
        key = tuple(sorted((k, repr(v)) for k, v in settings.items()))
        if key not in hinted:
            group_name = "ssm" if not hinted else f"ssm_{len(hinted)}"
            hinted[key] = {"params": [], **settings, "name": group_name}
        hinted[key]["params"].append(p)

    groups = []
    if decay:
        groups.append({"params": decay, "lr": lr, "weight_decay": weight_decay, "name": "decay"})
    if no_decay:
        groups.append({"params": no_decay, "lr": lr, "weight_decay": 0.0, "name": "no_decay"})
    groups.extend(hinted.values())
    return groups
