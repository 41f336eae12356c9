"""Token bookkeeping as label maps (numpy in, numpy out; no model): which output token holds each patch, which
input tokens survived a chain of pruning steps, and helpers to compare, upsample and colour label maps."""
from __future__ import annotations

import colorsys
from typing import Any, Mapping, Optional, Tuple

import numpy as np
import torch


def _numpy(a: Any) -> np.ndarray:  # noqa: shared with render
    if torch.is_tensor(a):
        return a.detach().float().cpu().numpy() if a.is_floating_point() else a.detach().cpu().numpy()
    return np.asarray(a)


def source_to_labels(source: Any, num_prefix: int, grid: Tuple[int, int]) -> np.ndarray:
    """Which output token holds each patch.

    Args:
        source: ``[N, N0]`` 0/1 membership (row: output token, column: input token), prefix tokens first in both
            (``info(model).source[b]``).
        num_prefix: prefix tokens (CLS, dist, registers) at the start of the ``N0`` input tokens.
        grid: ``(rows, cols)`` of the patch grid; ``rows * cols == N0 - num_prefix``.

    Returns:
        ``[rows, cols]`` int64: the output-token index (row of ``source``) that holds each patch, or ``-1`` where
        no output token holds it (the patch was pruned).
    """
    src = _numpy(source)
    if src.ndim != 2:
        raise ValueError(f"source must be [N, N0], got shape {src.shape} (pick one image: source[b])")
    rows, cols = grid
    n0 = src.shape[1]
    if n0 - num_prefix != rows * cols:
        raise ValueError(f"source has {n0} input tokens; {num_prefix} prefix + a {rows}x{cols} grid needs "
                         f"{num_prefix + rows * cols}")
    patches = src[:, num_prefix:] > 0.5
    labels = np.where(patches.any(axis=0), patches.argmax(axis=0), -1).astype(np.int64)
    return labels.reshape(rows, cols)


def kept_to_alive(kept: Mapping[int, Any], num_tokens: int, batch_index: int = 0,
                  upto: Optional[int] = None) -> np.ndarray:
    """The input tokens still present after a chain of pruning steps.

    Args:
        kept: ``{layer: indices}``, each ``[B, N_out]`` (or ``[N_out]``) indices into that site's input tokens, as
            in ``info(model).kept``. Steps apply in layer order.
        num_tokens: ``N0``, the tokens entering the first step (prefix included).
        batch_index: which image of the batch.
        upto: only the steps at layers ``<= upto`` (all when None).

    Returns:
        ``[N0]`` bool: True for the input tokens that survived every step.

    Only valid for pure pruning (each step keeps a subset of the previous step's tokens); where a method also
    merges, trace ``source`` instead.
    """
    alive = np.arange(num_tokens)
    for layer in sorted(kept):
        if upto is not None and layer > upto:
            break
        idx = _numpy(kept[layer]).astype(np.int64)
        if idx.ndim == 2:
            idx = idx[batch_index]
        if idx.size and (idx.min() < 0 or idx.max() >= alive.size):
            raise ValueError(f"kept[{layer}] indexes {idx.max()} but only {alive.size} tokens enter that step")
        alive = alive[idx]
    mask = np.zeros(num_tokens, dtype=bool)
    mask[alive] = True
    return mask


def alive_to_labels(alive: Any, num_prefix: int, grid: Tuple[int, int]) -> np.ndarray:
    """Label map for pure pruning: every surviving patch its own group (labelled by its input-token index,
    prefix included, like the rows of an identity ``source``), ``-1`` if dropped."""
    alive = _numpy(alive).astype(bool)
    rows, cols = grid
    if alive.size - num_prefix != rows * cols:
        raise ValueError(f"{alive.size} tokens; {num_prefix} prefix + a {rows}x{cols} grid needs "
                         f"{num_prefix + rows * cols}")
    patch = alive[num_prefix:]
    return np.where(patch, num_prefix + np.arange(patch.size), -1).astype(np.int64).reshape(rows, cols)


def canonical_labels(labels: np.ndarray) -> np.ndarray:
    """Relabel groups ``0, 1, ...`` in order of first appearance (row-major), ``-1`` kept: two label maps describe
    the same grouping exactly when their canonical forms are equal."""
    flat = np.asarray(labels).ravel()
    out = np.full(flat.shape, -1, dtype=np.int64)
    valid = flat >= 0
    if valid.any():
        _, first, inverse = np.unique(flat[valid], return_index=True, return_inverse=True)
        rank = np.empty(first.size, dtype=np.int64)
        rank[np.argsort(first)] = np.arange(first.size)
        out[valid] = rank[inverse]
    return out.reshape(np.shape(labels))


def same_grouping(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether two label maps group (and drop) the patches identically, whatever the label values."""
    return np.shape(a) == np.shape(b) and bool(np.array_equal(canonical_labels(a), canonical_labels(b)))


def upsample_labels(labels: np.ndarray, height: int, width: int) -> np.ndarray:
    """``[rows, cols]`` -> ``[height, width]`` by nearest neighbour (any size, not only multiples)."""
    rows, cols = labels.shape
    ry = (np.arange(height) * rows) // height
    rx = (np.arange(width) * cols) // width
    return labels[ry[:, None], rx[None, :]]


def group_borders(pixel_labels: np.ndarray, width: int = 1) -> np.ndarray:
    """``[H, W]`` bool: pixels on a border between two different labels (the first pixel after each change,
    grown to lines ``width`` pixels wide)."""
    edge = np.zeros(pixel_labels.shape, dtype=bool)
    edge[1:, :] |= pixel_labels[1:, :] != pixel_labels[:-1, :]
    edge[:, 1:] |= pixel_labels[:, 1:] != pixel_labels[:, :-1]
    for _ in range(width - 1):
        grown = edge.copy()
        grown[1:, :] |= edge[:-1, :]
        grown[:-1, :] |= edge[1:, :]
        grown[:, 1:] |= edge[:, :-1]
        grown[:, :-1] |= edge[:, 1:]
        edge = grown
    return edge


def label_colors(num: int, seed: int = 0) -> np.ndarray:
    """``[num, 3]`` float colours in [0, 1], well separated (golden-ratio hue steps), deterministic."""
    rng = np.random.default_rng(seed)
    start = rng.random()
    hues = (start + 0.61803398875 * np.arange(num)) % 1.0
    sat = 0.55 + 0.35 * ((np.arange(num) * 7) % 3) / 2
    val = 0.95 - 0.2 * ((np.arange(num) * 5) % 2)
    return np.array([colorsys.hsv_to_rgb(h, s, v) for h, s, v in zip(hues, sat, val)]).reshape(num, 3)
