"""Building the model an evaluation runs: a timm model by name, the reference Fashion-MNIST ViT, and weights from
a checkpoint file (the one loader the commands share)."""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch
import torch.nn as nn

REFERENCE = "fmnist_reference"


def read_state_dict(path: str) -> Dict[str, torch.Tensor]:
    """A state dict from a ``.safetensors`` file, a torch file (``weights_only=True``) or a URL, unwrapping
    ``model`` / ``state_dict`` / EMA containers and DDP's ``module.`` prefix."""
    if path.startswith(("http://", "https://")):
        state = torch.hub.load_state_dict_from_url(path, map_location="cpu", weights_only=True)
    elif path.endswith(".safetensors"):
        from safetensors.torch import load_file
        state = load_file(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict_ema", "model_ema", "state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}


def load_weights(model: nn.Module, path: str) -> None:
    """Load a checkpoint into ``model``; falls back to timm's checkpoint filter for foreign layouts (e.g. the
    MAE fine-tuned weights)."""
    state = read_state_dict(path)
    try:
        model.load_state_dict(state)
    except RuntimeError:
        from timm.models.vision_transformer import checkpoint_filter_fn
        model.load_state_dict(checkpoint_filter_fn(state, model))


def build_model(name: Optional[str] = None, checkpoint: Optional[str] = None, pretrained: bool = False,
                **model_kwargs: Any) -> nn.Module:
    """A model in eval mode: the timm model ``name`` (random weights unless ``pretrained`` or ``checkpoint``), or the
    reference Fashion-MNIST ViT for ``name`` None / ``"fmnist_reference"`` (its committed weights, or a checkpoint
    with a recipe beside it)."""
    from .reference import create_reference_model, load_reference_model, recipe_path
    if name in (None, REFERENCE):
        if checkpoint and recipe_path(checkpoint).is_file():
            return load_reference_model(checkpoint)
        if name is None and checkpoint is None:
            return load_reference_model()
        model = create_reference_model(**model_kwargs)
    else:
        import timm
        model = timm.create_model(name, pretrained=pretrained, **model_kwargs)
    if checkpoint:
        load_weights(model, checkpoint)
    return model.eval()
