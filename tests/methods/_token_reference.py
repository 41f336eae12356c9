"""Per-sample float64 reference forwards of MCTF and ToFu, written from the methods' semantics with plain Python loops.

Nothing here imports tokenreduce. The model side is recomputed from the layers' own submodules (norms, projections,
MLP, LayerScale), with attention written out by hand; the matching decisions (who merges into whom, output order)
are Python loops over token indices; groups are lists of input positions and pooling is a loop over groups. Run it
on an *unpatched* copy of the model, one image at a time.

Families: timm ``VisionTransformer`` (any prefix tokens, LayerScale, q/k norm, avg pool) and HF ``CLIPVisionModel``.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch

Group = List[int]  # positions (of the previous layer's tokens) pooled into one token


# ---------------------------------------------------------------------------------------------------------------
# The model, one layer at a time
class Timm:
    """timm VisionTransformer pieces."""

    def __init__(self, model):
        self.model = model
        self.layers = list(model.blocks)
        self.num_prefix = int(model.num_prefix_tokens)

    def embed(self, image: torch.Tensor) -> torch.Tensor:
        m = self.model
        x = m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(image[None]))))
        return x[0]

    def qkv(self, layer, h: torch.Tensor):
        n, c = h.shape
        attn = layer.attn
        q, k, v = attn.qkv(h).reshape(n, 3, attn.num_heads, attn.head_dim).permute(1, 2, 0, 3)
        return attn.q_norm(q), attn.k_norm(k), v

    def scale(self, layer) -> float:
        return float(layer.attn.scale)

    def attn_out(self, layer, h: torch.Tensor, mixed: torch.Tensor) -> torch.Tensor:
        """``mixed [H, N, d]`` (probabilities @ values) -> the attention branch's output ``[N, C]``."""
        attn = layer.attn
        out = attn.norm(mixed.transpose(0, 1).reshape(mixed.shape[1], -1))
        if getattr(attn, "gate", None) is not None:
            out = out * attn.gate(h).sigmoid()
        return attn.proj(out)

    def norm1(self, layer, x):
        return layer.norm1(x)

    def res1(self, layer, a):
        return layer.ls1(a)

    def mlp_branch(self, layer, x):
        return layer.ls2(layer.mlp(layer.norm2(x)))

    def head(self, x: torch.Tensor, size: List[float]) -> Dict[str, torch.Tensor]:
        m = self.model
        x = m.norm(x)
        if m.global_pool == "avg":
            p = 0 if getattr(m, "pool_include_prefix", False) else self.num_prefix
            w = torch.tensor(size[p:], dtype=x.dtype)[:, None]
            pooled = (x[p:] * w).sum(0) / w.sum()
            return {"logits": m.head(m.head_drop(m.fc_norm(pooled)))[None]}
        return {"logits": m.forward_head(x[None])}


class Clip:
    """transformers CLIPVisionModel pieces."""

    def __init__(self, model):
        self.vm = getattr(model, "vision_model", model)  # CLIPVisionModel is the tower itself in transformers 5
        self.layers = list(self.vm.encoder.layers)
        self.num_prefix = 1

    def embed(self, image):
        return self.vm.pre_layrnorm(self.vm.embeddings(image[None]))[0]

    def qkv(self, layer, h):
        a = layer.self_attn
        n = h.shape[0]
        split = lambda t: t.view(n, a.num_heads, a.head_dim).transpose(0, 1)  # noqa: E731
        return split(a.q_proj(h)), split(a.k_proj(h)), split(a.v_proj(h))

    def scale(self, layer):
        return float(layer.self_attn.scale)

    def attn_out(self, layer, h, mixed):
        return layer.self_attn.out_proj(mixed.transpose(0, 1).reshape(mixed.shape[1], -1))

    def norm1(self, layer, x):
        return layer.layer_norm1(x)

    def res1(self, layer, a):
        return a

    def mlp_branch(self, layer, x):
        return layer.mlp(layer.layer_norm2(x))

    def head(self, x, size):
        return {"last_hidden_state": x[None], "pooler_output": self.vm.post_layernorm(x[0])[None]}


def probabilities(fam, layer, h: torch.Tensor, size: Optional[List[float]]) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(probs [H, N, N], values [H, N, d])`` of ``layer`` on normalised tokens ``h``; ``log(size)`` added to
    the logits when ``size`` is given."""
    q, k, v = fam.qkv(layer, h)
    logits = (q @ k.transpose(-1, -2)) * fam.scale(layer)
    if size is not None:
        logits = logits + torch.tensor([math.log(s) for s in size], dtype=logits.dtype)
    return logits.softmax(dim=-1), v


def compose(groups: Sequence[Group], sources: List[Group]) -> List[Group]:
    """Input-token sets of new groups (positions of the current tokens) from the current tokens' sets."""
    return [sorted(i for g in group for i in sources[g]) for group in groups]


def source_matrix(sources: List[Group], n0: int) -> torch.Tensor:
    out = torch.zeros(len(sources), n0, dtype=torch.float64)
    for row, members in enumerate(sources):
        out[row, members] = 1
    return out


