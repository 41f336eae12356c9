"""LTMP's threshold training: learn a merge and a prune threshold per block for a FLOPs target, backbone frozen.

    model = timm.create_model("deit_small_patch16_224", pretrained=True)
    tokenreduce.patch(model, "ltmp", merge_thresholds=0.9, prune_thresholds=0.0)   # upstream's training init
    training = ThresholdTraining(model)              # the thresholds, outside model.state_dict()
    model.train()
    logits = model(images)                           # upstream's masked path (straight-through threshold masks)
    loss, parts = training.loss(logits, labels)      # label-smoothed CE + 10 (F - 0.75)²
    loss.backward()                                  # gradients reach only the thresholds
    training.export("thresholds.yaml")               # patch(model, "ltmp", thresholds="thresholds.yaml")

Upstream's recipe (Mxbonn/ltmp ``tools/train.py``): one epoch, SGD without momentum, learning rate 5e-6 for the
prune and 5e-3 for the merge thresholds (its README command), cosine per epoch (constant over a single epoch),
thresholds clamped to [0, 1] after every step, batch 128, ``tau`` 0.5, label smoothing 0.1, ``reduction_target``
0.75, ``reg_scale`` 10. :func:`main` is the command line, run by the shared trainer (torchrun / DDP, AMP, resume).
``F`` is the mean over blocks of each block's MAC ratio from the adapter's MAC model (upstream's closed form for a
standard ViT block, see :func:`tokenreduce.ops.ltmp.flops_ratio`).
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import api
from ..methods.ltmp import KINDS, LTMP, TRAINING_INIT, MaskedRun, Thresholds
from ..ops.ltmp import flops_ratio, kept_fractions
from .objective import Objective, Progress
from .trainer import TrainConfig, add_common_arguments, train, write_learned_yaml

#: Upstream's defaults (tools/train.py and its README command).
DEFAULTS = {"reduction_target": 0.75, "reg_scale": 10.0, "cls_scale": 1.0, "smoothing": 0.1, "lr_prune": 5e-6,
            "lr_merge": 5e-3, "momentum": 0.0, "min_lr": 0.0, "tau": 0.5}


def ltmp_method(model: nn.Module) -> LTMP:
    """The :class:`LTMP` instance a model is patched with (ValueError otherwise)."""
    method = api.method_of(model)
    if not isinstance(method, LTMP):
        raise ValueError(f"the model is patched with {method.name!r}, not 'ltmp'")
    return method


def label_smoothing_ce(logits: torch.Tensor, target: torch.Tensor, smoothing: float) -> torch.Tensor:
    """Upstream's training loss: timm's ``LabelSmoothingCrossEntropy`` (``(1 - s)·nll + s·mean(-log p)``)."""
    from timm.loss import LabelSmoothingCrossEntropy
    return LabelSmoothingCrossEntropy(smoothing=smoothing)(logits, target)


class ThresholdTraining(Objective):
    """LTMP's threshold training on a model patched with ``ltmp`` (``trainable=True``): the loss of a training
    forward, the optimizer and schedule, clamping and the export."""

    method = "ltmp"
    export_name = "thresholds.yaml"

    def __init__(self, model: nn.Module, reduction_target: float = DEFAULTS["reduction_target"],
                 reg_scale: float = DEFAULTS["reg_scale"], cls_scale: float = DEFAULTS["cls_scale"],
                 smoothing: float = DEFAULTS["smoothing"], lr_prune: float = DEFAULTS["lr_prune"],
                 lr_merge: float = DEFAULTS["lr_merge"], momentum: float = DEFAULTS["momentum"],
                 min_lr: float = DEFAULTS["min_lr"]) -> None:
        method = ltmp_method(model)
        if not method.trainable:
            raise ValueError("the model is patched with trainable=False: patch(model, 'ltmp', ...) with "
                             "trainable=True (the default) to train the thresholds")
        super().__init__(model, method.thresholds)
        self.ltmp, self.thresholds = method, method.thresholds
        if method.geometry.cost is None:
            raise ValueError("LTMP's FLOPs term needs the adapter's MAC model, which this model does not report")
        self.reduction_target, self.reg_scale, self.cls_scale = float(reduction_target), float(reg_scale), \
            float(cls_scale)
        self.smoothing = float(smoothing)
        self.lr = {"prune": float(lr_prune), "merge": float(lr_merge)}
        self.momentum, self.min_lr = float(momentum), float(min_lr)
        self._last_ratio: Optional[float] = None

    def threshold(self, kind: str, layer: int) -> nn.Parameter:
        """The learnable 0-d threshold of one block and kind (``"prune"`` / ``"merge"``); ``.grad`` after backward."""
        return self.thresholds.threshold(kind, layer)

    @torch.no_grad()
    def set_threshold(self, kind: str, layer: int, value: float) -> None:
        self.threshold(kind, layer).fill_(float(value))

    def is_training_run(self, state: Any) -> bool:
        return isinstance(state, MaskedRun)

    def masks(self) -> List[torch.Tensor]:
        """Every block's mask ``[B, N]`` after its reduction in the last training forward (forward values 0/1)."""
        return list(self.last_run().masks)

    def flops_ratio(self) -> torch.Tensor:
        """Upstream's differentiable FLOPs ratio ``F`` of the last training forward."""
        run = self.last_run()
        return flops_ratio(kept_fractions(run.masks), self.ltmp.geometry.cost, run.num_tokens)

    def cost_term(self) -> torch.Tensor:
        return self.flops_ratio()

    def loss(self, logits: torch.Tensor, target: torch.Tensor, *, cost: Optional[torch.Tensor] = None
             ) -> Tuple[torch.Tensor, Dict[str, float]]:
        """``cls_scale · CE_smoothed + reg_scale · (F − reduction_target)²`` (upstream's ``train_one_epoch``)."""
        ratio = self.flops_ratio() if cost is None else cost
        logits = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
        loss_cls = label_smoothing_ce(logits, target, self.smoothing) if self.smoothing > 0 else \
            F.cross_entropy(logits, target)
        loss_reg = (ratio - self.reduction_target) ** 2
        loss = self.cls_scale * loss_cls + self.reg_scale * loss_reg
        parts = {"loss": loss, "cls": loss_cls, "reg": loss_reg, "flops_ratio": ratio}
        parts = {k: float(v.detach()) for k, v in parts.items()}
        self._last_ratio = parts["flops_ratio"]
        return loss, parts

    # -- the trainer's side -----------------------------------------------------------------------------------
    def optimizer(self) -> torch.optim.Optimizer:
        groups = [{"params": list(getattr(self.thresholds, kind)), "lr": self.lr[kind], "name": kind}
                  for kind in KINDS]
        return torch.optim.SGD(groups, lr=self.lr["merge"], momentum=self.momentum, weight_decay=0.0)

    def schedule(self, optimizer: torch.optim.Optimizer, progress: Progress) -> None:
        # timm's cosine scheduler stepped per epoch (upstream's default): constant within an epoch
        factor = 0.5 * (1 + math.cos(math.pi * progress.epoch / max(progress.epochs, 1)))
        for group in optimizer.param_groups:
            base = self.lr[group["name"]]
            group["lr"] = self.min_lr + (base - self.min_lr) * factor

    def after_step(self) -> None:
        self.thresholds.clamp_(0.0, 1.0)

    def learned(self) -> Dict[str, Any]:
        return self.thresholds.values()

    def summary(self) -> Dict[str, Any]:
        values = self.thresholds.values()
        return {"reduction_target": self.reduction_target, "last_flops_ratio": self._last_ratio,
                "prune_thresholds": values["prune"], "merge_thresholds": values["merge"]}

    def export(self, path: os.PathLike, **meta: Any) -> Dict[str, Any]:
        """Write the thresholds as a YAML that ``patch(model, "ltmp", thresholds=path)`` loads."""
        values = self.thresholds.values()
        return write_learned_yaml(path, {**meta, "reduction_target": self.reduction_target, "tau": self.ltmp.tau,
                                         "prune_thresholds": values["prune"], "merge_thresholds": values["merge"]})


