"""Every call the vLLM plugin makes into tokenreduce, in one place (a change of the core API is an edit here only).

The vLLM-facing code (:mod:`.llava`) knows nothing of methods. It asks this module for a :class:`Plan` — what a
``{"method": ..., **params}`` spec does to a vision tower of a given shape, and how many tokens per image the language
model will receive — and then for a :class:`TowerReducer` that runs the plan in the tower's layers. The layers run
through tokenreduce's own :class:`~tokenreduce.backbones.layer_host.LayerHost` (the loop the timm and Hugging Face
CLIP adapters use) with a small :class:`LayerFamily` that says how vLLM's CLIP layer is built, so every token that
is selected or merged is selected or merged by tokenreduce's method code.

Nothing here imports vLLM.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
from dataclasses import dataclass
from typing import Any, Dict, FrozenSet, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from tokenreduce.api import build_method
from tokenreduce.backbones.hf_clip import HFEncoderFamily
from tokenreduce.backbones.layer_host import LayerFamily, LayerHost, analysis, apply_result
from tokenreduce.backbones.patcher import Patcher
from tokenreduce.backbones.llava import LlavaAdapter
from tokenreduce.backbones.vlm.tower import TowerSite
from tokenreduce.core import (ATTENTION_NEEDS, ForwardRecord, Geometry, Need, ReductionMethod, Site, TokenState,
                              all_needs, candidate_sites, get_method, list_methods, resolve_params)
from tokenreduce.core.requirements import need_names

__all__ = ["HFEncoderFamily", "LayerFamily", "Plan", "Tower", "TowerReducer", "Unsupported", "make_plan", "parse_spec",
           "servable_methods"]

#: What the plugin offers per vision site: exactly what tokenreduce's Hugging Face LLaVA adapter offers there (so
#: every servable spec has an HF reference), less the prompt's instruction text, which vLLM's encoder never sees (it
#: encodes each image once and caches it across requests). ``LLM_LAYER`` methods are refused.
PROVIDES: Dict[Site, FrozenSet[str]] = {
    site: need_names(needs) - {Need.INSTRUCTION.value}
    for site, needs in LlavaAdapter.provides.items() if site != Site.LLM_LAYER}
TOWER_SITES = frozenset(PROVIDES)


class Unsupported(ValueError):
    """A method or option vLLM cannot serve, with the reason and what to do instead."""


@dataclass(frozen=True)
class Tower:
    """The vision tower as the plugin sees it (vLLM truncates it at the feature layer: every layer is used).

    Attributes:
        num_layers: encoder layers that run (the feature layer is the last).
        num_patches: patch tokens per image; one CLS token comes first.
        dim: hidden width. num_heads: attention heads (all tensor-parallel ranks together).
        drops_cls: whether LLaVA's feature selection drops the CLS token after the tower (strategy ``"default"``).
    """

    num_layers: int
    num_patches: int
    dim: int
    num_heads: int
    drops_cls: bool

    @property
    def num_tokens(self) -> int:
        return self.num_patches + 1

    def geometry(self) -> Geometry:
        side = int(round(self.num_patches ** 0.5))
        grid = (side, side) if side * side == self.num_patches else None
        return Geometry(num_blocks=self.num_layers, num_prefix=1, num_patches=self.num_patches, dim=self.dim,
                        num_heads=self.num_heads, has_class_token=True, grid=grid)


@dataclass
class Plan:
    """One method on one tower, resolved once per engine.

    Attributes:
        name: the method's registered name. params: its parameters as given (validated).
        tower: the tower it was resolved for. method: the configured method (stateless between forwards).
        at_output: a ``TOWER_OUT`` method, whose tokens (CLS included) replace LLaVA's feature selection; otherwise
            the method acts inside the encoder layers and LLaVA's selection runs on the fewer tokens.
        tokens_per_image: embeddings the language model gets per image, i.e. the placeholder count.
    """

    name: str
    params: Dict[str, Any]
    tower: Tower
    method: ReductionMethod
    at_output: bool
    tokens_per_image: int = 0

    def describe(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params.items())
        return f"{self.name}({args}): {self.tower.num_patches} image tokens -> {self.tokens_per_image} per image"


# ---------------------------------------------------------------------------------------------------------------
# Resolving a spec
# ---------------------------------------------------------------------------------------------------------------
def parse_spec(spec: Any) -> Tuple[str, Dict[str, Any]]:
    """``{"method": name, **params}`` (a mapping, or its JSON text) -> ``(name, params)``; ValueError otherwise."""
    if isinstance(spec, str):
        try:
            spec = json.loads(spec)
        except json.JSONDecodeError as e:
            raise ValueError(f"hf_overrides['tokenreduce'] is not valid JSON ({e}): {spec!r}") from None
    if not isinstance(spec, dict) or not isinstance(spec.get("method"), str):
        raise ValueError("hf_overrides['tokenreduce'] must be a mapping with a 'method' name and the method's "
                         "parameters, e.g. {\"method\": \"visionzip\", \"dominant\": 54, \"contextual\": 10}; got "
                         f"{spec!r}")
    return spec["method"], {k: v for k, v in spec.items() if k != "method"}


def make_plan(spec: Any, tower: Tower) -> Plan:
    """Validate a spec against tokenreduce and the tower, and work out the tokens per image it leaves.

    Raises:
        ValueError: unknown method (the message lists the registered ones), invalid parameter value, or a budget
            the tower cannot give. TypeError: unknown parameter.
        Unsupported: a method vLLM cannot serve (it acts inside the language model, or the number of tokens it
            keeps depends on the image), or an option that has no meaning in vLLM.
    """
    name, given = parse_spec(spec)
    cls = get_method(name)
    resolved = resolve_params(name, given)
    sites = candidate_sites(cls, resolved)  # in order of preference; a method's site may depend on the model
    if all(site == Site.LLM_LAYER for site in sites):
        raise Unsupported(
            f"{name} acts inside the language model ({Site.LLM_LAYER.value}); vLLM fixes each image's placeholder "
            "count before the encoder runs and keeps every prompt token in its paged KV cache, so there is no site "
            f"for it. Serve a method that acts in the vision tower ({', '.join(servable_methods())}), or run {name} "
            "with tokenreduce.patch on a Hugging Face model")
    if resolved.get("trace_source"):
        raise Unsupported("trace_source records merges for tokenreduce.info(), which a vLLM engine does not offer; "
                          "drop it from hf_overrides['tokenreduce']")
    offered = [site for site in sites if site in PROVIDES]
    if not offered:
        raise Unsupported(f"{name} acts at {', '.join(repr(s.value) for s in sites)}, which LLaVA's vision tower "
                          f"does not offer (it offers {', '.join(sorted(s.value for s in PROVIDES))})")
    site = offered[0]  # as tokenreduce.patch picks it on the Hugging Face model
    # raises for a budget the tower cannot give
    method = build_method(name, dataclasses.replace(tower.geometry(), site=site), **given)
    missing = all_needs(method, tower.num_layers) - PROVIDES[site]
    if missing:
        why = ""
        if Need.INSTRUCTION.value in missing:
            why = " (the prompt's text: vLLM encodes each image once, without its prompt, and caches the result)"
        elif Need.VALID.value in missing:
            why = (" (it keeps a different number of tokens per image, and vLLM needs one fixed placeholder count "
                   "per image)")
        raise Unsupported(f"{name} (as configured) reads {sorted(missing)}, which the plugin cannot provide at "
                          f"'{site.value}'{why}")
    plan = Plan(name, dict(given), tower, method, at_output=method.site == Site.TOWER_OUT)
    out = output_tokens(plan)
    plan.tokens_per_image = out - (1 if tower.drops_cls and not plan.at_output else 0)
    if plan.tokens_per_image < 1:
        raise ValueError(f"{plan.describe()}: no image token would be left")
    return plan


def output_tokens(plan: Plan) -> int:
    """Tokens leaving the tower per image (CLS included), known before any image is seen.

    A ``TOWER_OUT`` method declares its count (``num_output``; None means it depends on the image, which vLLM cannot
    serve). For a method acting inside the encoder layers, whose count no declaration gives yet, the count is
    measured: the method's own ``reduce`` runs through the tower's sites on two random token states, and if they
    disagree the count depends on the image and the method is refused. Every encoder forward checks the real count.
    """
    n = plan.tower.num_tokens
    if plan.at_output:
        count = plan.method.num_output(n)
        if count is None:
            raise Unsupported(f"{plan.name} keeps a number of tokens that depends on the image (its num_output is "
                              "None), and vLLM must know each image's placeholder count before the encoder runs")
        return int(count)
    counts = set()
    for seed in (0, 1):
        n_out, per_sample = _probe(plan, seed)
        if per_sample:
            raise Unsupported(f"{plan.name} keeps a different number of tokens per image (it pads and marks the "
                              "valid ones), and vLLM needs one fixed placeholder count per image")
        counts.add(n_out)
    if len(counts) != 1:
        raise Unsupported(
            f"{plan.name} keeps a number of tokens that depends on the image ({sorted(counts)} on two random "
            "inputs), and vLLM must know each image's placeholder count before the encoder runs; give it a fixed "
            "budget, or use a method with one")
    return counts.pop()


def _probe(plan: Plan, seed: int) -> Tuple[int, bool]:
    """Tokens after the tower when every site sees random hidden states and queries/keys/values (no weights), and
    whether the method marked some of them invalid (a per-sample count padded to the batch's largest)."""
    g = torch.Generator().manual_seed(seed)
    t, method = plan.tower, plan.method
    rec = ForwardRecord(carry=method.begin(False))
    # Sources are traced from the first layer on when any layer reads them (as the layer host does).
    trace = any(Need.SOURCE.value in need_names(method.needs_at(i, False)) for i in range(t.num_layers))
    x = torch.randn(1, t.num_tokens, t.dim, generator=g)
    for layer in range(t.num_layers):
        if not method.acts_at(layer):
            continue
        n, d = x.shape[1], t.dim // t.num_heads
        q, k, v = (torch.randn(1, t.num_heads, n, d, generator=g) for _ in range(3))
        x = _reduce(rec, method, x, layer, q, k, v, d ** -0.5, None, trace)
    return int(x.shape[1]), rec.valid is not None and not bool(rec.valid.all())


def _reduce(rec: ForwardRecord, method: ReductionMethod, x: torch.Tensor, layer: int, q: Optional[torch.Tensor],
            k: Optional[torch.Tensor], v: Optional[torch.Tensor], scale: float,
            bias: Optional[torch.Tensor], trace: bool = False) -> torch.Tensor:
    """One site, as the layer host runs it: ``x [B, N, C]``, ``q/k/v [B, H, N, d]`` -> ``[B, N', C]``."""
    needs = need_names(method.needs_at(layer, False))
    found = analysis(needs, q, k, v, scale, bias) if needs & ATTENTION_NEEDS else {}
    state = TokenState(x=x, size=rec.ensure_size(x), source=rec.ensure_source(x) if trace else None, num_prefix=1,
                       layer=layer, valid=rec.valid, carry=rec.carry, **found)
    return apply_result(rec, method, state, method.reduce(state))


def servable_methods() -> List[str]:
    """Registered methods that act in a vision tower (whether a budget is servable is :func:`make_plan`'s call)."""
    out = []
    for m in list_methods():
        try:
            sites = candidate_sites(get_method(m), resolve_params(m, {}))  # at the method's defaults
        except (TypeError, ValueError):
            continue
        if any(s in TOWER_SITES for s in sites):
            out.append(m)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Running a plan in a tower
# ---------------------------------------------------------------------------------------------------------------
class TowerReducer:
    """Runs a plan in a tower: the ``owner`` that tokenreduce's :class:`LayerHost` (methods inside the layers) or
    :class:`TowerSite` (methods at the feature layer's output) reads ``method`` and ``record`` from.

    Args:
        plan: from :func:`make_plan`.
        family: how the tower's layers are built (the vLLM side provides it).
        layers: the tower's encoder layers, all of which run (the last is the feature layer).
        projector: the module the features go through next; a ``TOWER_OUT`` method's tokens replace its input.
    """

    instructions = None  # TowerSite reads it; vLLM's encoder has no prompt text (INSTRUCTION is refused)

    def __init__(self, plan: Plan, family: LayerFamily, layers: Sequence[nn.Module], projector: nn.Module) -> None:
        if len(layers) != plan.tower.num_layers:
            raise RuntimeError(f"the tower has {len(layers)} layers, the plan was made for {plan.tower.num_layers}")
        self.plan, self.method = plan, plan.method
        self.record: Optional[ForwardRecord] = None
        self.patcher = Patcher()
        if plan.at_output:
            self.site = TowerSite(self, family, list(layers), len(layers) - 1, 1, projector, plan.tower.geometry().grid)
            self.site.install(self.patcher, self.method)
        else:
            self.host = LayerHost(self, family, list(layers), num_prefix=1)
            self.host.install(self.patcher, self.method, trace_source=False)

    def begin_forward(self) -> ForwardRecord:
        self.record = ForwardRecord(carry=self.method.begin(False))
        return self.record

    @contextlib.contextmanager
    def forward(self) -> Iterator[None]:
        """Around one image batch, tower and projector: a fresh record, checked and dropped afterwards."""
        rec = self.begin_forward()
        try:
            yield
            if rec.valid is not None and not bool(rec.valid.all()):
                raise RuntimeError(f"{self.plan.name} kept a different number of tokens per image in this batch; "
                                   "vLLM needs the fixed count the plan promised (please report this with the spec)")
        finally:
            self.record = None

    def uninstall(self) -> None:
        self.patcher.restore()
