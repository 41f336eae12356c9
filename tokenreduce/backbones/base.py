"""What an adapter is: the part that knows a model family, where its tokens can be reduced and how to run its
attention so a method gets what it asked for. Adapters never know which method runs."""
from __future__ import annotations

from typing import Any, ClassVar, Dict, FrozenSet, List, Type

import torch.nn as nn

from ..methods.base import Geometry, ReductionMethod, Site
from ..state import ReductionInfo

_ADAPTERS: List[Type["Adapter"]] = []


class Adapter:
    """Base class. Subclasses declare what they provide and implement install / uninstall / info."""

    name: ClassVar[str] = ""
    #: Analysis inputs this adapter can give a method (see ``methods.base.NEEDS``).
    provides: ClassVar[FrozenSet[str]] = frozenset()
    #: Sites where this adapter can run a method.
    sites: ClassVar[FrozenSet[Site]] = frozenset()

    @classmethod
    def claims(cls, model: nn.Module) -> bool:
        """Whether this adapter is the one for the model's family (it may still refuse a variant)."""
        raise NotImplementedError

    @classmethod
    def check_model(cls, model: nn.Module) -> None:
        """Raise ValueError if this variant of the family is not supported."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def geometry(self) -> Geometry:
        raise NotImplementedError

    def install(self, method: ReductionMethod, options: Dict[str, Any]) -> None:
        raise NotImplementedError

    def uninstall(self) -> None:
        raise NotImplementedError

    def info(self) -> ReductionInfo:
        raise NotImplementedError


def register_adapter(cls: Type[Adapter]) -> Type[Adapter]:
    """Class decorator: make an adapter available to ``patch``."""
    if cls not in _ADAPTERS:
        _ADAPTERS.append(cls)
    return cls


def find_adapter(model: nn.Module) -> Type[Adapter]:
    """The adapter class for ``model``; ValueError listing the supported families otherwise."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"patch() takes a torch.nn.Module, got {type(model).__name__}")
    for cls in _ADAPTERS:
        if cls.claims(model):
            cls.check_model(model)
            return cls
    supported = "; ".join(cls.name for cls in _ADAPTERS)
    raise ValueError(f"tokenreduce does not support {type(model).__module__}.{type(model).__name__}. "
                     f"Supported model families: {supported}.")
