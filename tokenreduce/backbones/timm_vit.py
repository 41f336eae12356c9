"""Adapter for timm's ``VisionTransformer`` family (ViT, DeiT, distilled DeiT, registers, avg-pool, MAE-style).

How it hooks in, per instance and reversibly (every change goes through the adapter's Patcher):

- ``forward_features`` / ``forward_intermediates`` get a thin wrapper that starts a fresh
  :class:`~tokenreduce.core.ForwardRecord` and then runs timm's own method unchanged.
- Every ``Block`` runs through the shared :class:`~tokenreduce.backbones.layer_host.LayerHost`: the block's own
  submodules (norm1, attn, ls1, drop path, norm2, mlp, ls2) in timm's order with the reduction site inside.
  timm's ``Attention`` runs untouched: proportional attention is the additive float mask ``log(size)`` it passes to
  ``F.scaled_dot_product_attention``, so fused attention stays on.
- Queries and keys are read with forward hooks on ``attn.q_norm`` / ``attn.k_norm`` (values from ``attn.qkv``),
  i.e. exactly the tensors SDPA used, at no extra projection cost, and only in layers where the method acts.
- ``pool`` is wrapped so an average-pooled head weights tokens by size.

Nothing is copied into the model's ``state_dict`` and no class is rebound.
"""
from __future__ import annotations

import inspect
from typing import Any, Dict, FrozenSet, Optional, Tuple

import torch
import torch.nn as nn

from ..core import CostModel, Geometry, Need, ReductionInfo, ReductionMethod, Site, Status
from ..core.registry import register_adapter
from ..core.requirements import VISION_BLOCK_NEEDS
from .base import Adapter
from .layer_host import LayerFamily, LayerHost
from .macs import conv_patch_macs, linear_macs
from .patcher import Original, Replacement

try:  # timm is a hard dependency of the package; keep the error readable on a version without these
    from timm.layers import Attention as TimmAttention
    from timm.models.vision_transformer import Block as TimmBlock
    from timm.models.vision_transformer import VisionTransformer
    TIMM_ERROR: Optional[str] = None
except ImportError as error:  # pragma: no cover - depends on the installed timm
    VisionTransformer = TimmBlock = TimmAttention = None  # type: ignore
    TIMM_ERROR = str(error)

_ENTRY_POINTS = ("forward_features", "forward_intermediates")


class TimmBlockFamily(LayerFamily):
    """timm ``Block`` with ``timm.layers.Attention``."""

    def attention(self, layer: nn.Module) -> nn.Module:
        return layer.attn

    def norm1(self, layer: nn.Module) -> nn.Module:
        return layer.norm1

    def norm2(self, layer: nn.Module) -> nn.Module:
        return layer.norm2

    def mlp(self, layer: nn.Module) -> nn.Module:
        return layer.mlp

    def attend(self, layer, h, mask, kwargs):
        return layer.attn(h, attn_mask=mask, **kwargs)

    def residual_attn(self, layer, h):
        return layer.drop_path1(layer.ls1(h))

    def residual_mlp(self, layer, h):
        return layer.drop_path2(layer.ls2(h))

    def tap_modules(self, layer: nn.Module, names: FrozenSet[str]) -> Dict[str, nn.Module]:
        modules = {"q": layer.attn.q_norm, "k": layer.attn.k_norm, "v": layer.attn.qkv}
        return {n: modules[n] for n in names}

    def to_heads(self, layer: nn.Module, name: str, output: torch.Tensor) -> torch.Tensor:
        if name != "v":
            return output  # q_norm / k_norm see [B, H, N, d]
        attn = layer.attn
        b, n, _ = output.shape
        return output.reshape(b, n, 3, attn.num_heads, attn.head_dim)[:, :, 2].transpose(1, 2)

    def projections(self, layer: nn.Module) -> Dict[str, Tuple[nn.Linear, slice]]:
        attn = layer.attn
        width = attn.num_heads * attn.head_dim  # timm's fused qkv: output columns [q | k | v]
        return {name: (attn.qkv, slice(i * width, (i + 1) * width)) for i, name in enumerate("qkv")}

    def num_heads(self, layer: nn.Module) -> int:
        return int(layer.attn.num_heads)

    def scale(self, layer: nn.Module) -> float:
        return float(layer.attn.scale)


