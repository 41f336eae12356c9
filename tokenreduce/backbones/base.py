"""What an adapter is: the part that knows a model family — where its tokens can be reduced, how to run its layers
so a method gets what it declared, and how to count its MACs. An adapter never knows which method runs: it reads
only the method's declarations (site, needs, schedule) and calls ``reduce``.

Every change an adapter makes goes through its :class:`~tokenreduce.backbones.patcher.Patcher`, so
``uninstall`` restores exactly what was there. Per-forward state lives in one
:class:`~tokenreduce.core.ForwardRecord` (``self.record``), replaced at the start of every forward.
"""
from __future__ import annotations

from typing import Any, ClassVar, Dict, FrozenSet, Optional

import torch
import torch.nn as nn

from ..core import ForwardRecord, Geometry, ReductionInfo, ReductionMethod, Site, Status, run_begin
from ..core.registry import adapters
from .patcher import Patcher


class Adapter:
    """Base class. Subclasses declare what they provide per site and implement ``geometry`` / ``install`` /
    ``info``."""

    #: The family, as named in error messages ("timm VisionTransformer ...").
    name: ClassVar[str] = ""
    #: Per site this adapter offers, the needs it can provide there.
    provides: ClassVar[Dict[Site, FrozenSet[str]]] = {}

    @classmethod
    def claims(cls, model: nn.Module) -> bool:
        """Whether this adapter is the one for the model's family (it may still refuse a variant)."""
        raise NotImplementedError

    @classmethod
    def check_model(cls, model: nn.Module) -> None:
        """Raise ValueError if this variant of the family is not supported."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.method: Optional[ReductionMethod] = None
        self.options: Dict[str, Any] = {}
        self.patcher = Patcher()
        self.record: Optional[ForwardRecord] = None
        #: Per-call instructions of the prompts (``tokenreduce.instructions``), read by sites that provide
        #: ``Need.INSTRUCTION``: None, one instruction for every image, or a list with one per image.
        self.instructions: Any = None

    def geometry(self, site: Site) -> Geometry:
        """What a method acting at ``site`` may know of the model."""
        raise NotImplementedError

    def check_method(self, method: ReductionMethod) -> None:
        """Refuse (ValueError) a configured method this model cannot run, before anything is changed."""

    def install(self, method: ReductionMethod, options: Dict[str, Any]) -> None:
        raise NotImplementedError

    def uninstall(self) -> None:
        self.patcher.restore()
        self.record = None
        self.method = None

    def info(self) -> ReductionInfo:
        raise NotImplementedError

    def dense_macs(self, inputs: torch.Tensor) -> int:
        """Analytic MACs per image of the *unreduced* model on ``inputs`` (the same convention as ``info``)."""
        raise NotImplementedError(f"{type(self).__name__} has no MAC model for an unpatched forward")

    # -- shared by the subclasses ------------------------------------------------------------------------------
    def begin_forward(self, **fields: Any) -> ForwardRecord:
        """A fresh per-forward record, with the method's carry."""
        training = bool(getattr(self.model, "training", False))
        self.record = ForwardRecord(carry=run_begin(self.method, training) if self.method is not None else None,
                                    **fields)
        return self.record

    def vision_info(self, macs: int) -> ReductionInfo:
        """``info()`` of a vision host from the last record: sizes and sources default to the identity."""
        rec = self.finished_record()
        n_out = rec.layers[-1].tokens_out
        size = rec.size if rec.size is not None else torch.ones(rec.batch, n_out, dtype=rec.dtype, device=rec.device)
        source = rec.source
        if self.options.get("trace_source") and source is None and rec.size is None:  # nothing was reduced
            source = torch.eye(n_out, dtype=rec.dtype, device=rec.device).expand(rec.batch, n_out, n_out)
        valid = rec.valid
        return ReductionInfo(size=size.detach(), source=source.detach() if source is not None else None,
                             tokens_per_layer=[l.tokens_in for l in rec.layers], macs=int(macs), kept=dict(rec.kept),
                             valid=valid, tokens_per_sample=valid.sum(dim=1) if valid is not None else None,
                             method_state=rec.carry)

    def finished_record(self) -> ForwardRecord:
        """The record of the last forward, or a RuntimeError saying why there is none."""
        rec = self.record
        if rec is None or (not rec.layers and rec.status != Status.FAILED):
            raise RuntimeError("no forward has run since the model was patched: call the model first")
        if rec.status == Status.FAILED:
            raise RuntimeError(f"the last forward raised {rec.error}; info() describes only a completed forward")
        return rec


_WRAPPERS = {
    "OptimizedModule": "torch.compile returned a wrapper: patch the model first, then compile it "
                       "(tokenreduce.patch(model, ...); model = torch.compile(model)), or patch model._orig_mod",
    "DataParallel": "patch the wrapped module, before or after wrapping: tokenreduce.patch(dp.module, ...)",
    "DistributedDataParallel": "patch the model before wrapping it in DDP (tokenreduce.patch(model, ...); "
                               "model = DDP(model)), or patch ddp.module",
    "FullyShardedDataParallel": "patch the model before wrapping it with FSDP",
}


def find_adapter(model: nn.Module) -> type:
    """The adapter class for ``model``; ValueError listing the supported families otherwise."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"patch() takes a torch.nn.Module, got {type(model).__name__}")
    hint = _WRAPPERS.get(type(model).__name__)
    if hint is not None:
        raise ValueError(f"tokenreduce patches the model itself, not a {type(model).__name__}: {hint}")
    for cls in adapters():
        if cls.claims(model):
            cls.check_model(model)
            return cls
    supported = "; ".join(cls.name for cls in adapters())
    raise ValueError(f"tokenreduce does not support {type(model).__module__}.{type(model).__name__}. "
                     f"Supported model families: {supported}.")


def families_offering(site: Site) -> str:
    """The registered families with a site, named briefly (the part of each adapter's name before its details),
    for error messages."""
    return ", ".join(cls.name.split(" (")[0] for cls in adapters() if site in cls.provides) or "none"
