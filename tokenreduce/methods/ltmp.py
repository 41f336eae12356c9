"""LTMP: Learned Thresholds token Merging and Pruning (Bonnaerens & Dambre, TMLR 2023).

In every block, between the attention residual and the MLP: tokens are paired by position parity (src = even,
dst = odd), every src whose best cosine similarity (head-averaged keys) to a dst exceeds the block's *merge
threshold* is merged into it (size-weighted mean, importance = max), then every token whose importance (mean
attention received over heads and query rows) does not exceed the block's *prune threshold* is dropped. Attention
is proportional (``log(size)``). Counts vary per image: a batch is padded (``valid``), each image reduced as if it
were alone (upstream runs one image at a time).

The thresholds are two learnable scalars per block (:class:`Thresholds`, outside the model's ``state_dict``):

- ``model.eval()``: the inference path above (tokens really go), upstream ``InferenceLTMPBlock``;
- ``model.train()`` (with ``trainable=True``, the default): upstream's masked training path (``LTMPBlock``):
  nothing is removed, straight-through sigmoid masks of temperature ``tau`` enter later blocks' softmax as a key
  mask, and the thresholds get gradients. The training loop is ``tokenreduce.train.thresholds`` (one epoch, frozen
  backbone, ``tokenreduce train-thresholds``); it exports a YAML that ``thresholds=`` loads.

Defaults are upstream's inference init (merge 1.0, prune 0.0: nothing happens). Reproduces Mxbonn/ltmp at 1a9c055
(``../shared/fixtures/ltmp``); docs/methods/ltmp.md lists every choice.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, FrozenSet, List, Optional, Sequence, Union

import torch
import torch.nn as nn

from ..core import Geometry, Need, Param, ReductionMethod, Site, TokenState, register_method
from ..core.params import boolean, is_real, real
from ..ops.ltmp import (bipartite_pairing, changes_anything, layout_positions, masked_merge_prune, masked_softmax,
                        merge_prune, protect, received_importance)

KINDS = ("prune", "merge")
#: Upstream's initial thresholds: at inference (nothing happens) and for training (``LTMPBlock.__init__``).
INFERENCE_INIT = {"prune": 0.0, "merge": 1.0}
TRAINING_INIT = {"prune": 0.0, "merge": 0.9}


class Thresholds(nn.Module):
    """Two learnable scalars per block, ``prune[l]`` and ``merge[l]`` (0-d parameters). A module of its own, never
    a submodule of the model, so the model's ``state_dict`` is unchanged; save it with its own ``state_dict``.
    Created in float64 (the given values exactly); a trainer moves it to the model's device and dtype."""

    def __init__(self, prune: Sequence[float], merge: Sequence[float]) -> None:
        super().__init__()
        if len(prune) != len(merge):
            raise ValueError(f"{len(prune)} prune but {len(merge)} merge thresholds")
        for kind, values in (("prune", prune), ("merge", merge)):
            setattr(self, kind, nn.ParameterList([nn.Parameter(torch.tensor(float(v), dtype=torch.float64))
                                                  for v in values]))

    @property
    def num_blocks(self) -> int:
        return len(self.prune)

    def threshold(self, kind: str, layer: int) -> nn.Parameter:
        """The 0-d threshold of one block and kind (``.grad`` after a backward)."""
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        return getattr(self, kind)[layer]

    def values(self) -> Dict[str, List[float]]:
        """``{"prune": [...], "merge": [...]}`` as Python floats (one host sync when on a GPU)."""
        with torch.no_grad():
            return {kind: torch.stack(list(getattr(self, kind))).double().cpu().tolist() for kind in KINDS}

    @torch.no_grad()
    def clamp_(self, low: float = 0.0, high: float = 1.0) -> None:
        """Keep every threshold in ``[low, high]`` (upstream clamps to [0, 1] after each optimizer step)."""
        for p in self.parameters():
            p.clamp_(low, high)


@dataclass
class MaskedRun:
    """One training forward (the method's carry): the running mask and what the blocks produced.
    ``tokenreduce.info(model).method_state`` returns it; the trainer reads ``masks``."""

    mask: Optional[torch.Tensor] = None        # [B, N] entering the next block (None: all ones)
    importance: Optional[torch.Tensor] = None  # [B, N] of the current block (from its masked softmax)
    masks: List[torch.Tensor] = field(default_factory=list)   # [B, N] after every block
    sizes: List[torch.Tensor] = field(default_factory=list)   # [B, N] after every block
    num_tokens: int = 0                        # positions of the masked path (prefix included)


