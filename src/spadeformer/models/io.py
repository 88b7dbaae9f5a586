"""save_pretrained / from_pretrained: safetensors weights + config.json, each written atomically.

Layout of a saved model directory::

    config.json         {"model_class": "SpadeForCausalLM", "config": {...}, "save_id": "..."}
    model.safetensors   the weights (tied tensors stored once), its metadata holds the save_id

Saving writes both files to temp files in the directory, fsyncs them, then renames them over
the old ones, weights first; other files in the directory are left alone. A save interrupted
while writing leaves the old model whole. Both files carry the same random ``save_id``, so a
save interrupted between the two renames (new weights beside the old config) is refused on
load instead of loading mismatched halves. Loading never unpickles:
safetensors only holds tensors, config.json only JSON. Directories saved before the save_id
existed (safetensors' ``save_model`` layout) still load.
"""

from __future__ import annotations

import dataclasses
import json
import os
import uuid
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_model

from spadeformer.fileio import atomic_write_all
from spadeformer.training.checkpoint import read_model_weights, write_model_weights_file

__all__ = ["PretrainedMixin", "CONFIG_NAME", "WEIGHTS_NAME", "ModelLoadError",
           "load_pretrained_weights"]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


class ModelLoadError(RuntimeError):
    """A saved model directory is missing, corrupt or does not match its config."""


def _check_map_location(map_location: Any) -> torch.device:
    from spadeformer.training.distributed import resolve_device

    if map_location == "cuda":  # the current CUDA device, as torch reads "cuda" (not cuda:0)
        map_location = torch.device("cuda")
    try:
        return resolve_device(map_location)
    except ValueError as err:
        raise ValueError(f"map_location: {err}") from None


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
        """Write config.json + model.safetensors into ``directory`` (created if needed); see
        the module docstring for why an interrupted save never loads as a model."""
        target = Path(directory)
        if target.exists() and not target.is_dir():
            raise NotADirectoryError(f"directory={str(target)!r} exists and is not a directory")
        target.mkdir(parents=True, exist_ok=True)
        save_id = uuid.uuid4().hex
        meta = {"model_class": type(self).__name__, "config": self.config.to_dict(),
                "save_id": save_id}
        text = json.dumps(meta, indent=2, sort_keys=True)
        atomic_write_all([
            (target / WEIGHTS_NAME,
             lambda tmp: write_model_weights_file(self, tmp, {"save_id": save_id})),
            (target / CONFIG_NAME, lambda tmp: Path(tmp).write_text(text)),
        ])
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

        map_location = _check_map_location(map_location)
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
        _check_same_save(weights_path, config_path, meta.get("save_id"))
        if "save_id" in meta:
            _load_weights(model, weights_path, config_path)
        else:  # saved before the save_id: safetensors' save_model layout
            _load_legacy_weights(model, weights_path, config_path)
        return model.to(map_location)


def _check_same_save(weights_path: Path, config_path: Path, save_id: str | None) -> None:
    """Refuse weights and config of different saves (an overwrite interrupted between its two
    files, also over a directory saved before the save_id: then the config has none). Reads
    only the weights file's header."""
    try:
        with safe_open(str(weights_path), framework="pt") as f:
            weights_id = (f.metadata() or {}).get("save_id")
    except (SafetensorError, OSError) as err:
        raise ModelLoadError(f"{weights_path} could not be read (truncated or corrupt?): "
                             f"{err}") from err
    if weights_id != save_id:
        raise ModelLoadError(
            f"{weights_path} and {config_path} come from different saves (save ids "
            f"{weights_id!r} and {save_id!r}): a save_pretrained was interrupted between its "
            "two files; save the model again"
        )


def _load_weights(model: torch.nn.Module, weights_path: Path, config_path: Path) -> None:
    try:
        tensors, _ = read_model_weights(weights_path)
    except (SafetensorError, OSError, ValueError) as err:
        raise ModelLoadError(f"{weights_path} could not be read (truncated or corrupt?): "
                             f"{err}") from err
    try:
        missing, unexpected = model.load_state_dict(tensors, strict=False)
    except RuntimeError as err:
        raise ModelLoadError(f"the tensors of {weights_path} do not fit {config_path}: "
                             f"{err}") from err
    _check_keys(missing, unexpected, weights_path, config_path)


def _load_legacy_weights(model: torch.nn.Module, weights_path: Path, config_path: Path) -> None:
    try:
        missing, unexpected = load_model(model, str(weights_path), strict=False)
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise ModelLoadError(
            f"{weights_path} could not be read (truncated or corrupt?), or its tensors do "
            f"not fit the config: {err}"
        ) from err
    _check_keys(missing, unexpected, weights_path, config_path)


