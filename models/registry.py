"""A name -> factory registry for saliency models, in the style of timm.

Each model family file ends with small factories decorated with :func:`register_model`; the factory's
keyword arguments override the variant's defaults and become ``model.config``. ``create_model`` is the
only way jobs build models, so a weight file that records ``(name, config)`` can always be rebuilt.
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
from typing import Any, Callable, TypeVar

from .base import SODModel

__all__ = ["register_model", "create_model", "list_models", "describe_model", "UnknownModelError",
           "config_with_overrides"]

Factory = Callable[..., SODModel]
_REGISTRY: dict[str, Factory] = {}

C = TypeVar("C")


class UnknownModelError(ValueError):
    """Raised by ``create_model`` for a name nobody registered."""


def register_model(fn: Factory) -> Factory:
    """Register ``fn`` under its function name; re-registering a name is an error."""
    name = fn.__name__
    if name in _REGISTRY and _REGISTRY[name] is not fn:
        raise ValueError(f"model {name!r} is already registered by {_REGISTRY[name].__module__}")
    _REGISTRY[name] = fn
    return fn


def list_models(pattern: str = "*") -> list[str]:
    """Registered model names matching the shell-style ``pattern``, sorted."""
    return sorted(n for n in _REGISTRY if fnmatch.fnmatchcase(n, pattern))


def _entrypoint(name: str) -> Factory:
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, _REGISTRY, n=3)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        raise UnknownModelError(f"unknown model {name!r}.{hint} Registered models: {', '.join(list_models())}")
    return _REGISTRY[name]


def describe_model(name: str) -> str:
    """The first line of the factory's docstring."""
    doc = (_entrypoint(name).__doc__ or "").strip()
    return doc.splitlines()[0] if doc else ""


def create_model(name: str, **kwargs: Any) -> SODModel:
    """Build the registered model ``name``; ``kwargs`` override the variant's config fields.

    Raises:
        UnknownModelError: ``name`` is not registered (the message lists the registered names).
        ValueError: a keyword is not a config field of the model, or a value is invalid.
    """
    model = _entrypoint(name)(**kwargs)
    if not isinstance(model, SODModel):
        raise TypeError(f"factory for {name!r} returned {type(model).__name__}, not a SODModel")
    model.name = name
    return model


def config_with_overrides(defaults: C, overrides: dict[str, Any], model_name: str) -> C:
    """``dataclasses.replace(defaults, **overrides)`` with an error naming the model and its fields."""
    fields = [f.name for f in dataclasses.fields(defaults)]  # type: ignore[arg-type]
    unknown = sorted(set(overrides) - set(fields))
    if unknown:
        raise ValueError(f"{model_name}: unknown config key(s) {unknown}; valid keys: {fields}")
    return dataclasses.replace(defaults, **overrides)  # type: ignore[type-var]
