"""DiffRate's rate search: learn per-block kept counts against a FLOPs target with the backbone frozen.

    model = timm.create_model("deit_small_patch16_224", pretrained=True)
    tokenreduce.patch(model, "diffrate")                 # no counts: rate-search mode
    search = RateSearch(model)                           # the learnable logits, outside model.state_dict()
    model.train()
    logits = model(images)                               # masked training forward (upstream's DDP proxy)
    loss, parts = search.loss(logits, labels)            # cross entropy + 5 (GFLOPs - target)²
    loss.backward()                                      # gradients reach only the rate logits
    search.export("rates.yaml")                          # patch(model, "diffrate", rates="rates.yaml")

:func:`main` is the command line (``tools/train_rates.py``, ``tokenreduce search-rates``), run by the shared
trainer (:mod:`tokenreduce.train.trainer`): torchrun / DDP, AMP, resume, and a YAML export of ``prune_kept`` /
``merge_kept``.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import api
from ..core import CostModel
from ..methods.diffrate import KINDS, DiffRate, RateLogits, SearchRun
from ..methods.diffrate.functional import rate_flops as _rate_flops
from .objective import Objective, Progress
from .trainer import TrainConfig, add_common_arguments, cosine, train, write_learned_yaml

FLOPS_WEIGHT = 5.0  # upstream's lambda


class FlopCost(NamedTuple):
    """DiffRate's MAC counter for one model: the adapter's :class:`CostModel` with the patch embedding charged for
    the prefix tokens too (upstream counts it on all ``num_tokens``), and the tokens entering block 0."""

    cost: CostModel
    num_tokens: int

    @property
    def num_blocks(self) -> int:
        return self.cost.num_layers


def flop_cost(model: nn.Module) -> FlopCost:
    """DiffRate's counter for a model patched with ``diffrate``, from its adapter's MAC model."""
    geometry = diffrate_method(model).geometry
    if geometry.cost is None or geometry.num_tokens is None:
        raise ValueError("the DiffRate rate search needs the adapter's MAC model at a fixed input size")
    cost = geometry.cost
    upstream = dataclasses.replace(cost, constant=cost.constant + geometry.num_prefix * cost.embed_per_token)
    return FlopCost(upstream, geometry.num_tokens)


def rate_flops(prune_kept: Sequence[Any], merge_kept: Sequence[Any], cost: FlopCost):
    """DiffRate's MACs per image for per-block kept counts (differentiable when the counts are tensors)."""
    return _rate_flops(prune_kept, merge_kept, cost.cost, cost.num_tokens)


def diffrate_method(model: nn.Module) -> DiffRate:
    """The :class:`DiffRate` instance a model is patched with (ValueError otherwise)."""
    method = api.method_of(model)
    if not isinstance(method, DiffRate):
        raise ValueError(f"the model is patched with {method.name!r}, not 'diffrate'")
    return method


