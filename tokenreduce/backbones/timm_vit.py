"""Adapter for timm's ``VisionTransformer`` family (ViT, DeiT, distilled DeiT, registers, avg-pool, MAE-style).

How it hooks in, per instance and reversibly:

- ``forward_features`` / ``forward_intermediates`` get a thin wrapper that starts a fresh :class:`ForwardState`
  and then runs timm's own method unchanged.
- Every ``Block`` gets an instance ``forward`` that runs the block's own submodules (norm1, attn, ls1, drop path,
  norm2, mlp, ls2) in timm's order and puts the reduction site between the attention residual and the MLP (or
  after the block). timm's ``Attention`` runs untouched: proportional attention is the additive float mask
  ``log(size)`` it passes to ``F.scaled_dot_product_attention``, so fused attention stays on.
- Keys (and queries, when a method needs the CLS attention row or the attention matrix) are read with forward
  hooks on ``attn.k_norm`` / ``attn.q_norm``, i.e. exactly the tensors SDPA used, at no extra projection cost.
  Hooks are installed only in layers where the method acts.
- ``pool`` is wrapped so an average-pooled head weights tokens by size.

Nothing is copied into the model's ``state_dict`` and no class is rebound.
"""
from __future__ import annotations

import functools
import inspect
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from ..methods.base import Geometry, ReductionMethod, Site
from ..state import ForwardState, ReductionInfo
from . import host
from .base import Adapter, register_adapter

try:  # timm is a hard dependency of the package, but keep import errors readable
    from timm.layers import Attention as TimmAttention
    from timm.models.vision_transformer import Block as TimmBlock
    from timm.models.vision_transformer import VisionTransformer
except ImportError:  # pragma: no cover
    VisionTransformer = TimmBlock = TimmAttention = None  # type: ignore

_ENTRY_POINTS = ("forward_features", "forward_intermediates")


