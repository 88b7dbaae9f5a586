"""Crash-safe checkpoints: safetensors weights + a weights-only ``torch.load``-able state file.

Layout under a checkpoint root (the trainer uses ``out_dir/checkpoints``)::

    step-00000100/model.safetensors   model weights (tied tensors stored once, see below)
    step-00000100/state.pt            optimiser, scheduler, RNG states, data position, step, ...
    last.json                         {"step": 100, "dir": "step-00000100"}
    best.json                         {"step": 80, "dir": "step-00000080", "val_loss": ...}

Why directories plus pointer files: a checkpoint is two files, and replacing two files is not
atomic. A save writes both into a fresh hidden temp directory (each file fsynced), renames the
directory into place, and only then flips the pointer with the classic atomic-file recipe (temp
file in the same directory, fsync, ``os.replace``, fsync the directory). A process killed at
any moment leaves the pointer naming the previous complete checkpoint; leftovers (temp
directories, checkpoints no pointer names) are removed by the next save.

The state file is read with ``torch.load(weights_only=True)``: it holds only tensors and plain
containers of numbers and strings, never arbitrary pickled objects.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch
from torch import nn

from spadeformer.fileio import atomic_write, fsync_dir, fsync_file

__all__ = [
    "MODEL_FILE",
    "STATE_FILE",
    "CheckpointManager",
    "atomic_write",
    "capture_rng_state",
    "load_checkpoint",
    "load_model_weights",
    "read_model_weights",
    "restore_rng_state",
    "save_model_weights",
    "write_model_weights_file",
]

MODEL_FILE = "model.safetensors"
STATE_FILE = "state.pt"
_FORMAT = "spadeformer-checkpoint-v1"
_STEP_DIR = re.compile(r"^step-\d{8}(-\d+)?$")
_TAG = re.compile(r"^[A-Za-z0-9_]+$")


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2, sort_keys=True)

    atomic_write(path, write)


# ----------------------------------------------------------------------------- model weights


def _dedupe_state_dict(
    state: dict[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Drop exact aliases (tied weights: same storage, offset, shape, stride, dtype), keeping the
    first name; clone tensors that only partly overlap another (safetensors refuses shared
    storage). Returns (tensors to save, {alias: kept name})."""
    kept: dict[tuple, str] = {}
    storages: dict[tuple[str, int], str] = {}
    out: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    for name, t in state.items():
        t = t.detach()
        if t.numel() == 0:  # empty tensors share data_ptr 0; they are never real aliases
            out[name] = t.clone()
            continue
        storage_key = (str(t.device), t.untyped_storage().data_ptr())
        view_key = (*storage_key, t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        if view_key in kept:
            aliases[name] = kept[view_key]
            continue
        kept[view_key] = name
        shared = storage_key in storages
        storages.setdefault(storage_key, name)
        out[name] = t.clone() if shared else t
    return {k: v.cpu().contiguous() for k, v in out.items()}, aliases


def write_model_weights_file(model: nn.Module, filename: str,
                             metadata: dict[str, str] | None = None) -> None:
    """Write the weights to ``filename`` as it is (not atomic: callers write a temp file)."""
    tensors, aliases = _dedupe_state_dict(model.state_dict())
    meta = {**(metadata or {}), "format": _FORMAT,
            "aliases": json.dumps(aliases, sort_keys=True)}
    # Looked up at call time (not imported by name) so tests can simulate a crash inside it.
    safetensors.torch.save_file(tensors, filename, metadata=meta)


def save_model_weights(model: nn.Module, path: str | os.PathLike,
                       metadata: dict[str, str] | None = None) -> None:
    """Write ``model.state_dict()`` to ``path`` with ``safetensors.torch.save_file`` (atomic).
    Tied / shared tensors are stored once and restored by :func:`load_model_weights`."""
    atomic_write(path, lambda tmp: write_model_weights_file(model, tmp, metadata))


def read_model_weights(
    path: str | os.PathLike,
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A file written by :func:`save_model_weights` -> (state dict on CPU with the tied
    names restored, its metadata)."""
    with safetensors.safe_open(str(path), framework="pt", device="cpu") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open API)
    for alias, name in json.loads(meta.get("aliases", "{}")).items():
        tensors[alias] = tensors[name]
    return tensors, meta


def load_model_weights(model: nn.Module, path: str | os.PathLike,
                       strict: bool = True) -> dict[str, str]:
    """Load a file written by :func:`save_model_weights` into ``model``; returns its metadata."""
    tensors, meta = read_model_weights(path)
    model.load_state_dict(tensors, strict=strict)
    return meta


# ----------------------------------------------------------------------------- RNG states


def capture_rng_state() -> dict[str, Any]:
    """Python, NumPy, torch CPU and (if initialised) CUDA generator states, as plain data."""
    py_version, py_internal, py_gauss = random.getstate()
    np_state = np.random.get_state(legacy=False)
    state: dict[str, Any] = {
        "python": {"version": py_version, "internal": list(py_internal), "gauss": py_gauss},
        "numpy": {
            "bit_generator": np_state["bit_generator"],
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`."""
    py = state["python"]
    random.setstate((py["version"], tuple(py["internal"]), py["gauss"]))
    npst = state["numpy"]
    np.random.set_state({
        "bit_generator": npst["bit_generator"],
        "state": {"key": npst["key"].cpu().numpy().astype(np.uint32), "pos": npst["pos"]},
        "has_gauss": npst["has_gauss"],
        "gauss": npst["gauss"],
    })
    # .cpu(): a state file loaded with map_location="cuda" holds these on the GPU, and the
    # generators take CPU byte tensors only
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


# ----------------------------------------------------------------------------- manager


class CheckpointManager:
    """Save / load checkpoints under ``root`` with named pointers ("last", "best", ...)."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)

    def pointer(self, tag: str = "last") -> dict[str, Any] | None:
        """The JSON the pointer ``tag`` holds, or None when there is none."""
        self._check_tag(tag)
        path = self.root / f"{tag}.json"
        if not path.is_file():
            return None
        with open(path, encoding="utf-8") as f:
            return json.load(f)

    def path(self, tag: str = "last") -> Path | None:
        """The checkpoint directory ``tag`` names, or None."""
        ptr = self.pointer(tag)
        return None if ptr is None else self.root / ptr["dir"]

    def save(self, model: nn.Module, state: dict[str, Any], step: int,
             tags: Sequence[str] = ("last",), info: dict[str, Any] | None = None) -> Path:
        """Write a checkpoint of ``model`` + ``state`` at ``step`` and point ``tags`` at it.

        ``state`` must be weights-only loadable (tensors, numbers, strings, containers).
        ``info`` (JSON-able) is stored in the pointer files, e.g. the validation loss.
        """
        if isinstance(tags, str) or not tags:
            # a checkpoint no pointer names is garbage: the cleanup below would delete it
            raise ValueError(f"tags must be a non-empty sequence of pointer names such as "
                             f"('last',), got {tags!r}")
        for tag in tags:
            self._check_tag(tag)
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".tmp-step-{step:08d}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            model_file, state_file = tmp / MODEL_FILE, tmp / STATE_FILE
            write_model_weights_file(model, str(model_file), {"step": str(step)})
            fsync_file(model_file)
            torch.save({**state, "step": step}, str(state_file))
            fsync_file(state_file)
            fsync_dir(tmp)
            final = self._free_name(step)
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        fsync_dir(self.root)
        for tag in tags:
            pointer = {**(info or {}), "step": step, "dir": final.name}
            _write_json(self.root / f"{tag}.json", pointer)
        self.collect_garbage()
        return final

    def load(self, model: nn.Module | None = None, tag: str = "last",
             map_location: str | torch.device = "cpu") -> dict[str, Any]:
        """Load the checkpoint ``tag`` names: weights into ``model`` (if given); returns the
        state dict (weights-only unpickling)."""
        path = self.path(tag)
        if path is None:
            raise FileNotFoundError(f"no {tag!r} checkpoint under {str(self.root)!r}")
        return load_checkpoint(path, model, map_location=map_location)

    def collect_garbage(self) -> None:
        """Delete temp directories and step directories that no pointer names."""
        if not self.root.is_dir():
            return
        live = {p["dir"] for p in (self._read_pointer(f) for f in self.root.glob("*.json")) if p}
        for entry in self.root.iterdir():
            if entry.is_dir() and entry.name not in live and (
                    entry.name.startswith(".tmp-step-") or _STEP_DIR.match(entry.name)):
                shutil.rmtree(entry, ignore_errors=True)
        for entry in self.root.glob(".*.json.tmp-*"):
            entry.unlink(missing_ok=True)

    # -- helpers

    @staticmethod
    def _check_tag(tag: str) -> None:
        if not isinstance(tag, str) or not _TAG.match(tag):
            raise ValueError(f"tag must be a non-empty [A-Za-z0-9_] name, got {tag!r}")

    @staticmethod
    def _read_pointer(path: Path) -> dict[str, Any] | None:
        try:
            with open(path, encoding="utf-8") as f:
                obj = json.load(f)
            return obj if isinstance(obj, dict) and "dir" in obj else None
        except (OSError, ValueError):
            return None

    def _free_name(self, step: int) -> Path:
        """step-NNNNNNNN, or step-NNNNNNNN-k if a live pointer still names that one (a resumed
        run re-saving a step of an abandoned timeline must not clobber a named checkpoint)."""
        live = {p["dir"] for p in (self._read_pointer(f) for f in self.root.glob("*.json")) if p}
        base = f"step-{step:08d}"
        k = 0
        while True:
            name = base if k == 0 else f"{base}-{k}"
            candidate = self.root / name
            if name not in live:
                if candidate.exists():
                    shutil.rmtree(candidate)  # unnamed leftover of a crashed run
                return candidate
            k += 1


def load_checkpoint(path: str | os.PathLike, model: nn.Module | None = None,
                    map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint directory (``step-*``) or a root (its "last" pointer).

    Weights go into ``model`` when given (strict). The state is read with
    ``torch.load(weights_only=True)``; its step must match the weights file's.
    """
    path = Path(path)
    if not (path / STATE_FILE).is_file():
        found = CheckpointManager(path).path("last")
        if found is None:
            raise FileNotFoundError(f"{str(path)!r} is neither a checkpoint directory (with "
                                    f"{STATE_FILE}) nor a root with a last.json pointer")
        path = found
    state = torch.load(path / STATE_FILE, map_location=map_location, weights_only=True)
    tensors, meta = read_model_weights(path / MODEL_FILE)
    if meta.get("step") is not None and int(meta["step"]) != int(state["step"]):
        raise RuntimeError(f"inconsistent checkpoint {str(path)!r}: weights are from step "
                           f"{meta['step']}, state from step {state['step']}")
    if model is not None:
        model.load_state_dict(tensors, strict=True)
    return state
