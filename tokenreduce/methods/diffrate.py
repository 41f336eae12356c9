"""DiffRate: pruning and merging with learned per-layer kept counts (Chen et al., ICCV 2023).

Inside every block, between the attention residual and the MLP: tokens are sorted by the head-averaged attention
the CLS query gives them (prefix tokens pinned first), the first ``P_l`` are kept (pruning), then every token
beyond the first ``M_l`` is merged into its most similar (cosine of the hidden state) of the first ``M_l``:
unweighted mean including the destination, the merged tokens' sizes scaled by their similarity. Attention is
proportional (``log(size)`` bias). The counts include the prefix tokens, one per block, as upstream's
``set_kept_num``; the effective count after block l is ``min(N, P_l, M_l)``.

Two modes:

- **fixed rates** (``prune_kept`` / ``merge_kept`` lists, or ``rates=`` a YAML file or a named released table such
  as ``"deit_small@2.9"`` from ``configs/diffrate/``): inference, on timm's fused attention.
- **rate search** (no counts given): every block owns learnable logits over candidate kept counts, one vector for
  pruning and one for merging (:class:`RateLogits`, outside the model's ``state_dict``). In ``model.train()`` the
  forward runs the differentiable discrete proxy (tokens masked, never removed, softmax with policy); in
  ``model.eval()`` it runs the inference path with the counts the logits currently choose. The training loop
  lives in :mod:`tokenreduce.diffrate_search`.

Defaults reproduce OpenGVLab/DiffRate at 91ae3e3 (see ``../shared/fixtures/diffrate`` and docs/methods/diffrate.md).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from ..ops.diffrate import (candidate_counts, keep_probability, kept_count, masked_merge, permute_tokens,
                            similarity_merge, soft_keep_mask, softmax_with_policy, sort_by_importance)
from ..state import TokenState
from .base import Geometry, Param, ReductionMethod, Site
from ..resources import data_dir
from .registry import register_method

KINDS = ("prune", "merge")
#: Where the released rate tables live (override with TOKENREDUCE_DIFFRATE_CONFIGS).
CONFIG_DIR = Path(os.environ.get("TOKENREDUCE_DIFFRATE_CONFIGS", data_dir("configs") / "diffrate"))


# ---------------------------------------------------------------------------------------------------------------
# Rate tables: YAML files and the released configs
@dataclass
class RateTable:
    """One set of per-block kept counts (incl. prefix tokens) and what it was made for."""

    prune_kept: List[int]
    merge_kept: List[int]
    model: Optional[str] = None
    target_gflops: Optional[float] = None
    origin: str = ""
    meta: Dict[str, Any] = field(default_factory=dict)


def _int_list(value: Any, what: str) -> List[int]:
    if isinstance(value, str):  # upstream's compression_rate.json stores lists as strings
        import yaml
        value = yaml.safe_load(value)
    if (not isinstance(value, (list, tuple)) or not value
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)):
        raise ValueError(f"{what} must be a non-empty list of ints, got {value!r}")
    return [int(v) for v in value]


def _table_from(entry: Dict[str, Any], origin: str, model: Optional[str], meta: Dict[str, Any]) -> RateTable:
    missing = [k for k in ("prune_kept", "merge_kept") if k not in entry]
    if missing:
        raise ValueError(f"{origin}: missing {missing}")
    target = entry.get("target_gflops")
    return RateTable(_int_list(entry["prune_kept"], f"{origin}: prune_kept"),
                     _int_list(entry["merge_kept"], f"{origin}: merge_kept"),
                     model=entry.get("model", model), target_gflops=None if target is None else float(target),
                     origin=origin, meta=meta)


def list_rate_configs(config_dir: Union[str, Path, None] = None) -> Dict[str, List[str]]:
    """Released tables by config name: ``{"deit_small": ["2.3", "2.5", ...], ...}``."""
    import yaml
    out = {}
    for path in sorted(Path(config_dir or CONFIG_DIR).glob("*.yaml")):
        data = yaml.safe_load(path.read_text()) or {}
        if isinstance(data.get("rates"), dict):
            out[path.stem] = [str(k) for k in data["rates"]]
    return out


def load_rates(spec: Union[str, Path], config_dir: Union[str, Path, None] = None) -> RateTable:
    """A rate table from a YAML file or a named config.

    Args:
        spec: ``"deit_small@2.9"`` (a file of ``configs/diffrate`` by stem, timm model name or upstream name, then
            the FLOPs target), a YAML path holding ``prune_kept`` / ``merge_kept`` (what ``tools/train_rates.py``
            exports), or ``"path.yaml@2.9"`` for a file with several tables under ``rates:``.
        config_dir: where the named configs live (default ``configs/diffrate``).

    Raises:
        ValueError naming what exists when the file, the name or the target is unknown.
    """
    import yaml
    text = str(spec)
    name, _, target = text.rpartition("@") if "@" in text else (text, "", "")
    path = Path(name).expanduser()
    if not path.is_file():
        path = _find_config(name, Path(config_dir or CONFIG_DIR))
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping with prune_kept/merge_kept or rates, got {type(data).__name__}")
    meta = {k: v for k, v in data.items() if k not in ("rates", "prune_kept", "merge_kept")}
    if "prune_kept" in data or "merge_kept" in data:
        if target:
            raise ValueError(f"{path} holds a single table; drop '@{target}'")
        return _table_from(data, str(path), data.get("model"), meta)
    tables = data.get("rates")
    if not isinstance(tables, dict) or not tables:
        raise ValueError(f"{path}: neither prune_kept/merge_kept nor a 'rates:' mapping")
    if not target:
        raise ValueError(f"{path} holds several tables; pick one with '@<GFLOPs>', one of {list(map(str, tables))}")
    for key, entry in tables.items():
        if _same_number(key, target):
            entry = dict(entry)
            entry.setdefault("target_gflops", float(key))
            return _table_from(entry, f"{path}@{key}", data.get("model"), meta)
    raise ValueError(f"{path} has no table for {target} GFLOPs; it has {', '.join(map(str, tables))}")


def _same_number(a: Any, b: Any) -> bool:
    try:
        return abs(float(a) - float(b)) < 1e-9
    except (TypeError, ValueError):
        return False


def _find_config(name: str, config_dir: Path) -> Path:
    import yaml
    tables = {}  # only rate-table files (a "rates:" mapping); method configs may share the folder
    for path in sorted(config_dir.glob("*.yaml")):
        data = yaml.safe_load(path.read_text()) or {}
        if isinstance(data, dict) and isinstance(data.get("rates"), dict):
            tables[path] = data
    for path, data in tables.items():
        if name in (path.stem, data.get("model"), data.get("upstream_name")):
            return path
    candidates = list(tables)
    known = ", ".join(p.stem for p in candidates) or f"none found in {config_dir}"
    raise ValueError(f"no rate file or named config {name!r}; named configs: {known} (use e.g. 'deit_small@2.9')")


# ---------------------------------------------------------------------------------------------------------------
# Learnable rates (rate search)
class RateLogits(nn.Module):
    """Learnable logits over candidate kept counts: one vector per block and kind (``"prune"``, ``"merge"``).

    Block 0 is never compressed: its vectors hold one entry (all patches). Initialised to zeros (upstream). It is
    a module of its own, never a submodule of the model, so the model's ``state_dict`` is untouched; save it with
    its own ``state_dict``.
    """

    def __init__(self, num_blocks: int, num_patches: int, num_prefix: int, granularity: Tuple[int, int]) -> None:
        super().__init__()
        self.num_patches, self.num_prefix = num_patches, num_prefix
        self.granularity = dict(zip(KINDS, granularity))
        for kind in KINDS:
            sizes = [1] + [len(candidate_counts(num_patches, self.granularity[kind]))] * (num_blocks - 1)
            setattr(self, kind, nn.ParameterList([nn.Parameter(torch.zeros(k)) for k in sizes]))

    @property
    def num_blocks(self) -> int:
        return len(self.prune)

    def logits(self, kind: str, layer: int) -> nn.Parameter:
        """The logits ``[K]`` of one block and kind."""
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        return getattr(self, kind)[layer]

    def candidates(self, kind: str, layer: int) -> torch.Tensor:
        """Candidate patch counts ``[K]`` of one block and kind, in the logits' dtype and device."""
        ref = self.logits(kind, layer)
        if layer == 0:
            return torch.full((1,), float(self.num_patches), dtype=ref.dtype, device=ref.device)
        return candidate_counts(self.num_patches, self.granularity[kind], dtype=ref.dtype, device=ref.device)

    def kept(self, kind: str, layer: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(kept, probs)`` of one block: kept count incl. prefix (integer value, straight-through gradient)."""
        with torch.autocast(self.logits(kind, layer).device.type, enabled=False):
            return kept_count(self.logits(kind, layer), self.candidates(kind, layer), self.num_prefix)

    def kept_counts(self) -> Dict[str, List[int]]:
        """The integer counts the logits choose now: ``{"prune": [...], "merge": [...]}``."""
        with torch.no_grad():
            return {kind: [int(round(float(self.kept(kind, l)[0]))) for l in range(self.num_blocks)]
                    for kind in KINDS}


@dataclass
class _SearchRun:
    """State of one rate-search (training) forward: the running keep mask and what the blocks chose."""

    mask: Optional[torch.Tensor] = None  # [B, N] keep policy in sorted order (carries gradient)
    cls_attn: Optional[torch.Tensor] = None  # [B, N] the current block's CLS row of the policy softmax
    kept: Dict[str, List[torch.Tensor]] = field(default_factory=lambda: {k: [] for k in KINDS})
    live: List[int] = field(default_factory=list)  # live tokens entering each block


# ---------------------------------------------------------------------------------------------------------------
def _check_counts(value: Any) -> Optional[str]:
    if value is None:
        return None
    if (isinstance(value, (list, tuple)) and value
            and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value)):
        return None
    return "must be a list of per-block kept token counts (ints >= 1, including CLS), or None"


def _check_rates(value: Any) -> Optional[str]:
    if value is None or isinstance(value, (str, os.PathLike)):
        return None
    return "must be a YAML path or a named config such as 'deit_small@2.9'"


def _check_granularity(value: Any) -> Optional[str]:
    def ok(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= 1
    if ok(value) or (isinstance(value, (list, tuple)) and len(value) == 2 and all(ok(v) for v in value)):
        return None
    return "must be an int >= 1 or [prune_granularity, merge_granularity]"


def _check_bool(value: Any) -> Optional[str]:
    return None if isinstance(value, bool) else f"must be True or False, got {value!r}"


@register_method
class DiffRate(ReductionMethod):
    name = "diffrate"
    site = Site.BLOCK_MID
    needs = frozenset({"cls_attn"})
    prunes = True
    summary = ("DiffRate: per block, prune by CLS attention then merge by similarity, with learned per-layer "
               "kept counts (released tables or a rate search)")
    params = {
        "prune_kept": Param(None, "kept tokens after pruning, per block, incl. CLS (upstream set_kept_num)",
                            _check_counts),
        "merge_kept": Param(None, "kept tokens after merging, per block, incl. CLS", _check_counts),
        "rates": Param(None, "a rate YAML file or a released table, e.g. 'deit_small@2.9' (configs/diffrate)",
                       _check_rates),
        "granularity": Param(1, "rate search: step between candidate kept counts (int, or [prune, merge])",
                             _check_granularity),
        "prop_attn": Param(True, "proportional attention: add log(size) to the attention logits", _check_bool),
    }

    def __init__(self, geometry: Geometry, **params: Any) -> None:
        super().__init__(geometry, **params)
        self.num_prefix = geometry.num_prefix
        if not geometry.has_class_token or self.num_prefix < 1:
            raise ValueError("diffrate ranks tokens by the attention of the CLS token; this model has no class "
                             "token (class_token=False)")
        prune, merge, rates = params.get("prune_kept"), params.get("merge_kept"), params.get("rates")
        self.table: Optional[RateTable] = None
        if rates is not None:
            if prune is not None or merge is not None:
                raise ValueError("diffrate: give either rates= or prune_kept/merge_kept, not both")
            self.table = load_rates(rates)
            prune, merge = self.table.prune_kept, self.table.merge_kept
        self.searching = prune is None and merge is None
        self.rates: Optional[RateLogits] = None
        self.prune_kept: List[int] = []
        self.merge_kept: List[int] = []
        if self.searching:
            if not geometry.num_patches:
                raise ValueError("diffrate rate search needs the model's patch count (fixed input size)")
            g = params.get("granularity", 1)
            self.rates = RateLogits(geometry.num_blocks, geometry.num_patches, self.num_prefix,
                                    (g, g) if isinstance(g, int) else tuple(g))
        else:
            # A missing list means no reduction of that kind (a count no block can reach).
            never = [2 ** 31 - 1] * geometry.num_blocks
            self.prune_kept = self._validated(prune, "prune_kept") if prune is not None else never
            self.merge_kept = self._validated(merge, "merge_kept") if merge is not None else never
        self._training = False
        self._run: Optional[_SearchRun] = None
        self._eval_counts: Optional[Tuple[List[int], List[int]]] = None

    def _validated(self, counts: Sequence[int], what: str) -> List[int]:
        counts = list(counts)
        if len(counts) != self.geometry.num_blocks:
            raise ValueError(f"diffrate: {what} has {len(counts)} entries but the model has "
                             f"{self.geometry.num_blocks} blocks (one count per block, including CLS)")
        low = [c for c in counts if c <= self.num_prefix]
        if low:
            raise ValueError(f"diffrate: {what} must keep more than the {self.num_prefix} prefix token(s) in every "
                             f"block, got {counts}")
        return counts

    # -----------------------------------------------------------------------------------------------------------
    def attention_probs(self, layer: int, training: bool) -> Optional[Callable[[torch.Tensor], torch.Tensor]]:
        # The adapter calls this before every block's reduction site: it also tells reduce() which path to take.
        self._training = training and self.searching
        if not self._training:
            return None
        if layer == 0 or self._run is None:
            self._run = _SearchRun()
        run = self._run

        def probs(logits: torch.Tensor) -> torch.Tensor:
            if run.mask is None:
                run.mask = logits.new_ones(logits.shape[0], logits.shape[-1],
                                           dtype=torch.promote_types(logits.dtype, torch.float32))
            p = softmax_with_policy(logits, run.mask)
            run.cls_attn = p[:, :, 0].detach().mean(dim=1)
            return p

        return probs

    def reduce(self, state: TokenState) -> TokenState:
        if self._training:
            return self._reduce_search(state)
        if self.searching:
            if state.layer == 0 or self._eval_counts is None:
                counts = self.rates.kept_counts()
                self._eval_counts = (counts["prune"], counts["merge"])
            prune, merge = self._eval_counts
        else:
            prune, merge = self.prune_kept, self.merge_kept
        return self._reduce_fixed(state, prune[state.layer], merge[state.layer])

    def _reduce_fixed(self, state: TokenState, prune: int, merge: int) -> TokenState:
        """Inference: sort, keep the first ``prune``, merge everything beyond ``merge`` into the first ``merge``."""
        order = sort_by_importance(state.cls_attn, self.num_prefix)
        x, size, source = permute_tokens(order, state.x, state.size, state.source)
        if prune < x.shape[1]:
            x, size = x[:, :prune], size[:, :prune]
            source = source[:, :prune] if source is not None else None
        if merge < x.shape[1]:
            x, size, source = similarity_merge(x, size, source, merge, self.num_prefix)
        out = state.replace(x=x, size=size, source=source)
        out.extras["kept"] = order[:, :x.shape[1]]
        return out

    def _reduce_search(self, state: TokenState) -> TokenState:
        """Rate search (upstream's training forward): mask instead of removing, with gradients into the logits."""
        run, layer = self._run, state.layer
        if run is None or run.cls_attn is None:
            raise RuntimeError("diffrate rate search needs an adapter that runs attention_probs() before the "
                               "reduction site")
        mask = run.mask if run.mask is not None else state.x.new_ones(state.x.shape[:2])
        order = sort_by_importance(run.cls_attn, self.num_prefix)
        x, size, mask, source = permute_tokens(order, state.x, state.size, mask, state.source)
        n = x.shape[1]
        live = int(round(float(mask[0].detach().sum())))  # upstream: live tokens of sample 0
        prune, prune_probs = self.rates.kept("prune", layer)
        merge, merge_probs = self.rates.kept("merge", layer)
        prune_n, merge_n = int(round(float(prune.detach()))), int(round(float(merge.detach())))
        if prune_n < live:
            pi = keep_probability(prune_probs, self.rates.candidates("prune", layer), n, self.num_prefix)
            mask = mask * soft_keep_mask(pi, prune_n, live).to(mask.dtype)
        mid = min(live, prune_n)
        if merge_n < mid:
            x, size = masked_merge(x, size, merge_n, mid, self.num_prefix)
            pi = keep_probability(merge_probs, self.rates.candidates("merge", layer), n, self.num_prefix)
            mask = mask * soft_keep_mask(pi, merge_n, mid).to(mask.dtype)
        run.mask, run.cls_attn = mask, None
        run.kept["prune"].append(prune)
        run.kept["merge"].append(merge)
        run.live.append(live)
        return state.replace(x=x, size=size, source=source)

    # -----------------------------------------------------------------------------------------------------------
    def last_search(self) -> _SearchRun:
        """What the last rate-search (training) forward chose: kept-count tensors per block, live tokens."""
        if self._run is None or len(self._run.live) != self.geometry.num_blocks:
            raise RuntimeError("no complete rate-search forward yet: call the model in train() mode first")
        return self._run

    def kept_counts(self) -> Dict[str, List[int]]:
        """The per-block counts in use (fixed) or chosen by the logits now (search)."""
        if self.searching:
            return self.rates.kept_counts()
        return {"prune": list(self.prune_kept), "merge": list(self.merge_kept)}
