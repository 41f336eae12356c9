"""An independent float64 reference of Zero-TPrune and the pruning baselines, written with plain Python loops.

Nothing here imports tokenreduce: it is written from the paper (arXiv 2305.17328) and the issue, so that the tests
compare two independent implementations. The model side (attention probabilities, keys) is recomputed from the
timm modules' weights, not read from the adapter's hooks.
"""
from __future__ import annotations

import math
from fractions import Fraction
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

Matrix = List[List[float]]


# ---------------------------------------------------------------------------------------------------------------
# schedule arithmetic, exact

def ref_keep(present: int, spec) -> int:
    """Non-prefix tokens kept: an int count, or ceil(fraction · present) computed exactly (at least 1)."""
    if isinstance(spec, float):
        return max(1, min(present, math.ceil(Fraction(str(spec)) * present)))
    return spec


def ref_split(present: int, drop: int, sim_fraction: float) -> Tuple[int, int]:
    r_sim = min(math.floor(Fraction(str(sim_fraction)) * drop), present // 2)
    return r_sim, drop - r_sim


# ---------------------------------------------------------------------------------------------------------------
# Weighted PageRank, head filter, RMS

def ref_init(n: int, emphasise_cls: bool) -> List[float]:
    w = [1.0] * n
    if emphasise_cls:
        w[0] = math.sqrt(n)
    total = sum(w)
    return [v / total for v in w]


def ref_wpr(attn: Sequence[Matrix], iterations: int, init: List[float]) -> List[List[float]]:
    """Per head: ``iterations`` times, every token i collects A[j][i] · s[j] from every token j."""
    out = []
    for a in attn:
        n = len(a)
        s = list(init)
        for _ in range(iterations):
            new = []
            for i in range(n):
                total = 0.0
                for j in range(n):
                    total += a[j][i] * s[j]
                new.append(total)
            s = new
        out.append(s)
    return out


def ref_aggregate(scores: List[List[float]], band: Optional[Tuple[float, float]]) -> List[float]:
    """Keep heads whose variance of N·s lies in the band (all heads if none does), then root mean square."""
    n = len(scores[0])
    kept = []
    for s in scores:
        v = [n * x for x in s]
        mean = sum(v) / n
        var = sum((x - mean) ** 2 for x in v) / n
        kept.append(band is None or band[0] <= var <= band[1])
    if not any(kept):
        kept = [True] * len(scores)
    heads = [s for s, k in zip(scores, kept) if k]
    return [math.sqrt(sum(s[i] ** 2 for s in heads) / len(heads)) for i in range(n)]


def ref_importance(attn: Sequence[Matrix], iterations: int, cls_token: bool, cls_init: str,
                   band: Optional[Tuple[float, float]]) -> List[float]:
    n = len(attn[0])
    init = ref_init(n, cls_token and cls_init == "sqrt_n")
    return ref_aggregate(ref_wpr(attn, iterations, init), band)


def ref_subgraph(attn: Sequence[Matrix], tokens: List[int]) -> List[Matrix]:
    out = []
    for a in attn:
        sub = []
        for i in tokens:
            row = [a[i][j] for j in tokens]
            total = sum(row)
            sub.append([v / total for v in row])
        out.append(sub)
    return out


def ref_cosine(u: List[float], v: List[float]) -> float:
    dot = sum(x * y for x, y in zip(u, v))
    return dot / (math.sqrt(sum(x * x for x in u)) * math.sqrt(sum(y * y for y in v)))


# ---------------------------------------------------------------------------------------------------------------
# one Zero-TPrune step on one sample

def ref_similarity_stage(keys: List[List[float]], pre: List[float], p: int, r_sim: int) -> List[int]:
    """Surviving non-prefix token indices after dropping the r_sim tokens of the less important half most similar
    to the more important half."""
    cand = list(range(p, len(keys)))
    order = sorted(cand, key=lambda i: -pre[i])  # stable: a tie keeps the lower index as more important
    nb = len(cand) - len(cand) // 2
    group_b, group_a = order[:nb], order[nb:]
    best = {a: max(ref_cosine(keys[a], keys[b]) for b in group_b) for a in group_a}
    dropped = set(sorted(group_a, key=lambda a: -best[a])[:r_sim])
    return [i for i in cand if i not in dropped]


def ref_zero_tprune_step(attn: Sequence[Matrix], keys: List[List[float]], p: int, r_sim: int, r_imp: int, *,
                         iterations: int, cls_token: bool, cls_init: str = "sqrt_n",
                         band: Optional[Tuple[float, float]] = (0.01, 0.7), graph: str = "full") -> Dict:
    n = len(keys)
    out: Dict = {}
    cand = list(range(p, n))
    if r_sim:
        pre = ref_importance(attn, 1, cls_token, cls_init, band)
        out["pre"] = pre
        cand = ref_similarity_stage(keys, pre, p, r_sim)
    out["after_sim"] = list(range(p)) + cand
    if r_imp:
        survivors = list(range(p)) + cand
        if graph == "full":
            imp = ref_importance(attn, iterations, cls_token, cls_init, band)
            score = {i: imp[i] for i in survivors}
        else:
            imp = ref_importance(ref_subgraph(attn, survivors), iterations, cls_token, cls_init, band)
            score = dict(zip(survivors, imp))
        out["importance"] = [score[i] for i in survivors]
        ranked = sorted(cand, key=lambda i: -score[i])
        cand = sorted(ranked[:len(cand) - r_imp])
    out["index"] = list(range(p)) + cand
    return out


# ---------------------------------------------------------------------------------------------------------------
# a whole forward of an unpatched timm ViT with reference pruning between blocks

def block_attention(blk: torch.nn.Module, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(probs [B, H, N, N], keys [B, H, N, d])`` of a timm block's attention on its input x, from the weights."""
    attn = blk.attn
    b, n, _ = x.shape
    h = attn.num_heads
    qkv = attn.qkv(blk.norm1(x)).reshape(b, n, 3, h, -1).permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
    probs = torch.softmax((q @ k.transpose(-1, -2)) * attn.scale, dim=-1)
    return probs, k


Selector = Callable[[int, int, torch.Tensor, torch.Tensor, torch.Tensor, int, int], List[int]]


def ref_forward(model: torch.nn.Module, images: torch.Tensor, steps: Dict[int, object], select: Selector
                ) -> Tuple[torch.Tensor, Dict[int, List[List[int]]], List[int]]:
    """Run an unpatched timm ViT, pruning after the blocks in ``steps`` with ``select``.

    ``select(layer, sample, x_out [N, C], probs [H, N, N], keys [H, N, d], p, k)`` returns the kept indices of one
    sample (prefix first). Returns ``(logits, {layer: kept per sample}, tokens entering every block)``.
    """
    p = model.num_prefix_tokens
    x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(images))))
    kept_all: Dict[int, List[List[int]]] = {}
    tokens = []
    for layer, blk in enumerate(model.blocks):
        tokens.append(x.shape[1])
        probs, keys = block_attention(blk, x)
        x = blk(x)
        if layer in steps:
            k = ref_keep(x.shape[1] - p, steps[layer])
            kept = [select(layer, s, x[s], probs[s], keys[s], p, k) for s in range(x.shape[0])]
            kept_all[layer] = kept
            x = torch.stack([x[s, kept[s]] for s in range(x.shape[0])])
    x = model.norm(x)
    return model.forward_head(x), kept_all, tokens


