"""Analytic multiply-accumulate counts, the one MAC model every adapter uses.

Convention (per image, MACs, no norms / softmax / activation / reduction bookkeeping): the patch embedding on the
patch tokens; per attention layer ``N·(qkv + proj MACs per token) + 2·N²·A`` (``QKᵀ`` and ``PV``, A the attention
width); per MLP its linear layers on the tokens that enter it; the classifier heads. ``2 ×`` this equals
``torch.utils.flop_counter.FlopCounterMode`` on the same layers (tests/backbones check it). timm and fvcore report
the same number as "FLOPs"; ``tokenreduce.info(model).macs`` names it honestly.
"""
from __future__ import annotations

from typing import Sequence

import torch.nn as nn

from ..core import CostModel


def linear_macs(module: nn.Module) -> int:
    """MACs per token of every ``nn.Linear`` inside ``module``."""
    return sum(m.in_features * m.out_features for m in module.modules() if isinstance(m, nn.Linear))


def conv_patch_macs(conv: nn.Conv2d) -> int:
    """MACs per output position (patch) of a patch-embedding convolution."""
    return conv.out_channels * (conv.in_channels // conv.groups) * conv.kernel_size[0] * conv.kernel_size[1]


def layer_cost(attentions: Sequence[nn.Module], attn_dims: Sequence[int], mlps: Sequence[nn.Module],
               constant: float, embed_per_token: float = 0.0,
               projections: Sequence[Sequence[nn.Module]] = ()) -> CostModel:
    """The :class:`CostModel` of a stack of attention + MLP layers: per token the linear layers of each, per token
    pair ``2·A`` (``QKᵀ`` and ``PV``, A the attention width); ``projections`` are each layer's q/k/v projection
    modules (the cost of a look-ahead pass)."""
    preview = tuple(float(sum(linear_macs(m) for m in {id(m): m for m in mods}.values())) for mods in projections)
    return CostModel(constant=float(constant), attn_linear=tuple(float(linear_macs(a)) for a in attentions),
                     attn_quadratic=tuple(2.0 * a for a in attn_dims), mlp=tuple(float(linear_macs(m)) for m in mlps),
                     embed_per_token=float(embed_per_token), preview_linear=preview)
