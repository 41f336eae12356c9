"""The loop every ViT-like reduction host shares, whatever the model family.

A *host* is a stack of pre-norm transformer layers (timm ``Block``, HF ``CLIPEncoderLayer`` / ``SiglipEncoderLayer``)
in which a method acts. Every layer gets an instance forward that runs the layer's *own* submodules in the
family's order,

    x = x + residual_attn(attn(norm1(x), mask))     # the layer's own attention module, fused SDPA kept
    [site BLOCK_MID]
    x = x + residual_mlp(mlp(norm2(x)))
    [site BLOCK_OUT]

with ``BLOCK_IN`` before the attention. What differs per family — how to call the attention with an additive mask,
where queries / keys / values can be read, the residual branches — is a :class:`LayerFamily`. Everything else is
here: attention masks from token sizes and validity, the analysis a method declared (from tensors captured by
forward hooks, i.e. exactly what the fused attention consumed), the method's replacement softmax where it asked
for one, applying its result to the :class:`~tokenreduce.core.ForwardRecord`, and the MAC count.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Dict, FrozenSet, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from ..core import (ATTENTION_NEEDS, AttentionMap, CostModel, DenseMap, ForwardRecord, Need, ReductionMethod, Site,
                    Status, TokenState, run_reduce)
from .macs import layer_cost
from .patcher import Patcher

#: Needs that require the queries of the layer (the rest need only keys / values).
QUERY_NEEDS = frozenset({Need.CLS_ATTN, Need.CLS_ATTN_PER_HEAD, Need.ATTN, Need.ATTN_ROWS})


class LayerFamily:
    """How one family's layer is built. Subclasses implement the methods; they are stateless (picklable)."""

    def attention(self, layer: nn.Module) -> nn.Module:
        raise NotImplementedError

    def norm1(self, layer: nn.Module) -> nn.Module:
        raise NotImplementedError

    def norm2(self, layer: nn.Module) -> nn.Module:
        raise NotImplementedError

    def mlp(self, layer: nn.Module) -> nn.Module:
        raise NotImplementedError

    def attend(self, layer: nn.Module, h: torch.Tensor, mask: Optional[torch.Tensor], kwargs: Dict[str, Any]
               ) -> torch.Tensor:
        """The layer's own attention on the normalised tokens ``h [B, N, C]`` with an additive or boolean mask."""
        raise NotImplementedError

    def residual_attn(self, layer: nn.Module, h: torch.Tensor) -> torch.Tensor:
        return h

    def residual_mlp(self, layer: nn.Module, h: torch.Tensor) -> torch.Tensor:
        return h

    def tap_modules(self, layer: nn.Module, names: FrozenSet[str]) -> Dict[str, nn.Module]:
        """``{"q"|"k"|"v": module}``: modules whose forward output holds the queries / keys / values."""
        raise NotImplementedError

    def to_heads(self, layer: nn.Module, name: str, output: torch.Tensor) -> torch.Tensor:
        """A captured output as ``[B, H, N, d]``."""
        raise NotImplementedError

    def projections(self, layer: nn.Module) -> Dict[str, Tuple[nn.Linear, slice]]:
        """``{"q"|"k"|"v": (linear, output columns)}``: where the layer projects each, so that a pass reading only
        some of them computes only those (:class:`SkipProjections`). Empty when unknown: everything is computed."""
        return {}

    def num_heads(self, layer: nn.Module) -> int:
        raise NotImplementedError

    def scale(self, layer: nn.Module) -> float:
        raise NotImplementedError


