"""The tower-output site of Qwen2.5-VL / Qwen3-VL: a method acting on the patch merger's tokens of each image (or
video), with the feature layer's attention mapped through the merger.

The Qwen towers are *packed*: all patches of all images of a call run as one sequence ``[N, C]`` whose attention is
cut into segments (an image, a video frame, or — in Qwen2.5-VL's windowed layers — a window), and the merger turns
every run of 4 consecutive patches (a 2×2 block) into one visual token. Qwen2.5-VL additionally runs its blocks in
*window order* (the 2×2 blocks of a window next to each other) and puts the merged tokens back in raster order
after the merger. Hooks capture, inside the adapter's window only:

- the last block's fused ``qkv`` output and the ``cu_seqlens`` / rotary ``position_embeddings`` its attention got
  (queries and keys are rotated with the model's own function, exactly as the attention used them);
- Qwen2.5-VL's window permutation (the ``window_index`` the tower passed to ``permute_input_for_window_attn``);
- every block's attention segments, for the MAC count.

Per call, the merged tokens of the images are grouped by grid (images of one grid form one batch), each group is a
:class:`~tokenreduce.core.TokenState` (``x`` the merger's output, ``num_prefix = 0``, the needs from
:func:`~tokenreduce.backbones.vlm.tower.merged_analysis`), and the method's tokens replace the image's features.
Every output token must name the merged token it is (``kept``), or — for a token it synthesised — the merged tokens
it holds (``source``; a method that returns neither runs a second time with sources traced): its M-RoPE position is
that of its first member, and Qwen3-VL's deepstack features follow it (gathered for a kept token, averaged over the
members for a synthesised one). The tokens of an image are put in the order of those positions (raster order), as
the official VisionZip Qwen2.5-VL code keeps them.
"""
from __future__ import annotations

import sys
from typing import Any, Callable, Dict, FrozenSet, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from ...core import ATTENTION_NEEDS, Need, ReductionMethod, TokenState, run_reduce
from ...ops.merge import gather_tokens
from ...ops.rope import rotate_half
from ..macs import linear_macs
from ..patcher import Original, Patcher, Replacement
from ..vlm.tower import instruction_rows, merged_analysis

QKV_NEEDS = ATTENTION_NEEDS


