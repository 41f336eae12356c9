"""DiffRate's rate search: learn per-block kept counts against a FLOPs target with the backbone frozen.

    model = timm.create_model("deit_small_patch16_224", pretrained=True)
    tokenreduce.patch(model, "diffrate")                 # no counts: rate-search mode
    search = RateSearch(model)                           # the learnable logits, outside model.state_dict()
    model.train()
    logits = model(images)                               # masked training forward (upstream's DDP proxy)
    loss, parts = search.loss(logits, labels, target_gflops=2.9)
    loss.backward()                                      # gradients reach only the rate logits
    search.export("rates.yaml")                          # patch(model, "diffrate", rates="rates.yaml")

:func:`main` is the command line (``tools/train_rates.py``, ``tokenreduce search-rates``): one or many processes
under ``torchrun`` (DDP: nccl on GPU, gloo on CPU), AMP on GPU, a progress bar, checkpoint and resume, and a YAML
export of the learned ``prune_kept`` / ``merge_kept``.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import api
from .methods.diffrate import KINDS, DiffRate, RateLogits
from .ops.diffrate import FlopCost, rate_flops

FLOPS_WEIGHT = 5.0  # upstream's lambda


# ---------------------------------------------------------------------------------------------------------------
def flop_cost(model: nn.Module) -> FlopCost:
    """DiffRate's analytic MAC model of a timm ViT (upstream's counter, generalised to any widths).

    Per block: the attention's linear layers per token, ``2·A`` per token pair (``QKᵀ`` and ``PV``), the MLP's
    linear layers per token; constant: the patch embedding on all tokens (prefix included, as upstream) and the
    classifier heads.
    """
    def linear_macs(module: nn.Module) -> int:
        return sum(m.in_features * m.out_features for m in module.modules() if isinstance(m, nn.Linear))

    pe = model.patch_embed
    proj = getattr(pe, "proj", None)
    if isinstance(proj, nn.Conv2d):
        per_token = proj.out_channels * (proj.in_channels // proj.groups) * proj.kernel_size[0] * proj.kernel_size[1]
    else:
        per_token = linear_macs(pe)
    num_tokens = int(pe.num_patches) + int(model.num_prefix_tokens)
    head = sum(linear_macs(getattr(model, n)) for n in ("head", "head_dist") if isinstance(getattr(model, n, None),
                                                                                         nn.Module))
    blocks = list(model.blocks)
    return FlopCost(
        num_tokens=num_tokens,
        constant=float(num_tokens * per_token + head),
        attn_linear=tuple(float(linear_macs(b.attn)) for b in blocks),
        attn_quadratic=tuple(float(2 * b.attn.num_heads * b.attn.head_dim) for b in blocks),
        mlp=tuple(float(linear_macs(b.mlp)) for b in blocks),
    )


def diffrate_method(model: nn.Module) -> DiffRate:
    """The :class:`DiffRate` instance a model is patched with (ValueError otherwise)."""
    method = api._adapter_of(model).method
    if not isinstance(method, DiffRate):
        raise ValueError(f"the model is patched with {method.name!r}, not 'diffrate'")
    return method


class RateSearch:
    """Handle on the rate search of a model patched with ``diffrate`` in search mode (no kept counts given).

    Moves the rate logits to the model's device and floating dtype (do this before building an optimizer), and
    turns the last training forward into DiffRate's differentiable FLOPs and loss.
    """

    def __init__(self, model: nn.Module, flops_weight: float = FLOPS_WEIGHT) -> None:
        method = diffrate_method(model)
        if not method.searching:
            raise ValueError("the model is patched with fixed DiffRate counts; patch(model, 'diffrate') without "
                             "prune_kept/merge_kept/rates to search them")
        self.model, self.method = model, method
        self.rates: RateLogits = method.rates
        self.cost = flop_cost(model)
        self.flops_weight = float(flops_weight)
        ref = next((p for p in model.parameters() if p.is_floating_point()), None)
        if ref is not None:
            self.rates.to(device=ref.device, dtype=ref.dtype)

    def parameters(self) -> List[nn.Parameter]:
        return list(self.rates.parameters())

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

    def kept_counts(self) -> Dict[str, List[int]]:
        """The counts the logits choose now (what :meth:`export` writes)."""
        return self.rates.kept_counts()

    def last_kept(self) -> Dict[str, List[int]]:
        """The counts chosen by the last training forward."""
        run = self.method.last_search()
        return {k: [int(round(float(v.detach()))) for v in run.kept[k]] for k in KINDS}

    def flops(self) -> torch.Tensor:
        """DiffRate's differentiable MACs per image of the last training forward (``ste_min`` routing)."""
        run = self.method.last_search()
        return rate_flops(run.kept["prune"], run.kept["merge"], self.cost)

    def inference_flops(self, counts: Optional[Dict[str, List[int]]] = None) -> float:
        """MACs per image of inference with ``counts`` (default: the current choice), upstream's counter."""
        counts = counts or self.kept_counts()
        return float(rate_flops(counts["prune"], counts["merge"], self.cost))

    def loss(self, logits: torch.Tensor, target: torch.Tensor, target_gflops: float,
             flops: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, Dict[str, float]]:
        """``cross_entropy + flops_weight·(GFLOPs − target)²`` of the last training forward."""
        flops = self.flops() if flops is None else flops
        loss_cls = F.cross_entropy(logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits,
                                   target)
        loss_flops = (flops / 1e9 - target_gflops) ** 2
        loss = loss_cls + self.flops_weight * loss_flops
        parts = {"loss": loss, "cls": loss_cls, "flops": loss_flops, "gflops": flops / 1e9}
        return loss, {k: float(v.detach()) for k, v in parts.items()}

    def export(self, path: os.PathLike, **meta: Any) -> Dict[str, Any]:
        """Write the current counts as a YAML that ``patch(model, "diffrate", rates=path)`` loads."""
        return export_rates(path, self.kept_counts(), self.inference_flops() / 1e9, **meta)


