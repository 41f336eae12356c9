"""What the trainer trains: an :class:`Objective` wraps a model patched with a method that has learnable parameters
of its own (DiffRate's rate logits, LTMP's thresholds) and turns a training forward into a loss.

The model's own weights stay frozen and its ``state_dict`` untouched: the learnable parameters live in
``Objective.module`` (an ``nn.Module`` outside the model), which the trainer optimises, checkpoints and exports. The
differentiable cost term comes from the method's record of the forward (``tokenreduce.info(model).method_state``)
and the adapter's MAC model (``Geometry.cost``), so an objective never knows the model family.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, ClassVar, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from .. import api


@dataclass(frozen=True)
class Progress:
    """Where the training is: ``step`` (0-based) of ``total`` scheduled steps, ``epoch`` of ``epochs``, and
    ``steps_per_epoch``."""

    step: int
    total: int
    epoch: int
    epochs: int
    steps_per_epoch: int


class Objective:
    """Base class. A subclass sets ``method`` (the registry name it trains) and implements :meth:`cost_term`,
    :meth:`loss`, :meth:`learned` and :meth:`export`; it may override :meth:`optimizer`, :meth:`schedule` and
    :meth:`after_step`.

    Args:
        model: a model patched with ``method``.
        module: the learnable parameters (outside the model). Moved to the model's device and floating dtype here,
            so build the optimizer afterwards.
    """

    method: ClassVar[str] = ""
    #: The export's file name inside the trainer's output folder.
    export_name: ClassVar[str] = "learned.yaml"

    def __init__(self, model: nn.Module, module: nn.Module) -> None:
        self.model, self.module = model, module
        ref = next((p for p in model.parameters() if p.is_floating_point()), None)
        if ref is not None:
            module.to(device=ref.device, dtype=ref.dtype)

    # -- what is learned ---------------------------------------------------------------------------------------
    def parameters(self) -> List[nn.Parameter]:
        return list(self.module.parameters())

    def last_run(self) -> Any:
        """What the method recorded in the last forward (its carry), or a RuntimeError when that was no training
        forward of this method."""
        state = api.info(self.model).method_state
        if state is None or not self.is_training_run(state):
            raise RuntimeError(f"no {self.method} training forward has run: call model.train() and the model first")
        return state

    def is_training_run(self, state: Any) -> bool:  # pragma: no cover - abstract
        raise NotImplementedError

    def cost_term(self) -> torch.Tensor:  # pragma: no cover - abstract
        """The differentiable cost of the last training forward (called inside the trained module's forward)."""
        raise NotImplementedError

    def loss(self, logits: torch.Tensor, target: torch.Tensor, *, cost: Optional[torch.Tensor] = None
             ) -> Tuple[torch.Tensor, Dict[str, float]]:  # pragma: no cover - abstract
        """``(loss, parts)``: the scalar to backpropagate and its named parts as floats (``parts["loss"]`` first,
        for the history). ``cost`` is :meth:`cost_term` of the same forward (computed when None)."""
        raise NotImplementedError

    # -- optimisation ------------------------------------------------------------------------------------------
    def optimizer(self) -> torch.optim.Optimizer:  # pragma: no cover - abstract
        raise NotImplementedError

    def schedule(self, optimizer: torch.optim.Optimizer, progress: Progress) -> None:
        """Set every group's learning rate for this step (default: leave them)."""

    def after_step(self) -> None:
        """Called after every optimizer step (e.g. clamping)."""

    # -- results -----------------------------------------------------------------------------------------------
    def learned(self) -> Dict[str, Any]:  # pragma: no cover - abstract
        """What the parameters choose now, JSON-able (every rank reports it; the summary compares them)."""
        raise NotImplementedError

    def summary(self) -> Dict[str, Any]:
        """Extra entries for the trainer's summary."""
        return {}

    def export(self, path, **meta: Any) -> Dict[str, Any]:  # pragma: no cover - abstract
        """Write what was learned so ``patch`` loads it; returns the document written."""
        raise NotImplementedError

    def digest(self) -> str:
        """A short hash of the parameters (equal on every rank when DDP kept them in sync)."""
        flat = torch.cat([p.detach().double().flatten().cpu() for p in self.module.parameters()])
        return hashlib.sha256(flat.numpy().tobytes()).hexdigest()[:16]


class ObjectiveModule(nn.Module):
    """What DDP wraps: the frozen patched model plus the objective's parameters (its only trainable ones); the
    forward returns ``(logits, cost)`` so the cost is part of the graph DDP sees."""

    def __init__(self, model: nn.Module, objective: Objective) -> None:
        super().__init__()
        self.model, self.learnable = model, objective.module
        self._objective = objective

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        logits = self.model(x)
        return logits, self._objective.cost_term()
