"""The method registry: names -> method classes with declared capabilities and parameter schemas."""
from __future__ import annotations

from typing import Any, Dict, List, Type

from .base import NEEDS, Param, ReductionMethod

_METHODS: Dict[str, Type[ReductionMethod]] = {}


def _is_bool(v: Any) -> Any:
    return None if isinstance(v, bool) else f"must be True or False, got {v!r}"


#: Options every method accepts; adapters read them (they are not passed to the method class).
COMMON_PARAMS: Dict[str, Param] = {
    "trace_source": Param(False, "record which input tokens each output token holds (info(model).source)",
                          _is_bool),
    "size_weighted_pool": Param(True, "weight average-pooled heads by token size (timm avg-pool models)",
                                _is_bool),
}


def register_method(cls: Type[ReductionMethod]) -> Type[ReductionMethod]:
    """Class decorator: add a method to the registry under ``cls.name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    if cls.name in _METHODS and _METHODS[cls.name] is not cls:
        raise ValueError(f"a method named '{cls.name}' is already registered ({_METHODS[cls.name].__name__})")
    unknown = set(cls.needs) - NEEDS
    if unknown:
        raise ValueError(f"{cls.__name__} needs unknown inputs {sorted(unknown)}; known: {sorted(NEEDS)}")
    clash = set(cls.params) & set(COMMON_PARAMS)
    if clash:
        raise ValueError(f"{cls.__name__} redefines common parameters {sorted(clash)}")
    _METHODS[cls.name] = cls
    return cls


def get_method(name: str) -> Type[ReductionMethod]:
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
    """Fill defaults and validate. TypeError for an unknown parameter, ValueError for an invalid value."""
    schema = method_params(name)
    unknown = sorted(set(given) - set(schema))
    if unknown:
        raise TypeError(f"{name} got unknown parameter(s) {unknown}; it accepts: {', '.join(schema)}")
    resolved = {k: given.get(k, p.default) for k, p in schema.items()}
    for key, value in resolved.items():
        check = schema[key].check
        problem = check(value) if check is not None else None
        if problem:
            raise ValueError(f"{name}: invalid {key}={value!r}: {problem}")
    return resolved