class RateSearch(Objective):
    """The rate search of a model patched with ``diffrate`` in search mode (no kept counts given).

    Moves the rate logits to the model's device and floating dtype (do this before building an optimizer), and
    turns the last training forward into DiffRate's differentiable FLOPs and loss.
    """

    method = "diffrate"
    export_name = "rates.yaml"

    def __init__(self, model: nn.Module, flops_weight: float = FLOPS_WEIGHT, target_gflops: Optional[float] = None,
                 lr: float = 0.01, min_lr: float = 0.001) -> None:
        method = diffrate_method(model)
        if not method.searching:
            raise ValueError("the model is patched with fixed DiffRate counts; patch(model, 'diffrate') without "
                             "prune_kept/merge_kept/rates to search them")
        super().__init__(model, method.rates)
        self.diffrate = method
        self.rates: RateLogits = method.rates
        self.cost: FlopCost = flop_cost(model)  # upstream's counter (not the Objective's cost_term)
        self.flops_weight = float(flops_weight)
        self.target_gflops = target_gflops
        self.lr, self.min_lr = float(lr), float(min_lr)

    def logits(self, kind: str, layer: int) -> nn.Parameter:
        """The learnable logits ``[K]`` of one block and kind (``"prune"`` / ``"merge"``); ``.grad`` after backward."""
        return self.rates.logits(kind, layer)

    @torch.no_grad()
    def set_logits(self, kind: str, layer: int, value: torch.Tensor) -> None:
        param = self.logits(kind, layer)
        if tuple(value.shape) != tuple(param.shape):
            raise ValueError(f"{kind} logits of block {layer} have shape {tuple(param.shape)}, "
                             f"got {tuple(value.shape)}")
        param.copy_(value)

    def is_training_run(self, state: Any) -> bool:
        return isinstance(state, SearchRun)

    def last_search(self) -> SearchRun:
        """The rate-search record of the last training forward (``RuntimeError`` before one ran in train() mode)."""
        try:
            return self.last_run()
        except RuntimeError:
            raise RuntimeError("no rate-search forward has run: call model.train() and the model first (the "
                               "rates are learned in train() mode)") from None

    def kept_counts(self) -> Dict[str, List[int]]:
        """The counts the logits choose now (what :meth:`export` writes)."""
        return self.rates.kept_counts()

    def last_kept(self) -> Dict[str, List[int]]:
        """The counts chosen by the last training forward."""
        run = self.last_search()
        return {k: [int(round(float(v.detach()))) for v in run.kept[k]] for k in KINDS}

    def flops(self) -> torch.Tensor:
        """DiffRate's differentiable MACs per image of the last training forward (``ste_min`` routing)."""
        run = self.last_search()
        return rate_flops(run.kept["prune"], run.kept["merge"], self.cost)

    def cost_term(self) -> torch.Tensor:
        return self.flops()

    def inference_flops(self, counts: Optional[Dict[str, List[int]]] = None) -> float:
        """MACs per image of inference with ``counts`` (default: the current choice), upstream's counter."""
        counts = counts or self.kept_counts()
        return float(rate_flops(counts["prune"], counts["merge"], self.cost))

    def full_flops(self) -> float:
        """MACs per image of the unreduced model (upstream's counter)."""
        never = [10 ** 9] * self.cost.num_blocks
        return float(rate_flops(never, never, self.cost))

    def loss(self, logits: torch.Tensor, target: torch.Tensor, target_gflops: Optional[float] = None,
             flops: Optional[torch.Tensor] = None, *, cost: Optional[torch.Tensor] = None
             ) -> Tuple[torch.Tensor, Dict[str, float]]:
        """``cross_entropy + flops_weight·(GFLOPs − target)²`` of the last training forward (``flops`` / ``cost``:
        its :meth:`flops`, computed when not given)."""
        target_gflops = self.target_gflops if target_gflops is None else target_gflops
        if target_gflops is None:
            raise ValueError("give target_gflops (here or to RateSearch)")
        flops = cost if flops is None else flops
        flops = self.flops() if flops is None else flops
        loss_cls = F.cross_entropy(logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits,
                                   target)
        loss_flops = (flops / 1e9 - target_gflops) ** 2
        loss = loss_cls + self.flops_weight * loss_flops
        parts = {"loss": loss, "cls": loss_cls, "flops": loss_flops, "gflops": flops / 1e9}
        return loss, {k: float(v.detach()) for k, v in parts.items()}

    # -- the trainer's side -----------------------------------------------------------------------------------
    def optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=0.0)

    def schedule(self, optimizer: torch.optim.Optimizer, progress: Progress) -> None:
        # upstream: cosine from arch-lr 0.01 to arch-min-lr 0.001 over all steps
        for group in optimizer.param_groups:
            group["lr"] = cosine(progress.step, progress.total, self.lr, self.min_lr)

    def learned(self) -> Dict[str, Any]:
        return self.kept_counts()

    def summary(self) -> Dict[str, Any]:
        counts = self.kept_counts()
        return {"target_gflops": self.target_gflops, "achieved_gflops": self.inference_flops(counts) / 1e9,
                "full_gflops": self.full_flops() / 1e9, "prune_kept": counts["prune"],
                "merge_kept": counts["merge"]}

    def export(self, path: os.PathLike, **meta: Any) -> Dict[str, Any]:
        """Write the current counts as a YAML that ``patch(model, "diffrate", rates=path)`` loads."""
        if self.target_gflops is not None:
            meta = {"target_gflops": self.target_gflops, "granularity": self.rates.granularity["prune"], **meta}
        return export_rates(path, self.kept_counts(), self.inference_flops() / 1e9, **meta)


def export_rates(path: os.PathLike, counts: Dict[str, List[int]], achieved_gflops: float,
                 **meta: Any) -> Dict[str, Any]:
    return write_learned_yaml(path, {**meta, "achieved_gflops": round(achieved_gflops, 6),
                                     "prune_kept": list(counts["prune"]), "merge_kept": list(counts["merge"])})


# ---------------------------------------------------------------------------------------------------------------
@dataclass
class SearchConfig(TrainConfig):
    """A DiffRate rate search (upstream's recipe: AdamW, cosine 0.01 -> 0.001, 3 epochs)."""

    target_gflops: float = 2.9
    flops_weight: float = FLOPS_WEIGHT
    epochs: int = 3
    lr: float = 0.01
    min_lr: float = 0.001
    granularity: int = 1
    output: str = "results/diffrate_search"


def search_rates(cfg: SearchConfig) -> Dict[str, Any]:
    """Run a rate search with the shared trainer; returns the summary (also ``<output>/summary.json``) and writes
    ``<output>/rates.yaml``."""
    base = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(TrainConfig)}
    return train(TrainConfig(**base), "diffrate", {"granularity": cfg.granularity},
                 lambda model: RateSearch(model, flops_weight=cfg.flops_weight, target_gflops=cfg.target_gflops,
                                          lr=cfg.lr, min_lr=cfg.min_lr))


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The rate-search options (shared by tools/train_rates.py and ``tokenreduce search-rates``)."""
    d = SearchConfig()
    add_common_arguments(p, d)
    p.add_argument("--target-gflops", type=float, required=True, help="FLOPs target (GMACs per image, upstream's "
                   "counter)")
    p.add_argument("--flops-weight", type=float, default=d.flops_weight, help="lambda of the FLOPs loss")
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--min-lr", type=float, default=d.min_lr)
    p.add_argument("--granularity", type=int, default=d.granularity, help="step between candidate kept counts")
    p.set_defaults(output=d.output)
    return p


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    parser = add_arguments(argparse.ArgumentParser(
        description="DiffRate rate search: learn per-block kept counts for a FLOPs target (run under torchrun "
                    "for several processes)."))
    args = parser.parse_args(argv)
    summary = search_rates(SearchConfig(**vars(args)))
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"target {summary['target_gflops']:.3f} GFLOPs, achieved {summary['achieved_gflops']:.3f} "
              f"(full model {summary['full_gflops']:.3f}); rates: {Path(args.output) / 'rates.yaml'}")
    return summary


if __name__ == "__main__":
    main()
