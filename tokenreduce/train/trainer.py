"""One trainer for every method that learns parameters of its own on a frozen backbone (DiffRate's rate search,
LTMP's thresholds): one or many processes under ``torchrun`` (DDP: nccl on GPU, gloo on CPU), AMP on GPU, a
progress bar, checkpoint and resume (bit-identical to an uninterrupted run), and the method's export.

    summary = train(cfg, patch_params={...}, make_objective=lambda model: SomeObjective(model, ...))

writes ``<output>/checkpoint.pt``, ``<output>/<objective.export_name>``, ``summary.json`` and ``history.json``.
The method-specific parts (parameters, loss, cost, optimizer, export) are the :class:`~.objective.Objective`.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from .. import api
from .objective import Objective, ObjectiveModule, Progress


@dataclass
class TrainConfig:
    """What every training run needs (the method's own options live in its config subclass)."""

    model: str = "deit_small_patch16_224"
    model_kwargs: Optional[Dict[str, Any]] = None
    pretrained: bool = False
    data: Optional[str] = None  # an ImageFolder root (its train/ subfolder when present), or "fashion-mnist"
    synthetic: bool = False
    synthetic_size: int = 1024
    limit: Optional[int] = None  # use only the first N images of the data
    epochs: int = 1
    max_steps: Optional[int] = None
    batch_size: int = 64  # per process
    workers: int = 4
    amp: str = "auto"  # auto (bf16 on GPU), bf16, fp16, none
    output: str = "results/train"
    resume: bool = False
    save_every: int = 0  # also checkpoint every N steps (0: at epoch ends only)
    seed: int = 0
    progress: bool = True


# ---------------------------------------------------------------------------------------------------------------
# Model and data
class SyntheticImages(torch.utils.data.Dataset):
    """Reproducible random images and labels (image i is drawn from a generator seeded with ``seed + i``)."""

    def __init__(self, num: int, input_size: Sequence[int], num_classes: int, seed: int = 0) -> None:
        self.num, self.input_size, self.num_classes, self.seed = num, tuple(input_size), num_classes, seed

    def __len__(self) -> int:
        return self.num

    def __getitem__(self, i: int):
        g = torch.Generator().manual_seed(self.seed + i)
        return torch.randn(self.input_size, generator=g), int(torch.randint(self.num_classes, (1,), generator=g))


FASHION_MNIST = ("fashion-mnist", "fmnist")


def build_model(cfg: TrainConfig) -> nn.Module:
    """A timm model by name, or ``"reference"``: the project's trained Fashion-MNIST ViT (the evaluation's one
    model builder, :func:`tokenreduce.evaluation.models.build_model`)."""
    from ..evaluation.models import build_model as build_named_model
    return build_named_model(None if cfg.model == "reference" else cfg.model, pretrained=cfg.pretrained,
                             **(cfg.model_kwargs or {}))


def training_data(cfg: TrainConfig, model: nn.Module):
    """The training images at the model's own input size: synthetic, Fashion-MNIST or an ImageFolder."""
    from timm.data import create_transform, resolve_data_config
    data_cfg = resolve_data_config({}, model=model)
    # the model's own input size (pretrained_cfg may describe another resolution than this instance)
    proj = getattr(model.patch_embed, "proj", None)
    if isinstance(proj, nn.Conv2d):
        data_cfg["input_size"] = (proj.in_channels, *model.patch_embed.img_size)
    if cfg.synthetic:
        return SyntheticImages(cfg.synthetic_size, data_cfg["input_size"], model.num_classes, cfg.seed)
    if cfg.data in FASHION_MNIST or (cfg.data is None and cfg.model == "reference"):
        from ..evaluation.datasets import FashionMNIST  # the project's offline default (its training split)
        channels, height, _ = data_cfg["input_size"]
        return FashionMNIST(train=True, img_size=height, channels=channels)
    if not cfg.data:
        raise ValueError("give --data (an ImageFolder root or 'fashion-mnist') or --synthetic")
    from torchvision.datasets import ImageFolder
    root = Path(cfg.data)
    root = root / "train" if (root / "train").is_dir() else root
    transform = create_transform(data_cfg["input_size"], is_training=True, mean=data_cfg["mean"],
                                 std=data_cfg["std"], interpolation=data_cfg["interpolation"])
    return ImageFolder(str(root), transform=transform)


# ---------------------------------------------------------------------------------------------------------------
# Processes
def dist_setup() -> Tuple[int, int, torch.device]:
    """Join the torchrun process group if there is one: ``(rank, world_size, device)`` (the evaluation's set-up:
    nccl on GPUs, gloo on CPUs)."""
    from ..evaluation.distributed import init_distributed, rank_and_world
    device = init_distributed("cuda" if torch.cuda.is_available() else "cpu")
    rank, world = rank_and_world()
    return rank, world, device


def amp_dtype(amp: str, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype for ``--amp`` (auto: bf16 on GPU, none on CPU)."""
    amp = amp if amp != "auto" else ("bf16" if device.type == "cuda" else "none")
    if amp != "none" and device.type != "cuda":
        raise ValueError(f"--amp {amp} needs a GPU")
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)


def _batches(loader, skip: int) -> Iterator:
    for i, batch in enumerate(loader):
        if i >= skip:
            yield batch


def _all_finite(value: float, world: int, device: torch.device) -> bool:
    """Whether the loss is finite on every rank (a rank skipping its backward alone would hang DDP)."""
    finite = math.isfinite(value)
    if world > 1:
        import torch.distributed as dist
        flag = torch.tensor([1.0 if finite else 0.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        finite = bool(flag.item() > 0)
    return finite


# ---------------------------------------------------------------------------------------------------------------
def train(cfg: TrainConfig, method: str, patch_params: Dict[str, Any],
          make_objective: Callable[[nn.Module], Objective]) -> Dict[str, Any]:
    """Train ``method``'s own parameters on a frozen model; returns the summary (rank 0 also writes it).

    Args:
        cfg: the run (model, data, steps, processes, output).
        method: the registry name the model is patched with.
        patch_params: its parameters for ``tokenreduce.patch``.
        make_objective: builds the :class:`Objective` from the patched model (moves its parameters to the device).

    Under ``torchrun`` every process trains on its shard of the data and DDP averages the gradients, so all ranks
    hold the same parameters; the summary lists every rank's result and digest to prove it.
    """
    import torch.distributed as dist
    from tqdm import tqdm

    rank, world, device = dist_setup()
    torch.manual_seed(cfg.seed)
    out = Path(cfg.output)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)

    model = build_model(cfg)
    model.requires_grad_(False)
    model.to(device)
    api.patch(model, method, **patch_params)
    objective = make_objective(model)
    model.train()

    autocast = amp_dtype(cfg.amp, device)
    scaler = torch.amp.GradScaler("cuda", enabled=autocast is torch.float16)

    dataset = training_data(cfg, model)
    if cfg.limit is not None:
        dataset = torch.utils.data.Subset(dataset, range(min(cfg.limit, len(dataset))))
    sampler = (torch.utils.data.distributed.DistributedSampler(dataset, seed=cfg.seed) if world > 1
               else torch.utils.data.RandomSampler(dataset, generator=torch.Generator().manual_seed(cfg.seed)))
    loader = torch.utils.data.DataLoader(dataset, batch_size=cfg.batch_size, sampler=sampler, drop_last=True,
                                         num_workers=cfg.workers, pin_memory=device.type == "cuda",
                                         persistent_workers=cfg.workers > 0)
    if len(loader) == 0:
        raise ValueError(f"{len(dataset)} images make no full batch of {cfg.batch_size} per process")
    per_epoch = len(loader)
    schedule = per_epoch * cfg.epochs  # the schedule spans all epochs; max_steps only stops early
    total = schedule if cfg.max_steps is None else min(cfg.max_steps, schedule)

    module: nn.Module = ObjectiveModule(model, objective)
    if world > 1:
        module = nn.parallel.DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda"
                                                     else None)
    optimizer = objective.optimizer()

    step, skipped, ckpt_path = 0, 0, out / "checkpoint.pt"
    if cfg.resume and ckpt_path.exists():
        state = torch.load(ckpt_path, map_location=device, weights_only=False)
        if state.get("method", method) != method:
            raise ValueError(f"{ckpt_path} is a {state['method']} checkpoint, not {method}")
        objective.module.load_state_dict(state["learnable"])
        optimizer.load_state_dict(state["optimizer"])
        step, skipped = int(state["step"]), int(state.get("skipped", 0))

    def save() -> None:
        if rank != 0:
            return
        tmp = ckpt_path.with_suffix(".tmp")
        torch.save({"method": method, "learnable": objective.module.state_dict(), "optimizer": optimizer.state_dict(),
                    "step": step, "skipped": skipped, "config": asdict(cfg)}, tmp)
        tmp.replace(ckpt_path)

    bar = tqdm(total=total, initial=step, disable=not cfg.progress or rank != 0, desc=f"{method} training",
               dynamic_ncols=True)
    history: List[Dict[str, float]] = []
    start = time.time()
    while step < total:
        epoch, skip = divmod(step, per_epoch)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        else:  # the same permutation per epoch on resume
            sampler.generator.manual_seed(cfg.seed + epoch)
        for images, labels in _batches(loader, skip):
            if step >= total:
                break
            objective.schedule(optimizer, Progress(step, schedule, step // per_epoch, cfg.epochs, per_epoch))
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
                logits, cost = module(images)
            loss, parts = objective.loss(logits, labels, cost=cost)
            optimizer.zero_grad(set_to_none=True)
            if _all_finite(parts["loss"], world, device):
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                objective.after_step()
            else:  # upstream LTMP skips a NaN loss; a step that would poison the parameters is never taken
                skipped += 1
            step += 1
            history.append({"step": step, **parts})
            bar.update(1)
            bar.set_postfix({k: f"{v:.4g}" for k, v in list(parts.items())[:3]})
            if cfg.save_every and step % cfg.save_every == 0:
                save()
        save()
    bar.close()

    mine = {"rank": rank, **objective.learned(), "digest": objective.digest()}
    if world > 1:
        everyone: List[Any] = [None] * world
        dist.all_gather_object(everyone, mine)
    else:
        everyone = [mine]
    summary = {"method": method, "model": cfg.model, "steps": step, "skipped_steps": skipped, "world_size": world,
               "seconds": time.time() - start,
               "ranks_agree": all(e["digest"] == everyone[0]["digest"] for e in everyone), "per_rank": everyone,
               **objective.summary(), "last": history[-1] if history else None}
    if rank == 0:
        objective.export(out / objective.export_name, model=cfg.model, steps=step, world_size=world,
                         source=f"tokenreduce {method} training")
        (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        (out / "history.json").write_text(json.dumps(history) + "\n")
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return summary


# ---------------------------------------------------------------------------------------------------------------
def add_common_arguments(p: argparse.ArgumentParser, defaults: TrainConfig) -> argparse.ArgumentParser:
    """The options every training command shares (model, data, steps, processes, output)."""
    p.add_argument("--model", default=defaults.model, help="timm model name, or 'reference' (the project's trained "
                   "Fashion-MNIST ViT; its data is the default then)")
    p.add_argument("--model-kwargs", type=json.loads, default=None, help="JSON kwargs for timm.create_model")
    p.add_argument("--pretrained", action="store_true", help="load the model's pretrained weights")
    p.add_argument("--data", help="ImageFolder root (uses its train/ subfolder when there is one), or "
                   "'fashion-mnist' (the offline default dataset, training split)")
    p.add_argument("--synthetic", action="store_true", help="random images and labels instead of --data")
    p.add_argument("--synthetic-size", type=int, default=defaults.synthetic_size, help="images in the synthetic set")
    p.add_argument("--limit", type=int, default=None, help="use only the first N images of the data")
    p.add_argument("--epochs", type=int, default=defaults.epochs)
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (the learning-rate "
                   "schedule still spans --epochs)")
    p.add_argument("--batch-size", type=int, default=defaults.batch_size, help="images per process and step")
    p.add_argument("--workers", type=int, default=defaults.workers, help="data-loading workers per process")
    p.add_argument("--amp", choices=("auto", "bf16", "fp16", "none"), default=defaults.amp,
                   help="mixed precision on GPU (auto: bf16 on GPU, none on CPU)")
    p.add_argument("--output", default=defaults.output, help="folder for checkpoint.pt, the export, summary.json")
    p.add_argument("--resume", action="store_true", help="continue from <output>/checkpoint.pt")
    p.add_argument("--save-every", type=int, default=defaults.save_every, help="also checkpoint every N steps")
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    return p


def write_learned_yaml(path: os.PathLike, doc: Dict[str, Any]) -> Dict[str, Any]:
    """Write what a run learned (rates, thresholds) as the YAML ``patch(model, method, ...=path)`` loads, keys in
    the order given and lists on one line; returns ``doc``."""
    import yaml
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(doc, sort_keys=False, default_flow_style=None))
    return doc


def cosine(step: int, total: int, high: float, low: float) -> float:
    """Cosine from ``high`` to ``low`` over ``total`` steps."""
    return low + 0.5 * (high - low) * (1 + math.cos(math.pi * min(step, total) / max(total, 1)))


__all__ = ["FASHION_MNIST", "SyntheticImages", "TrainConfig", "add_common_arguments", "amp_dtype", "build_model",
           "cosine", "dist_setup", "train", "training_data"]
