"""The registries: method names -> method classes, and the adapters ``patch`` chooses from.

Importing ``tokenreduce.core`` registers nothing; ``tokenreduce.methods`` and ``tokenreduce.backbones`` register
the built-in ones when imported.
"""
from __future__ import annotations

from typing import Any, Dict, List

from .params import Param, boolean, resolve
from .requirements import NEEDS, need_names

_METHODS: Dict[str, type] = {}
_ADAPTERS: List[type] = []

#: Options every method accepts; adapters read them (they are not passed to the method class).
COMMON_PARAMS: Dict[str, Param] = {
    "trace_source": Param(False, "record which input tokens each output token holds (info(model).source)", boolean),
    "size_weighted_pool": Param(True, "weight average-pooled heads by token size (timm avg-pool models)", boolean),
}


def register_method(cls: type) -> type:
    """Class decorator: add a method to the registry under ``cls.name``, after checking its declarations."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    if cls.name in _METHODS and _METHODS[cls.name] is not cls:
        raise ValueError(f"a method named '{cls.name}' is already registered ({_METHODS[cls.name].__name__})")
    unknown = need_names(cls.needs) - NEEDS
    if unknown:
        raise ValueError(f"{cls.__name__} needs unknown inputs {sorted(unknown)}; known: {sorted(NEEDS)}")
    names = [n for p_name, p in cls.params.items() for n in (p_name, *p.aliases)]
    clash = sorted(set(names) & set(COMMON_PARAMS)) or sorted({n for n in names if names.count(n) > 1})
    if clash:
        raise ValueError(f"{cls.__name__} declares parameter names twice or over the common options: {clash}")
    if cls.positions not in ("keep", "renumber"):
        raise ValueError(f"{cls.__name__}.positions must be 'keep' or 'renumber', got {cls.positions!r}")
    _METHODS[cls.name] = cls
    return cls


def get_method(name: str) -> type:
    """The method class registered as ``name``; ValueError naming the registered methods otherwise."""
    if not isinstance(name, str) or name not in _METHODS:
        raise ValueError(f"unknown method {name!r}; registered methods: {', '.join(list_methods())}")
    return _METHODS[name]


def list_methods() -> List[str]:
    """Names of the registered methods, sorted."""
    return sorted(_METHODS)


def method_params(name: str) -> Dict[str, Param]:
    """Every parameter ``patch(model, name, ...)`` accepts: the method's own, then the common options."""
    return {**get_method(name).params, **COMMON_PARAMS}


def resolve_params(name: str, given: Dict[str, Any]) -> Dict[str, Any]:
    """Canonical names, defaults filled, validated (TypeError: unknown name; ValueError: invalid value)."""
    return resolve(name, method_params(name), given)


def register_adapter(cls: type) -> type:
    """Class decorator: make an adapter available to ``patch``."""
    if cls not in _ADAPTERS:
        _ADAPTERS.append(cls)
    return cls


def adapters() -> List[type]:
    """The registered adapter classes, in registration order."""
    return list(_ADAPTERS)
