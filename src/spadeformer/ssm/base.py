"""The protocol every global information extractor (S4, S4D, S5, Hyena, LSTM) follows.

    forward(x, padding_mask=None) -> y        x, y: (batch, length, d_model)
    initial_state(batch_size) -> state        state: a tensor or tuple of tensors
    step(x_t, state) -> (y_t, state)          x_t, y_t: (batch, d_model), causal models only
    bidirectional: bool                       sees the future too (no step())
    trainable: bool                           False = every parameter frozen at initialisation

``padding_mask`` is (batch, length) bool, True at padded positions: padded positions neither
contribute to nor receive output (their output is zero). The computation runs in float32 even
under autocast (SSM kernels lose accuracy in half precision), or in float64 for a module cast
with ``.double()``; the input is cast to that dtype and the output back to the input's dtype.
Casting a whole model to half precision (``model.to(torch.bfloat16)``) leaves an SSM's
parameters in float32, for the same reason.
"""

from __future__ import annotations

import contextlib
import math
import weakref
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

__all__ = [
    "CachedKernels",
    "FrozenCache",
    "GlobalExtractor",
    "check_dropout",
    "check_dt_range",
    "check_lr",
    "check_padding_mask",
    "check_positive",
    "check_sequence",
    "check_state",
    "check_state_size",
    "fp32_region",
    "default_device",
    "mark_no_weight_decay",
    "mark_ssm_params",
]


def check_positive(name: str, value: Any, *, allow_float: bool = False) -> None:
    """Raise ValueError unless ``value`` is a positive int (or finite number, with allow_float)."""
    kinds = (int, float) if allow_float else (int,)
    if (
        isinstance(value, bool)
        or not isinstance(value, kinds)
        or not math.isfinite(value)  # NaN passes `value <= 0`
        or value <= 0
    ):
        kind = "finite number" if allow_float else "integer"
        raise ValueError(f"{name} must be a positive {kind}, got {value!r}")


def check_state_size(d_state: Any, multiple_of: int, error: str) -> None:
    """d_state must be a positive integer divisible by ``multiple_of``.

    ``error`` is the message for a d_state that does not divide, formatted with ``d_state``:
    each SSM says in its own words why (how it stores conjugate pairs).
    """
    check_positive("d_state", d_state)
    if d_state % multiple_of:
        raise ValueError(error.format(d_state=d_state))


def check_dt_range(dt_min: Any, dt_max: Any) -> None:
    """0 < dt_min <= dt_max, both numbers."""
    check_positive("dt_min", dt_min, allow_float=True)
    check_positive("dt_max", dt_max, allow_float=True)
    if dt_min > dt_max:
        raise ValueError(f"dt_min must be <= dt_max, got dt_min={dt_min!r} > dt_max={dt_max!r}")


def check_lr(lr: Any) -> None:
    """None (use the optimiser's SSM learning rate) or a positive finite number."""
    if lr is not None:
        check_positive("lr", lr, allow_float=True)


def check_dropout(dropout: Any, name: str = "dropout") -> None:
    """A number in [0, 1) (bools are refused: True is not a probability); ``name`` is the
    argument the message names."""
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not (
        0.0 <= dropout < 1.0
    ):
        raise ValueError(f"{name} must be a number in [0, 1), got {dropout!r}")


def check_step_input(x_t: Any, d_model: int) -> None:
    """x_t must be a tensor of shape (batch, d_model): one token per row of a decoding step."""
    if not isinstance(x_t, torch.Tensor) or x_t.dim() != 2 or x_t.shape[-1] != d_model:
        got = tuple(x_t.shape) if isinstance(x_t, torch.Tensor) else type(x_t).__name__
        raise ValueError(f"x_t must have shape (batch, d_model={d_model}), got {got}")