def zero_tprune_selector(iterations: Sequence[int], *, cls_token: bool, sim_fraction: float = 0.5,
                         cls_init: str = "sqrt_n", band: Optional[Tuple[float, float]] = (0.01, 0.7),
                         graph: str = "full", keys: str = "concat") -> Selector:
    def select(layer, sample, x_out, probs, k, p, keep):
        n = x_out.shape[0]
        present = n - p
        r_sim, r_imp = ref_split(present, present - keep, sim_fraction)
        if keys == "concat":
            key_rows = [sum((k[h, i].tolist() for h in range(k.shape[0])), []) for i in range(n)]
        else:
            key_rows = [k[:, i].mean(dim=0).tolist() for i in range(n)]
        return ref_zero_tprune_step(probs.tolist(), key_rows, p, r_sim, r_imp, iterations=iterations[layer],
                                    cls_token=cls_token, cls_init=cls_init, band=band, graph=graph)["index"]
    return select


def topk_attn_selector(layer, sample, x_out, probs, keys, p, keep) -> List[int]:
    """EViT's criterion: head-averaged attention of the CLS query (row 0), highest ``keep`` non-prefix tokens."""
    h, n, _ = probs.shape
    score = [sum(probs[hh, 0, i].item() for hh in range(h)) / h for i in range(n)]
    ranked = sorted(range(p, n), key=lambda i: -score[i])
    return list(range(p)) + sorted(ranked[:keep])


# ---------------------------------------------------------------------------------------------------------------
# test models

def sharp_vit(distilled: bool = False, qkv_scale: float = 10.0, **overrides) -> torch.nn.Module:
    """A tiny random float64 timm ViT (24x24 images, 36 patches, 4 blocks, 3 heads) whose qkv weights are scaled
    up so attention is peaked: the per-head PageRank variances then straddle the head filter's band, and the
    pruning decisions are far from ties."""
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
    return model