# ---------------------------------------------------------------------------------------------------------------
@dataclass
class ThresholdConfig(TrainConfig):
    """An LTMP threshold training run (upstream's recipe by default)."""

    reduction_target: float = DEFAULTS["reduction_target"]
    reg_scale: float = DEFAULTS["reg_scale"]
    cls_scale: float = DEFAULTS["cls_scale"]
    smoothing: float = DEFAULTS["smoothing"]
    tau: float = DEFAULTS["tau"]
    lr_prune: float = DEFAULTS["lr_prune"]
    lr_merge: float = DEFAULTS["lr_merge"]
    momentum: float = DEFAULTS["momentum"]
    min_lr: float = DEFAULTS["min_lr"]
    init_prune: float = TRAINING_INIT["prune"]
    init_merge: float = TRAINING_INIT["merge"]
    epochs: int = 1
    batch_size: int = 128
    output: str = "results/ltmp_thresholds"


def train_thresholds(cfg: ThresholdConfig) -> Dict[str, Any]:
    """Train LTMP's thresholds with the shared trainer; returns the summary and writes
    ``<output>/thresholds.yaml``."""
    base = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(TrainConfig)}
    params = {"prune_thresholds": cfg.init_prune, "merge_thresholds": cfg.init_merge, "tau": cfg.tau}
    return train(TrainConfig(**base), "ltmp", params,
                 lambda model: ThresholdTraining(model, reduction_target=cfg.reduction_target,
                                                 reg_scale=cfg.reg_scale, cls_scale=cfg.cls_scale,
                                                 smoothing=cfg.smoothing, lr_prune=cfg.lr_prune,
                                                 lr_merge=cfg.lr_merge, momentum=cfg.momentum, min_lr=cfg.min_lr))


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of ``tokenreduce train-thresholds``."""
    d = ThresholdConfig()
    add_common_arguments(p, d)
    p.add_argument("--reduction-target", type=float, default=d.reduction_target,
                   help="FLOPs ratio to reach (upstream's F: mean over blocks of the block's MAC ratio)")
    p.add_argument("--reg-scale", type=float, default=d.reg_scale, help="weight of (F - target)^2")
    p.add_argument("--cls-scale", type=float, default=d.cls_scale, help="weight of the classification loss")
    p.add_argument("--smoothing", type=float, default=d.smoothing, help="label smoothing (0: plain cross entropy)")
    p.add_argument("--tau", type=float, default=d.tau, help="temperature of the threshold masks")
    p.add_argument("--lr", type=float, nargs="+", default=[d.lr_prune, d.lr_merge], metavar="LR",
                   help="learning rate of the prune thresholds, then of the merge thresholds (one value: both)")
    p.add_argument("--momentum", type=float, default=d.momentum, help="SGD momentum (upstream: 0)")
    p.add_argument("--min-lr", type=float, default=d.min_lr, help="end of the per-epoch cosine")
    p.add_argument("--init-prune", type=float, default=d.init_prune, help="initial prune thresholds")
    p.add_argument("--init-merge", type=float, default=d.init_merge, help="initial merge thresholds")
    p.set_defaults(output=d.output)
    return p


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    parser = add_arguments(argparse.ArgumentParser(
        description="LTMP: learn a merge and a prune threshold per block for a FLOPs target, backbone frozen (run "
                    "under torchrun for several processes)."))
    args = vars(parser.parse_args(argv))
    lrs = args.pop("lr")
    if len(lrs) > 2:
        parser.error("--lr takes one or two values (prune, merge)")
    args["lr_prune"], args["lr_merge"] = lrs[0], lrs[-1]
    summary = train_thresholds(ThresholdConfig(**args))
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"reduction target {summary['reduction_target']}, last training FLOPs ratio "
              f"{summary['last_flops_ratio']:.4f}; thresholds: {Path(args['output']) / 'thresholds.yaml'}")
    return summary


if __name__ == "__main__":
    main()


__all__ = ["DEFAULTS", "ThresholdConfig", "ThresholdTraining", "Thresholds", "label_smoothing_ce", "ltmp_method",
           "main", "train_thresholds"]