def check_sequence(x: Any, d_model: int, name: str = "x") -> None:
    """x must be a floating tensor of shape (batch, length >= 1, d_model)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 3:
        raise ValueError(
            f"{name} must have shape (batch, length, d_model={d_model}), got shape {tuple(x.shape)}"
        )
    if x.shape[-1] != d_model:
        raise ValueError(f"{name} must have last dimension d_model={d_model}, got {x.shape[-1]}")
    if x.shape[1] < 1:
        raise ValueError(f"{name} must have length >= 1, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")


def check_state(state: Any, expected: tuple[int, ...], axes: str) -> None:
    """A recurrent state must be a tensor of shape ``expected`` (named ``axes``, e.g.
    "batch, d_model, d_state"), as ``initial_state(batch)`` makes it."""
    if not isinstance(state, torch.Tensor) or tuple(state.shape) != expected:
        got = tuple(state.shape) if isinstance(state, torch.Tensor) else type(state).__name__
        raise ValueError(
            f"state must have shape ({axes}) = {expected}, got {got}; use initial_state(batch_size)"
        )


def check_padding_mask(padding_mask: Any, batch: int, length: int) -> None:
    """padding_mask must be None or a bool tensor of shape (batch, length)."""
    if padding_mask is None:
        return
    if not isinstance(padding_mask, torch.Tensor) or padding_mask.dtype != torch.bool:
        got = padding_mask.dtype if isinstance(padding_mask, torch.Tensor) else type(padding_mask)
        raise TypeError(f"padding_mask must be a bool tensor (True = padded), got {got}")
    if tuple(padding_mask.shape) != (batch, length):
        raise ValueError(
            f"padding_mask must have shape (batch, length) = ({batch}, {length}), "
            f"got {tuple(padding_mask.shape)}"
        )


def mark_ssm_params(module: nn.Module, names: Sequence[str], lr: float | None) -> None:
    """Optimiser hint for the parameters ``names`` (dotted paths below ``module``): their own
    learning rate (None = the optimiser's ``ssm_lr``, else its lr) and no weight decay, as the
    official S4 code does. Kept as ``param._optim`` and in the owning module's
    ``_optim_hints`` (which survives ``copy.deepcopy``, unlike attributes of a Parameter);
    :func:`spadeformer.training.optim.param_groups` reads both."""
    if isinstance(names, str):
        raise TypeError(f"names must be a sequence of parameter names, got the string {names!r}")
    for name in names:
        owner_name, _, leaf = name.rpartition(".")
        owner = module.get_submodule(owner_name) if owner_name else module
        if not isinstance(owner._parameters.get(leaf), nn.Parameter):
            raise ValueError(f"{name!r} is not a parameter of this {type(module).__name__}")
        getattr(owner, leaf)._optim = {"lr": lr, "weight_decay": 0.0}
        table = owner.__dict__.setdefault("_optim_hints", {})
        table[leaf] = {"lr": lr, "weight_decay": 0.0}


def default_device() -> torch.device:
    """Where factory calls put new tensors now (a ``with torch.device(...)`` context included):
    the HiPPO initialisers compute on the CPU (eigh has no meta / all-GPU kernels) and their
    results must move here, or a module built under ``torch.device("meta")`` or ``"cuda"``
    would be split across two devices."""
    return torch.empty(0).device


def mark_no_weight_decay(module: nn.Module, names: Sequence[str]) -> None:
    """Keep the parameters ``names`` of ``module`` (direct attributes) out of weight decay at
    the optimiser's learning rate: per-channel skip and bias vectors (S4's D, Hyena's filter
    bias) stored as (channels, d_model) matrices, which the "decay what has ndim >= 2" rule
    of :func:`spadeformer.training.optim.param_groups` would otherwise decay. Kept in the
    module's ``_no_weight_decay`` set (survives ``copy.deepcopy``)."""
    for name in names:
        if not isinstance(module._parameters.get(name), nn.Parameter):
            raise ValueError(f"{name!r} is not a parameter of this {type(module).__name__}")
        module.__dict__.setdefault("_no_weight_decay", set()).add(name)


def fp32_region(device_type: str) -> contextlib.AbstractContextManager:
    """Disable autocast so the SSM runs in float32 whatever the caller's autocast says."""
    if device_type in ("cuda", "cpu", "xpu", "mps"):
        return torch.autocast(device_type=device_type, enabled=False)
    return contextlib.nullcontext()


_HALF = (torch.float16, torch.bfloat16)


def _full_precision(params: Sequence[torch.Tensor]) -> contextlib.AbstractContextManager:
    """:func:`fp32_region` on the device of ``params`` (none: no autocast to leave)."""
    return fp32_region(params[0].device.type) if params else contextlib.nullcontext()


