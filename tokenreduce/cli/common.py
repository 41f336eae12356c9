"""What the subcommands share: the one ``KEY=VALUE`` parameter syntax, and turning expected errors into one line."""
from __future__ import annotations

import sys
from typing import Any, Callable, Dict, List, Sequence, Tuple

import yaml

#: Errors a command reports as one ``error:`` line with exit status 2 (a traceback would only hide the message).
USER_ERRORS = (FileNotFoundError, TypeError, ValueError, RuntimeError, OSError)


def parse_params(items: Sequence[str]) -> Dict[str, Any]:
    """``["r=13", "prop_attn=false"]`` -> ``{"r": 13, "prop_attn": False}`` (values are YAML)."""
    params: Dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"a parameter must be KEY=VALUE, got {item!r}")
        params[key.strip()] = yaml.safe_load(value)
    return params


def parse_run(spec: str) -> Tuple[str, Dict[str, Any]]:
    """``"tome:r=16,prop_attn=false"`` -> ``("tome", {"r": 16, "prop_attn": False})``: a method and its parameters
    in one argument (commas inside brackets stay: ``tome:r=[16,-1.0]``)."""
    method, _, rest = spec.partition(":")
    if not method.strip():
        raise ValueError(f"{spec!r} names no method: use METHOD or METHOD:key=value,...")
    return method.strip(), parse_params(split_top_level(rest))


def split_top_level(text: str) -> List[str]:
    """Split on commas that are not inside brackets."""
    parts, depth, cur = [], 0, ""
    for ch in text:
        depth += ch in "[({"
        depth -= ch in "])}"
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    return [p for p in (s.strip() for s in parts) if p]


def error(message: str) -> int:
    """Print one ``error:`` line to stderr; returns the exit status 2."""
    print(f"error: {message}", file=sys.stderr)
    return 2


def guarded(main: Callable[..., int]) -> Callable[..., int]:
    """A command ``main`` whose expected errors become one ``error:`` line and exit status 2."""
    def run(*args: Any, **kwargs: Any) -> int:
        try:
            return main(*args, **kwargs)
        except USER_ERRORS as e:
            return error(str(e))
    run.__doc__, run.__name__ = main.__doc__, main.__name__
    return run
