"""Loop-level float64 references for TokenReduction's clustering methods (K-Medoids, DPC-KNN), written from the
fixtures' README semantics with per-sample Python loops (no batching, no shared code with tokenreduce.ops), and
reference forwards of timm ViTs and HF CLIP towers that call them between unpatched blocks."""
from __future__ import annotations

import copy
import math
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch


# ---------------------------------------------------------------------------------------------------------------
# One sample at a time
def pair_distances(points: torch.Tensor) -> List[List[float]]:
    """Euclidean distances of ``points [N, C]`` pair by pair."""
    n = points.shape[0]
    return [[float(torch.sqrt(((points[i] - points[j]) ** 2).sum())) for j in range(n)] for i in range(n)]


def kmedoids_one(points: torch.Tensor, weight: Sequence[float], k: int, iterations: int) -> Tuple[List[int], List[int]]:
    """README steps 1-4 for one image: ``(medoids in output order, final cluster of every point)``."""
    n = points.shape[0]
    d = pair_distances(points)
    medoids = sorted(range(n), key=lambda i: (-weight[i], i))[:k]
    cost = [weight[i] * sum(d[i]) for i in range(n)]
    for _ in range(iterations):
        assign = [min(range(k), key=lambda c: (d[i][medoids[c]], c)) for i in range(n)]
        new = []
        for c in range(k):
            members = [i for i in range(n) if assign[i] == c]
            new.append(min(members, key=lambda i: (cost[i], i)) if members else 0)
        medoids = new
    assign = [min(range(k), key=lambda c: (d[i][medoids[c]], c)) for i in range(n)]
    for c, m in enumerate(medoids):
        if medoids.index(m) == c:
            assign[m] = c
    return medoids, assign


def dpc_knn_one(points: torch.Tensor, k: int, neighbours: int, valid: Optional[Sequence[bool]] = None
                ) -> Tuple[List[int], List[int]]:
    """DPC-KNN for one sample, ties in density broken by index: ``(centres in cluster order, cluster per point)``."""
    n, c = points.shape
    valid = [True] * n if valid is None else list(valid)
    d = [[v / math.sqrt(c) for v in row] for row in pair_distances(points)]
    if not all(valid):
        far = max(max(row) for row in d) + 1
        d = [[d[i][j] if valid[j] else far for j in range(n)] for i in range(n)]
    kk = min(neighbours, n)
    rho = [math.exp(-sum(v * v for v in sorted(d[i])[:kk]) / kk) * float(valid[i]) for i in range(n)]
    largest = max(max(row) for row in d)

    def is_denser(j: int, i: int) -> bool:
        return rho[j] > rho[i] or (rho[j] == rho[i] and j < i)

    delta = [min([d[i][j] for j in range(n) if is_denser(j, i)] + [largest]) for i in range(n)]
    score = [delta[i] * rho[i] for i in range(n)]
    centres = sorted(range(n), key=lambda i: (-score[i], i))[:k]
    assign = [min(range(k), key=lambda q: (d[centres[q]][j], q)) for j in range(n)]
    for q, centre in enumerate(centres):
        assign[centre] = q
    return centres, assign


def cluster_means_one(points: torch.Tensor, assign: Sequence[int], k: int,
                      weight: Optional[Sequence[float]] = None) -> torch.Tensor:
    """``sum(w x) / (sum(w) + 1e-6)`` per cluster -> ``[K, C]``."""
    weight = [1.0] * points.shape[0] if weight is None else weight
    out = []
    for q in range(k):
        members = [i for i in range(points.shape[0]) if assign[i] == q]
        total = sum(weight[i] for i in members) + 1e-6
        out.append(sum((points[i] * weight[i] for i in members), torch.zeros_like(points[0])) / total)
    return torch.stack(out)


# ---------------------------------------------------------------------------------------------------------------
# Stage steps on a batch, image by image: (x [B, N, C], size [B, N], previous block's attention or None) -> new
Step = Callable[[torch.Tensor, torch.Tensor, Optional[torch.Tensor], int], Tuple[torch.Tensor, torch.Tensor]]


def kmedoids_step(iterations: int) -> Step:
    def step(x, size, attn, k, p):
        xs, ss = [], []
        for b in range(x.shape[0]):
            weight = [float(attn[b, :, :, t].sum()) for t in range(p, x.shape[1])]
            medoids, assign = kmedoids_one(x[b, p:], weight, k, iterations)
            xs.append(torch.cat([x[b, :p], x[b, p:][medoids]]))
            ss.append(torch.cat([size[b, :p], torch.tensor([sum(float(size[b, p + i]) for i in range(len(assign))
                                                                 if assign[i] == q) for q in range(k)],
                                                            dtype=size.dtype)]))
        return torch.stack(xs), torch.stack(ss)
    return step