class _AttentionProbs(TorchFunctionMode):
    """Inside one call of timm's ``Attention.forward``, compute the attention probabilities with a method's
    function instead of softmax: SDPA is evaluated eagerly as ``probs_fn(scale·q·kᵀ + mask) @ v`` (dropout kept),
    and the eager path's softmax is replaced. Used only when a method asks (``attention_probs``), i.e. for
    DiffRate's rate search; inference keeps the fused kernel."""

    def __init__(self, probs_fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.probs_fn = probs_fn

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            return self._sdpa(*args, **kwargs)
        if func in _SOFTMAX and kwargs.get("dim", args[1] if len(args) > 1 else None) in (-1, args[0].dim() - 1):
            return self.probs_fn(args[0])
        return func(*args, **kwargs)

    def _sdpa(self, q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **unused):
        logits = (q * (q.shape[-1] ** -0.5 if scale is None else scale)) @ k.transpose(-2, -1)
        if is_causal:
            n, m = logits.shape[-2:]
            attn_mask = torch.ones(n, m, dtype=torch.bool, device=q.device).tril()
        if attn_mask is not None:
            logits = logits.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool \
                else logits + attn_mask
        probs = self.probs_fn(logits)
        if dropout_p > 0:
            probs = F.dropout(probs, dropout_p)
        return probs @ v


_SOFTMAX = (torch.Tensor.softmax, torch.softmax, F.softmax)


def _linear_macs_per_token(module: nn.Module) -> int:
    return sum(m.in_features * m.out_features for m in module.modules() if isinstance(m, nn.Linear))


def _head_macs(model: nn.Module) -> int:
    total = 0
    for name in ("head", "head_dist"):
        head = getattr(model, name, None)
        if isinstance(head, nn.Linear):
            total += head.in_features * head.out_features
    return total


def _embed_macs(model: nn.Module, img_hw) -> int:
    pe = model.patch_embed
    if hasattr(pe, "dynamic_feat_size") and img_hw is not None:
        gh, gw = pe.dynamic_feat_size(tuple(int(v) for v in img_hw))
    else:
        gh, gw = pe.grid_size
    proj = getattr(pe, "proj", None)
    if isinstance(proj, nn.Conv2d):
        per_patch = proj.out_channels * (proj.in_channels // proj.groups) * proj.kernel_size[0] * proj.kernel_size[1]
    else:
        per_patch = _linear_macs_per_token(pe)
    return int(gh * gw * per_patch)


@register_adapter
class TimmViTAdapter(Adapter):
    name = ("timm.models.vision_transformer.VisionTransformer and subclasses built from timm's Block/Attention "
            "(ViT, DeiT, distilled DeiT, registers, class_token=False, avg pool, dynamic_img_size)")
    provides = frozenset({"keys", "keys_per_head", "cls_attn", "attn"})
    sites = frozenset({Site.BLOCK_MID, Site.BLOCK_OUT})

    @classmethod
    def claims(cls, model: nn.Module) -> bool:
        return VisionTransformer is not None and isinstance(model, VisionTransformer)

    @classmethod
    def check_model(cls, model: nn.Module) -> None:
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
        self.fs: Optional[ForwardState] = None
        self.method: Optional[ReductionMethod] = None
        self._hooks: List[Any] = []
        blocks = list(model.blocks)
        self._attn_macs_per_token = [_linear_macs_per_token(b.attn) for b in blocks]
        self._attn_dim = [b.attn.num_heads * b.attn.head_dim for b in blocks]
        self._mlp_macs_per_token = [_linear_macs_per_token(b.mlp) for b in blocks]

    def geometry(self) -> Geometry:
        m = self.model
        return Geometry(
            num_blocks=len(m.blocks),
            num_prefix=int(m.num_prefix_tokens),
            num_patches=getattr(m.patch_embed, "num_patches", None),
            dim=int(m.embed_dim),
            num_heads=int(m.blocks[0].attn.num_heads),
            has_class_token=getattr(m, "cls_token", None) is not None,
            macs=self.block_macs,
        )

    def block_macs(self, blocks) -> int:
        """Analytic MACs per image at the default input size for ``[(tokens into attention, tokens into MLP)]``."""
        fs = ForwardState()
        fs.blocks = [(n_attn, n_mlp, n_mlp) for n_attn, n_mlp in blocks]
        fs.extras["img_hw"] = None
        return self.flops(fs)

    def install(self, method: ReductionMethod, options: Dict[str, Any]) -> None:
        model = self.model
        self.method = method
        self.trace_source = bool(options.get("trace_source", False))
        self.size_weighted_pool = bool(options.get("size_weighted_pool", True))
        self.num_prefix = int(model.num_prefix_tokens)
        n = len(model.blocks)
        self._acts = [method.acts_at(i) for i in range(n)]
        self._needs = [method.needs_at(i) if self._acts[i] else frozenset() for i in range(n)]
        self._site_mid = method.site == Site.BLOCK_MID
        custom = type(method).attention_probs is not ReductionMethod.attention_probs
        self._probs_hook = [custom and a for a in self._acts]

        cls = type(model)
        model.forward_features = self._entry(cls.forward_features)
        model.forward_intermediates = self._intermediates_entry(cls.forward_intermediates)
        if hasattr(cls, "pool"):
            self._class_pool = cls.pool
            model.pool = self._pool
        for i, blk in enumerate(model.blocks):
            blk.forward = functools.partial(self._block_forward, blk, i)
            needs = self._needs[i]
            if needs & host.ANALYSIS:
                self._hooks.append(blk.attn.k_norm.register_forward_hook(self._tap("k")))
            if needs & {"cls_attn", "attn"}:
                self._hooks.append(blk.attn.q_norm.register_forward_hook(self._tap("q")))

    def uninstall(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        for name in _ENTRY_POINTS + ("pool",):
            self.model.__dict__.pop(name, None)
        for blk in self.model.blocks:
            blk.__dict__.pop("forward", None)
        self.fs = None

    # ----------------------------------------------------------------------------------------------------------
    def _begin(self, img: Optional[torch.Tensor]) -> None:
        self.fs = ForwardState()
        self.fs.extras["img_hw"] = tuple(img.shape[-2:]) if torch.is_tensor(img) and img.dim() == 4 else None

    def _entry(self, fn):
        model = self.model

        @functools.wraps(fn)
        def forward_features(x, *args, **kwargs):
            self._begin(x)
            return fn(model, x, *args, **kwargs)

        return forward_features

    def _intermediates_entry(self, fn):
        model = self.model
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def forward_intermediates(x, *args, **kwargs):
            bound = signature.bind(model, x, *args, **kwargs)
            bound.apply_defaults()
            if bound.arguments.get("output_fmt") == "NCHW" and any(self._acts):
                raise ValueError("a model patched with a token-reducing method has no spatial grid after the first "
                                 "reduction: call forward_intermediates(..., output_fmt='NLC')")
            self._begin(x)
            return fn(model, x, *args, **kwargs)

        return forward_intermediates

    def _tap(self, name: str):
        def hook(module, inputs, output):
            self.fs.taps[name] = output
        return hook

    def _block_forward(self, blk: nn.Module, layer: int, x: torch.Tensor,
                       attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False) -> torch.Tensor:
        fs = self.fs
        if fs is None:  # a block called on its own, outside the model's forward
            self._begin(None)
            fs = self.fs
        n_in = x.shape[1]
        bias = host.attention_bias(self.method, fs.size, attn_mask, n_in)
        attn_kwargs = {"attn_mask": bias}
        if is_causal:
            attn_kwargs["is_causal"] = True
        probs_fn = self.method.attention_probs(layer, blk.training) if self._probs_hook[layer] else None
        if probs_fn is None:
            h = blk.attn(blk.norm1(x), **attn_kwargs)
        else:  # timm's own Attention, with the method's softmax in place of SDPA's
            with _AttentionProbs(probs_fn):
                h = blk.attn(blk.norm1(x), **attn_kwargs)
        x = x + blk.drop_path1(blk.ls1(h))
        acts = self._acts[layer]
        if acts and self._site_mid:
            x = self._reduce(x, layer, blk, bias)
        n_mid = x.shape[1]
        x = x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))
        if acts and not self._site_mid:
            x = self._reduce(x, layer, blk, bias)
        fs.blocks.append((n_in, n_mid, x.shape[1]))
        fs.extras["out"] = (x.shape[0], x.dtype, x.device)
        fs.taps.clear()
        return x

    def _reduce(self, x: torch.Tensor, layer: int, blk: nn.Module, bias: Optional[torch.Tensor]) -> torch.Tensor:
        fs, needs = self.fs, self._needs[layer]
        analysis = host.analysis_inputs(fs.taps.get("q"), fs.taps["k"], needs, blk.attn.scale, bias) \
            if needs & host.ANALYSIS else {}
        state = host.token_state(fs, x, layer, self.num_prefix, self.trace_source, analysis)
        return host.reduce_tokens(fs, self.method, state)

    def _pool(self, x: torch.Tensor, pool_type: Optional[str] = None) -> torch.Tensor:
        model, fs = self.model, self.fs
        pool_type = model.global_pool if pool_type is None else pool_type
        size = fs.size if fs is not None else None
        if (not self.size_weighted_pool or size is None or getattr(model, "attn_pool", None) is not None
                or pool_type not in ("avg", "avgmax") or size.shape[1] != x.shape[1]):
            return self._class_pool(model, x, pool_type=pool_type)
        start = 0 if getattr(model, "pool_include_prefix", False) else self.num_prefix
        tokens, weight = x[:, start:], size[:, start:, None].to(x.dtype)
        mean = (tokens * weight).sum(dim=1) / weight.sum(dim=1)
        return mean if pool_type == "avg" else 0.5 * (tokens.amax(dim=1) + mean)

    # ----------------------------------------------------------------------------------------------------------
    def info(self) -> ReductionInfo:
        return host.reduction_info(self.fs, self.trace_source, self.flops(self.fs) if self.fs is not None else 0)

    def flops(self, fs: ForwardState) -> int:
        """Analytic MACs per image of the forward recorded in ``fs`` (convention in ``ops.flops``)."""
        total = _embed_macs(self.model, fs.extras.get("img_hw")) + _head_macs(self.model)
        for i, (n_attn, n_mlp, _) in enumerate(fs.blocks):
            total += n_attn * self._attn_macs_per_token[i] + 2 * n_attn * n_attn * self._attn_dim[i]
            total += n_mlp * self._mlp_macs_per_token[i]
        return int(total)