def rotate_like_qwen(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                     ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Qwen's vision RoPE (``q, k [N, H, d]``, ``cos, sin [N, d]``): computed in float32 and cast back, as the
    tower's ``apply_rotary_pos_emb_vision`` does (a float64 model's attention sees float32-rotated q / k)."""
    cos, sin = cos.unsqueeze(-2).float(), sin.unsqueeze(-2).float()
    qf, kf = q.float(), k.float()
    return (qf * cos + rotate_half(qf) * sin).to(q.dtype), (kf * cos + rotate_half(kf) * sin).to(k.dtype)


def model_rotation(attn: nn.Module) -> Callable[..., Tuple[torch.Tensor, torch.Tensor]]:
    """The rotation the attention module's own modeling file applies (``apply_rotary_pos_emb_vision``), or
    :func:`rotate_like_qwen`."""
    fn = getattr(sys.modules.get(type(attn).__module__), "apply_rotary_pos_emb_vision", None)
    return fn if callable(fn) else rotate_like_qwen


def segment_ids(cu_seqlens: torch.Tensor, n: int) -> torch.Tensor:
    """``[N]`` the segment of every packed token from cumulative lengths ``[S + 1]``."""
    return torch.searchsorted(cu_seqlens[1:].to(torch.long), torch.arange(n, device=cu_seqlens.device), right=True)


def to_raster(t: torch.Tensor, reverse: Optional[torch.Tensor], group: int) -> torch.Tensor:
    """Rows of a packed tensor ``[N, ...]`` in the tower's (window) order -> raster order of the merge groups, with
    ``reverse`` the inverse of the window permutation of the groups (None: already in raster order)."""
    if reverse is None:
        return t
    n = t.shape[0]
    return t.reshape(n // group, group, *t.shape[1:])[reverse.to(t.device)].reshape(t.shape)


def output_index(out: TokenState, num_tokens: int) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """``(index [B, K], synthesised [B, K])`` of a method's output: the merged token each output token is (``kept``),
    and for a token without one (``kept`` absent or -1) its first member in ``source``; ``(None, None)`` when some
    token has neither."""
    b, k = out.x.shape[:2]
    kept = out.kept if out.kept is not None and tuple(out.kept.shape[:2]) == (b, k) else None
    synthesised = torch.ones(b, k, dtype=torch.bool, device=out.x.device) if kept is None else kept < 0
    index = kept.clamp(min=0) if kept is not None else torch.zeros(b, k, dtype=torch.long, device=out.x.device)
    if bool(synthesised.any()):
        src = out.source
        if src is None or tuple(src.shape) != (b, k, num_tokens):
            return None, None
        member = src > 0
        if not bool(member[synthesised].any(dim=-1).all()):
            return None, None
        first = member.to(torch.int8).argmax(dim=-1)
        index = torch.where(synthesised, first, index)
    return index, synthesised


class WindowIndexTap(Replacement):
    """Instance ``permute_input_for_window_attn`` of Qwen2.5-VL's tower: records the window permutation it applies."""

    def __init__(self, site: "QwenTowerSite", original: Original) -> None:
        self.site, self.original = site, original

    def __call__(self, input_tensor: torch.Tensor, window_index: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if self.site.owner.tower_busy:
            self.site.window_index = window_index
        return self.original(input_tensor, window_index, *args, **kwargs)


class AttentionArgsTap:
    """Forward pre-hook (with kwargs) on a vision block's attention: its ``cu_seqlens`` (and, for the feature layer,
    its rotary ``position_embeddings``)."""

    def __init__(self, site: "QwenTowerSite", index: int) -> None:
        self.site, self.index = site, index

    def __call__(self, module: nn.Module, args: Tuple, kwargs: Dict[str, Any]) -> None:
        site = self.site
        if not site.owner.tower_busy:
            return
        cu = kwargs.get("cu_seqlens", args[1] if len(args) > 1 else None)
        if cu is not None:
            lengths = (cu[1:] - cu[:-1]).to(torch.long)
            site.pair_counts[self.index] = int((lengths * lengths).sum())
        if self.index == site.feature_layer:
            site.taps["cu_seqlens"] = cu
            site.taps["position_embeddings"] = kwargs.get("position_embeddings")


class QkvTap:
    """Forward hook on the feature layer's fused ``qkv`` projection."""

    def __init__(self, site: "QwenTowerSite") -> None:
        self.site = site

    def __call__(self, module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
        if self.site.owner.tower_busy:
            self.site.taps["qkv"] = output


class QwenTowerSite:
    """Runs a ``TOWER_OUT`` method on the merged tokens of a Qwen2.5-VL / Qwen3-VL tower.

    Args:
        owner: the adapter (``record``, ``method``, ``tower_busy``, ``instructions`` read at run time).
        visual: the vision tower (``blocks``, ``merger``, ``spatial_merge_size``).
    """

    def __init__(self, owner: Any, visual: nn.Module) -> None:
        self.owner, self.visual = owner, visual
        self.blocks = list(visual.blocks)
        self.feature_layer = len(self.blocks) - 1
        attn = self.blocks[-1].attn
        self.num_heads = int(attn.num_heads)
        self.head_dim = int(getattr(attn, "head_dim", attn.qkv.in_features // self.num_heads))
        self.scale = float(getattr(attn, "scaling", self.head_dim ** -0.5))
        self.merge = int(visual.spatial_merge_size)
        self.group = self.merge * self.merge
        self.rotate = model_rotation(attn)
        self.windowed = hasattr(visual, "fullatt_block_indexes")
        self.taps: Dict[str, Any] = {}
        self.window_index: Optional[torch.Tensor] = None
        self.pair_counts: Dict[int, int] = {}

    # -- install -----------------------------------------------------------------------------------------------
    def install(self, patcher: Patcher, method: ReductionMethod) -> None:
        self.needs: FrozenSet[str] = frozenset(method.needs_at(self.feature_layer, False))
        for i, block in enumerate(self.blocks):
            patcher.hook(block.attn.register_forward_pre_hook(AttentionArgsTap(self, i), with_kwargs=True))
        if self.needs & QKV_NEEDS:
            patcher.hook(self.blocks[-1].attn.qkv.register_forward_hook(QkvTap(self)))
            if self.windowed:
                if not callable(getattr(self.visual, "permute_input_for_window_attn", None)):
                    raise ValueError("this transformers version's Qwen2.5-VL tower has no permute_input_for_window_"
                                     "attn, which tokenreduce reads the window order from; use transformers >= 5.18")
                patcher.set_attr(self.visual, "permute_input_for_window_attn",
                                 WindowIndexTap(self, patcher.original(self.visual, "permute_input_for_window_attn")))

    def begin_call(self) -> None:
        self.taps.clear()
        self.window_index = None
        self.pair_counts = {}

    # -- the feature layer's q / k / v, per image, in raster order ---------------------------------------------
    def patch_heads(self, sizes: Sequence[int]) -> Tuple[List[torch.Tensor], List[torch.Tensor], List[torch.Tensor],
                                                          List[torch.Tensor]]:
        """Per image ``q, k, v [H, N_i, d]`` (q / k rotated) and ``segments [N_i]``, patches in merge-group raster
        order."""
        qkv = self.taps.get("qkv")
        if qkv is None or self.taps.get("cu_seqlens") is None:
            raise RuntimeError("the vision tower's last block did not run inside the features call")
        n = qkv.shape[0]
        q, k, v = qkv.reshape(n, 3, self.num_heads, -1).unbind(1)
        cos, sin = self.taps["position_embeddings"]
        q, k = self.rotate(q, k, cos, sin)
        seg = segment_ids(self.taps["cu_seqlens"], n)
        reverse = None
        if self.windowed:
            if self.window_index is None:
                raise RuntimeError("the Qwen2.5-VL tower did not report its window order")
            reverse = torch.argsort(self.window_index)
        q, k, v, seg = (to_raster(t, reverse, self.group) for t in (q, k, v, seg))
        if sum(sizes) != n:
            raise RuntimeError(f"the tower ran {n} patches but the grids hold {sum(sizes)}")
        split = lambda t: [p.transpose(0, 1) for p in torch.split(t, list(sizes))]  # noqa: E731
        return split(q), split(k), split(v), list(torch.split(seg, list(sizes)))

    # -- one features call -------------------------------------------------------------------------------------
    def reduce_output(self, out: Any, grid_thw: torch.Tensor, modality: str) -> Tuple[Any, List[Dict[str, Any]]]:
        """The features call's output with every image's (or video's) tokens reduced, and one row description per
        image: ``{"modality", "grid", "tokens", "index"}`` (``index``: the merged token each kept token is or
        starts, ascending)."""
        rec, method = self.owner.record, self.owner.method
        grids = [tuple(int(v) for v in g) for g in grid_thw.tolist()]
        pooled = list(out.pooler_output)
        deep = getattr(out, "deepstack_features", None)
        sizes = [t * h * w for t, h, w in grids]
        heads = self.patch_heads(sizes) if self.needs & QKV_NEEDS else None
        instructions = instruction_rows(self.owner.instructions, len(grids)) if Need.INSTRUCTION in self.needs \
            else None
        groups: Dict[Tuple[int, int, int], List[int]] = {}
        for i, g in enumerate(grids):
            groups.setdefault(g, []).append(i)
        new_pooled: List[Optional[torch.Tensor]] = [None] * len(grids)
        new_deep = [[None] * len(grids) for _ in (deep or [])]
        rows: List[Optional[Dict[str, Any]]] = [None] * len(grids)
        for grid, members in groups.items():
            x = torch.stack([pooled[i] for i in members])
            found: Dict[str, Any] = {}
            if heads is not None:
                q, k, v, seg = (torch.stack([part[i] for i in members]) for part in heads)
                found = merged_analysis(self.needs, q, k, v, self.scale, seg, self.group)
            if Need.PROJECTED in self.needs:
                found["projected"] = x
            if Need.GRID in self.needs:
                found["grid"] = self.merged_grid(grid, method.name)
            if instructions is not None:
                found["instruction"] = [instructions[i] for i in members]
            feats, index, synthesised, source = self.run(rec, method, x, found)
            order = index.argsort(dim=1, stable=True)
            feats, index = gather_tokens(feats, order), index.gather(1, order)
            for level, per_image in enumerate(deep or []):
                d = torch.stack([per_image[i] for i in members])
                followed = gather_tokens(d, index)
                if bool(synthesised.any()):
                    weights = source / source.sum(dim=-1, keepdim=True).clamp(min=1e-30)
                    mean = gather_tokens(weights.to(d.dtype) @ d, order)
                    followed = torch.where(gather_tokens(synthesised, order)[..., None], mean, followed)
                for j, i in enumerate(members):
                    new_deep[level][i] = followed[j]
            for j, i in enumerate(members):
                new_pooled[i] = feats[j]
                rows[i] = {"modality": modality, "grid": grid, "tokens": x.shape[1], "index": index[j]}
        out.pooler_output = tuple(new_pooled)
        if deep is not None:
            out.deepstack_features = [tuple(level) for level in new_deep]
        rec.finish_layer(self.feature_layer, max(sizes) // self.group, max(sizes) // self.group,
                         new_pooled[0][None])
        return out, rows

    def merged_grid(self, grid: Tuple[int, int, int], name: str) -> Tuple[int, int]:
        t, h, w = grid
        if t != 1:
            raise ValueError(f"{name} reads the patch grid (Need.GRID) of each image, but a video's merged tokens lie "
                             f"on a {t} x {h // self.merge} x {w // self.merge} (frames x rows x columns) grid, not "
                             "one 2-D grid; give the frames as images, or use a method that does not read the grid")
        return (h // self.merge, w // self.merge)

    def run(self, rec: Any, method: ReductionMethod, x: torch.Tensor, found: Dict[str, Any]
            ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """``(tokens [B, K, D], index [B, K], synthesised [B, K], source [B, K, M] or None)`` of the method on one
        group of images."""
        b, m = x.shape[:2]

        def once(source: Optional[torch.Tensor]) -> TokenState:
            state = TokenState(x=x, size=x.new_ones(b, m), source=source, num_prefix=0, layer=self.feature_layer,
                               carry=rec.carry, **found)
            out = run_reduce(method, state)
            rec.carry = out.carry
            return state if out is state else out

        out = once(None)
        if out.x is x:  # the method changed nothing
            index = torch.arange(m, device=x.device).expand(b, m)
            return x, index, torch.zeros(b, m, dtype=torch.bool, device=x.device), None
        index, synthesised = output_index(out, m)
        if index is None:
            # A token without a kept index: learn its members from traced sources (one more run of the method).
            out = once(torch.eye(m, dtype=x.dtype, device=x.device).expand(b, m, m))
            index, synthesised = output_index(out, m)
            if index is None:
                raise RuntimeError(f"{method.name} returned tokens that name neither the merged token they are "
                                   "(kept) nor the ones they hold (source), so they have no M-RoPE position")
        if bool((index.sort(dim=1).values.diff(dim=1) == 0).any()):
            raise RuntimeError(f"{method.name} returned two tokens for the same merged token, which cannot both take "
                               "its M-RoPE position")
        rec.kept[self.feature_layer] = index
        return out.x, index, synthesised, out.source

    # -- MACs --------------------------------------------------------------------------------------------------
    def macs(self, num_patches: int) -> int:
        """Analytic MACs of the last features call: patch embedding, every block's linear layers and ``2·A`` per
        attended pair of its segments, the merger(s) on the merged tokens."""
        visual = self.visual
        conv = visual.patch_embed.proj
        embed = conv.out_channels * conv.in_channels * int(torch.tensor(conv.kernel_size).prod())
        total = embed * num_patches
        for i, block in enumerate(self.blocks):
            width = int(block.attn.qkv.in_features)
            total += num_patches * (linear_macs(block.attn) + linear_macs(block.mlp))
            total += 2 * width * self.pair_counts.get(i, 0)
        mergers = [visual.merger] + list(getattr(visual, "deepstack_merger_list", []))
        total += (num_patches // self.group) * sum(linear_macs(m) for m in mergers)
        return int(total)