def _check_keys(missing, unexpected, weights_path: Path, config_path: Path) -> None:
    if missing or unexpected:
        raise ModelLoadError(
            f"{weights_path} does not match {config_path}: missing tensors "
            f"{sorted(missing)[:8]}, unexpected tensors {sorted(unexpected)[:8]}"
        )


# Config fields that shape no backbone tensor: they may differ between a saved model and the
# model it initialises (another head, another dropout) without being the reason it does not fit.
_HEAD_OR_TRAINING_FIELDS = {"dropout", "attention_dropout", "adaptive_dropout", "num_labels",
                            "pooling", "pad_token_id", "tie_embeddings", "n_decoder_layers",
                            "decoder_start_token_id"}


def _backbone_differences(saved_model: torch.nn.Module, model: torch.nn.Module) -> str:
    """"it differs in causal (True there, False here), ..." over the backbone's config fields."""
    saved_cfg, cfg = getattr(saved_model, "config", None), getattr(model, "config", None)
    if not (dataclasses.is_dataclass(saved_cfg) and dataclasses.is_dataclass(cfg)):
        return "this model has no config to compare"
    theirs, ours = dataclasses.asdict(saved_cfg), dataclasses.asdict(cfg)
    diffs = [f"{k} ({theirs[k]!r} there, {ours.get(k)!r} here)" for k in theirs
             if k not in _HEAD_OR_TRAINING_FIELDS and theirs[k] != ours.get(k)]
    return "it differs in " + ", ".join(diffs) if diffs else "the configs agree"


def load_pretrained_weights(model: torch.nn.Module, directory: str | os.PathLike
                            ) -> dict[str, list[str]]:
    """Start ``model`` from a saved model's weights (fine-tuning): see the returned report.

    ``directory`` is a :meth:`~PretrainedMixin.save_pretrained` directory or a run directory
    holding one as ``model/``. The saved model may be another head class (a language model's
    backbone under a classifier): every ``backbone.*`` tensor must be there with the same
    shape (else ValueError naming it); other tensors load where name and shape match, the rest
    keep their fresh initialisation. Returns ``{"loaded", "fresh", "unused"}`` tensor names.
    """
    from spadeformer import models

    path = Path(directory)
    if (path / "model" / CONFIG_NAME).is_file() and not (path / CONFIG_NAME).is_file():
        path = path / "model"  # a run directory
    if not (path / CONFIG_NAME).is_file():
        raise ModelLoadError(f"init_from={str(directory)!r} holds no saved model "
                             f"(no {CONFIG_NAME} there or in its model/ folder)")
    try:
        saved_class = json.loads((path / CONFIG_NAME).read_text())["model_class"]
        cls = getattr(models, saved_class)
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
        raise ModelLoadError(f"{path / CONFIG_NAME} is not a valid spadeformer config: "
                             f"{err!r}") from err
    saved_model = cls.from_pretrained(path)
    saved = saved_model.state_dict()
    target = model.state_dict()
    report: dict[str, list[str]] = {"loaded": [], "fresh": [], "unused": []}
    # tied names (one storage) are copied once, from the saved tensor of the backbone name
    # when there is one: an untied saved LM must not put its output layer into the embedding
    groups: dict[tuple, list[str]] = {}
    for name, tensor in target.items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        groups.setdefault(key if tensor.numel() else (name,), []).append(name)
    used: set[str] = set()
    with torch.no_grad():
        for names in groups.values():
            names = sorted(names, key=lambda n: not n.startswith("backbone."))
            tensor = target[names[0]]
            source = next((n for n in names if n in saved
                           and saved[n].shape == tensor.shape), None)
            if source is None and names[0].startswith("backbone."):
                got = saved.get(names[0])
                got = "missing" if got is None else f"shape {tuple(got.shape)}"
                raise ValueError(
                    f"init_from={str(directory)!r}: its backbone does not fit this model: "
                    f"{names[0]} is {got} there, {tuple(tensor.shape)} here (the model section "
                    "must describe the saved model's backbone; "
                    f"{_backbone_differences(saved_model, model)})"
                )
            if source is None:
                report["fresh"].extend(names)
                continue
            tensor.copy_(saved[source])
            used.add(source)
            report["loaded"].extend(names)
    if not report["loaded"]:
        raise ValueError(f"init_from={str(directory)!r}: no tensor of it fits this model")
    def storage(t: torch.Tensor) -> tuple:
        return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))

    used_storages = {storage(saved[n]) for n in used if saved[n].numel()}
    report["unused"] = [name for name, t in saved.items()
                        if name not in used and not (t.numel() and storage(t) in used_storages)]
    return report
