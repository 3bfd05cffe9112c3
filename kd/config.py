"""YAML -> frozen dataclasses, strictly.

Config dataclasses live beside what they configure (``cluster/label/config.py``, ``cluster/training/sections.py`` ...);
the loader sits in ``kd`` (the lowest layer that needs it) so Ray workers can rebuild a config from its dict;
this module only validates plain data (``yaml.safe_load``) into them. Unknown keys, wrong types and bad
override paths are errors that name the dotted key, e.g. ``train.optim.lr: expected float, got 'fast'``.
NaN and infinite numbers (YAML ``.nan``, ``.inf``, ``-.inf``) are rejected wherever they appear, whatever the
field's type, e.g. ``optim.lr: must be a finite number, got nan``: no sodkd setting means anything by them.

CLI overrides use the same paths: ``--train.lr=0.01`` or ``train.lr=0.01``; the value is parsed as YAML
(so ``[224, 256]``, ``true``, ``null`` work).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any, Mapping, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration value or key is invalid; the message starts with its dotted path."""


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """Validate ``value`` against the annotation ``tp``; return the value as the dataclass wants it."""
    if isinstance(value, float) and not math.isfinite(value):  # before any type test: a union or Any takes it
        raise ConfigError(f"{path}: must be a finite number, got {value}")
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return _finite_anywhere(value, path)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, path)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{path}: expected {' or '.join(_type_name(a) for a in args)}, got {value!r}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{path}: expected one of {list(args)}, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{path}: expected a mapping for {tp.__name__}, got {value!r}")
        return _build(tp, value, path)
    if origin in (tuple,):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{path}[{i}]") for i, v in enumerate(value))
        if args and len(args) != len(value):
            raise ConfigError(f"{path}: expected {len(args)} items, got {len(value)}")
        return tuple(_coerce(v, a, f"{path}[{i}]") for i, (v, a) in enumerate(zip(value, args or [Any] * len(value))))
    if origin in (list,):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        return [_coerce(v, args[0] if args else Any, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin in (dict,) or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        kt, vt = args if args else (Any, Any)
        return {_coerce(k, kt, f"{path}.<key>"): _coerce(v, vt, f"{path}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected bool, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected int, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected float, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected str, got {value!r}")
        return value
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"{path}: expected {tp.__name__}, got {value!r}")
    return value


def _finite_anywhere(value: Any, path: str) -> Any:
    """``value`` (free-form data under an ``Any`` field), with every number in it checked for NaN/inf."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{path}: must be a finite number, got {value}")
    if isinstance(value, Mapping):
        for k, v in value.items():
            _finite_anywhere(k, f"{path}.<key>")
            _finite_anywhere(v, f"{path}.{k}")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _finite_anywhere(v, f"{path}[{i}]")
    return value


def _build(cls: type[T], data: Mapping[str, Any], prefix: str = "") -> T:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in data.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if key not in fields:
            known = ", ".join(sorted(fields))
            raise ConfigError(f"{path}: unknown key (known keys here: {known})")
        kwargs[key] = _coerce(value, hints[key], path)
    missing = [n for n, f in fields.items() if n not in kwargs
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"{(prefix + '.') if prefix else ''}{missing[0]}: required key is missing")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"{prefix or cls.__name__}: {e}") from e


def parse_overrides(overrides: list[str] | None) -> dict[str, Any]:
    """``["--train.lr=0.01", "data.sizes=[224,256]"]`` -> nested dict. Values are parsed as YAML."""
    nested: dict[str, Any] = {}
    for item in overrides or []:
        text = item[2:] if item.startswith("--") else item
        if "=" not in text:
            raise ConfigError(f"{text}: override must look like dotted.key=value")
        key, raw = text.split("=", 1)
        parts = key.split(".")
        if not all(parts):
            raise ConfigError(f"{key}: empty segment in dotted key")
        node = nested
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{key}: conflicts with another override")
        node[parts[-1]] = yaml.safe_load(raw) if raw != "" else ""
    return nested


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = _merge(dict(out[k]), v)
        else:
            out[k] = v
    return out


def load_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: config file not found")
    data = yaml.safe_load(p.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: top level must be a mapping, got {type(data).__name__}")
    return data


def load_config(cls: type[T], source: str | Path | Mapping[str, Any] | None = None,
                overrides: list[str] | Mapping[str, Any] | None = None) -> T:
    """Build ``cls`` from a YAML path or a mapping, then apply dotted overrides; strict throughout."""
    data: dict[str, Any] = {}
    if isinstance(source, (str, Path)):
        data = load_yaml(source)
    elif source is not None:
        data = dict(source)
    if overrides:
        over = overrides if isinstance(overrides, Mapping) else parse_overrides(list(overrides))
        data = _merge(data, over)
    return _build(cls, data)


def to_dict(cfg: Any) -> dict[str, Any]:
    """A dataclass config as plain nested data (tuples become lists), the form that crosses into Ray."""
    def conv(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        return v
    return conv(cfg)


def to_flat_dict(cfg: Any, prefix: str = "") -> dict[str, Any]:
    """Flatten a config (dataclass or nested dict) to ``{"a.b.c": value}``: what MLflow records as params."""
    data = to_dict(cfg) if dataclasses.is_dataclass(cfg) else cfg
    flat: dict[str, Any] = {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict) and v:
            flat.update(to_flat_dict(v, key))
        else:
            flat[key] = v
    return flat
