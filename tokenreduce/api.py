"""The public surface: patch / unpatch / info / list_methods."""
from __future__ import annotations

from typing import Any, Optional

import torch.nn as nn

from .backbones import find_adapter
from .backbones.base import Adapter
from .methods import COMMON_PARAMS, get_method, list_methods, resolve_params
from .state import ReductionInfo

_ATTR = "_tokenreduce"

__all__ = ["info", "is_patched", "list_methods", "patch", "unpatch"]


def patch(model: nn.Module, method: Optional[str] = None, *, config: Optional[str] = None,
          **params: Any) -> nn.Module:
    """Make ``model`` reduce tokens with ``method``, in place; returns the model.

    Everything is validated before the model is touched: the model family (ValueError naming the supported
    ones), the method name (ValueError listing the registered methods), each parameter (TypeError for an
    unknown name, ValueError for a bad value), and that the model's adapter provides what the method needs.
    Patching a model that is already patched first restores it, then applies the new method.

    Args:
        model: a supported model, e.g. a timm ``VisionTransformer``.
        method: a registered method name (``tokenreduce.list_methods()``).
        **params: the method's parameters (``tokenreduce.method_params(method)``) and the common options
            ``trace_source`` and ``size_weighted_pool``.
        config: a YAML config (path, or name under ``configs/``, see ``tokenreduce.configs``) giving the method
            and its parameters; keyword ``params`` override the config's.
    """
    if config is not None:
        from .configs import load_config  # lazy: configs imports yaml, which plain patching does not need
        cfg = load_config(config)
        if method is not None and method != cfg.method:
            raise ValueError(f"method {method!r} contradicts config {config!r}, which is for {cfg.method!r}")
        method, params = cfg.method, {**cfg.params, **params}
    if method is None:
        raise TypeError("patch() needs a method name or config=")
    adapter_cls = find_adapter(model)
    method_cls = get_method(method)
    resolved = resolve_params(method, params)
    if method_cls.site not in adapter_cls.sites:
        raise ValueError(f"{method} acts at '{method_cls.site.value}', which {type(model).__name__} does not "
                         f"offer (it offers: {', '.join(sorted(s.value for s in adapter_cls.sites))})")
    missing = set(method_cls.needs) - set(adapter_cls.provides)
    if missing:
        raise ValueError(f"{method} needs {sorted(missing)}, which the adapter for {type(model).__name__} "
                         "cannot provide")
    adapter = adapter_cls(model)
    method_kwargs = {k: v for k, v in resolved.items() if k not in COMMON_PARAMS}
    instance = method_cls(adapter.geometry(), **method_kwargs)  # may raise for an impossible schedule
    options = {k: resolved[k] for k in COMMON_PARAMS}
    if is_patched(model):
        unpatch(model)
    adapter.install(instance, options)
    object.__setattr__(model, _ATTR, adapter)
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Restore the original modules; afterwards the model computes exactly what it did before ``patch``."""
    adapter = _adapter_of(model)
    adapter.uninstall()
    del model.__dict__[_ATTR]
    return model


def is_patched(model: nn.Module) -> bool:
    """Whether ``model`` is currently patched by tokenreduce."""
    return isinstance(model.__dict__.get(_ATTR), Adapter)


def info(model: nn.Module) -> ReductionInfo:
    """What the last forward of a patched model did: sizes, sources, tokens per layer, analytic FLOPs."""
    return _adapter_of(model).info()


def _adapter_of(model: nn.Module) -> Adapter:
    if not is_patched(model):
        raise ValueError(f"this {type(model).__name__} is not patched by tokenreduce; call tokenreduce.patch first")
    return model.__dict__[_ATTR]
