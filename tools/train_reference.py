#!/usr/bin/env python
"""Train the reference ViT on Fashion-MNIST (the model the offline default evaluation patches).

A plain timm ``VisionTransformer`` (see ``tokenreduce.evaluation.reference.REFERENCE_ARCH``): 28×28 grey images, 2×2
patches, 196 patch tokens + CLS, 12 blocks. Recipe: AdamW, linear warm-up then cosine decay per step, label
smoothing, random-shift (pad 2) + horizontal-flip augmentation, gradient clipping.

To fit a 1-thread CPU budget it trains progressively (as in FixRes / progressive resizing): the first
``--low-res-epochs`` epochs see images downsampled to ``--low-res-size`` (49 tokens instead of 196, ~5× cheaper),
the remaining epochs the full 28×28 input the model is evaluated at. The position embedding keeps its 14×14
grid and is resampled on the fly during the low-resolution phase (timm's ``dynamic_img_size``), so the saved
weights are an ordinary fixed-size ViT.

Resumable: the full training state is written to ``--work-dir/last.pt`` after every epoch and picked up again
on restart. At the end the weights go to ``--out`` (safetensors) with a JSON recipe (and a Markdown copy)
holding the measured test accuracy.

    nice -n 19 python tools/train_reference.py --threads 1 > train.log 2>&1 &
"""
from __future__ import annotations

import _checkout  # noqa: F401,I001  (run from a plain checkout: puts the repository on sys.path)
import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

import torch
import torch.nn as nn
import torch.nn.functional as F

from tokenreduce.evaluation.datasets import FashionMNIST, normalize_fmnist
from tokenreduce.evaluation.reference import REFERENCE_ARCH, REFERENCE_CHECKPOINT, count_parameters, create_reference_model