@dataclass
class InferenceRun:
    """One inference forward (the method's carry): the thresholds read at its start, and the token order.

    A block that merges and prunes nothing still reorders the tokens into upstream's ``[src, dst]`` layout, which
    decides the next block's pairs. Moving the tokens would only change the rounding, so such a block records the
    order instead (``perm``: logical slot -> physical index) and the next block that changes something, or the
    last block (so ``info(model)`` reports upstream's order), applies it. The last block applies it before its MLP,
    and MLP and norm act per token: with nothing reduced anywhere, a CLS-pooled model computes exactly what the
    unpatched one does (an average-pooled head sums the same tokens in another order).
    """

    values: Dict[str, List[float]]
    perm: Optional[torch.Tensor] = None


def load_thresholds(path: Union[str, os.PathLike]) -> Dict[str, List[float]]:
    """``{"prune": [...], "merge": [...]}`` from a YAML with ``prune_thresholds`` / ``merge_thresholds`` (what the
    trainer exports)."""
    import yaml
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"ltmp: thresholds file {str(path)!r} not found")
    data = yaml.safe_load(path.read_text()) or {}
    missing = [f"{k}_thresholds" for k in KINDS if f"{k}_thresholds" not in data]
    if missing:
        raise ValueError(f"ltmp: {path} has no {missing} (expected the keys prune_thresholds and merge_thresholds)")
    return {k: [float(v) for v in data[f"{k}_thresholds"]] for k in KINDS}


def _check_thresholds(v: Any) -> Optional[str]:
    if v is None or is_real(v) or (isinstance(v, (list, tuple)) and v and all(is_real(x) for x in v)):
        return None
    return "must be a number (every block) or a list of numbers, one per block"


def _check_path(v: Any) -> Optional[str]:
    return None if v is None or isinstance(v, (str, os.PathLike)) else "must be a YAML path"


