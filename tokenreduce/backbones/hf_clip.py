"""Hugging Face CLIP-style vision towers (transformers >= 5.18): the layer family that LLaVA's adapters reuse, and the
adapter for ``CLIPVisionModel`` / ``CLIPVisionModelWithProjection`` as models of their own.

How it hooks in, per instance and reversibly (nothing enters the ``state_dict``, no class is rebound):

- A forward pre-hook on ``encoder`` starts a fresh :class:`~tokenreduce.core.ForwardRecord` for every encoder pass.
- Every encoder layer runs through the shared :class:`~tokenreduce.backbones.layer_host.LayerHost` with the
  layer's own submodules (``layer_norm1``, ``self_attn``, ``layer_norm2``, ``mlp``) in HF's order. ``self_attn``
  runs untouched with whatever attention implementation the config selects: proportional attention is the additive
  float mask ``log(size)`` handed to it as ``attention_mask``, which SDPA (and eager) add to the logits.
- Queries / keys / values are read with forward hooks on ``self_attn.q_proj`` / ``k_proj`` / ``v_proj``: exactly
  what the attention used, at no extra projection cost. The CLS row is one extra ``q_cls·Kᵀ`` (O(N·d)); eager
  attention is never switched on.

The same family serves SigLIP's encoder layers (same structure, no CLS token).
"""
from __future__ import annotations

from typing import Any, Dict, FrozenSet, Optional, Tuple

import torch
import torch.nn as nn

from ..core import CostModel, Geometry, Need, ReductionInfo, ReductionMethod, Site, Status
from ..core.registry import register_adapter
from ..core.requirements import VISION_BLOCK_NEEDS
from .base import Adapter
from .layer_host import LayerFamily, LayerHost
from .macs import conv_patch_macs

try:  # transformers is an optional dependency (the ``vlm`` extra)
    from transformers.models.clip.modeling_clip import (CLIPAttention, CLIPEncoderLayer, CLIPVisionModel,
                                                        CLIPVisionModelWithProjection)
except ImportError:  # pragma: no cover
    CLIPAttention = CLIPEncoderLayer = CLIPVisionModel = CLIPVisionModelWithProjection = None  # type: ignore


