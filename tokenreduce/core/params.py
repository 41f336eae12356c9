"""Method parameters: :class:`Param` (default, description, validator, the papers' names as aliases) and the
shared validators every method composes its checks from.

One vocabulary across methods (docs/concepts.md#parameters):

==================  =========================================================================================
``r``               tokens removed per block (merged or pruned), an int or a per-layer schedule
``keep``            tokens kept, **not counting prefix tokens** (CLS, dist, registers); in a VLM, visual tokens
                    kept per image
``keep_ratio``      fraction of the (non-prefix / visual) tokens kept
``layer``/``layers`` where a method acts: block indices (0-based) or the LLM decoder layer(s)
``target_flops``    a FLOPs budget (fraction of the unreduced model, or MACs per image)
``prop_attn``       proportional attention (``log(size)`` added to the attention logits)
==================  =========================================================================================

A validator returns None when the value is acceptable, else a message saying what is allowed.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

Check = Callable[[Any], Optional[str]]


@dataclass(frozen=True)
class Param:
    """One method parameter.

    Attributes:
        default: used when the caller does not give it.
        doc: one line for ``tokenreduce methods`` and the docs.
        check: validator (None: anything goes).
        aliases: other accepted names (the paper's or the official code's), e.g. ``("keep_rate",)``.
    """

    default: Any
    doc: str
    check: Optional[Check] = None
    aliases: Tuple[str, ...] = ()


# ---------------------------------------------------------------------------------------------------------------
# Predicates and validators
def is_int(v: Any) -> bool:
    """An integer that is not a bool."""
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def is_real(v: Any) -> bool:
    """A finite real number that is not a bool."""
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(float(v))


def boolean(v: Any) -> Optional[str]:
    return None if isinstance(v, bool) else f"must be True or False, got {v!r}"


def integer(minimum: Optional[int] = None, optional: bool = False) -> Check:
    """An int (>= ``minimum``), or None when ``optional``."""
    def check(v: Any) -> Optional[str]:
        if optional and v is None:
            return None
        if not is_int(v):
            return f"must be an int{' or None' if optional else ''}, got {v!r}"
        if minimum is not None and v < minimum:
            return f"must be >= {minimum}, got {v}"
        return None
    return check


def real(low: Optional[float] = None, high: Optional[float] = None, *, low_open: bool = False,
         optional: bool = False) -> Check:
    """A number in ``[low, high]`` (``(low, high]`` with ``low_open``), or None when ``optional``."""
    def check(v: Any) -> Optional[str]:
        if optional and v is None:
            return None
        if not is_real(v):
            return f"must be a number{' or None' if optional else ''}, got {v!r}"
        if low is not None and (v <= low if low_open else v < low):
            return f"must be {'>' if low_open else '>='} {low}, got {v}"
        if high is not None and v > high:
            return f"must be <= {high}, got {v}"
        return None
    return check


def fraction(optional: bool = False) -> Check:
    """A number in (0, 1]."""
    return real(0.0, 1.0, low_open=True, optional=optional)


def choice(*choices: Any) -> Check:
    def check(v: Any) -> Optional[str]:
        return None if v in choices else f"must be one of {', '.join(repr(c) for c in choices)}, got {v!r}"
    return check


def int_list(minimum: int = 0, optional: bool = False, non_empty: bool = True) -> Check:
    """A list (or tuple) of ints >= ``minimum``, or None when ``optional``."""
    def check(v: Any) -> Optional[str]:
        if optional and v is None:
            return None
        if (isinstance(v, (list, tuple)) and (v or not non_empty)
                and all(is_int(x) and x >= minimum for x in v)):
            return None
        return f"must be a list of ints >= {minimum}{' or None' if optional else ''}, got {v!r}"
    return check


def layer_list(optional: bool = True) -> Check:
    """Block / layer indices: a strictly increasing list of ints >= 0 (or None when ``optional``)."""
    base = int_list(0, optional=optional)

    def check(v: Any) -> Optional[str]:
        problem = base(v)
        if problem or v is None:
            return problem
        if any(a >= b for a, b in zip(v, list(v)[1:])):
            return f"must be strictly increasing, got {list(v)}"
        return None
    return check


def either(*checks: Check) -> Check:
    """Accept a value any of ``checks`` accepts; the message lists every way that was tried."""
    def check(v: Any) -> Optional[str]:
        problems = []
        for c in checks:
            p = c(v)
            if p is None:
                return None
            problems.append(p)
        return " or ".join(dict.fromkeys(problems))
    return check


# ---------------------------------------------------------------------------------------------------------------
# Resolution
def canonical_names(schema: Dict[str, Param]) -> Dict[str, str]:
    """``{name or alias: canonical name}`` for a schema."""
    names = {name: name for name in schema}
    for name, p in schema.items():
        for alias in p.aliases:
            names[alias] = name
    return names


def resolve(owner: str, schema: Dict[str, Param], given: Dict[str, Any]) -> Dict[str, Any]:
    """Map aliases to canonical names, fill defaults and validate.

    Raises:
        TypeError: an unknown parameter (naming what is accepted), or a parameter given under two names.
        ValueError: an invalid value (saying what is allowed).
    """
    names = canonical_names(schema)
    unknown = sorted(set(given) - set(names))
    if unknown:
        accepted = ", ".join(f"{n} (alias {', '.join(p.aliases)})" if p.aliases else n for n, p in schema.items())
        raise TypeError(f"{owner} got unknown parameter(s) {unknown}; it accepts: {accepted}")
    canonical: Dict[str, Any] = {}
    spelled: Dict[str, str] = {}
    for key, value in given.items():
        name = names[key]
        if name in canonical:
            raise TypeError(f"{owner}: {spelled[name]!r} and {key!r} name the same parameter; give one")
        canonical[name], spelled[name] = value, key
    resolved = {k: canonical.get(k, p.default) for k, p in schema.items()}
    for key, value in resolved.items():
        check = schema[key].check
        problem = check(value) if check is not None else None
        if problem:
            raise ValueError(f"{owner}: invalid {spelled.get(key, key)}={value!r}: {problem}")
    return resolved


def per_layer(value: Any, num_layers: int, what: str) -> Sequence[Any]:
    """One value per layer: a scalar repeated, or a list that must have ``num_layers`` entries."""
    if isinstance(value, (list, tuple)):
        if len(value) != num_layers:
            raise ValueError(f"{what} lists {len(value)} values but the model has {num_layers} blocks")
        return list(value)
    return [value] * num_layers
