"""Training the methods that learn parameters of their own on a frozen backbone: one trainer
(:mod:`~tokenreduce.train.trainer`: torchrun / DDP, AMP, resume, export) and one :class:`Objective` per method —
DiffRate's rate search (:mod:`~tokenreduce.train.rate_search`) and LTMP's thresholds
(:mod:`~tokenreduce.train.thresholds`)."""
from .objective import Objective, ObjectiveModule, Progress
from .rate_search import RateSearch, SearchConfig, search_rates
from .thresholds import ThresholdConfig, ThresholdTraining, train_thresholds
from .trainer import TrainConfig, train

__all__ = ["Objective", "ObjectiveModule", "Progress", "RateSearch", "SearchConfig", "ThresholdConfig",
           "ThresholdTraining", "TrainConfig", "search_rates", "train", "train_thresholds"]