class FrozenCache:
    """Values computed from parameters that do not change (a frozen SSM's kernels, spectra,
    filters), keyed by what was computed; least recently used entries dropped beyond
    ``max_entries``.

    An entry stays valid while each parameter it was computed from still views the same
    memory (the same storage object, held by weak reference so the cache keeps nothing alive,
    at the same offset, shape, stride and dtype) with the same in-place version counter. So
    ``load_state_dict`` (in place or ``assign=True``), ``.to()``, tensors swapped in by
    ``torch.func.functional_call`` and in-place updates by autograd-tracked ops (the default
    torch optimisers) all make it stale, while ``p.detach()`` views of the same parameters
    still hit. Not seen: edits through ``p.data`` and optimisers that bypass version counters
    (``fused=True``); clear the cache after those. Values made under ``torch.inference_mode``
    are inference tensors, which autograd cannot save: they are kept apart from the others.
    Parameters without a storage or a version counter (inference tensors, ``vmap``-batched
    ones) and tensor subclasses (DTensor shards) are not cached at all. Copies and pickles of a
    module start with an empty cache. (Under ``torch.compile`` the lookup is a few graph
    breaks; the model is not compiled as a whole here, and ``torch.compiler.disable`` would
    import torch._dynamo with spadeformer, doubling its import time.)
    """

    def __init__(self, max_entries: int):
        self.max_entries = max_entries
        self._entries: OrderedDict[tuple, tuple[tuple, tuple, Any]] = OrderedDict()

    @staticmethod
    def _fingerprint(params: Sequence[torch.Tensor]) -> tuple[tuple, tuple] | None:
        """(storages, layout stamps) of ``params``, or None when they cannot be tracked."""
        if any(type(p) not in (torch.Tensor, nn.Parameter) for p in params):
            return None  # subclasses (DTensor shards ...) may change behind their storage
        try:
            storages = tuple(p.untyped_storage() for p in params)
            # data_ptr: a storage resized in place (as FSDP does) keeps its object
            stamps = tuple((p.data_ptr(), p.storage_offset(), tuple(p.shape), p.stride(),
                            p.dtype, p._version) for p in params)
        except (RuntimeError, NotImplementedError):  # inference / functorch-batched tensors
            return None
        return storages, stamps

    def get(self, what: tuple, params: Sequence[torch.Tensor], compute: Callable[[], Any]) -> Any:
        """The cached ``compute()`` for ``what`` and ``params``; computed without autograd and
        in float32 whatever autocast the caller is under (a kernel first asked for inside an
        autocast region must not be cached in bf16 for every later call) when missing or
        stale."""
        fingerprint = self._fingerprint(params)
        if fingerprint is None:
            with torch.no_grad(), _full_precision(params):
                return compute()
        storages, stamps = fingerprint
        key = (what, torch.is_inference_mode_enabled())
        entry = self._entries.get(key)
        if entry is not None:
            refs, old_stamps, value = entry
            if old_stamps == stamps and all(
                r() is st for r, st in zip(refs, storages, strict=True)
            ):
                self._entries.move_to_end(key)
                return value
        with torch.no_grad(), _full_precision(params):
            value = compute()
        self._entries[key] = (tuple(weakref.ref(st) for st in storages), stamps, value)
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
        return value

    def get_when_frozen(self, what: tuple, params: Sequence[torch.Tensor],
                        compute: Callable[[], Any]) -> Any:
        """``compute()`` itself while any of ``params`` requires grad (a trained value must
        carry its gradient), else the cached value of :meth:`get`."""
        if any(p.requires_grad for p in params):
            return compute()
        return self.get(what, params, compute)

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)

    def __getstate__(self) -> dict:
        return {"max_entries": self.max_entries}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["max_entries"])

    def __deepcopy__(self, memo: dict) -> FrozenCache:
        return FrozenCache(self.max_entries)