class EntryPoint(Replacement):
    """``forward_features`` / ``forward_intermediates`` of a patched model: a fresh record, then timm's own."""

    def __init__(self, adapter: "TimmViTAdapter", original: Original, check_fmt: bool) -> None:
        self.adapter, self.original, self.check_fmt = adapter, original, check_fmt

    def __call__(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        adapter = self.adapter
        if self.check_fmt:
            bound = inspect.signature(self.original.function).bind(
                *(() if self.original.bound else (adapter.model,)), x, *args, **kwargs)
            bound.apply_defaults()
            if bound.arguments.get("output_fmt") == "NCHW" and any(adapter.host.acts):
                raise ValueError("a model patched with a token-reducing method has no spatial grid after the first "
                                 "reduction: call forward_intermediates(..., output_fmt='NLC')")
        rec = adapter.begin_forward(input_hw=tuple(x.shape[-2:]) if torch.is_tensor(x) and x.dim() == 4 else None)
        try:
            out = self.original(x, *args, **kwargs)
        except BaseException as error:
            rec.fail(error)
            raise
        rec.status = Status.DONE
        return out


class SizeWeightedPool(Replacement):
    """``pool`` of a patched model: an average-pooled head weights tokens by size (padding has size 0)."""

    def __init__(self, adapter: "TimmViTAdapter", original: Original) -> None:
        self.adapter, self.original = adapter, original

    def __call__(self, x: torch.Tensor, pool_type: Optional[str] = None) -> torch.Tensor:
        adapter = self.adapter
        model, rec = adapter.model, adapter.record
        pool_type = model.global_pool if pool_type is None else pool_type
        size = rec.size if rec is not None else None
        if (not adapter.options.get("size_weighted_pool", True) or size is None
                or getattr(model, "attn_pool", None) is not None or pool_type not in ("avg", "avgmax")
                or size.shape[1] != x.shape[1]):
            return self.original(x, pool_type=pool_type)
        start = 0 if getattr(model, "pool_include_prefix", False) else int(model.num_prefix_tokens)
        tokens, weight = x[:, start:], size[:, start:, None].to(x.dtype)
        mean = (tokens * weight).sum(dim=1) / weight.sum(dim=1)
        if pool_type == "avg":
            return mean
        valid = rec.valid[:, start:, None] if rec.valid is not None else None
        peak = (tokens.masked_fill(~valid, float("-inf")) if valid is not None else tokens).amax(dim=1)
        return 0.5 * (peak + mean)


def _head_macs(model: nn.Module) -> int:
    return sum(getattr(model, n).in_features * getattr(model, n).out_features for n in ("head", "head_dist")
               if isinstance(getattr(model, n, None), nn.Linear))


def _patch_macs(model: nn.Module) -> int:
    """Patch-embedding MACs per patch."""
    proj = getattr(model.patch_embed, "proj", None)
    return conv_patch_macs(proj) if isinstance(proj, nn.Conv2d) else linear_macs(model.patch_embed)


def _num_patches(model: nn.Module, input_hw: Optional[Tuple[int, int]]) -> int:
    pe = model.patch_embed
    if hasattr(pe, "dynamic_feat_size") and input_hw is not None:
        gh, gw = pe.dynamic_feat_size(tuple(int(v) for v in input_hw))
    else:
        gh, gw = pe.grid_size
    return int(gh * gw)


@register_adapter
class TimmViTAdapter(Adapter):
    name = ("timm VisionTransformer and subclasses built from timm's Block/Attention (ViT, DeiT, distilled DeiT, "
            "registers, class_token=False, avg pool, dynamic_img_size)")
    provides = {site: VISION_BLOCK_NEEDS | {Need.ATTENTION_PROBS, Need.VALID}
                for site in (Site.BLOCK_IN, Site.BLOCK_MID, Site.BLOCK_OUT)}

    @classmethod
    def claims(cls, model: nn.Module) -> bool:
        if VisionTransformer is None:
            return type(model).__name__ == "VisionTransformer" and type(model).__module__.startswith("timm")
        return isinstance(model, VisionTransformer)

    @classmethod
    def check_model(cls, model: nn.Module) -> None:
        if TIMM_ERROR is not None:
            import timm
            raise ValueError(f"tokenreduce needs timm >= 1.0.16 (timm.layers.Attention); this timm "
                             f"{timm.__version__} fails with: {TIMM_ERROR}. Upgrade with: pip install -U timm")
        for i, blk in enumerate(model.blocks):
            if type(blk).forward is not TimmBlock.forward:
                raise ValueError(
                    f"{type(model).__name__}.blocks[{i}] is a {type(blk).__name__}, whose forward differs from "
                    "timm's Block; tokenreduce supports ViTs built from timm.models.vision_transformer.Block "
                    "(e.g. vit_*, deit_*, not EVA, Swin or parallel-block models).")
            attn = blk.attn
            if not isinstance(attn, TimmAttention) or type(attn).forward is not TimmAttention.forward:
                raise ValueError(
                    f"{type(model).__name__}.blocks[{i}].attn is a {type(attn).__name__}; tokenreduce needs timm's "
                    "timm.layers.Attention (rotary or custom attention is not supported).")

    # ----------------------------------------------------------------------------------------------------------
    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.host = LayerHost(self, TimmBlockFamily(), list(model.blocks), int(model.num_prefix_tokens))

    def geometry(self, site: Site) -> Geometry:
        m = self.model
        grid = getattr(m.patch_embed, "grid_size", None)
        return Geometry(
            num_blocks=len(m.blocks), num_prefix=int(m.num_prefix_tokens),
            num_patches=getattr(m.patch_embed, "num_patches", None), dim=int(m.embed_dim),
            num_heads=int(m.blocks[0].attn.num_heads), has_class_token=getattr(m, "cls_token", None) is not None,
            grid=tuple(int(g) for g in grid) if grid is not None else None, cost=self.cost(None))

    def cost(self, input_hw: Optional[Tuple[int, int]]) -> CostModel:
        """The MAC model for an input of ``input_hw`` (None: the default size)."""
        per_patch = _patch_macs(self.model)
        return self.host.cost(_num_patches(self.model, input_hw) * per_patch + _head_macs(self.model), per_patch)

    def install(self, method: ReductionMethod, options: Dict[str, Any]) -> None:
        model, patcher = self.model, self.patcher
        self.method, self.options = method, dict(options)
        for name in _ENTRY_POINTS:
            patcher.set_attr(model, name, EntryPoint(self, patcher.original(model, name),
                                                     check_fmt=name == "forward_intermediates"))
        if hasattr(type(model), "pool"):
            patcher.set_attr(model, "pool", SizeWeightedPool(self, patcher.original(model, "pool")))
        self.host.install(patcher, method, bool(options.get("trace_source", False)))

    # ----------------------------------------------------------------------------------------------------------
    def dense_macs(self, inputs: torch.Tensor) -> int:
        hw = tuple(inputs.shape[-2:]) if inputs.dim() == 4 else None
        n = _num_patches(self.model, hw) + int(self.model.num_prefix_tokens)
        return self.cost(hw).macs([(n, n)] * len(self.host.layers))

    def info(self) -> ReductionInfo:
        rec = self.finished_record()
        return self.vision_info(self.cost(rec.input_hw).macs(rec.cost_blocks()))