class Tap:
    """Forward hook that stores a module's output in the current record's taps (a class, so a patched model
    pickles)."""

    def __init__(self, host: "LayerHost", name: str) -> None:
        self.host, self.name = host, name

    def __call__(self, module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
        rec = self.host.owner.record
        if rec is not None:
            setattr(rec.taps, self.name, output)


class LayerForward:
    """The instance forward of host layer ``index`` (a class, so a patched model pickles)."""

    def __init__(self, host: "LayerHost", index: int) -> None:
        self.host, self.index = host, index

    def __call__(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.host.run_layer(self.index, x, *args, **kwargs)


# ---------------------------------------------------------------------------------------------------------------
# Pure helpers
# ---------------------------------------------------------------------------------------------------------------
def attention_mask(size: Optional[torch.Tensor], valid: Optional[torch.Tensor], prop_attn: bool,
                   user_mask: Optional[torch.Tensor], n: int, dtype: torch.dtype) -> Optional[torch.Tensor]:
    """The additive mask a layer's attention gets, ``[B, 1, 1, N]`` or the caller's mask (plus both), or None.

    Args:
        size: ``[B, N']`` token sizes, or None before any merge (then no bias: fastest SDPA kernel).
        valid: ``[B, N']`` bool real tokens, or None; padding keys get ``-inf``.
        prop_attn: whether ``log(size)`` is added (proportional attention).
        user_mask: the mask the caller passed to the layer (bool: True = attend, or additive float), or None.
        n: tokens entering the layer.
    """
    bias = size.log()[:, None, None, :] if prop_attn and size is not None and size.shape[1] == n else None
    # Whether any key is padding is data; a compiled graph cannot branch on it, so it always carries the mask.
    if valid is not None and valid.shape[1] == n and (torch.compiler.is_compiling() or not bool(valid.all())):
        pad = torch.zeros(valid.shape, dtype=dtype, device=valid.device).masked_fill(~valid, float("-inf"))
        bias = pad[:, None, None, :] if bias is None else bias + pad[:, None, None, :]
    if bias is not None:
        bias = bias.to(dtype)
    if user_mask is None:
        return bias
    if user_mask.shape[-1] != n:
        raise ValueError(f"the attention mask covers {user_mask.shape[-1]} tokens but {n} remain after token "
                         "reduction; a mask cannot follow merged tokens (reduce only after the masked layers)")
    if bias is None:
        return user_mask
    if user_mask.dtype == torch.bool:
        user_mask = torch.zeros(user_mask.shape, dtype=bias.dtype, device=bias.device).masked_fill(
            ~user_mask, float("-inf"))
    return user_mask + bias.to(user_mask.dtype)


def attention_probs(q: torch.Tensor, k: torch.Tensor, scale: float, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """Post-softmax attention ``[B, H, Nq, N]`` of queries ``q [B, H, Nq, d]`` over keys ``k [B, H, N, d]``.

    ``bias`` is the additive mask the layer's attention saw (broadcastable to the logits). O(Nq·N·d).
    """
    logits = (q @ k.transpose(-2, -1)).mul_(scale)  # scaled in place: no scaled copy of q, no second logits
    if bias is not None:
        in_place = bias.dtype == logits.dtype and torch.broadcast_shapes(bias.shape, logits.shape) == logits.shape
        logits = logits.add_(bias) if in_place else logits + bias  # else: promote / broadcast as before
    if not plain_inference(logits.device.type):
        return logits.softmax(dim=-1)
    # In inference the probabilities overwrite the logits: at ViT-B, batch 32, one [B, H, N, N] allocation (60 MB,
    # above the allocator's reuse threshold, so fresh pages every layer) less.
    return torch.softmax(logits, dim=-1, out=logits)


def plain_inference(device_type: str) -> bool:
    """Whether in-place and aliasing shortcuts are safe here: no autograd recording, no autocast (its ops choose
    their own output dtype, ``out=`` ops do not), no torch.compile trace (it wants the functional ops)."""
    return not (torch.is_grad_enabled() or torch.is_autocast_enabled(device_type) or torch.compiler.is_compiling())


def _rows_of(bias: Optional[torch.Tensor], rows: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """The part of an additive mask that applies to some query rows ``[B, Q]`` (all rows when None)."""
    if bias is None or bias.dim() != 4 or bias.shape[-2] == 1 or rows is None:
        return bias
    index = rows[:, None, :, None].expand(bias.shape[0], bias.shape[1], rows.shape[1], bias.shape[-1])
    return bias.gather(2, index)


class AttentionRows:
    """``Need.ATTN_ROWS``: probabilities of chosen query rows, computed on demand from captured q / k."""

    def __init__(self, q: torch.Tensor, k: torch.Tensor, scale: float, bias: Optional[torch.Tensor]) -> None:
        self.q, self.k, self.scale, self.bias = q, k, scale, bias

    def __call__(self, rows: torch.Tensor) -> torch.Tensor:
        """``rows [B, Q]`` query indices -> ``[B, H, Q, N]``."""
        b, h, _, d = self.q.shape
        q = self.q.gather(2, rows[:, None, :, None].expand(b, h, rows.shape[1], d))
        return attention_probs(q, self.k, self.scale, _rows_of(self.bias, rows))


def analysis(needs: FrozenSet[str], q: Optional[torch.Tensor], k: Optional[torch.Tensor], v: Optional[torch.Tensor],
             scale: float, bias: Optional[torch.Tensor]) -> Dict[str, Any]:
    """What a method asked for, from one attention layer's ``q, k, v [B, H, N, d]``.

    Returns any of ``keys [B, N, d]`` (mean over heads), ``keys_per_head``, ``values_per_head`` ``[B, H, N, d]``,
    ``cls_attn [B, N]`` / ``cls_attn_per_head [B, H, N]`` (the attention row of token 0: one query, not the whole
    matrix), ``attn [B, H, N, N]`` and ``attn_rows`` (a callable).
    """
    out: Dict[str, Any] = {}
    if Need.KEYS in needs:
        out["keys"] = k.mean(dim=1)
    if Need.KEYS_PER_HEAD in needs:
        out["keys_per_head"] = k
    if Need.VALUES_PER_HEAD in needs:
        out["values_per_head"] = v
    if Need.ATTN in needs:
        out["attn"] = attention_probs(q, k, scale, bias)
    if needs & {Need.CLS_ATTN, Need.CLS_ATTN_PER_HEAD}:
        row = out["attn"][:, :, 0] if "attn" in out else \
            attention_probs(q[:, :, :1], k, scale, _rows_of(bias, q.new_zeros(q.shape[0], 1, dtype=torch.long)))[:, :, 0]
        if Need.CLS_ATTN in needs:
            out["cls_attn"] = row.mean(dim=1)
        if Need.CLS_ATTN_PER_HEAD in needs:
            out["cls_attn_per_head"] = row
    if Need.ATTN_ROWS in needs:
        out["attn_rows"] = AttentionRows(q, k, scale, bias)
    return out


ProjectionPlan = Tuple[Tuple[nn.Linear, Optional[slice]], ...]


def projection_plan(projections: Dict[str, Tuple[nn.Linear, slice]], read: FrozenSet[str]
                    ) -> Tuple[ProjectionPlan, int]:
    """What to compute of a layer's q / k / v projections when only the names in ``read`` are used.

    Returns ``(plan, skipped)``: for every projection linear holding a name not read, the one contiguous range of
    output columns still computed (None: nothing), and the MACs per token left out. A linear whose read columns are
    not one range is computed whole (it is not in the plan).
    """
    by_linear: Dict[int, Tuple[nn.Linear, List[Tuple[int, int]], List[Tuple[int, int]]]] = {}
    for name, (linear, cols) in projections.items():
        start, stop, _ = cols.indices(linear.out_features)
        entry = by_linear.setdefault(id(linear), (linear, [], []))
        entry[1 if name in read else 2].append((start, stop))
    plan, skipped = [], 0
    for linear, kept, dropped in by_linear.values():
        if not dropped:
            continue
        kept.sort()
        if any(a[1] != b[0] for a, b in zip(kept, kept[1:])):
            continue
        cols = slice(kept[0][0], kept[-1][1]) if kept else None
        plan.append((linear, cols))
        skipped += linear.in_features * (linear.out_features - (cols.stop - cols.start if cols else 0))
    return tuple(plan), skipped


class SkipProjections(TorchFunctionMode):
    """Inside one call of a layer's attention, compute only the q / k / v columns that will be read: ``F.linear``
    on a planned weight computes its kept columns only (a look-ahead pass stops at its taps; a layer given its
    probabilities reads only v). The other columns are never read; what they hold is :func:`_columns_only`'s
    business. The skipped MACs are recorded by the host."""

    def __init__(self, plan: ProjectionPlan) -> None:
        super().__init__()
        self.plan = plan

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            x = args[0]
            weight = args[1] if len(args) > 1 else kwargs["weight"]
            for linear, cols in self.plan:
                if weight is linear.weight:
                    bias = args[2] if len(args) > 2 else kwargs.get("bias")
                    return _columns_only(func, x, weight, bias, cols)
        return func(*args, **kwargs)


def skip_projections(plan: ProjectionPlan) -> Any:
    """:class:`SkipProjections` for a plan, or no mode at all when it skips nothing (no per-op interception)."""
    return SkipProjections(plan) if plan else contextlib.nullcontext()


def _columns_only(linear_fn: Callable[..., torch.Tensor], x: torch.Tensor, weight: torch.Tensor,
                  bias: Optional[torch.Tensor], cols: Optional[slice]) -> torch.Tensor:
    """``linear_fn(x, weight, bias)`` ``[..., C_out]`` with only the output columns ``cols`` computed.

    In inference the result is :func:`widened_view` of the computed columns: no zero fill and no copy (on a CPU
    that was about 8 % of an MCTF forward at ViT-S, batch 32), the other columns holding values of neighbouring
    rows. Where autograd, autocast or torch.compile is involved, the other columns are real zeros.
    """
    shape = (*x.shape[:-1], weight.shape[0])
    if cols is None:
        autocast = torch.is_autocast_enabled(x.device.type)
        return x.new_zeros(shape, dtype=torch.get_autocast_dtype(x.device.type) if autocast else x.dtype)
    w, b = weight[cols], None if bias is None else bias[cols]
    if not plain_inference(x.device.type) or x.dtype != weight.dtype:
        part = linear_fn(x, w, b)
        out = part.new_zeros(shape)
        out[..., cols] = part
        return out
    start, stop, _ = cols.indices(weight.shape[0])
    rows = x.reshape(-1, x.shape[-1])
    buffer, part = widened_buffer(rows.shape[0], start, stop, weight.shape[0], x)
    if b is None:
        torch.mm(rows, w.t(), out=part)
    else:
        torch.addmm(b, rows, w.t(), out=part)
    return widened_view(buffer, part.view(*shape[:-1], stop - start), shape[-1])


def widened_buffer(num_rows: int, start: int, stop: int, width: int, like: torch.Tensor
                   ) -> Tuple[torch.Tensor, torch.Tensor]:
    """A flat buffer for :func:`widened_view` and its ``[num_rows, stop - start]`` part to compute into: the rows
    back to back, with ``start`` zeros before them and ``width - stop`` after, so that every column of every row
    of the ``width``-wide view lies inside the buffer."""
    kept = stop - start
    buffer = like.new_empty(start + num_rows * kept + width - stop)
    buffer[:start].zero_()
    buffer[start + num_rows * kept:].zero_()
    return buffer, buffer[start:start + num_rows * kept].view(num_rows, kept)


def widened_view(buffer: torch.Tensor, part: torch.Tensor, width: int) -> torch.Tensor:
    """``[..., width]`` over a :func:`widened_buffer` holding the computed columns ``part [..., kept]``: each row's
    computed columns are ``part``'s row, its other columns alias the neighbouring rows (or the zero padding), so a
    reshape into heads stays a view. Never written to: the elements overlap."""
    return buffer.as_strided((*part.shape[:-1], width), (*part.stride()[:-1], 1))


class ReplaceSoftmax(TorchFunctionMode):
    """Inside one call of a layer's attention, use a method's probabilities instead of softmax.

    ``probs`` is a function of the logits, or the probabilities themselves (a tensor or an
    :class:`~tokenreduce.core.AttentionMap`; see ``ReductionMethod.attention_probs``). SDPA is evaluated eagerly:
    as ``probs(scale·q·kᵀ + mask) @ v``, or as ``map.apply(v)`` with no ``q·kᵀ`` when the probabilities are given
    (``report[0]`` then records the keys of that product, for the layer's MACs; a list the caller keeps, because
    torch.compile does not let a mode's own attributes out of the ``with``). An eager path's softmax is replaced
    (its logits are the model's own, already computed); dropout is kept."""

    _SOFTMAX = (torch.Tensor.softmax, torch.softmax, F.softmax)

    def __init__(self, probs: Union[Callable[[torch.Tensor], torch.Tensor], torch.Tensor, AttentionMap],
                 report: Optional[List[int]] = None) -> None:
        super().__init__()
        self.probs = DenseMap(probs) if isinstance(probs, torch.Tensor) else probs
        self.report = [0] if report is None else report

    def _probs_of(self, logits: torch.Tensor) -> torch.Tensor:
        if isinstance(self.probs, AttentionMap):
            return self.probs.dense().to(logits.dtype)
        return self.probs(logits)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            return self._sdpa(*args, **kwargs)
        if func in self._SOFTMAX and kwargs.get("dim", args[1] if len(args) > 1 else None) in (-1, args[0].dim() - 1):
            return self._probs_of(args[0])
        return func(*args, **kwargs)

    def _sdpa(self, q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **unused):
        if isinstance(self.probs, AttentionMap):
            if dropout_p > 0:
                probs = F.dropout(self.probs.dense().to(v.dtype), dropout_p)
                self.report[0] = probs.shape[-1]
                return probs @ v
            self.report[0] = self.probs.pv_tokens
            return self.probs.apply(v)
        logits = (q * (q.shape[-1] ** -0.5 if scale is None else scale)) @ k.transpose(-2, -1)
        if is_causal:
            n, m = logits.shape[-2:]
            attn_mask = torch.ones(n, m, dtype=torch.bool, device=q.device).tril()
        if attn_mask is not None:
            logits = logits.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool \
                else logits + attn_mask
        probs = self.probs(logits)
        if dropout_p > 0:
            probs = F.dropout(probs, dropout_p)
        return probs @ v


class _PreviewDone(Exception):
    """Raised by a tap once a preview pass captured what it needs (the rest of the attention is skipped)."""


class PreviewTap:
    """Forward hook of a ``BLOCK_IN`` layer (installed once, like :class:`Tap`): stores a module's output in the
    current record's taps and, during that layer's preview pass, stops the attention once every wanted tensor
    arrived. Installed at patch time rather than per pass, so a compiled forward registers no hooks (a class, so a
    patched model pickles)."""

    def __init__(self, host: "LayerHost", name: str) -> None:
        self.host, self.name = host, name

    def __call__(self, module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
        rec = self.host.owner.record
        if rec is None:
            return
        setattr(rec.taps, self.name, output)
        wanted = self.host.previewing
        if wanted and all(getattr(rec.taps, w) is not None for w in wanted):
            raise _PreviewDone


# ---------------------------------------------------------------------------------------------------------------
# The host
# ---------------------------------------------------------------------------------------------------------------
class LayerHost:
    """Runs a method in the layers ``layers`` of a model.

    Args:
        owner: the adapter; its ``record`` (the per-forward record) and ``method`` are read at run time.
        family: how the layers are built.
        layers: the host layers, in order.
        num_prefix: protected leading tokens.
        num_sites: layers the method may act in (the first ``num_sites``; a LLaVA tower stops at its feature
            layer). Defaults to all.
    """

    def __init__(self, owner: Any, family: LayerFamily, layers: Sequence[nn.Module], num_prefix: int,
                 num_sites: Optional[int] = None) -> None:
        self.owner, self.family = owner, family
        self.layers = list(layers)
        self.num_prefix = int(num_prefix)
        self.num_sites = len(self.layers) if num_sites is None else int(num_sites)

    def _head_dim(self, layer: nn.Module) -> int:
        attn = self.family.attention(layer)
        hd = getattr(attn, "head_dim", None)
        return int(hd) if hd is not None else int(getattr(attn, "embed_dim")) // self.family.num_heads(layer)

    # -- install -----------------------------------------------------------------------------------------------
    def install(self, patcher: Patcher, method: ReductionMethod, trace_source: bool) -> None:
        self.site = method.site
        n = len(self.layers)
        self.acts = [i < self.num_sites and method.acts_at(i) for i in range(n)]
        # What each layer reads, in eval and in training (a method may read differently when training).
        self.needs_by_mode = {mode: [frozenset(method.needs_at(i, mode)) if self.acts[i] else frozenset()
                                     for i in range(n)] for mode in (False, True)}
        # Plain booleans, resolved here: set algebra on frozensets does not trace under torch.compile.
        self.reads_attention = {mode: [bool(needs & ATTENTION_NEEDS) for needs in per_layer]
                                for mode, per_layer in self.needs_by_mode.items()}
        # Sources are traced from the first layer on, for every layer, when any layer declares Need.SOURCE in that
        # mode (eval / training), or always with trace_source=True.
        self.trace_by_mode = {mode: bool(trace_source) or any(Need.SOURCE in needs for needs in per_layer)
                              for mode, per_layer in self.needs_by_mode.items()}
        # What a BLOCK_IN preview waits for, per mode and layer (sorted names; no set algebra in the forward).
        self.preview_taps = {mode: [tuple(sorted(self._taps_for(needs))) for needs in per_layer]
                             for mode, per_layer in self.needs_by_mode.items()}
        self.previewing: Tuple[str, ...] = ()  # set only while a preview pass runs
        # Projections a pass does not read are not computed: a preview reads only its taps, a layer given its
        # attention probabilities only v. (plan, MACs per token skipped) per mode / layer.
        projections = [self.family.projections(layer) for layer in self.layers]
        self.preview_plans = {mode: [projection_plan(proj, frozenset(taps)) for proj, taps in zip(projections, per)]
                              for mode, per in self.preview_taps.items()}
        self.given_plans = [projection_plan(proj, frozenset({"v"})) for proj in projections]
        for i, layer in enumerate(self.layers):
            patcher.set_forward(layer, LayerForward(self, i))
            taps = self._taps_for(self.needs_by_mode[False][i] | self.needs_by_mode[True][i])
            hook = PreviewTap if self.site == Site.BLOCK_IN else Tap
            for name, module in self.family.tap_modules(layer, taps).items():
                patcher.hook(module.register_forward_hook(hook(self, name)))

    @staticmethod
    def _taps_for(needs: FrozenSet[str]) -> FrozenSet[str]:
        taps = set()
        if needs & (ATTENTION_NEEDS - {Need.VALUES_PER_HEAD}):
            taps.add("k")
        if needs & QUERY_NEEDS:
            taps.add("q")
        if Need.VALUES_PER_HEAD in needs:
            taps.add("v")
        return frozenset(taps)

    # -- run ---------------------------------------------------------------------------------------------------
    def record_for(self, index: int) -> ForwardRecord:
        """The record of this pass: a new one when no forward is running or when a hand-written loop starts over
        (a layer at or before the last one that ran)."""
        owner = self.owner
        rec = owner.record
        if rec is None or index <= rec.last_layer or rec.status != Status.RUNNING:
            rec = owner.begin_forward()
        return rec

    def run_layer(self, i: int, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        rec = self.record_for(i)
        try:
            return self._run_layer(rec, i, x, *args, **kwargs)
        except BaseException as error:
            rec.fail(error)
            raise

    def _run_layer(self, rec: ForwardRecord, i: int, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        family, layer, method = self.family, self.layers[i], self.owner.method
        user_mask = kwargs.pop("attn_mask", kwargs.pop("attention_mask", args[0] if args else None))
        acts = self.acts[i]
        n_in = x.shape[1]
        if acts and self.site == Site.BLOCK_IN:
            x = self._preview_and_reduce(rec, i, x, user_mask, kwargs)
        mask = attention_mask(rec.size, rec.valid, method.prop_attn, user_mask, x.shape[1], x.dtype)
        h = family.norm1(layer)(x)
        probs = None
        if acts and Need.ATTENTION_PROBS in self._needs(i):
            probs = method.attention_probs(self._state(rec, i, x, {}))
        pv_report = [0]  # the keys of a given P·V, when the layer took given probabilities on its SDPA path
        skipped = 0  # MACs of projections not computed (here and in the preview)
        if probs is None:
            h = family.attend(layer, h, mask, kwargs)
        elif isinstance(probs, (torch.Tensor, AttentionMap)):  # the probabilities themselves: q, k never read
            plan, per_token = self.given_plans[i]
            with ReplaceSoftmax(probs, pv_report), skip_projections(plan):
                h = family.attend(layer, h, mask, kwargs)
            skipped += per_token * x.shape[1]
        else:  # a function of the logits
            with ReplaceSoftmax(probs, pv_report):
                h = family.attend(layer, h, mask, kwargs)
        x = x + family.residual_attn(layer, h)
        if acts and self.site == Site.BLOCK_MID:
            x = self._reduce(rec, i, x, mask)
        n_mid = x.shape[1]
        x = x + family.residual_mlp(layer, family.mlp(layer)(family.norm2(layer)(x)))
        if acts and self.site == Site.BLOCK_OUT:
            x = self._reduce(rec, i, x, mask)
        previewed = acts and self.site == Site.BLOCK_IN and bool(self.preview_taps[bool(layer.training)][i])
        if previewed:
            skipped += self.preview_plans[bool(layer.training)][i][1] * n_in
        rec.finish_layer(i, n_in if self.site != Site.BLOCK_IN else n_mid, n_mid, x, n_in if previewed else 0,
                         pv_report[0], skipped)
        return x

    def _needs(self, i: int) -> FrozenSet[str]:
        return self.needs_by_mode[bool(self.layers[i].training)][i]

    def _analysis(self, rec: ForwardRecord, i: int, mask: Optional[torch.Tensor]) -> Dict[str, Any]:
        needs = self._needs(i)
        if not self.reads_attention[bool(self.layers[i].training)][i]:
            return {}
        layer, taps = self.layers[i], rec.taps
        q, k, v = (None if t is None else self.family.to_heads(layer, name, t)
                   for name, t in (("q", taps.q), ("k", taps.k), ("v", taps.v)))
        return analysis(needs, q, k, v, self.family.scale(layer), mask)

    def _state(self, rec: ForwardRecord, i: int, x: torch.Tensor, found: Dict[str, Any]) -> TokenState:
        traced = self.trace_by_mode[bool(self.layers[i].training)]
        return TokenState(x=x, size=rec.ensure_size(x), source=rec.ensure_source(x) if traced else None,
                          num_prefix=self.num_prefix, layer=i, valid=rec.valid, training=self.layers[i].training,
                          carry=rec.carry, **found)

    def _reduce(self, rec: ForwardRecord, i: int, x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        state = self._state(rec, i, x, self._analysis(rec, i, mask))
        return apply_result(rec, self.owner.method, state, run_reduce(self.owner.method, state))

    def _preview_and_reduce(self, rec: ForwardRecord, i: int, x: torch.Tensor, user_mask: Optional[torch.Tensor],
                            kwargs: Dict[str, Any]) -> torch.Tensor:
        """``BLOCK_IN``: capture this layer's q / k / v on its input (stopping the attention there), then reduce."""
        layer = self.layers[i]
        mask = attention_mask(rec.size, rec.valid, self.owner.method.prop_attn, user_mask, x.shape[1], x.dtype)
        wanted = self.preview_taps[bool(layer.training)][i]
        if wanted:
            self.previewing = wanted
            try:
                with skip_projections(self.preview_plans[bool(layer.training)][i][0]):
                    self.family.attend(layer, self.family.norm1(layer)(x), mask, dict(kwargs))
            except _PreviewDone:
                pass
            finally:
                self.previewing = ()
        return self._reduce(rec, i, x, mask)

    # -- MACs --------------------------------------------------------------------------------------------------
    def cost(self, constant: float, embed_per_token: float = 0.0) -> CostModel:
        """The host layers' MAC model, with the adapter's token-independent ``constant`` (embedding, heads)."""
        return layer_cost([self.family.attention(l) for l in self.layers],
                          [self.family.num_heads(l) * self._head_dim(l) for l in self.layers],
                          [self.family.mlp(l) for l in self.layers], constant, embed_per_token,
                          [list(self.family.tap_modules(l, frozenset("qkv")).values()) for l in self.layers])


def apply_result(rec: ForwardRecord, method: ReductionMethod, state: TokenState, out: TokenState) -> torch.Tensor:
    """Record a method's result in the per-forward record; returns the new hidden states."""
    rec.carry = out.carry
    if out is state:
        return state.x
    n = out.x.shape[1]
    if out.size.shape[:2] != out.x.shape[:2] or (out.source is not None and out.source.shape[1] != n) or \
            (out.valid is not None and out.valid.shape[:2] != out.x.shape[:2]):
        raise RuntimeError(f"{method.name} returned an inconsistent token state at layer {state.layer}: x "
                           f"{tuple(out.x.shape)}, size {tuple(out.size.shape)}")
    rec.size, rec.source, rec.valid = out.size, out.source, out.valid
    if out.kept is not None:
        rec.kept[state.layer] = out.kept
    return out.x