def dpc_knn_step(neighbours: int) -> Step:
    def step(x, size, attn, k, p):
        xs, ss = [], []
        for b in range(x.shape[0]):
            _, assign = dpc_knn_one(x[b, p:], k, neighbours)
            xs.append(torch.cat([x[b, :p], cluster_means_one(x[b, p:], assign, k)]))
            ss.append(torch.cat([size[b, :p], torch.tensor([sum(float(size[b, p + i]) for i in range(len(assign))
                                                                 if assign[i] == q) for q in range(k)],
                                                            dtype=size.dtype)]))
        return torch.stack(xs), torch.stack(ss)
    return step


def stage_counts(num_patches: int, layers: Sequence[int], keep_ratio: float) -> Dict[int, int]:
    """``{block: clusters}`` of the compounding schedule, written out."""
    return {layer: max(1, int(num_patches * keep_ratio ** (j + 1))) for j, layer in enumerate(layers)}


# ---------------------------------------------------------------------------------------------------------------
# Reference forwards through unpatched copies
def block_attention(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    return ((q * scale) @ k.transpose(-2, -1)).softmax(dim=-1)


def timm_attention(block, x: torch.Tensor) -> torch.Tensor:
    """Plain softmax attention ``[B, H, N, N]`` of a timm block on its input."""
    attn = block.attn
    b, n, c = x.shape
    qkv = attn.qkv(block.norm1(x)).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
    return block_attention(q, k, attn.scale)


@torch.no_grad()
def timm_reference(model, images: torch.Tensor, counts: Dict[int, int], step: Step) -> torch.Tensor:
    """Logits of a timm ViT with ``step`` run before the blocks in ``counts`` (model unpatched)."""
    model = copy.deepcopy(model)
    p = model.num_prefix_tokens
    x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(images))))
    size = torch.ones(x.shape[:2], dtype=x.dtype)
    attn = None
    for i, block in enumerate(model.blocks):
        if i in counts and counts[i] < x.shape[1] - p:
            x, size = step(x, size, attn, counts[i], p)
        attn = timm_attention(block, x)
        x = block(x)
    x = model.norm(x)
    if model.global_pool == "avg":
        w = size[:, p:, None]
        pooled = (x[:, p:] * w).sum(1) / w.sum(1)
    else:
        pooled = x[:, 0]
    return model.head(model.fc_norm(pooled))


@torch.no_grad()
def clip_reference(model, pixels: torch.Tensor, counts: Dict[int, int], step: Step) -> torch.Tensor:
    """``last_hidden_state`` of a transformers CLIPVisionModel with ``step`` before the layers in ``counts``."""
    model = copy.deepcopy(model)
    x = model.pre_layrnorm(model.embeddings(pixels))
    size = torch.ones(x.shape[:2], dtype=x.dtype)
    attn = None
    for i, layer in enumerate(model.encoder.layers):
        if i in counts and counts[i] < x.shape[1] - 1:
            x, size = step(x, size, attn, counts[i], 1)
        sa = layer.self_attn
        h = layer.layer_norm1(x)
        split = lambda t: t.view(t.shape[0], t.shape[1], sa.num_heads, -1).transpose(1, 2)  # noqa: E731
        attn = block_attention(split(sa.q_proj(h)), split(sa.k_proj(h)), sa.scale)
        x = layer(x, None)
        x = x[0] if isinstance(x, tuple) else x
    return x


def require_host_compile(model_factory) -> None:
    """Skip (saying why) when the host itself cannot be compiled with fullgraph=True right now: the check is of the
    method, and ToMe stands in for "the adapter compiles"."""
    import pytest
    import tokenreduce
    model = model_factory()
    tokenreduce.patch(model, "tome", r=2)
    try:
        with torch.no_grad():
            torch.compile(model, fullgraph=True, backend="eager")(torch.randn(1, 3, 32, 32, dtype=torch.float64))
    except Exception as error:  # noqa: BLE001
        pytest.skip(f"the timm host does not compile with fullgraph=True at the moment (ToMe fails too): "
                    f"{type(error).__name__}: {str(error).splitlines()[0]}")
    finally:
        torch._dynamo.reset()