def pool(x: torch.Tensor, groups: Sequence[Group], weight: Optional[Sequence[float]]) -> torch.Tensor:
    """Each group's weighted mean of ``x [N, C]`` rows (``weight`` None: element-wise max)."""
    rows = []
    for g in groups:
        if weight is None:
            rows.append(torch.stack([x[i] for i in g]).amax(dim=0))
        else:
            total = sum(weight[i] for i in g)
            rows.append(sum(weight[i] * x[i] for i in g) / total)
    return torch.stack(rows)


# ---------------------------------------------------------------------------------------------------------------
# MCTF
def mctf_count(r, t: int, p: int) -> int:
    if t - r < 10:
        r = t - 10
    n = t - p
    r = int(n * r) if r < 1 else int(r)
    return max(0, min(r, n // 2))


def mctf_groups(x, received, size, p, r, bidirectional, tau_sim, tau_info, tau_size) -> List[Group]:
    """One sample: MCTF's output groups (positions), in output order."""
    t = x.shape[0]
    unit = x / x.norm(dim=-1, keepdim=True)
    inv_m = [1 / float(m) for m in received]
    inv_s = [1 / s for s in size]
    u = [v / max(inv_m) for v in inv_m]
    z = [v / max(inv_s) for v in inv_s]
    a_set = [i for i in range(p, t) if i % 2 == 0]
    b_set = [i for i in range(p, t) if i % 2 == 1]

    def score(a, b):
        v = ((float(unit[a] @ unit[b]) + 1) / 2) ** (1 / tau_sim) if tau_sim else 1.0
        if tau_info:
            v = v * (u[a] * u[b]) ** (1 / tau_info)
        if tau_size:
            v = v * (z[a] * z[b]) ** (1 / tau_size)
        return v

    s = {(a, b): score(a, b) for a in a_set for b in b_set}
    r1, r2 = (r // 2, r - r // 2) if bidirectional else (r, 0)
    best = {a: max(b_set, key=lambda b: s[a, b]) for a in a_set}
    ranked = sorted(a_set, key=lambda a: -s[a, best[a]])
    merged_a, kept_a = ranked[:r1], ranked[r1:]
    if p:
        kept_a = sorted(kept_a)
    b_groups = {b: [b] for b in b_set}
    for a in merged_a:
        b_groups[best[a]].append(a)
    prefix = [[i] for i in range(p)]
    if not bidirectional:
        return prefix + [[a] for a in kept_a] + [b_groups[b] for b in b_set]
    best2 = {b: max(kept_a, key=lambda a: s[a, b]) for b in b_set}
    ranked2 = sorted(b_set, key=lambda b: -s[best2[b], b])
    merged_b, kept_b = ranked2[:r2], ranked2[r2:]
    a_groups = {a: [a] for a in kept_a}
    for b in merged_b:
        a_groups[best2[b]].extend(b_groups[b])
    return prefix + [a_groups[a] for a in kept_a] + [b_groups[b] for b in kept_b]


def mctf_weights(pooling: str, received, size) -> Optional[List[float]]:
    if pooling == "attn":
        return [float(m) * s / max(size) for m, s in zip(received, size)]
    if pooling == "size":
        return list(size)
    if pooling == "mean":
        return [1.0] * len(size)
    return None


def merged_attention(probs: torch.Tensor, groups: Sequence[Group], weight: Optional[List[float]]) -> torch.Tensor:
    """``probs [H, N, N]`` -> ``[H, M, M]``: key columns of a group summed, query rows pooled."""
    cols = torch.stack([probs[:, :, g].sum(dim=-1) for g in groups], dim=-1)  # [H, N, M]
    rows = []
    for g in groups:
        if weight is None:
            rows.append(cols[:, g, :].amax(dim=1))
        else:
            w = torch.tensor([weight[i] for i in g], dtype=probs.dtype)
            rows.append((cols[:, g, :] * w[None, :, None]).sum(dim=1) / w.sum())
    return torch.stack(rows, dim=1)


def mctf_reference(fam, image, *, r=16, layers=None, one_step_ahead=1, tau_sim=1.0, tau_info=20.0, tau_size=40.0,
                   bidirectional=True, pooling="attn", prop_attn=True):
    """One image through the unpatched model with MCTF as specified; returns the head's outputs plus ``size``
    ``[1, N]`` and ``source`` ``[1, N, N0]``."""
    x = fam.embed(image)
    n0, p = x.shape[0], fam.num_prefix
    size = [1.0] * n0
    sources: List[Group] = [[i] for i in range(n0)]
    active = set(range(1, len(fam.layers))) if layers is None else set(layers)

    def merge(x, probs, size, sources):
        received = probs.mean(dim=(0, 1))
        k = mctf_count(r, x.shape[0], p)
        if k <= 0:
            return None
        groups = mctf_groups(x, received, size, p, k, bidirectional, tau_sim, tau_info, tau_size)
        weight = mctf_weights(pooling, received, size)
        return (pool(x, groups, weight), [sum(size[i] for i in g) for g in groups], compose(groups, sources),
                merged_attention(probs, groups, weight))

    for i, layer in enumerate(fam.layers):
        bias = size if prop_attn else None
        act = i in active
        if act and one_step_ahead in (1, 2):
            probs, _ = probabilities(fam, layer, fam.norm1(layer, x), bias)
            done = merge(x, probs, size, sources)
            if done is not None:
                x, size, sources, merged = done
                h = fam.norm1(layer, x)
                if one_step_ahead == 1:
                    _, _, v = fam.qkv(layer, h)
                    a = fam.attn_out(layer, h, merged @ v)
                else:
                    probs, v = probabilities(fam, layer, h, size if prop_attn else None)
                    a = fam.attn_out(layer, h, probs @ v)
            else:
                h = fam.norm1(layer, x)
                probs, v = probabilities(fam, layer, h, bias)
                a = fam.attn_out(layer, h, probs @ v)
            x = x + fam.res1(layer, a)
            x = x + fam.mlp_branch(layer, x)
            continue
        h = fam.norm1(layer, x)
        probs, v = probabilities(fam, layer, h, bias)
        x = x + fam.res1(layer, fam.attn_out(layer, h, probs @ v))
        x = x + fam.mlp_branch(layer, x)
        if act:  # one_step_ahead == 0: merge the block's output with the block's attention
            done = merge(x, probs, size, sources)
            if done is not None:
                x, size, sources, _ = done
    out = fam.head(x, size)
    out["size"] = torch.tensor([size], dtype=torch.float64)
    out["source"] = source_matrix(sources, n0)[None]
    return out


# ---------------------------------------------------------------------------------------------------------------
# ToFu
def tome_groups(keys: torch.Tensor, r: int, p: int) -> List[Group]:
    """One sample: ToMe's bipartite matching on ``keys [N, d]`` (A even, B odd positions, prefix protected), as
    groups in ToMe's output order: prefix, unmerged A (by position if p > 0, else by descending best score), B."""
    t = keys.shape[0]
    r = max(0, min(r, (t - p) // 2))
    if r == 0:
        return [[i] for i in range(t)]
    unit = keys / keys.norm(dim=-1, keepdim=True)
    a_set = [i for i in range(0, t, 2) if i >= p]
    b_set = [i for i in range(1, t, 2) if i >= p]
    best = {a: max(b_set, key=lambda b: float(unit[a] @ unit[b])) for a in a_set}
    score = {a: float(unit[a] @ unit[best[a]]) for a in a_set}
    ranked = sorted(a_set, key=lambda a: -score[a])
    merged, kept = ranked[:r], ranked[r:]
    if p:
        kept = sorted(kept)
    b_groups = {b: [b] for b in b_set}
    for a in merged:
        b_groups[best[a]].append(a)
    return [[i] for i in range(p)] + [[a] for a in kept] + [b_groups[b] for b in b_set]


def tofu_combine(x: torch.Tensor, groups: Sequence[Group], size: List[float], prune: bool) -> torch.Tensor:
    """Prune: a group is its destination (the one B member, or the lone token). MLERP: the size-weighted mean scaled
    to the largest member norm; a lone token is itself."""
    rows = []
    for g in groups:
        if len(g) == 1:
            rows.append(x[g[0]])
            continue
        dst = [i for i in g if i % 2 == 1]
        assert len(dst) == 1
        if prune:
            rows.append(x[dst[0]])
            continue
        mean = sum(size[i] * x[i] for i in g) / sum(size[i] for i in g)
        peak = max(float(x[i].norm()) for i in g)
        rows.append(mean * (peak / float(mean.norm())))
    return torch.stack(rows)


def tofu_reference(fam, image, *, r=0, merge_from=None, prop_attn=True):
    """One image through the unpatched model with ToFu; ``r`` an int or a per-layer list."""
    x = fam.embed(image)
    n0, p = x.shape[0], fam.num_prefix
    depth = len(fam.layers)
    schedule = list(r) + [0] * (depth - len(r)) if isinstance(r, (list, tuple)) else [r] * depth
    first_merge = depth // 2 + 1 if merge_from is None else merge_from
    size = [1.0] * n0
    sources: List[Group] = [[i] for i in range(n0)]
    for i, layer in enumerate(fam.layers):
        h = fam.norm1(layer, x)
        q, k, v = fam.qkv(layer, h)
        logits = (q @ k.transpose(-1, -2)) * fam.scale(layer)
        if prop_attn:
            logits = logits + torch.tensor([math.log(s) for s in size], dtype=logits.dtype)
        x = x + fam.res1(layer, fam.attn_out(layer, h, logits.softmax(dim=-1) @ v))
        groups = tome_groups(k.mean(dim=0), schedule[i], p)
        if len(groups) < x.shape[0]:
            x = tofu_combine(x, groups, size, prune=i < first_merge)
            size = [sum(size[j] for j in g) for g in groups]
            sources = compose(groups, sources)
        x = x + fam.mlp_branch(layer, x)
    out = fam.head(x, size)
    out["size"] = torch.tensor([size], dtype=torch.float64)
    out["source"] = source_matrix(sources, n0)[None]
    return out
