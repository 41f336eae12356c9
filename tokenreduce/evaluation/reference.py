"""The reference model of the offline default: a plain timm ViT trained on Fashion-MNIST.

It is an ordinary ``timm.models.vision_transformer.VisionTransformer`` (12 blocks, CLS token, 196 patch tokens
from 28×28 grey images with 2×2 patches), so every method that supports timm ViTs runs on it unchanged. The
weights are committed under ``checkpoints/`` with a JSON recipe holding the measured test accuracy; they are
trained by ``tools/train_reference.py``.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, Optional, Union

import torch.nn as nn

from .datasets import FMNIST_MEAN, FMNIST_STD
from ..resources import data_dir

#: The committed checkpoint; ``TOKENREDUCE_REFERENCE`` points elsewhere (e.g. a fresh training run).
REFERENCE_CHECKPOINT = data_dir("checkpoints") / "fmnist_vit_reference.safetensors"

#: Architecture of the reference model (timm VisionTransformer keyword arguments).
REFERENCE_ARCH: Dict[str, Any] = dict(
    img_size=28, patch_size=2, in_chans=1, num_classes=10, embed_dim=32, depth=12, num_heads=2, mlp_ratio=4.0,
    qkv_bias=True, class_token=True, global_pool="token",
)


def create_reference_model(arch: Optional[Dict[str, Any]] = None, **overrides: Any) -> nn.Module:
    """A randomly initialised reference ViT with a ``pretrained_cfg`` describing its preprocessing."""
    from timm.models.vision_transformer import VisionTransformer
    kwargs = dict(REFERENCE_ARCH if arch is None else arch)
    kwargs.update(overrides)
    model = VisionTransformer(**kwargs)
    size = int(kwargs["img_size"])
    # timm's resolve_data_config reads this, so ImageFolder-style tooling preprocesses it correctly too.
    model.pretrained_cfg = dict(
        architecture="tokenreduce_fmnist_vit", input_size=(int(kwargs.get("in_chans", 3)), size, size),
        crop_pct=1.0, interpolation="bilinear", mean=(FMNIST_MEAN,), std=(FMNIST_STD,), num_classes=10,
        tag="fmnist_reference")
    return model


def recipe_path(checkpoint: Union[str, os.PathLike]) -> Path:
    """The JSON recipe stored beside a checkpoint."""
    return Path(checkpoint).with_suffix(".json")


def load_reference_model(checkpoint: Optional[Union[str, os.PathLike]] = None) -> nn.Module:
    """The trained reference model in eval mode (architecture read from the recipe beside the weights)."""
    from safetensors.torch import load_file
    path = Path(checkpoint or os.environ.get("TOKENREDUCE_REFERENCE", REFERENCE_CHECKPOINT))
    if not path.is_file():
        raise FileNotFoundError(f"reference checkpoint {path} is missing; train one with "
                                "`python tools/train_reference.py` or set TOKENREDUCE_REFERENCE")
    arch = None
    if recipe_path(path).is_file():
        arch = json.loads(recipe_path(path).read_text()).get("arch")
    model = create_reference_model(arch)
    model.load_state_dict(load_file(str(path)))
    return model.eval()


def reference_recipe(checkpoint: Optional[Union[str, os.PathLike]] = None) -> Dict[str, Any]:
    """The recipe JSON of a checkpoint ({} when absent)."""
    path = recipe_path(checkpoint or os.environ.get("TOKENREDUCE_REFERENCE", REFERENCE_CHECKPOINT))
    return json.loads(path.read_text()) if path.is_file() else {}


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = ["REFERENCE_ARCH", "REFERENCE_CHECKPOINT", "create_reference_model", "load_reference_model",
           "reference_recipe", "recipe_path"]