def split_heads(t: torch.Tensor, num_heads: int) -> torch.Tensor:
    """``[B, N, H·d]`` projection output -> ``[B, H, N, d]``."""
    b, n, c = t.shape
    return t.view(b, n, num_heads, c // num_heads).transpose(1, 2)


class HFEncoderFamily(LayerFamily):
    """HF pre-norm encoder layers with ``self_attn.{q,k,v}_proj`` (CLIP, SigLIP)."""

    def attention(self, layer: nn.Module) -> nn.Module:
        return layer.self_attn

    def norm1(self, layer: nn.Module) -> nn.Module:
        return layer.layer_norm1

    def norm2(self, layer: nn.Module) -> nn.Module:
        return layer.layer_norm2

    def mlp(self, layer: nn.Module) -> nn.Module:
        return layer.mlp

    def attend(self, layer, h, mask, kwargs):
        return layer.self_attn(hidden_states=h, attention_mask=mask, **kwargs)[0]

    def tap_modules(self, layer: nn.Module, names: FrozenSet[str]) -> Dict[str, nn.Module]:
        attn = layer.self_attn
        modules = {"q": attn.q_proj, "k": attn.k_proj, "v": attn.v_proj}
        return {n: modules[n] for n in names}

    def to_heads(self, layer: nn.Module, name: str, output: torch.Tensor) -> torch.Tensor:
        return split_heads(output, self.num_heads(layer))

    def projections(self, layer: nn.Module) -> Dict[str, Tuple[nn.Linear, slice]]:
        attn = layer.self_attn
        return {"q": (attn.q_proj, slice(None)), "k": (attn.k_proj, slice(None)), "v": (attn.v_proj, slice(None))}

    def num_heads(self, layer: nn.Module) -> int:
        return int(layer.self_attn.num_heads)

    def scale(self, layer: nn.Module) -> float:
        return float(layer.self_attn.scale)


def check_encoder_layers(layers, kinds, attn_kinds, what: str) -> None:
    """ValueError unless every layer is one of ``kinds`` with attention one of ``attn_kinds`` (unmodified)."""
    for i, layer in enumerate(layers):
        if not isinstance(layer, kinds) or not isinstance(layer.self_attn, attn_kinds):
            raise ValueError(f"encoder.layers[{i}] is a {type(layer).__name__}; tokenreduce's {what} host needs "
                             f"transformers' {kinds[0].__name__} with {attn_kinds[0].__name__}")


def check_clip_layers(vision_model: nn.Module) -> None:
    check_encoder_layers(vision_model.encoder.layers, (CLIPEncoderLayer,), (CLIPAttention,), "CLIP")


def check_additive_mask(vision_model: nn.Module, method: ReductionMethod) -> None:
    """Proportional attention needs an attention implementation that takes an additive float mask."""
    impl = getattr(vision_model.config, "_attn_implementation", "sdpa") or "sdpa"
    if method.prop_attn and impl not in ("sdpa", "eager"):
        raise ValueError(f"proportional attention needs an additive attention mask, which the vision tower's "
                         f"'{impl}' attention does not take; load the model with attn_implementation='sdpa' or pass "
                         "prop_attn=False")


def clip_vision_model(model: nn.Module) -> Optional[nn.Module]:
    """The ``CLIPVisionModel`` inside ``model`` (itself, or ``.vision_model`` of the projection variant)."""
    if CLIPVisionModel is None:
        return None
    if isinstance(model, CLIPVisionModel):
        return model
    if isinstance(model, CLIPVisionModelWithProjection):
        return model.vision_model
    return None


def tower_cost(vision_model: nn.Module, host: LayerHost) -> CostModel:
    """The MAC model of a CLIP / SigLIP tower: patch embedding plus the host layers."""
    per_patch = conv_patch_macs(vision_model.embeddings.patch_embedding)
    return host.cost(int(vision_model.embeddings.num_patches) * per_patch, per_patch)


class EncoderBegin:
    """Forward pre-hook on a vision encoder: a fresh record for every pass (picklable)."""

    def __init__(self, adapter: Adapter) -> None:
        self.adapter = adapter

    def __call__(self, module: nn.Module, args: Any) -> None:
        self.adapter.begin_forward()


class EncoderDone:
    """Forward hook on a vision encoder: the pass completed."""

    def __init__(self, adapter: Adapter) -> None:
        self.adapter = adapter

    def __call__(self, module: nn.Module, args: Any, output: Any) -> None:
        if self.adapter.record is not None:
            self.adapter.record.status = Status.DONE


# ---------------------------------------------------------------------------------------------------------------
@register_adapter
class HFClipVisionAdapter(Adapter):
    name = ("transformers CLIPVisionModel / CLIPVisionModelWithProjection (transformers >= 5.18, CLIPEncoderLayer "
            "with CLIPAttention; sdpa or eager attention)")
    provides = {site: VISION_BLOCK_NEEDS | {Need.VALID} for site in (Site.BLOCK_IN, Site.BLOCK_MID, Site.BLOCK_OUT)}

    @classmethod
    def claims(cls, model: nn.Module) -> bool:
        return clip_vision_model(model) is not None

    @classmethod
    def check_model(cls, model: nn.Module) -> None:
        check_clip_layers(clip_vision_model(model))

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.vision = clip_vision_model(model)
        self.host = LayerHost(self, HFEncoderFamily(), self.vision.encoder.layers, num_prefix=1)

    def geometry(self, site: Site) -> Geometry:
        cfg = self.vision.config
        n = int(self.vision.embeddings.num_patches)
        side = int(round(n ** 0.5))
        return Geometry(num_blocks=len(self.host.layers), num_prefix=1, num_patches=n, dim=int(cfg.hidden_size),
                        num_heads=int(cfg.num_attention_heads), has_class_token=True,
                        grid=(side, side) if side * side == n else None, cost=tower_cost(self.vision, self.host))

    def check_method(self, method: ReductionMethod) -> None:
        check_additive_mask(self.vision, method)

    def install(self, method: ReductionMethod, options: Dict[str, Any]) -> None:
        self.method, self.options = method, dict(options)
        encoder = self.vision.encoder
        self.patcher.hook(encoder.register_forward_pre_hook(EncoderBegin(self)))
        self.patcher.hook(encoder.register_forward_hook(EncoderDone(self)))
        self.host.install(self.patcher, method, bool(options.get("trace_source", False)))

    def dense_macs(self, inputs: torch.Tensor) -> int:
        n = int(self.vision.embeddings.num_patches) + 1
        return tower_cost(self.vision, self.host).macs([(n, n)] * len(self.host.layers))

    def info(self) -> ReductionInfo:
        rec = self.finished_record()
        return self.vision_info(tower_cost(self.vision, self.host).macs(rec.cost_blocks()))