def export_rates(path: os.PathLike, counts: Dict[str, List[int]], achieved_gflops: float,
                 **meta: Any) -> Dict[str, Any]:
    import yaml
    doc = {**meta, "achieved_gflops": round(achieved_gflops, 6),
           "prune_kept": list(counts["prune"]), "merge_kept": list(counts["merge"])}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(doc, sort_keys=False, default_flow_style=None))
    return doc


# ---------------------------------------------------------------------------------------------------------------
# The training loop
@dataclass
class SearchConfig:
    model: str = "deit_small_patch16_224"
    model_kwargs: Optional[Dict[str, Any]] = None
    pretrained: bool = False
    data: Optional[str] = None  # an ImageFolder root (its train/ subfolder when present), or "fashion-mnist"
    synthetic: bool = False
    synthetic_size: int = 1024
    limit: Optional[int] = None  # use only the first N images of the data
    target_gflops: float = 2.9
    flops_weight: float = FLOPS_WEIGHT
    epochs: int = 3
    max_steps: Optional[int] = None
    batch_size: int = 64  # per process
    lr: float = 0.01
    min_lr: float = 0.001
    granularity: int = 1
    workers: int = 4
    amp: str = "auto"  # auto (bf16 on GPU), bf16, fp16, none
    output: str = "results/diffrate_search"
    resume: bool = False
    save_every: int = 0  # also checkpoint every N steps (0: at epoch ends only)
    seed: int = 0
    progress: bool = True


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


def _build_model(cfg: SearchConfig) -> nn.Module:
    """A timm model by name, or ``"reference"``: the project's trained Fashion-MNIST ViT (tokenreduce.reference)."""
    if cfg.model == "reference":
        from .reference import load_reference_model
        return load_reference_model()
    import timm
    return timm.create_model(cfg.model, pretrained=cfg.pretrained, **(cfg.model_kwargs or {}))


def _dataset(cfg: SearchConfig, model: nn.Module):
    from timm.data import create_transform, resolve_data_config
    data_cfg = resolve_data_config({}, model=model)
    # the model's own input size (pretrained_cfg may describe another resolution than this instance)
    data_cfg["input_size"] = (model.patch_embed.proj.in_channels, *model.patch_embed.img_size) \
        if isinstance(getattr(model.patch_embed, "proj", None), nn.Conv2d) else data_cfg["input_size"]
    if cfg.synthetic:
        return SyntheticImages(cfg.synthetic_size, data_cfg["input_size"], model.num_classes, cfg.seed)
    if cfg.data in FASHION_MNIST or (cfg.data is None and cfg.model == "reference"):
        from .data import FashionMNIST  # the project's offline default (its training split)
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