def parse_args(argv: List[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=None, help="folder with the Fashion-MNIST IDX files (default: Debian's)")
    p.add_argument("--out", default=str(REFERENCE_CHECKPOINT), help="final safetensors path (recipe beside it)")
    p.add_argument("--work-dir", default="runs/fmnist_reference", help="resumable state and per-epoch log")
    p.add_argument("--epochs", type=int, default=20, help="total epochs")
    p.add_argument("--low-res-epochs", type=int, default=8, help="leading epochs at --low-res-size")
    p.add_argument("--low-res-size", type=int, default=14, help="image side during the low-resolution phase")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    p.add_argument("--min-lr", type=float, default=1e-5)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--warmup-steps", type=int, default=500)
    p.add_argument("--label-smoothing", type=float, default=0.1)
    p.add_argument("--clip-grad", type=float, default=1.0)
    p.add_argument("--embed-dim", type=int, default=REFERENCE_ARCH["embed_dim"])
    p.add_argument("--num-heads", type=int, default=REFERENCE_ARCH["num_heads"])
    p.add_argument("--depth", type=int, default=REFERENCE_ARCH["depth"])
    p.add_argument("--threads", type=int, default=1, help="torch threads (leave the other cores to others)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit-train", type=int, default=None, help="train on a subset (smoke tests)")
    p.add_argument("--limit-test", type=int, default=None, help="evaluate on a subset (smoke tests)")
    p.add_argument("--max-steps", type=int, default=None, help="stop each epoch after this many steps (timing)")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------------------------
def augment(images: torch.Tensor, gen: torch.Generator, pad: int = 2) -> torch.Tensor:
    """Random shift by up to ``pad`` pixels (zero padding: the background is black) and horizontal flip,
    on a whole uint8 batch ``[B, H, W]`` at once."""
    b, h, w = images.shape
    padded = F.pad(images, (pad, pad, pad, pad))
    oy = torch.randint(0, 2 * pad + 1, (b,), generator=gen)
    ox = torch.randint(0, 2 * pad + 1, (b,), generator=gen)
    rows = (oy[:, None] + torch.arange(h))[:, :, None]
    cols = (ox[:, None] + torch.arange(w))[:, None, :]
    out = padded[torch.arange(b)[:, None, None], rows, cols]
    flip = torch.rand(b, generator=gen) < 0.5
    out[flip] = out[flip].flip(-1)
    return out


def lr_at(step: int, total: int, args: argparse.Namespace) -> float:
    """Linear warm-up, then cosine decay to ``min_lr`` over the whole run (both phases)."""
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    progress = (step - args.warmup_steps) / max(1, total - args.warmup_steps)
    return args.min_lr + 0.5 * (args.lr - args.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


@torch.inference_mode()
def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, img_size: int,
             batch_size: int = 500) -> float:
    """Top-1 accuracy (%) on uint8 images resized to ``img_size``."""
    model.eval()
    correct = 0
    for i in range(0, images.shape[0], batch_size):
        x = normalize_fmnist(images[i:i + batch_size], img_size)
        correct += (model(x).argmax(-1) == labels[i:i + batch_size]).sum().item()
    return 100.0 * correct / images.shape[0]


def arch_of(args: argparse.Namespace) -> Dict[str, Any]:
    return dict(REFERENCE_ARCH, embed_dim=args.embed_dim, num_heads=args.num_heads, depth=args.depth)


def save_state(path: Path, state: Dict[str, Any]) -> None:
    """Atomic write, so an interrupted save never corrupts the resumable state."""
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def log(msg: str) -> None:
    print(time.strftime("%H:%M:%S"), msg, flush=True)


# ---------------------------------------------------------------------------------------------------------------
def train(args: argparse.Namespace) -> Dict[str, Any]:
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    train_set = FashionMNIST(args.data, train=True, limit=args.limit_train)
    test_set = FashionMNIST(args.data, train=False, limit=args.limit_test)
    arch = arch_of(args)
    # dynamic_img_size only resamples the position embedding at run time: the parameters are unchanged.
    model = create_reference_model(arch, dynamic_img_size=args.low_res_epochs > 0)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "pos_embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2 or "pos_embed" in n]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.999))
    steps_per_epoch = train_set.images.shape[0] // args.batch_size  # drop the last partial batch
    if args.max_steps:
        steps_per_epoch = min(steps_per_epoch, args.max_steps)
    total_steps = steps_per_epoch * args.epochs
    gen = torch.Generator().manual_seed(args.seed)
    state_path = work / "last.pt"
    start_epoch, history, train_seconds = 0, [], 0.0
    if state_path.is_file():
        state = torch.load(state_path, weights_only=False)  # our own file: it holds the generator state too
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        gen.set_state(state["gen"])
        start_epoch, history, train_seconds = state["epoch"], state["history"], state["train_seconds"]
        log(f"resumed from {state_path} after epoch {start_epoch}")
    log(f"model: {count_parameters(model):,} parameters, arch {arch}; {steps_per_epoch} steps/epoch, "
        f"{args.epochs} epochs ({args.low_res_epochs} at {args.low_res_size}px), threads={args.threads}")

    for epoch in range(start_epoch, args.epochs):
        size = args.low_res_size if epoch < args.low_res_epochs else REFERENCE_ARCH["img_size"]
        model.train()
        t0 = time.time()
        order = torch.randperm(train_set.images.shape[0], generator=gen)
        loss_sum = 0.0
        for i in range(steps_per_epoch):
            step = epoch * steps_per_epoch + i
            for group in opt.param_groups:
                group["lr"] = lr_at(step, total_steps, args)
            idx = order[i * args.batch_size:(i + 1) * args.batch_size]
            x = normalize_fmnist(augment(train_set.images[idx], gen), size)
            loss = F.cross_entropy(model(x), train_set.labels[idx], label_smoothing=args.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if args.clip_grad:
                nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
            opt.step()
            loss_sum += loss.item()
            if (i + 1) % 100 == 0:
                log(f"epoch {epoch + 1} step {i + 1}/{steps_per_epoch} loss {loss_sum / (i + 1):.4f} "
                    f"lr {opt.param_groups[0]['lr']:.2e} {(time.time() - t0) / (i + 1):.3f}s/step")
        epoch_seconds = time.time() - t0
        train_seconds += epoch_seconds
        # The low-resolution phase is monitored cheaply (at its own size on 2000 images); afterwards the full test
        # set at the evaluation size is measured every epoch.
        if size != REFERENCE_ARCH["img_size"]:
            acc = evaluate(model, test_set.images[:2000], test_set.labels[:2000], size)
            note = f"test@{size}px (first 2000)"
        else:
            acc = evaluate(model, test_set.images, test_set.labels, size)
            note = f"test@{size}px ({test_set.images.shape[0]} images)"
        history.append(dict(epoch=epoch + 1, img_size=size, loss=loss_sum / steps_per_epoch, acc=acc,
                            eval=note, seconds=round(epoch_seconds, 1)))
        log(f"epoch {epoch + 1}/{args.epochs} size {size} loss {loss_sum / steps_per_epoch:.4f} {note}: "
            f"{acc:.2f}% ({epoch_seconds / 60:.1f} min)")
        save_state(state_path, dict(model=model.state_dict(), opt=opt.state_dict(), gen=gen.get_state(),
                                    epoch=epoch + 1, history=history, train_seconds=train_seconds,
                                    args=vars(args)))
    return export(model, test_set, arch, history, train_seconds, args)


def export(model: nn.Module, test_set: FashionMNIST, arch: Dict[str, Any], history: List[Dict[str, Any]],
           train_seconds: float, args: argparse.Namespace) -> Dict[str, Any]:
    """Write the safetensors weights, the JSON recipe with the measured accuracy, and a Markdown copy."""
    from safetensors.torch import save_file
    acc = evaluate(model, test_set.images, test_set.labels, REFERENCE_ARCH["img_size"])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out))
    recipe = {
        "model": "timm.models.vision_transformer.VisionTransformer",
        "arch": arch,
        "parameters": count_parameters(model),
        "dataset": "Fashion-MNIST (Debian dataset-fashion-mnist), 60000 train / 10000 test",
        "preprocessing": {"img_size": REFERENCE_ARCH["img_size"], "mean": 0.2860, "std": 0.3530,
                          "tokens": "196 patch tokens + CLS"},
        "test_top1": round(acc, 2),
        "test_images": int(test_set.images.shape[0]),
        "training": {k: v for k, v in vars(args).items() if k not in ("out", "work_dir", "data")},
        "augmentation": "random shift (zero pad 2) + horizontal flip",
        "optimizer": "AdamW, linear warm-up then per-step cosine decay, label smoothing, grad clip",
        "train_minutes": round(train_seconds / 60, 1),
        "hardware": f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
                    f"{args.threads} thread(s), CPU shared with other jobs",
        "history": history,
    }
    out.with_suffix(".json").write_text(json.dumps(recipe, indent=2) + "\n")
    out.with_suffix(".md").write_text(recipe_markdown(recipe, out.name))
    log(f"saved {out} ({out.stat().st_size / 1e6:.2f} MB); test top-1 {acc:.2f}%")
    return recipe


def recipe_markdown(recipe: Dict[str, Any], name: str) -> str:
    lines = [f"# {name}", "", f"Fashion-MNIST test top-1: **{recipe['test_top1']:.2f}%** "
             f"({recipe['test_images']} images), trained in {recipe['train_minutes']} min on {recipe['hardware']}.",
             "", f"Architecture: `VisionTransformer(**{recipe['arch']})`, {recipe['parameters']:,} parameters.", "",
             "Recipe: " + recipe["optimizer"] + "; " + recipe["augmentation"] + ".", "",
             "Reproduce: `python tools/train_reference.py " + " ".join(
                 f"--{k.replace('_', '-')} {v}" for k, v in recipe["training"].items()
                 if v is not None and k not in ("max_steps", "limit_train", "limit_test")) + "`", "",
             "| epoch | input | train loss | test top-1 | minutes |", "|---|---|---|---|---|"]
    for h in recipe["history"]:
        lines.append(f"| {h['epoch']} | {h['img_size']}px | {h['loss']:.4f} | {h['acc']:.2f} ({h['eval']}) | "
                     f"{h['seconds'] / 60:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: List[str] | None = None) -> int:
    train(parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
