"""save_pretrained / from_pretrained: safetensors weights + config.json, written atomically.

Layout of a saved model directory::

    config.json         {"model_class": "SpadeForCausalLM", "config": {...SpadeConfig...}}
    model.safetensors   the weights (tied tensors stored once)

Saving writes both files into a fresh temporary directory beside the target and renames it
into place, so an interrupted save never leaves a half-written model. Loading never unpickles:
safetensors only holds tensors, config.json only JSON.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_model, save_model

__all__ = ["PretrainedMixin", "CONFIG_NAME", "WEIGHTS_NAME", "ModelLoadError"]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


class ModelLoadError(RuntimeError):
    """A saved model directory is missing, corrupt or does not match its config."""


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


class PretrainedMixin:
    """Adds save_pretrained / from_pretrained / num_parameters to a model with ``.config``."""

    config: Any

    def num_parameters(self, trainable_only: bool = False) -> int:
        """Parameter count (tied tensors counted once)."""
        seen, total = set(), 0
        for p in self.parameters():  # parameters() already de-duplicates shared tensors
            if id(p) in seen or (trainable_only and not p.requires_grad):
                continue
            seen.add(id(p))
            total += p.numel()
        return total

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write config.json + model.safetensors into ``directory`` atomically."""
        target = Path(directory)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:
            meta = {"model_class": type(self).__name__, "config": self.config.to_dict()}
            with open(tmp / CONFIG_NAME, "w") as f:
                json.dump(meta, f, indent=2, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            save_model(self, str(tmp / WEIGHTS_NAME))
            with open(tmp / WEIGHTS_NAME, "rb+") as f:
                os.fsync(f.fileno())
            backup = None
            if target.exists():
                backup = target.parent / f".{target.name}.old-{os.getpid()}"
                os.replace(target, backup)
            os.replace(tmp, target)
            _fsync_dir(target.parent)
            if backup is not None:
                shutil.rmtree(backup, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return target

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, map_location: str = "cpu",
                        dtype: torch.dtype | None = None):
        """Load a model saved by :meth:`save_pretrained`. Clear errors for missing, corrupt or
        mismatched files; nothing is unpickled.

        The model is built in float32 and the saved tensors are cast into it, whatever dtype
        they were saved in; ``dtype`` (e.g. ``torch.bfloat16``) casts the model first (SSM
        parameters stay float32, see :mod:`spadeformer.ssm.base`).
        """
        from spadeformer.config import SpadeConfig

        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise ValueError(f"dtype must be None or a floating torch.dtype, got {dtype!r}")

        path = Path(directory)
        if not path.is_dir():
            raise ModelLoadError(f"no saved model at {str(path)!r}: directory does not exist")
        config_path, weights_path = path / CONFIG_NAME, path / WEIGHTS_NAME
        for p in (config_path, weights_path):
            if not p.is_file():
                raise ModelLoadError(f"saved model at {str(path)!r} is missing {p.name} "
                                     f"(expected {CONFIG_NAME} and {WEIGHTS_NAME})")
        try:
            meta = json.loads(config_path.read_text())
            config = SpadeConfig.from_dict(meta["config"])
            saved_class = meta["model_class"]
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
            raise ModelLoadError(f"{config_path} is not a valid spadeformer config: {err}") from err
        if saved_class != cls.__name__:
            raise ModelLoadError(f"{path} holds a {saved_class}, not a {cls.__name__}; "
                                 f"load it with {saved_class}.from_pretrained")
        model = cls(config)
        if dtype is not None:
            model.to(dtype)
        try:
            missing, unexpected = load_model(model, str(weights_path), strict=False,
                                             device=map_location)
        except (SafetensorError, OSError, ValueError, RuntimeError) as err:
            raise ModelLoadError(
                f"{weights_path} could not be read (truncated or corrupt?), or its tensors do "
                f"not fit the config: {err}"
            ) from err
        if missing or unexpected:
            raise ModelLoadError(
                f"{weights_path} does not match {config_path}: missing tensors "
                f"{sorted(missing)[:8]}, unexpected tensors {sorted(unexpected)[:8]}"
            )
        return model.to(map_location)