class _SearchModule(nn.Module):
    """What DDP wraps: the frozen patched model plus the rate logits (its only trainable parameters)."""

    def __init__(self, model: nn.Module, search: RateSearch) -> None:
        super().__init__()
        self.model, self.rates, self._search = model, search.rates, search

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        logits = self.model(x)
        return logits, self._search.flops()


def _lr_at(step: int, total: int, lr: float, min_lr: float) -> float:
    """Cosine from ``lr`` to ``min_lr`` over ``total`` steps (upstream: arch-lr 0.01 -> arch-min-lr 0.001)."""
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * min(step, total) / max(total, 1)))


def _dist_setup() -> Tuple[int, int, torch.device]:
    """Join the torchrun process group if there is one: ``(rank, world_size, device)``."""
    import torch.distributed as dist
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    return rank, world, device


def _digest(rates: RateLogits) -> str:
    flat = torch.cat([p.detach().double().flatten().cpu() for p in rates.parameters()])
    return hashlib.sha256(flat.numpy().tobytes()).hexdigest()[:16]


def _batches(loader, skip: int) -> Iterator:
    for i, batch in enumerate(loader):
        if i >= skip:
            yield batch


def search_rates(cfg: SearchConfig) -> Dict[str, Any]:
    """Run a rate search; returns the summary (also written to ``<output>/summary.json`` by rank 0).

    Under ``torchrun`` every process trains on its shard of the data and DDP averages the rate gradients, so all
    ranks hold the same logits; the summary lists every rank's final counts to prove it.
    """
    import torch.distributed as dist
    from tqdm import tqdm

    rank, world, device = _dist_setup()
    torch.manual_seed(cfg.seed)
    out = Path(cfg.output)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)

    model = _build_model(cfg)
    model.requires_grad_(False)
    model.to(device)
    api.patch(model, "diffrate", granularity=cfg.granularity)
    search = RateSearch(model, flops_weight=cfg.flops_weight)
    model.train()

    amp = cfg.amp if cfg.amp != "auto" else ("bf16" if device.type == "cuda" else "none")
    if amp != "none" and device.type != "cuda":
        raise ValueError(f"--amp {amp} needs a GPU")
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    scaler = torch.amp.GradScaler("cuda", enabled=amp == "fp16")

    dataset = _dataset(cfg, model)
    if cfg.limit is not None:
        dataset = torch.utils.data.Subset(dataset, range(min(cfg.limit, len(dataset))))
    sampler = (torch.utils.data.distributed.DistributedSampler(dataset, seed=cfg.seed) if world > 1
               else torch.utils.data.RandomSampler(dataset, generator=torch.Generator().manual_seed(cfg.seed)))
    loader = torch.utils.data.DataLoader(dataset, batch_size=cfg.batch_size, sampler=sampler, drop_last=True,
                                         num_workers=cfg.workers, pin_memory=device.type == "cuda",
                                         persistent_workers=cfg.workers > 0)
    if len(loader) == 0:
        raise ValueError(f"{len(dataset)} images make no full batch of {cfg.batch_size} per process")
    schedule = len(loader) * cfg.epochs  # the cosine spans all epochs; max_steps only stops early
    total = schedule if cfg.max_steps is None else min(cfg.max_steps, schedule)

    module = _SearchModule(model, search)
    if world > 1:
        module = nn.parallel.DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda"
                                                     else None)
    optimizer = torch.optim.AdamW(search.parameters(), lr=cfg.lr, weight_decay=0.0)

    step, ckpt_path = 0, out / "checkpoint.pt"
    if cfg.resume and ckpt_path.exists():
        state = torch.load(ckpt_path, map_location=device, weights_only=False)
        search.rates.load_state_dict(state["rates"])
        optimizer.load_state_dict(state["optimizer"])
        step = int(state["step"])

    def save() -> None:
        if rank != 0:
            return
        tmp = ckpt_path.with_suffix(".tmp")
        torch.save({"rates": search.rates.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                    "config": vars(cfg)}, tmp)
        tmp.replace(ckpt_path)

    bar = tqdm(total=total, initial=step, disable=not cfg.progress or rank != 0, desc="diffrate search",
               dynamic_ncols=True)
    history: List[Dict[str, float]] = []
    start = time.time()
    while step < total:
        epoch, skip = divmod(step, len(loader))
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        else:  # the same permutation per epoch on resume
            sampler.generator.manual_seed(cfg.seed + epoch)
        for images, labels in _batches(loader, skip):
            if step >= total:
                break
            for group in optimizer.param_groups:
                group["lr"] = _lr_at(step, schedule, cfg.lr, cfg.min_lr)
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                logits, flops = module(images)
            loss, parts = search.loss(logits, labels, cfg.target_gflops, flops=flops)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            step += 1
            history.append({"step": step, **parts})
            bar.update(1)
            bar.set_postfix(loss=f"{parts['loss']:.3f}", gflops=f"{parts['gflops']:.3f}",
                            lr=f"{optimizer.param_groups[0]['lr']:.4f}")
            if cfg.save_every and step % cfg.save_every == 0:
                save()
        save()
    bar.close()

    counts = search.kept_counts()
    mine = {"rank": rank, **counts, "digest": _digest(search.rates)}
    if world > 1:
        everyone: List[Any] = [None] * world
        dist.all_gather_object(everyone, mine)
    else:
        everyone = [mine]
    achieved = search.inference_flops(counts) / 1e9
    summary = {"model": cfg.model, "target_gflops": cfg.target_gflops, "achieved_gflops": achieved,
               "full_gflops": float(rate_flops([10 ** 9] * search.cost.num_blocks, [10 ** 9] * search.cost.num_blocks,
                                               search.cost)) / 1e9,
               "steps": step, "world_size": world, "seconds": time.time() - start,
               "ranks_agree": all(e["digest"] == everyone[0]["digest"] for e in everyone), "per_rank": everyone,
               "prune_kept": counts["prune"], "merge_kept": counts["merge"],
               "last": history[-1] if history else None}
    if rank == 0:
        export_rates(out / "rates.yaml", counts, achieved, model=cfg.model, target_gflops=cfg.target_gflops,
                     granularity=cfg.granularity, steps=step, world_size=world, source="tokenreduce rate search")
        (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        (out / "history.json").write_text(json.dumps(history) + "\n")
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return summary


# ---------------------------------------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The rate-search options (shared by tools/train_rates.py and ``tokenreduce search-rates``)."""
    d = SearchConfig()
    p.add_argument("--model", default=d.model, help="timm model name, or 'reference' (the project's trained "
                   "Fashion-MNIST ViT; its data is the default then)")
    p.add_argument("--model-kwargs", type=json.loads, default=None, help='JSON kwargs for timm.create_model')
    p.add_argument("--pretrained", action="store_true", help="load the model's pretrained weights")
    p.add_argument("--data", help="ImageFolder root (uses its train/ subfolder when there is one), or "
                   "'fashion-mnist' (the offline default dataset, training split)")
    p.add_argument("--synthetic", action="store_true", help="random images and labels instead of --data")
    p.add_argument("--synthetic-size", type=int, default=d.synthetic_size, help="images in the synthetic set")
    p.add_argument("--limit", type=int, default=None, help="use only the first N images of the data")
    p.add_argument("--target-gflops", type=float, required=True, help="FLOPs target (GMACs per image, upstream's "
                   "counter)")
    p.add_argument("--flops-weight", type=float, default=d.flops_weight, help="lambda of the FLOPs loss")
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (the learning-rate "
                   "schedule still spans --epochs)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="images per process and step")
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--min-lr", type=float, default=d.min_lr)
    p.add_argument("--granularity", type=int, default=d.granularity, help="step between candidate kept counts")
    p.add_argument("--workers", type=int, default=d.workers, help="data-loading workers per process")
    p.add_argument("--amp", choices=("auto", "bf16", "fp16", "none"), default=d.amp,
                   help="mixed precision on GPU (auto: bf16 on GPU, none on CPU)")
    p.add_argument("--output", default=d.output, help="folder for checkpoint.pt, rates.yaml, summary.json")
    p.add_argument("--resume", action="store_true", help="continue from <output>/checkpoint.pt")
    p.add_argument("--save-every", type=int, default=d.save_every, help="also checkpoint every N steps")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
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
