"""Drawing: a label map over an image ToMe-style (each output token's patches filled with one colour, borders between
groups, dropped patches greyed out), a grid of such panels, and PNG files."""
from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence, Tuple, Union

import numpy as np

from .labels import _numpy, group_borders, label_colors, upsample_labels

if TYPE_CHECKING:  # pragma: no cover
    from .capture import LayerRecord

#: Colour of the lines between groups (RGB, 0-255).
BORDER = (255, 255, 255)
#: Grey level that dropped patches are washed towards (0-1).
DROPPED_GREY = 0.82


def _as_float_image(image: Any) -> np.ndarray:
    if hasattr(image, "convert"):  # PIL
        image = np.asarray(image.convert("RGB"))
    img = _numpy(image)
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    if img.ndim != 3 or img.shape[2] not in (3, 4):
        raise ValueError(f"image must be [H, W, 3] (or a PIL image), got shape {img.shape}")
    integer = np.issubdtype(img.dtype, np.integer)
    img = img[:, :, :3].astype(np.float64)
    return img / 255.0 if integer else img


def render_overlay(image: Any, labels: np.ndarray, *, fill: str = "mean", alpha: float = 0.8,
                   border: Optional[Tuple[int, int, int]] = BORDER, border_width: int = 1,
                   singletons: bool = False, hatch: int = 6) -> np.ndarray:
    """Draw a label map over an image.

    Args:
        image: ``[H, W, 3]`` uint8 or float in [0, 1], or a PIL image: what the model saw (after the crop).
        labels: ``[rows, cols]`` output-token index per patch, ``-1`` for dropped patches
            (:func:`source_to_labels`, :func:`alive_to_labels`).
        fill: ``"mean"``: each group filled with the mean colour of its pixels (ToMe's pictures);
            ``"palette"``: a distinct colour per group; ``"none"``: the image itself (borders and greying only).
        alpha: how strongly the fill replaces the image (1: flat fill).
        border: RGB colour of the lines between groups (and around dropped areas); None for no lines.
        border_width: line width in pixels.
        singletons: also fill tokens that hold a single patch (by default they show the image unchanged).
        hatch: spacing in pixels of the diagonal lines over dropped patches (0: plain grey).

    Returns:
        ``[H, W, 3]`` uint8.
    """
    if fill not in ("mean", "palette", "none"):
        raise ValueError(f"fill must be 'mean', 'palette' or 'none', got {fill!r}")
    img = _as_float_image(image)
    h, w = img.shape[:2]
    labels = np.asarray(labels)
    pix = upsample_labels(labels, h, w)
    out = img.copy()
    valid = labels[labels >= 0]
    if valid.size and fill != "none":
        ids, counts = np.unique(valid, return_counts=True)
        dense = np.searchsorted(ids, np.where(pix >= 0, pix, ids[0]))
        members = pix >= 0
        if fill == "mean":
            sums = np.zeros((ids.size, 3))
            np.add.at(sums, dense[members], img[members])
            npix = np.bincount(dense[members], minlength=ids.size)[:, None]
            colors = sums / np.maximum(npix, 1)
        else:
            colors = label_colors(ids.size)
        grouped = counts > 1 if not singletons else np.ones(ids.size, dtype=bool)
        paint = members & grouped[dense]
        out[paint] = (1 - alpha) * img[paint] + alpha * colors[dense[paint]]
    dropped = pix < 0
    if dropped.any():
        lum = img[dropped] @ np.array([0.299, 0.587, 0.114])
        out[dropped] = (0.25 * lum + 0.75 * DROPPED_GREY)[:, None]
        if hatch:  # thin diagonal lines, so dropped areas never read as a light part of the image
            yy, xx = np.nonzero(dropped)
            on = ((yy + xx) % max(2, int(hatch))) == 0
            out[yy[on], xx[on]] = DROPPED_GREY - 0.22
    if border is not None:
        edge = group_borders(pix, border_width)
        out[edge] = np.asarray(border, dtype=np.float64) / 255.0
    return (np.clip(out, 0, 1) * 255 + 0.5).astype(np.uint8)


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def layer_grid(image, records: Sequence[LayerRecord], *, title: str = "", cols: int = 4, panel: float = 2.2,
               fill: str = "mean", note: str = "", dpi: int = 100):
    """A matplotlib figure: one panel per record (the first is the input image), titled with the block and the
    token count. Returns the figure (save it with ``fig.savefig``)."""
    plt = _pyplot()
    n = len(records)
    cols = max(1, min(cols, n))
    rows = math.ceil(n / cols)
    two_lines = any(r.layer >= 0 and ((r.labels < 0).any() or not r.exact) for r in records)
    row_h = panel + (0.42 if two_lines else 0.28)
    fig, axes = plt.subplots(rows, cols, figsize=(panel * cols, row_h * rows + (0.35 if title else 0.05)
                                                  + (0.25 if note else 0)), dpi=dpi, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, rec in zip(axes.flat, records):
        if rec.layer < 0:
            ax.imshow(_as_float_image(image))
            ax.set_title(f"input · {rec.tokens} tokens", fontsize=8)
        else:
            ax.imshow(render_overlay(image, rec.labels, fill=fill))
            dropped = int((rec.labels < 0).sum())
            second = f"{dropped} patch{'es' if dropped != 1 else ''} dropped" if dropped else ""
            if not rec.exact:
                second = (second + ", " if second else "") + "merges not traced"
            ax.set_title(f"after block {rec.layer} · {rec.tokens} tokens" + (f"\n{second}" if second else ""),
                         fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    note_h = 0.0
    if note:
        import textwrap
        note = textwrap.fill(note, width=max(30, int(panel * cols * 16)))
        note_h = 0.03 * (note.count("\n") + 1) * (3 / max(rows, 1)) ** 0.5
        fig.text(0.5, 0.005, note, ha="center", va="bottom", fontsize=7, color="0.35")
    fig.tight_layout(rect=(0, note_h, 1, 1))
    return fig


def save_png(figure_or_array: Any, path: Union[str, Path], *, dpi: Optional[int] = None,
             colors: Optional[int] = None) -> Path:
    """Write a matplotlib figure or an ``[H, W, 3]`` uint8 array as PNG (closing the figure). ``colors`` (e.g. 256)
    stores a palette image instead, several times smaller for documentation."""
    from PIL import Image
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(figure_or_array, np.ndarray):
        img = Image.fromarray(figure_or_array)
    else:
        import io
        buf = io.BytesIO()
        figure_or_array.savefig(buf, format="png", dpi=dpi)
        _pyplot().close(figure_or_array)
        buf.seek(0)
        img = Image.open(buf).convert("RGB")
    if colors:
        img = img.quantize(colors=int(colors), method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    img.save(path, format="PNG", optimize=True)
    return path