class CachedKernels:
    """Mixin: ``kernels`` / ``kernel`` for an extractor whose convolution kernels depend on its
    parameters alone (S4D, the EMA). The class defines ``_compute_kernels(length) -> (k,
    k_rev or None)``, ``_kernel_params()`` (what the kernels read) and ``self._cache``, a
    :class:`FrozenCache`."""

    def kernels(self, length: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Forward kernel and reverse kernel (None when causal), each (channels, d_model,
        length) (the EMA: one channel).

        Cached per length while the kernel's parameters are frozen (least recently used
        lengths dropped beyond the cache's size; :class:`FrozenCache` says when an entry is
        stale); recomputed from the live parameters otherwise. The tensors are the caller's
        own: editing them leaves the cache (and later forwards) alone.
        """
        k, k_rev = self._kernels(length)
        return k.clone(), None if k_rev is None else k_rev.clone()

    def _kernels(self, length: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """:meth:`kernels` without the copies: the cached tensors themselves (forward only
        reads them)."""
        check_positive("length", length)
        return self._cache.get_when_frozen((length,), self._kernel_params(),
                                           lambda: self._compute_kernels(length))

    def kernel(self, length: int) -> torch.Tensor:
        """The causal (forward) convolution kernel, (channels, d_model, length)."""
        return self.kernels(length)[0]


class GlobalExtractor(nn.Module):
    """Base class: argument checks, fp32 region, padding, freezing and the step() guard.

    Subclasses implement ``_forward(x, padding_mask)`` on float32 input (padded positions
    already zeroed) and, when causal, ``initial_state`` and ``_step``.
    """

    def __init__(self, d_model: int, *, bidirectional: bool = False, trainable: bool = True):
        super().__init__()
        check_positive("d_model", d_model)
        if not isinstance(bidirectional, bool):
            raise TypeError(f"bidirectional must be a bool, got {bidirectional!r}")
        if not isinstance(trainable, bool):
            raise TypeError(f"trainable must be a bool, got {trainable!r}")
        self.d_model = d_model
        self.bidirectional = bidirectional
        self.trainable = trainable

    def freeze_if_requested(self) -> None:
        """Call at the end of a subclass __init__: trainable=False freezes every parameter."""
        if not self.trainable:
            for p in self.parameters():
                p.requires_grad_(False)

    def _compute_dtype(self) -> torch.dtype:
        """float64 when the module was cast with .double(), else float32."""
        p = next(self.parameters(), None)
        return torch.float64 if p is not None and p.dtype == torch.float64 else torch.float32

    def _apply(self, fn, recurse=True):
        # .to() / .cuda() / .double() replace parameter tensors: cached values of the old ones
        # are stale (and would pin their memory)
        for value in vars(self).values():
            if isinstance(value, FrozenCache):
                value.clear()

        # .half() / .to(torch.bfloat16) of a whole model: SSM parameters and buffers stay in
        # float32, where the computation runs (see the module docstring)
        def keep_fp32(t: torch.Tensor) -> torch.Tensor:
            out = fn(t)
            if out.dtype in _HALF and t.dtype not in _HALF:
                out = t.to(device=out.device)  # the move, not the rounding
            return out

        return super()._apply(keep_fp32, recurse)

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: (batch, length, d_model) -> (batch, length, d_model)."""
        check_sequence(x, self.d_model)
        check_padding_mask(padding_mask, x.shape[0], x.shape[1])
        with fp32_region(x.device.type):
            u = x.to(self._compute_dtype())
            if padding_mask is not None:
                u = u.masked_fill(padding_mask.unsqueeze(-1), 0.0)
            y = self._forward(u, padding_mask)
            if padding_mask is not None:
                y = y.masked_fill(padding_mask.unsqueeze(-1), 0.0)
        return y.to(x.dtype)

    def step(self, x_t: torch.Tensor, state: Any) -> tuple[torch.Tensor, Any]:
        """One causal decoding step. x_t: (batch, d_model) -> y_t: (batch, d_model), new state."""
        if self.bidirectional:
            raise RuntimeError(
                f"step() needs a causal model, but this {type(self).__name__} has "
                "bidirectional=True (it looks at future tokens); build it with bidirectional=False"
            )
        check_step_input(x_t, self.d_model)
        if not x_t.is_floating_point():
            raise TypeError(f"x_t must be a floating-point tensor, got dtype {x_t.dtype}")
        with fp32_region(x_t.device.type):
            y_t, state = self._step(x_t.to(self._compute_dtype()), state)
        return y_t.to(x_t.dtype), state

    def initial_state(self, batch_size: int) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def _forward(self, u: torch.Tensor, padding_mask: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError  # pragma: no cover - abstract

    def _step(self, x_t: torch.Tensor, state: Any) -> tuple[torch.Tensor, Any]:
        raise NotImplementedError  # pragma: no cover - abstract

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, bidirectional={self.bidirectional}, "
            f"trainable={self.trainable}"
        )
