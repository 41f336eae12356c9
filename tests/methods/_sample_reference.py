"""A float64 reference ViT forward, one image at a time, for the methods that read a block's attention inside the
block (EViT, PPT, ATS).

Nothing here imports tokenreduce. The attention of every block is recomputed from the layer's own weights (the
``Timm`` / ``Clip`` families of ``_token_reference``: qkv, q/k norm, scale, proj, LayerScale, MLP) on a single
image's tokens, and a method's decision at its blocks is a callback that the tests write with plain Python loops
over lists, from the semantics in the fixtures' READMEs. So a test compares two independent implementations, and
batching cannot leak into the reference.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence

import torch


@dataclass
class Tokens:
    """One image's tokens between blocks: ``x [N, C]``, ``size`` (input tokens each stands for) and ``members``
    (the input-token indices each holds), prefix first."""

    x: torch.Tensor
    size: List[float]
    members: List[List[int]]
    extra: dict = field(default_factory=dict)  # per-forward notes of a reference (e.g. counts per block)


@dataclass
class Attention:
    """A block's attention on one image: ``q, k, v [H, N, d]`` (after q/k norm) and ``probs [H, N, N]``."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    probs: torch.Tensor


Softmax = Callable[[torch.Tensor], torch.Tensor]
#: ``step(layer, tokens_after_attention_residual, attention) -> Tokens`` (the decision of a reducing block).
Step = Callable[[int, Tokens, Attention], Tokens]


def forward(fam, image: torch.Tensor, steps, step: Step,
            key_bias: Callable[[int, Tokens], Optional[List[float]]] = lambda layer, t: None,
            softmax: Callable[[int, Tokens], Optional[Softmax]] = lambda layer, t: None):
    """One image through an unpatched model (``fam``: a ``Timm`` or ``Clip`` family of ``_token_reference``);
    ``step`` reduces the tokens after the attention residual of the blocks in ``steps``. ``key_bias`` gives an
    additive logit per key (e.g. log size), ``softmax`` a replacement of ``softmax(dim=-1)`` on the logits
    ``[H, N, N]``. Returns ``(the family's outputs, final Tokens)``."""
    x = fam.embed(image)
    n = x.shape[0]
    t = Tokens(x, [1.0] * n, [[i] for i in range(n)])
    for index, layer in enumerate(fam.layers):
        h = fam.norm1(layer, t.x)
        q, k, v = fam.qkv(layer, h)
        logits = (q @ k.transpose(-1, -2)) * fam.scale(layer)
        bias = key_bias(index, t)
        if bias is not None:
            logits = logits + torch.tensor(bias, dtype=logits.dtype)
        replace = softmax(index, t)
        probs = replace(logits) if replace is not None else logits.softmax(dim=-1)
        xm = t.x + fam.res1(layer, fam.attn_out(layer, h, probs @ v))
        t = Tokens(xm, t.size, t.members, t.extra)
        if index in steps:
            t = step(index, t, Attention(q, k, v, probs))
        t = Tokens(t.x + fam.mlp_branch(layer, t.x), t.size, t.members, t.extra)
    return fam.head(t.x, t.size), t


def log_sizes(sizes: Sequence[float]) -> List[float]:
    return [math.log(s) for s in sizes]


def take(t: Tokens, rows: Sequence[int]) -> Tokens:
    """The tokens ``rows`` of one image, in that order."""
    return Tokens(t.x[list(rows)], [t.size[i] for i in rows], [t.members[i] for i in rows], t.extra)


def cls_row(a: Attention) -> List[float]:
    """Sum over heads of the CLS query's attention to every token."""
    return [float(a.probs[:, 0, j].sum()) for j in range(a.probs.shape[-1])]


def value_norms(a: Attention) -> List[float]:
    """``||v_j||_2`` with all heads concatenated."""
    h, n, d = a.v.shape
    return [math.sqrt(sum(float(a.v[hh, j, i]) ** 2 for hh in range(h) for i in range(d))) for j in range(n)]


def source_matrix(members: Sequence[Sequence[int]], n0: int) -> torch.Tensor:
    out = torch.zeros(len(members), n0, dtype=torch.float64)
    for row, m in enumerate(members):
        out[row, list(m)] = 1
    return out


def vit(distilled: bool = False, qkv_scale: float = 6.0, **overrides) -> torch.nn.Module:
    """A tiny random float64 timm ViT (24x24 images: 36 patches, 4 blocks, 3 heads) with sharpened attention so
    the decisions are far from ties."""
    kwargs = dict(img_size=24, patch_size=4, embed_dim=48, depth=4, num_heads=3, num_classes=10, qkv_bias=True)
    kwargs.update(overrides)
    torch.manual_seed(0)
    if distilled:
        from timm.models.deit import VisionTransformerDistilled
        model = VisionTransformerDistilled(**kwargs)
    else:
        from timm.models.vision_transformer import VisionTransformer
        model = VisionTransformer(**kwargs)
    model = model.double().eval()
    with torch.no_grad():
        for blk in model.blocks:
            blk.attn.qkv.weight.mul_(qkv_scale)
        for name, p in model.named_parameters():  # non-zero biases everywhere: nothing may rely on zero biases
            if name.endswith("bias") or name.endswith("norm1.weight"):
                p.add_(0.05 * torch.randn_like(p))
    return model


VARIANTS = {
    "plain": {},
    "registers": dict(reg_tokens=4),
    "distilled": dict(distilled=True),
    "layerscale_qknorm": dict(init_values=0.5, qk_norm=True),
    "cls_avgpool": dict(global_pool="avg"),
    "dynamic_img_size": dict(dynamic_img_size=True),
}


def images(n: int = 3, size: int = 24, seed: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def clip(layers: int = 4) -> torch.nn.Module:
    """A tiny random float64 HF CLIP vision tower (32x32 images: 64 patches) with sharpened attention."""
    from transformers import CLIPVisionConfig, CLIPVisionModel
    torch.manual_seed(0)
    cfg = CLIPVisionConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=layers, num_attention_heads=3,
                           image_size=32, patch_size=4)
    model = CLIPVisionModel(cfg).double().eval()
    with torch.no_grad():
        for layer in getattr(model, "vision_model", model).encoder.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj):
                proj.weight.mul_(4.0)
    return model
