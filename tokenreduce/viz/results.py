"""Plots of evaluation results: top-1 against GFLOPs and against images per second (``tokenreduce plot``), and the
Pareto plot of one evaluation (``tokenreduce eval --plot``)."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from .render import _pyplot


def read_results(paths: Sequence[Union[str, Path]]) -> List[Dict[str, Any]]:
    """Rows with ``status == "ok"`` from ``tokenreduce eval`` results files (``{..., "rows": [...]}``), each with
    ``_file`` and ``_model`` (the file's ``model``) added."""
    rows: List[Dict[str, Any]] = []
    for path in paths:
        data = json.loads(Path(path).read_text())
        file_rows = data.get("rows") if isinstance(data, dict) else data
        if not isinstance(file_rows, list):
            raise ValueError(f"{path}: not a tokenreduce eval results file (no 'rows' list)")
        for row in file_rows:
            if row.get("status", "ok") != "ok" or row.get("top1") is None:
                continue
            rows.append({**row, "_file": str(path), "_model": data.get("model", "") if isinstance(data, dict) else ""})
    return rows


def plot_results(rows: Sequence[Mapping[str, Any]], title: str = ""):
    """A figure with two panels: top-1 against GFLOPs and top-1 against images per second, one line per method
    (the unpatched model as a star). Rows come from :func:`read_results`."""
    plt = _pyplot()
    models = sorted({r.get("_model", "") for r in rows})
    key = (lambda r: (r.get("method") or "none", r.get("_model", ""))) if len(models) > 1 else \
        (lambda r: (r.get("method") or "none", ""))
    groups: Dict[Tuple[str, str], List[Mapping[str, Any]]] = {}
    for r in rows:
        groups.setdefault(key(r), []).append(r)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.3), dpi=110)
    cmap = plt.get_cmap("tab10")
    ordered = sorted(groups.items(), key=lambda kv: (kv[0][0] != "none", kv[0]))  # the unpatched model first
    for i, ((method, model), members) in enumerate(ordered):
        label = ("unpatched" if method == "none" else method) + (f" ({model})" if model else "")
        color = cmap(i % 10)
        for ax, xkey in zip(axes, ("gflops", "img_per_s")):
            pts = sorted((float(r[xkey]), float(r["top1"])) for r in members if r.get(xkey) is not None)
            if not pts:
                continue
            ax.plot([p[0] for p in pts], [p[1] for p in pts], color=color, label=label,
                    marker="*" if method == "none" else "o", markersize=11 if method == "none" else 5,
                    linestyle="-" if len(pts) > 1 else "none")
    axes[0].set_xlabel("GFLOPs per image (analytic multiply-accumulates)")
    axes[1].set_xlabel("images per second")
    for ax in axes:
        ax.set_ylabel("top-1 (%)")
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    h2, l2 = axes[1].get_legend_handles_labels()
    for h, l in zip(h2, l2):
        if l not in labels:
            handles.append(h)
            labels.append(l)
    if not any(r.get("img_per_s") is not None for r in rows):
        axes[1].text(0.5, 0.5, "no throughput in these results", ha="center", va="center",
                     transform=axes[1].transAxes, color="0.4")
    fig.legend(handles, labels, loc="lower center", ncol=min(6, max(1, len(labels))), fontsize=8, frameon=False)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0.08 + 0.04 * ((len(labels) - 1) // 6), 1, 1))
    return fig


def pareto_front(points: Sequence[Tuple[float, float]]) -> List[Tuple[float, float]]:
    """The (GFLOPs, top-1) points no other point beats on both (lower GFLOPs, higher top-1), by GFLOPs."""
    front, best = [], -math.inf
    for g, a in sorted(points, key=lambda p: (p[0], -p[1])):
        if a > best:
            front.append((g, a))
            best = a
    return front


def plot_pareto(rows: Sequence[Any], path: Path, title: str) -> Optional[Path]:
    """Top-1 against GFLOPs of one evaluation (rows with ``method``, ``gflops``, ``top1``), one marker per method,
    the Pareto front as a line. None without matplotlib."""
    try:
        plt = _pyplot()
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    cmap = plt.get_cmap("tab10")
    for i, m in enumerate(sorted({r.method for r in rows})):
        pts = sorted((r.gflops, r.top1) for r in rows if r.method == m)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="*" if m == "none" else "o",
                markersize=12 if m == "none" else 6, color=cmap(i % 10), label="unpatched" if m == "none" else m,
                linestyle="-" if len(pts) > 1 else "none")
    base = next((r for r in rows if r.method == "none"), None)
    if base is not None:
        ax.axhline(base.top1, color="0.75", linewidth=0.8, linestyle="--", zorder=0)
    front = pareto_front([(r.gflops, r.top1) for r in rows])
    ax.plot([p[0] for p in front], [p[1] for p in front], color="0.6", linestyle=":", zorder=0, label="Pareto front")
    ax.set_xlabel("GFLOPs per image (analytic MACs)")
    ax.set_ylabel("top-1 (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right", ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
