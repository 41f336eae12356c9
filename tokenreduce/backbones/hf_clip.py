"""Adapter for Hugging Face CLIP vision towers (transformers >= 5): ``CLIPVisionModel`` and
``CLIPVisionModelWithProjection``, and the host that LLaVA's adapter reuses for its vision tower.

How it hooks in, per instance and reversibly (nothing enters the ``state_dict``, no class is rebound):

- A forward pre-hook on ``encoder`` starts a fresh :class:`ForwardState` for every encoder pass.
- Every ``CLIPEncoderLayer`` gets an instance ``forward`` that runs the layer's own submodules (``layer_norm1``,
  ``self_attn``, ``layer_norm2``, ``mlp``) in HF's order and places the reduction site between the attention
  residual and the MLP (or after the layer). ``CLIPAttention`` itself runs untouched with whatever attention
  implementation the config selects: proportional attention is the additive float mask ``log(size)`` handed to it
  as ``attention_mask``, which SDPA (and eager) add to the logits, so fused attention stays on.
- Keys (and queries, when a method needs the CLS attention row or the attention matrix) are read with forward hooks
  on ``self_attn.k_proj`` / ``q_proj``: exactly the tensors the attention used, at no extra projection cost. The CLS
  row is one extra ``q_cls·Kᵀ`` (O(N·d)); eager attention is never switched on. Hooks exist only where the method acts.
"""
from __future__ import annotations

import functools
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.nn as nn

from ..methods.base import Geometry, ReductionMethod, Site
from ..state import ForwardState, ReductionInfo
from . import host
from .base import Adapter, register_adapter

try:  # transformers is an optional dependency (the ``llava`` extra)
    from transformers.models.clip.modeling_clip import (CLIPAttention, CLIPEncoderLayer, CLIPVisionModel,
                                                        CLIPVisionModelWithProjection)
except ImportError:  # pragma: no cover
    CLIPAttention = CLIPEncoderLayer = CLIPVisionModel = CLIPVisionModelWithProjection = None  # type: ignore

ANALYSIS = host.ANALYSIS