@register_method
class LTMP(ReductionMethod):
    name = "ltmp"
    site = Site.BLOCK_MID
    needs = frozenset({Need.ATTN, Need.KEYS, Need.VALID, Need.SOURCE, Need.ATTENTION_PROBS})
    compilable = False  # the token count after every block depends on the data (one host sync per block)
    summary = ("Learned Thresholds token Merging and Pruning: per block, merge src tokens more similar than a "
               "learned threshold, then prune tokens less important than another")
    params = {
        "prune_thresholds": Param(None, "per block: keep a token iff its importance (mean attention received) > "
                                        "this; one number or one per block; None: 0.0 (upstream's init)",
                                  _check_thresholds, aliases=("prune_threshold",)),
        "merge_thresholds": Param(None, "per block: merge a src token iff its best cosine similarity > this; one "
                                        "number or one per block; None: 1.0 (nothing merges)",
                                  _check_thresholds, aliases=("merge_threshold",)),
        "thresholds": Param(None, "a YAML with prune_thresholds / merge_thresholds (tokenreduce train-thresholds "
                                  "writes one)", _check_path),
        "tau": Param(0.5, "temperature of the straight-through threshold masks in training (tools/train.py "
                          "--tau; the models' own default is 0.1)", real(0.0, low_open=True)),
        "trainable": Param(True, "model.train() runs the masked soft path with learnable thresholds (needs an "
                                 "adapter that can replace the softmax: timm); False: fixed thresholds, train() "
                                 "runs the inference path", boolean),
        "prop_attn": Param(True, "proportional attention: add log(size) to the attention logits", boolean),
    }

    def __init__(self, geometry: Geometry, **params: Any) -> None:
        super().__init__(geometry, **params)
        depth = geometry.num_blocks
        given = {k: params.get(f"{k}_thresholds") for k in KINDS}
        if params.get("thresholds") is not None:
            if any(v is not None for v in given.values()):
                raise ValueError("ltmp: give either thresholds= (a YAML) or prune_thresholds / merge_thresholds, "
                                 "not both")
            given = load_thresholds(params["thresholds"])
        values = {}
        for kind in KINDS:
            v = given[kind]
            v = INFERENCE_INIT[kind] if v is None else v
            v = [float(v)] * depth if is_real(v) else [float(x) for x in v]
            if len(v) != depth:
                raise ValueError(f"ltmp: {kind}_thresholds has {len(v)} entries but the model has {depth} blocks "
                                 "(one per block, or a single number)")
            values[kind] = v
        self.thresholds = Thresholds(values["prune"], values["merge"])
        self.tau = float(params.get("tau", 0.5))
        self.trainable = bool(params.get("trainable", True))

    # -----------------------------------------------------------------------------------------------------------
    def needs_at(self, layer: int, training: bool = False) -> FrozenSet[str]:
        if training and self.trainable:
            # sources are traced in training only with trace_source=True (nothing reads them)
            return frozenset({Need.ATTENTION_PROBS, Need.KEYS})
        return frozenset({Need.ATTN, Need.KEYS, Need.VALID, Need.SOURCE})

    def missing_needs_hint(self, missing: FrozenSet[str]) -> str:
        if Need.ATTENTION_PROBS.value in missing:
            return ("Training LTMP's thresholds replaces the attention softmax, which this model's adapter cannot do; "
                    "pass trainable=False to run LTMP with fixed thresholds (inference, and model.train() runs the "
                    "inference path)")
        return ""

    def begin(self, training: bool) -> Any:
        if training and self.trainable:
            return MaskedRun()
        return InferenceRun(self.thresholds.values())  # read every forward: they may have been trained since

    def attention_probs(self, state: TokenState):
        if not (state.training and self.trainable):
            return None
        run: MaskedRun = state.carry
        p = state.num_prefix

        def probs(logits: torch.Tensor) -> torch.Tensor:
            mask = run.mask if run.mask is not None else logits.new_ones(logits.shape[0], logits.shape[-1])
            out = masked_softmax(logits, mask)
            run.importance = protect(out.mean(dim=(1, 2)), p, float("inf"))
            return out

        return probs

    def reduce(self, state: TokenState) -> TokenState:
        if state.training and self.trainable:
            return self._reduce_masked(state)
        run: InferenceRun = state.carry
        layer, p, perm = state.layer, state.num_prefix, run.perm
        merge_thr, prune_thr = run.values["merge"][layer], run.values["prune"][layer]
        importance = received_importance(state.attn, p, state.valid)
        keys = state.keys if perm is None else state.keys[:, perm]
        importance = importance if perm is None else importance[:, perm]
        pairing = bipartite_pairing(keys, p, valid=state.valid)
        last = layer == self.geometry.num_blocks - 1
        if state.valid is None and not changes_anything(importance, pairing, merge_thr, prune_thr):
            # nothing merged or pruned in the whole batch: only the order changes (see InferenceRun). With padding
            # every image has its own layout, so merge_prune below packs them instead.
            order = layout_positions(state.num_tokens, p, state.x.device)
            perm = order if perm is None else perm[order]
            if not last:
                return state.replace(carry=InferenceRun(run.values, perm))
            return state.replace(x=state.x[:, perm], size=state.size[:, perm],
                                 source=state.source[:, perm] if state.source is not None else None,
                                 carry=InferenceRun(run.values, None))
        x, size, source = state.x, state.size, state.source
        if perm is not None:  # only set while nothing was padded: every image still holds all its tokens
            x, size = x[:, perm], size[:, perm]
            source = source[:, perm] if source is not None else None
        out = merge_prune(x, size, importance, pairing, merge_thr, prune_thr, p, valid=state.valid, source=source)
        return state.replace(x=out.x, size=out.size, source=out.source, valid=out.valid,
                             carry=InferenceRun(run.values, None))

    def _reduce_masked(self, state: TokenState) -> TokenState:
        run: MaskedRun = state.carry
        if run.importance is None:
            raise RuntimeError("ltmp training needs the adapter to run attention_probs() before the reduction site")
        layer = state.layer
        ref = state.x
        mask = run.mask if run.mask is not None else ref.new_ones(ref.shape[:2])
        thr = {k: self.thresholds.threshold(k, layer).to(device=ref.device, dtype=ref.dtype) for k in KINDS}
        out = masked_merge_prune(state.x, state.size, mask, run.importance, state.keys, thr["merge"], thr["prune"],
                                 self.tau, state.num_prefix, source=state.source)
        run.mask, run.importance, run.num_tokens = out.mask, None, state.num_tokens
        run.masks.append(out.mask)
        run.sizes.append(out.size)
        return state.replace(x=out.x, size=out.size, source=out.source, carry=run)

    # -----------------------------------------------------------------------------------------------------------
    def threshold_values(self) -> Dict[str, List[float]]:
        """The thresholds in use now: ``{"prune": [...], "merge": [...]}``."""
        return self.thresholds.values()
