"""Run configuration: a YAML file with three sections plus dotted ``key=value`` overrides.

    model:   preset (a system name), size, and any SpadeConfig field
    data:    name (which dataset) and that dataset's options
    train:   any TrainConfig field

Example: ``spadeformer train --config configs/demo.yaml train.steps=50 model.window_size=64``.
Unknown keys are errors that name the closest valid key.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import re
from pathlib import Path
from typing import Any

import yaml

__all__ = ["load_run_config", "apply_override", "validate_run_config", "DATA_OPTIONS",
           "RunConfigError"]

SECTIONS = ("model", "data", "train")

# data.name -> the options it accepts (besides "name").
# Documented in spadeformer.tasks (one source class per name) and configs/README.md.
DATA_OPTIONS: dict[str, tuple[str, ...]] = {
    "stdlib": ("seq_len", "root", "max_bytes", "include_tests", "eval_seq_len"),
    "listops": ("path", "max_length"),
    "text": ("path", "max_length", "val_fraction", "split_seed"),
    "retrieval": ("path", "max_length"),
    "image": ("path", "val_fraction", "split_seed"),
    "pathfinder": ("path", "size", "split_seed"),
    "wikitext103": ("path", "seq_len", "eval_seq_len", "context", "vocab_path", "cache_dir"),
    "seq2seq": ("path", "max_source_length", "max_target_length", "source_key", "target_key"),
    "span_corruption": ("path", "seq_len", "noise_density", "mean_span_length", "text_key"),
}


class RunConfigError(ValueError):
    """A run configuration key or value is not valid."""


def _unknown(key: str, valid: list[str], where: str) -> RunConfigError:
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return RunConfigError(f"unknown key {key!r} in {where}{hint} Valid keys: {sorted(valid)}")


def _model_keys() -> list[str]:
    from spadeformer.config import SpadeConfig

    # init_from: the weights a fresh run starts from (fine-tuning), read by `spadeformer train`
    return ["preset", "size", "init_from", *[f.name for f in dataclasses.fields(SpadeConfig)]]


def _train_keys() -> list[str]:
    from spadeformer.training.trainer import TrainConfig

    return [f.name for f in dataclasses.fields(TrainConfig)]


def _data_keys(data: dict[str, Any]) -> list[str]:
    name = data.get("name")
    if name not in DATA_OPTIONS:
        raise RunConfigError(f"data.name must be one of {sorted(DATA_OPTIONS)}, got {name!r}")
    return ["name", *DATA_OPTIONS[name]]


def validate_run_config(cfg: dict[str, Any]) -> None:
    """Check section names and every key; raise RunConfigError naming the closest valid key."""
    for section in cfg:
        if section not in SECTIONS:
            raise _unknown(section, list(SECTIONS), "the run config's top level")
    for section in SECTIONS:
        if not isinstance(cfg.get(section, {}), dict):
            raise RunConfigError(f"section {section!r} must be a mapping, got "
                                 f"{type(cfg[section]).__name__}")
    checks = {"model": _model_keys(), "train": _train_keys(),
              "data": _data_keys(cfg.get("data", {}))}
    for section, valid in checks.items():
        for key in cfg.get(section, {}):
            if key not in valid:
                raise _unknown(key, valid, f"section {section!r}")


def apply_override(cfg: dict[str, Any], override: str) -> None:
    """Apply ``section.key=value`` (value parsed as YAML: 1e-3, true, [0, 1], text)."""
    if "=" not in override:
        raise RunConfigError(f"override {override!r} must look like section.key=value "
                             "(e.g. train.lr=1e-3)")
    dotted, raw = override.split("=", 1)
    parts = dotted.strip().split(".")
    if len(parts) < 2 or not all(parts):
        raise RunConfigError(f"override key {dotted!r} must be dotted: section.key "
                             f"with section in {list(SECTIONS)}")
    if parts[0] not in SECTIONS:
        raise _unknown(parts[0], list(SECTIONS), f"override {override!r}")
    try:
        value = _parse_value(raw)
    except yaml.YAMLError as err:
        raise RunConfigError(f"override {override!r}: the value is not valid YAML "
                             f"({_one_line(err)}); quote text, close brackets") from None
    node = cfg.setdefault(parts[0], {})
    if not isinstance(node, dict):
        raise RunConfigError(f"override {override!r}: section {parts[0]!r} is not a mapping")
    for part in parts[1:-1]:  # nested, e.g. model.ssm_options.d_state=32
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise RunConfigError(f"override {override!r}: {part!r} is not a mapping")
    node[parts[-1]] = value


class _Loader(yaml.SafeLoader):
    """PyYAML follows YAML 1.1, which reads ``3e-3`` (an exponent without a dot) as text; this
    loader reads such plain scalars as floats, as YAML 1.2 does. Quoted scalars stay text
    (``'2024'`` or ``'1e5'`` as a folder name)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
    list("-+0123456789."))


def _one_line(err: yaml.YAMLError) -> str:
    """PyYAML's message in one line (problem and where)."""
    return " ".join(str(err).split())


def _parse_value(raw: str) -> Any:
    """YAML scalars and lists (with the loader's 3e-3 floats); an unquoted None is null."""
    value = yaml.load(raw, Loader=_Loader) if raw.strip() else ""
    quoted = raw.strip()[:1] in ("'", '"')
    if isinstance(value, str) and not quoted and value.lower() == "none":
        return None
    return value


def load_run_config(path: str | Path | None, overrides: list[str] = (),
                    base: dict[str, Any] | None = None) -> dict[str, Any]:
    """Read the YAML file (or start from ``base``, or empty), apply overrides, validate.
    Returns a plain dict."""
    cfg: dict[str, Any] = copy.deepcopy(base) if base is not None else {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise RunConfigError(f"config file {str(p)!r} does not exist")
        try:
            loaded = yaml.load(p.read_text(), Loader=_Loader) or {}
        except yaml.YAMLError as err:
            raise RunConfigError(f"{p} is not valid YAML: {_one_line(err)}") from None
        if not isinstance(loaded, dict):
            raise RunConfigError(f"{p} must hold a mapping with sections {list(SECTIONS)}")
        cfg = loaded
    for section in SECTIONS:
        if cfg.get(section) is None:  # absent, or an empty "data:" in the YAML
            cfg[section] = {}
        elif not isinstance(cfg[section], dict):
            raise RunConfigError(
                f"section {section!r} must be a mapping of keys to values, got "
                f"{cfg[section]!r} (e.g. '{section}:' then indented 'key: value' lines)"
            )
    for override in overrides:
        apply_override(cfg, override)
    cfg["data"].setdefault("name", "stdlib")
    validate_run_config(cfg)
    return cfg


def build_model_config(model_section: dict[str, Any]):
    """model section -> SpadeConfig (preset + size + field overrides)."""
    from spadeformer.config import SpadeConfig

    fields = dict(model_section)
    preset = fields.pop("preset", None)
    size = fields.pop("size", "tiny")
    if preset is None:
        if "size" in model_section:
            raise RunConfigError("model.size needs model.preset (a system name)")
        return SpadeConfig.from_dict(fields)
    return SpadeConfig.from_preset(preset, size=size, **fields)
