"""Merge methods by name. Built-in methods register on import of pymerge.methods; others call `register`."""
from __future__ import annotations

from typing import Dict, Type

from pymerge.errors import excerpt
from pymerge.methods.base import ConfigError, MergeMethod, suggest

_METHODS: Dict[str, Type[MergeMethod]] = {}


def register(cls: Type[MergeMethod]) -> Type[MergeMethod]:
    """Class decorator: make a MergeMethod available as `merge_method: <cls.name>`."""
    if not cls.name:
        raise ValueError(f"{cls.__name__}: a merge method needs a `name`")
    names = [p.name for p in cls.params]
    if len(set(names)) != len(names):
        raise ValueError(f"{cls.__name__}: duplicate parameter names {names}")
    _METHODS[cls.name] = cls
    return cls


def get_method(name: str) -> MergeMethod:
    import pymerge.methods  # noqa: F401  (registers the built-in methods)

    if name not in _METHODS:
        raise ConfigError(f"unknown merge_method {excerpt(name)}{suggest(excerpt(name), _METHODS)}")
    return _METHODS[name]()


def available() -> Dict[str, Type[MergeMethod]]:
    import pymerge.methods  # noqa: F401

    return dict(_METHODS)
