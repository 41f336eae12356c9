"""Which reduction a run applies: a method and its parameters, or a config file, or none (unpatched).

Checked before a model is loaded, through the public API (``tokenreduce.list_methods`` /
``tokenreduce.method_params``, and the config loader ``patch(config=...)`` itself uses), so a typo in
``--model_args`` fails in a second instead of after the weights are read. Values are checked by
``tokenreduce.patch`` itself.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Optional

import yaml

import tokenreduce

#: ``method=`` values meaning "run unpatched"
UNPATCHED = ("none", "unpatched", "baseline")


class PatchRefused(ValueError):
    """``tokenreduce.patch`` refused this method (or its values) on this model; the message says why."""


@dataclass
class PatchSpec:
    """``method`` with ``params``, or ``config`` (a path or a name under configs/, params overriding it)."""

    method: Optional[str] = None
    params: Dict[str, Any] = field(default_factory=dict)
    config: Optional[str] = None

    @classmethod
    def from_args(cls, method: Optional[str], config: Optional[str], params: Dict[str, Any]) -> "PatchSpec":
        """Validate names (method, parameter names, config file) and coerce ``KEY=VALUE`` strings.

        ``--model_args`` values arrive as strings, ints, floats or bools; a list or mapping (``layers=[2,6,15]``)
        arrives as its text and is read as YAML here.
        """
        params = {k: coerce(v) for k, v in params.items()}
        if isinstance(method, str) and method.lower() in UNPATCHED:
            method = None
        if config is not None:
            cfg = _load_config(str(config))
            if method is not None and method != cfg.method:
                raise ValueError(f"method={method} contradicts config={config}, which is for {cfg.method}")
            method, params = cfg.method, {**cfg.params, **params}
            config = str(config)
        if method is None:
            if params:
                raise TypeError(f"method parameters {sorted(params)} given without method= or config=")
            return cls()
        _check_names(str(method), params)
        return cls(method=str(method), params=params, config=config)

    @property
    def label(self) -> str:
        """``visionzip(dominant=54, contextual=10)`` or ``unpatched``."""
        if self.method is None:
            return "unpatched"
        inner = ", ".join(f"{k}={v}" for k, v in self.params.items())
        return f"{self.method}({inner})"

    def apply(self, model: Any) -> None:
        """Patch ``model`` in place (restoring it first if patched), or unpatch it for the unpatched run."""
        if self.method is None:
            if tokenreduce.is_patched(model):
                tokenreduce.unpatch(model)
            return
        try:
            tokenreduce.patch(model, self.method, **self.params)
        except (TypeError, ValueError) as e:  # validated before the model was touched: it is as it was
            raise PatchRefused(f"{self.label} on {type(model).__name__}: {e}") from e


def coerce(value: Any) -> Any:
    """A ``--model_args`` value: strings that spell a YAML list, mapping or null become that, others stay."""
    if not isinstance(value, str):
        return value
    text = value.strip()
    if text[:1] in "[{" or text in ("null", "~"):
        try:
            return yaml.safe_load(text)
        except yaml.YAMLError:
            raise ValueError(f"cannot read {value!r} as a YAML list or mapping") from None
    return value


def _check_names(method: str, params: Dict[str, Any]) -> None:
    if method not in tokenreduce.list_methods():
        raise ValueError(f"unknown method {method!r}; registered: {', '.join(tokenreduce.list_methods())}")
    known = tokenreduce.method_params(method)
    unknown = sorted(set(params) - set(known))
    if unknown:
        raise TypeError(f"{method} has no parameter(s) {unknown}; its parameters: {', '.join(known)} "
                        f"(see `tokenreduce methods {method}`)")


def _load_config(ref: str) -> Any:
    from tokenreduce.configs import load_config  # lazy: only runs with config= given
    return load_config(ref)


__all__ = ["PatchRefused", "PatchSpec", "UNPATCHED", "coerce"]
