"""Training the methods that learn parameters of their own on a frozen backbone: one trainer
(:mod:`~tokenreduce.train.trainer`: torchrun / DDP, AMP, resume, export) and one :class:`Objective` per method —
DiffRate's rate search (:mod:`~tokenreduce.train.rate_search`) and LTMP's thresholds
(:mod:`~tokenreduce.train.thresholds`).

The names below are imported on first use, so ``python -m tokenreduce.train.thresholds`` (e.g. under torchrun)
runs its module once."""
from importlib import import_module
from typing import Any

_NAMES = {"Objective": "objective", "ObjectiveModule": "objective", "Progress": "objective",
          "RateSearch": "rate_search", "SearchConfig": "rate_search", "search_rates": "rate_search",
          "ThresholdConfig": "thresholds", "ThresholdTraining": "thresholds", "train_thresholds": "thresholds",
          "TrainConfig": "trainer", "train": "trainer"}

__all__ = sorted(_NAMES)


def __getattr__(name: str) -> Any:
    if name in _NAMES:
        return getattr(import_module(f".{_NAMES[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
