"""Global information extractors: S4, S4D, S5, Hyena, an LSTM and Mega's damped EMA, one file
each.

All follow the protocol of :class:`spadeformer.ssm.base.GlobalExtractor`.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
from typing import Any

from spadeformer.ssm.base import GlobalExtractor

__all__ = ["GlobalExtractor", "build_ssm", "check_ssm_options", "S4", "S4D", "S5", "Hyena",
           "LSTMGlobal", "MultiHeadEMA"]

# kind -> (module, class). Imported lazily so one broken optional piece never blocks the rest.
_REGISTRY = {
    "s4": ("spadeformer.ssm.s4", "S4"),
    "s4d": ("spadeformer.ssm.s4d", "S4D"),
    "s5": ("spadeformer.ssm.s5", "S5"),
    "hyena": ("spadeformer.ssm.hyena", "Hyena"),
    "lstm": ("spadeformer.ssm.lstm", "LSTMGlobal"),
    "ema": ("spadeformer.ssm.ema", "MultiHeadEMA"),
}


def ssm_class(kind: str) -> type[GlobalExtractor]:
    if kind not in _REGISTRY:
        raise ValueError(f"ssm must be one of {sorted(_REGISTRY)}, got {kind!r}")
    module, name = _REGISTRY[kind]
    return getattr(importlib.import_module(module), name)


def ssm_option_names(kind: str) -> list[str]:
    """The keyword options of SSM ``kind`` (its constructor's arguments but d_model and
    bidirectional, which the model sets)."""
    params = inspect.signature(ssm_class(kind).__init__).parameters
    return [n for n in params if n not in ("self", "d_model", "bidirectional")]


def check_ssm_options(kind: str, options: dict[str, Any], name: str = "ssm_options") -> None:
    """Raise ValueError naming an unknown option of SSM ``kind``, its closest valid name and
    the valid ones."""
    valid = ssm_option_names(kind)
    for key in options:
        if key not in valid:
            close = difflib.get_close_matches(str(key), valid, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(
                f"unknown {name} key {key!r} for ssm={kind!r}{hint}; valid keys: {valid} (a "
                "preset's options for another ssm: drop them, e.g. model.ssm_options=null)"
            )


def build_ssm(kind: str, d_model: int, *, bidirectional: bool, **options: Any) -> GlobalExtractor:
    """Instantiate the SSM ``kind`` ("s4", "s4d", "s5", "hyena", "lstm", "ema")."""
    cls = ssm_class(kind)
    check_ssm_options(kind, options, name="SSM option")
    try:
        return cls(d_model, bidirectional=bidirectional, **options)
    except TypeError as err:  # unknown option: say which SSM and what it takes
        raise ValueError(f"bad ssm_options for ssm={kind!r}: {err}") from err


def __getattr__(name: str) -> Any:
    for kind, (_, cls_name) in _REGISTRY.items():
        if cls_name == name:
            return ssm_class(kind)
    raise AttributeError(f"module 'spadeformer.ssm' has no attribute {name!r}")