# ---------------------------------------------------------------------------------------------------------------
# Pure helpers
# ---------------------------------------------------------------------------------------------------------------
def split_heads(t: torch.Tensor, num_heads: int) -> torch.Tensor:
    """``[B, N, H·d]`` projection output -> ``[B, H, N, d]``."""
    b, n, c = t.shape
    return t.view(b, n, num_heads, c // num_heads).transpose(1, 2)


def analysis_inputs(taps: Dict[str, torch.Tensor], needs: frozenset, num_heads: int, scale: float,
                    bias: Optional[torch.Tensor]) -> Dict[str, torch.Tensor]:
    """``host.analysis_inputs`` from the ``q_proj`` / ``k_proj`` outputs ``[B, N, C]`` of one attention layer."""
    if not needs & ANALYSIS:
        return {}
    q = split_heads(taps["q"], num_heads) if "q" in taps else None
    return host.analysis_inputs(q, split_heads(taps["k"], num_heads), needs, scale, bias)


def _linear_macs(module: nn.Module) -> int:
    return sum(m.in_features * m.out_features for m in module.modules() if isinstance(m, nn.Linear))


def clip_vision_model(model: nn.Module) -> Optional[nn.Module]:
    """The ``CLIPVisionModel`` inside ``model`` (itself, or ``.vision_model`` of the projection variant)."""
    if CLIPVisionModel is None:
        return None
    if isinstance(model, CLIPVisionModel):
        return model
    if isinstance(model, CLIPVisionModelWithProjection):
        return model.vision_model
    return None


def check_clip_layers(vision_model: nn.Module) -> None:
    """ValueError unless every encoder layer is HF's ``CLIPEncoderLayer`` with ``CLIPAttention`` (unmodified)."""
    for i, layer in enumerate(vision_model.encoder.layers):
        if not isinstance(layer, CLIPEncoderLayer) or not isinstance(layer.self_attn, CLIPAttention):
            raise ValueError(f"encoder.layers[{i}] is a {type(layer).__name__}; tokenreduce's CLIP host needs "
                             "transformers' CLIPEncoderLayer with CLIPAttention")


# ---------------------------------------------------------------------------------------------------------------
# The host: a CLIP vision tower that runs a method inside its encoder layers
# ---------------------------------------------------------------------------------------------------------------
class ClipTowerHost:
    """Runs a ``BLOCK_MID`` / ``BLOCK_OUT`` method inside a ``CLIPVisionModel``'s encoder layers.

    Args:
        vision_model: the ``CLIPVisionModel``.
        num_blocks: layers the method may act in (the first ``num_blocks``; LLaVA passes the layers that feed its
            features, so a schedule is spread over those). Defaults to all layers.
    """

    def __init__(self, vision_model: nn.Module, num_blocks: Optional[int] = None) -> None:
        self.vm = vision_model
        self.layers = list(vision_model.encoder.layers)
        self.num_blocks = len(self.layers) if num_blocks is None else int(num_blocks)
        cfg = vision_model.config
        self.num_heads = int(cfg.num_attention_heads)
        self.dim = int(cfg.hidden_size)
        self.fs: Optional[ForwardState] = None
        self.method: Optional[ReductionMethod] = None
        self._hooks: List[Any] = []
        self._attn_macs_per_token = [_linear_macs(l.self_attn) for l in self.layers]
        self._mlp_macs_per_token = [_linear_macs(l.mlp) for l in self.layers]
        emb = vision_model.embeddings
        conv = emb.patch_embedding
        self._embed_macs_per_patch = conv.out_channels * conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]

    def geometry(self) -> Geometry:
        return Geometry(num_blocks=self.num_blocks, num_prefix=1, num_patches=int(self.vm.embeddings.num_patches),
                        dim=self.dim, num_heads=self.num_heads, has_class_token=True)

    # ----------------------------------------------------------------------------------------------------------
    def install(self, method: ReductionMethod, options: Dict[str, Any]) -> None:
        attn_impl = getattr(self.vm.config, "_attn_implementation", "sdpa") or "sdpa"
        if method.prop_attn and attn_impl not in ("sdpa", "eager"):
            raise ValueError(f"proportional attention needs an additive attention mask, which the CLIP tower's "
                             f"'{attn_impl}' attention does not take; load the model with attn_implementation='sdpa' "
                             "or pass prop_attn=False")
        self.method = method
        self.trace_source = bool(options.get("trace_source", False))
        n = len(self.layers)
        self._acts = [i < self.num_blocks and method.acts_at(i) for i in range(n)]
        self._needs = [method.needs_at(i) if self._acts[i] else frozenset() for i in range(n)]
        self._site_mid = method.site == Site.BLOCK_MID
        self._hooks.append(self.vm.encoder.register_forward_pre_hook(self._begin_hook))
        for i, layer in enumerate(self.layers):
            layer.forward = functools.partial(self._layer_forward, layer, i)
            needs = self._needs[i]
            if needs & ANALYSIS:
                self._hooks.append(layer.self_attn.k_proj.register_forward_hook(self._tap("k")))
            if needs & {"cls_attn", "attn"}:
                self._hooks.append(layer.self_attn.q_proj.register_forward_hook(self._tap("q")))

    def uninstall(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        for layer in self.layers:
            layer.__dict__.pop("forward", None)
        self.fs = None

    # ----------------------------------------------------------------------------------------------------------
    def begin(self) -> ForwardState:
        self.fs = ForwardState()
        return self.fs

    def _begin_hook(self, module, args):
        self.begin()

    def _tap(self, name: str):
        def hook(module, inputs, output):
            if self.fs is not None:
                self.fs.taps[name] = output
        return hook

    def _layer_forward(self, layer: nn.Module, i: int, hidden_states: torch.Tensor,
                       attention_mask: Optional[torch.Tensor] = None, **kwargs: Any) -> torch.Tensor:
        # The minimal re-composition of CLIPEncoderLayer.forward that places the reduction site.
        fs = self.fs if self.fs is not None else self.begin()
        n_in = hidden_states.shape[1]
        bias = host.attention_bias(self.method, fs.size, attention_mask, n_in)
        if bias is not None:
            bias = bias.to(hidden_states.dtype)
        attn_out, _ = layer.self_attn(hidden_states=layer.layer_norm1(hidden_states), attention_mask=bias, **kwargs)
        x = hidden_states + attn_out
        acts = self._acts[i]
        if acts and self._site_mid:
            x = self._reduce(x, i, layer, bias)
        n_mid = x.shape[1]
        x = x + layer.mlp(layer.layer_norm2(x))
        if acts and not self._site_mid:
            x = self._reduce(x, i, layer, bias)
        fs.blocks.append((n_in, n_mid, x.shape[1]))
        fs.extras["out"] = (x.shape[0], x.dtype, x.device)
        fs.taps.clear()
        return x

    def _reduce(self, x: torch.Tensor, i: int, layer: nn.Module, bias: Optional[torch.Tensor]) -> torch.Tensor:
        fs = self.fs
        analysis = analysis_inputs(fs.taps, self._needs[i], self.num_heads, layer.self_attn.scale, bias)
        state = host.token_state(fs, x, i, 1, self.trace_source, analysis)
        return host.reduce_tokens(fs, self.method, state)

    # ----------------------------------------------------------------------------------------------------------
    def info(self) -> ReductionInfo:
        fs = self.fs
        return host.reduction_info(fs, self.trace_source, self.flops(fs.blocks) if fs is not None else 0)

    def flops(self, blocks: Sequence[tuple]) -> int:
        """Analytic MACs per image: patch embedding plus every layer run (convention in ``ops.flops``)."""
        n0 = blocks[0][0] - 1 if blocks else int(self.vm.embeddings.num_patches)
        total = n0 * self._embed_macs_per_patch
        for i, blk in enumerate(blocks):
            n_attn, n_mlp = blk[0], blk[1]
            total += n_attn * self._attn_macs_per_token[i] + 2 * n_attn * n_attn * self.dim
            total += n_mlp * self._mlp_macs_per_token[i]
        return int(total)


# ---------------------------------------------------------------------------------------------------------------
# The adapter for stand-alone CLIP vision models
# ---------------------------------------------------------------------------------------------------------------
@register_adapter
class HFClipVisionAdapter(Adapter):
    name = ("transformers CLIPVisionModel / CLIPVisionModelWithProjection (transformers >= 5, CLIPEncoderLayer "
            "with CLIPAttention; sdpa or eager attention)")
    provides = frozenset({"keys", "keys_per_head", "cls_attn", "attn"})
    sites = frozenset({Site.BLOCK_MID, Site.BLOCK_OUT})

    @classmethod
    def claims(cls, model: nn.Module) -> bool:
        return clip_vision_model(model) is not None

    @classmethod
    def check_model(cls, model: nn.Module) -> None:
        check_clip_layers(clip_vision_model(model))

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.host = ClipTowerHost(clip_vision_model(model))

    def geometry(self) -> Geometry:
        return self.host.geometry()

    def install(self, method: ReductionMethod, options: Dict[str, Any]) -> None:
        self.host.install(method, options)

    def uninstall(self) -> None:
        self.host.uninstall()

    def info(self) -> ReductionInfo:
        return self.host.info()
