"""What the adapters of the LLaVA family share (LLaVA-1.5, LLaVA-NeXT, LLaVA-OneVision in transformers >= 5.18): a
vision tower (CLIP or SigLIP) whose features at ``vision_feature_layer`` go through a projector into a Llama-style
language model, with each visual input's placeholder tokens in the prompt.

Which shared VLM piece runs depends only on the method's site:

- ``BLOCK_MID`` / ``BLOCK_OUT`` (ToMe, PiToMe, ...): inside the tower's encoder layers through the shared
  :class:`~tokenreduce.backbones.layer_host.LayerHost`, over the layers that feed the features.
- ``TOWER_OUT`` (VisionZip, ...): at the feature layer, before the projector
  (:class:`~tokenreduce.backbones.vlm.tower.TowerSite`).
- ``LLM_LAYER`` (DART, FastV, ...): inside the language model at prefill
  (:class:`~tokenreduce.backbones.vlm.decoder.DecoderSite`), over every visual placeholder token.

Vision methods change how many features come back, so ``forward`` and ``generate`` shrink each visual input's run of
placeholder tokens to match (:mod:`tokenreduce.backbones.vlm.shrink`). A family member says what differs: the model
class, its visual inputs (images; OneVision's videos), how many tower rows each input is encoded as (anyres crops)
and how reduced rows are packed (:mod:`tokenreduce.backbones.llava.anyres`). Nothing enters the ``state_dict``; no
class is rebound; ``unpatch`` restores exactly what the Patcher recorded.
"""
from __future__ import annotations

import inspect
from typing import Any, ClassVar, Dict, FrozenSet, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from ...core import Geometry, Need, ReductionInfo, ReductionMethod, Site, Status
from ...core.requirements import VISION_BLOCK_NEEDS
from ..hf_clip import HFEncoderFamily, check_additive_mask, check_encoder_layers, tower_cost
from ..layer_host import LayerHost
from ..macs import linear_macs
from ..patcher import Original, Patcher, Replacement
from ..vlm.decoder import DECODER_NEEDS, DecoderSite
from ..vlm.adapter import VlmAdapter
from ..vlm.labels import PrunedLabels
from ..vlm.shrink import Modality, PromptShrink, ShrinkingForward, VlmGenerate
from ..vlm.tower import TOWER_NEEDS, TowerSite, feature_layer_index
from .anyres import crop_grid, pack_reduced

try:  # transformers is an optional dependency (the ``vlm`` extra)
    from transformers.models.clip.modeling_clip import CLIPAttention, CLIPEncoderLayer, CLIPVisionModel
    from transformers.models.siglip.modeling_siglip import SiglipAttention, SiglipEncoderLayer, SiglipVisionModel
except ImportError:  # pragma: no cover
    CLIPAttention = CLIPEncoderLayer = CLIPVisionModel = None  # type: ignore
    SiglipAttention = SiglipEncoderLayer = SiglipVisionModel = None  # type: ignore

VISION_SITES = frozenset({Site.BLOCK_MID, Site.BLOCK_OUT, Site.TOWER_OUT})
_UNSET = object()
CLS_NEEDS = frozenset({Need.CLS_ATTN, Need.CLS_ATTN_PER_HEAD})


class TowerKind(NamedTuple):
    """A vision tower class the family's adapters run methods in."""

    name: str
    model: type
    layer: type
    attention: type
    num_prefix: int  # tokens before the patches in the encoder's hidden states (CLS)


def tower_kinds() -> Tuple[TowerKind, ...]:
    if CLIPVisionModel is None:  # pragma: no cover
        return ()
    return (TowerKind("CLIP", CLIPVisionModel, CLIPEncoderLayer, CLIPAttention, 1),
            TowerKind("SigLIP", SiglipVisionModel, SiglipEncoderLayer, SiglipAttention, 0))


def tower_kind(vision: nn.Module) -> Optional[TowerKind]:
    """The kind of ``vision`` (exact classes: a subclass may change what the layers compute), or None."""
    return next((k for k in tower_kinds() if type(vision) is k.model), None)


# ---------------------------------------------------------------------------------------------------------------
# Replacements and hooks (picklable classes)
# ---------------------------------------------------------------------------------------------------------------
class FeaturesWindow(Replacement):
    """``get_image_features`` (or ``get_video_features``) of a patched model: the call's layout is read, then a
    fresh record is opened around the tower pass (the window in which the tower site acts)."""

    def __init__(self, adapter: "LlavaFamilyAdapter", original: Original, modality: str = "image") -> None:
        self.adapter, self.original, self.modality = adapter, original, modality
        self.signature = original.__signature__

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        try:
            arguments = dict(self.signature.bind(*args, **kwargs).arguments)
        except TypeError:  # the original raises its own error
            return self.original(*args, **kwargs)
        for name, value in list(arguments.items()):  # keyword arguments collected by **kwargs
            if self.signature.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
                arguments.update(arguments.pop(name))
        adapter = self.adapter
        adapter.check_feature_layer(arguments.get("vision_feature_layer"))
        rec = adapter.begin_forward()
        rows = adapter.rows_of(self.modality, arguments)
        previous = adapter.__dict__.get("rows_per_image", _UNSET)
        if rows is not None:  # this call's tower rows per input; else whatever the adapter holds stays
            adapter.rows_per_image = rows
        try:
            out = self.original(*args, **kwargs)
        except BaseException as error:
            rec.fail(error)
            raise
        finally:
            if rows is not None:
                if previous is _UNSET:
                    adapter.__dict__.pop("rows_per_image", None)
                else:
                    adapter.rows_per_image = previous
        rec.status = Status.DONE
        return out


class PromptBegin:
    """Forward pre-hook (with kwargs) on the inner model: a fresh record with the prompt's visual-token mask (every
    placeholder token of the adapter's visual inputs), for methods inside the language model (picklable)."""

    def __init__(self, adapter: "LlavaFamilyAdapter") -> None:
        self.adapter = adapter

    def __call__(self, module: nn.Module, args: Any, kwargs: Dict[str, Any]) -> None:
        rec = self.adapter.begin_forward()
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")
        ids = self.adapter.visual_token_ids
        if input_ids is not None:
            mask = input_ids == ids[0]
            for other in ids[1:]:
                mask = mask | (input_ids == other)
            rec.image_mask = mask
        elif embeds is not None:
            mask = None
            for i in ids:
                token = module.get_input_embeddings()(torch.tensor(i, device=embeds.device))
                hit = (embeds == token).all(-1)
                mask = hit if mask is None else mask | hit
            rec.image_mask = mask


class ReducedPacking(Replacement):
    """``pack_image_features`` of a patched anyres model (LLaVA-NeXT, LLaVA-OneVision): when the tower rows came back
    reduced, each image is packed by :func:`~tokenreduce.backbones.llava.anyres.pack_reduced` (base image, then the
    crops' tokens in grid order, no newline inside a multi-row image); unreduced rows go to the model's own
    packing."""

    def __init__(self, adapter: "LlavaFamilyAdapter", original: Original) -> None:
        self.adapter, self.original = adapter, original
        self.signature = original.__signature__

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        a = self.signature.bind(*args, **kwargs).arguments
        features, sizes = a["image_features"], a["image_sizes"]
        rows = [int(f.shape[0]) for f in features]
        tokens = int(features[0].shape[1])
        adapter = self.adapter
        kept, size, reduced = adapter.tower_selection(sum(rows), tokens)
        if not reduced:
            return self.original(*args, **kwargs)
        newline = a.get("image_newline")
        cfg = adapter.cfg
        packed, start = [], 0
        for feature, n, image_size in zip(features, rows, sizes):
            part = slice(start, start + n)
            start += n
            grid = crop_grid(image_size, cfg.image_grid_pinpoints, cfg.vision_config.image_size) if n > 1 else None
            packed.append(pack_reduced(feature, newline, None if kept is None else kept[part],
                                       None if size is None else size[part], adapter.num_prefix, adapter.patch_grid,
                                       grid))
        lens = torch.tensor([p.shape[0] for p in packed], dtype=torch.long, device=features[0].device)
        return packed, lens


# ---------------------------------------------------------------------------------------------------------------
# The shared adapter
# ---------------------------------------------------------------------------------------------------------------
class LlavaFamilyAdapter(VlmAdapter):
    """Base of the LLaVA-family adapters. A subclass sets ``name`` and ``model_class`` and overrides the hooks below
    where its model differs from LLaVA-1.5 (one image, one tower row per image, features scattered as they are)."""

    provides = {Site.BLOCK_MID: VISION_BLOCK_NEEDS, Site.BLOCK_OUT: VISION_BLOCK_NEEDS, Site.TOWER_OUT: TOWER_NEEDS,
                Site.LLM_LAYER: DECODER_NEEDS}
    #: per visual input: the inner model's method that encodes it (the window the tower site acts in)
    feature_functions: ClassVar[Dict[str, str]] = {"image": "get_image_features"}
    #: the ``forward`` / ``generate`` arguments the image encoder takes
    image_kwargs: ClassVar[Tuple[str, ...]] = ("vision_feature_layer", "vision_feature_select_strategy",
                                               "image_sizes")
    #: whether a reduced input may need more placeholder tokens than the processor wrote (anyres rows kept whole
    #: where the processor counts the unpadded grid): the prompt's runs then also lengthen
    grow_runs: ClassVar[bool] = False

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.cfg = model.config
        self.image_token_id = int(self.cfg.image_token_id)
        self.vision = model.model.vision_tower
        self.lm = model.model.language_model
        self.kind = tower_kind(self.vision)
        #: tokens before the patches at the feature layer (CLS); SigLIP has none
        self.num_prefix = self.kind.num_prefix if self.kind is not None else 1
        vfl = self.cfg.vision_feature_layer
        self.feature_layer: Optional[int] = None
        if isinstance(vfl, int) and self.kind is not None:
            self.feature_layer = feature_layer_index(vfl, len(self.vision.encoder.layers))
        self.host: Optional[LayerHost] = None
        self.tower: Optional[TowerSite] = None
        self.decoder = DecoderSite(self, self.lm)
        #: tower rows per visual input of the current tower call (crops, frames), read by the tower site
        self.rows_per_image: Optional[List[int]] = None

    # -- what differs per family member (hooks) ----------------------------------------------------------------
    @property
    def visual_token_ids(self) -> Tuple[int, ...]:
        """The placeholder tokens of every visual input (the LLM site's ``image_mask``)."""
        return (self.image_token_id,)

    def rows_of(self, modality: str, arguments: Dict[str, Any]) -> Optional[List[int]]:
        """Tower rows per visual input of one encoder call (``arguments`` bound by name), or None for one row
        each."""
        return None

    def extra_modalities(self, inner: nn.Module) -> Sequence[Modality]:
        """Visual inputs besides the images whose placeholder runs the patched forward shrinks."""
        return ()

    def install_layout(self, patcher: Patcher, inner: nn.Module) -> None:
        """Install what packs reduced tower rows into each input's visual tokens (nothing for LLaVA-1.5)."""

    def check_vision_method(self, method: ReductionMethod) -> None:
        """Refuse a vision-side method this family member cannot lay out (ValueError)."""

    # -- geometry ----------------------------------------------------------------------------------------------
    @property
    def patch_grid(self) -> Tuple[int, int]:
        vc = self.vision.config
        side = int(vc.image_size) // int(vc.patch_size)
        return side, side

    def geometry(self, site: Site) -> Geometry:
        if site == Site.LLM_LAYER:
            tc = self.lm.config
            return Geometry(num_blocks=len(self.lm.layers), num_prefix=0, num_patches=None,
                            dim=int(tc.hidden_size), num_heads=int(tc.num_attention_heads), has_class_token=False)
        self.check_vision(site)
        vc = self.vision.config
        n = int(self.vision.embeddings.num_patches)
        return Geometry(num_blocks=self.feature_layer + 1, num_prefix=self.num_prefix, num_patches=n,
                        dim=int(vc.hidden_size), num_heads=int(vc.num_attention_heads),
                        has_class_token=self.num_prefix > 0, grid=self.patch_grid,
                        cost=tower_cost(self.vision, self._vision_host()))

    def _vision_host(self) -> LayerHost:
        if self.host is None:
            self.host = LayerHost(self, HFEncoderFamily(), self.vision.encoder.layers, num_prefix=self.num_prefix,
                                  num_sites=self.feature_layer + 1)
        return self.host

    # -- checks ------------------------------------------------------------------------------------------------
    def check_vision(self, site: Site) -> None:
        kind = self.kind
        if kind is None:
            names = " or ".join(f"{k.model.__name__}" for k in tower_kinds())
            raise ValueError(f"methods at '{site.value}' run in the vision tower, and tokenreduce supports "
                             f"{type(self.model).__name__}'s tower when it is transformers' {names}; this one is "
                             f"{type(self.vision).__name__}")
        check_encoder_layers(self.vision.encoder.layers, (kind.layer,), (kind.attention,), kind.name)
        if not isinstance(self.cfg.vision_feature_layer, int):
            raise ValueError(f"methods at '{site.value}' need a single vision_feature_layer; this model concatenates "
                             f"layers {self.cfg.vision_feature_layer}")
        if self.feature_layer < 0:
            raise ValueError(f"vision_feature_layer={self.cfg.vision_feature_layer} selects the patch embeddings; "
                             "a vision method needs at least one encoder layer before the features")

    def check_feature_layer(self, vision_feature_layer: Any) -> None:
        """A call may name its own feature layer; the patch was resolved for the config's."""
        if vision_feature_layer is None or vision_feature_layer == self.cfg.vision_feature_layer:
            return
        if (isinstance(vision_feature_layer, int) and self.kind is not None and
                feature_layer_index(vision_feature_layer, len(self.vision.encoder.layers)) == self.feature_layer):
            return
        raise ValueError(f"the model was patched for vision_feature_layer={self.cfg.vision_feature_layer}; "
                         f"re-patch after changing config.vision_feature_layer instead of passing "
                         f"vision_feature_layer={vision_feature_layer!r}")

    def check_method(self, method: ReductionMethod) -> None:
        if method.site == Site.LLM_LAYER:
            self.decoder.check(method)
            return
        check_additive_mask(self.vision, method)
        if self.num_prefix == 0:
            if needs_of(method, self.feature_layer + 1) & CLS_NEEDS:
                raise ValueError(f"{method.name} (as configured) ranks tokens by the CLS token's attention, and this "
                                 f"model's {self.kind.name} vision tower has no CLS token")
        self.check_vision_method(method)

    # -- install -----------------------------------------------------------------------------------------------
    def install(self, method: ReductionMethod, options: Dict[str, Any]) -> None:
        self.method, self.options = method, dict(options)
        patcher, inner = self.patcher, self.model.model
        if method.site in VISION_SITES:
            if method.site == Site.TOWER_OUT:
                self.tower = TowerSite(self, HFEncoderFamily(), self.vision.encoder.layers, self.feature_layer,
                                       self.num_prefix, inner.multi_modal_projector, self.patch_grid)
                self.tower.install(patcher, method)
            else:
                self._vision_host().install(patcher, method, bool(options.get("trace_source", False)))
            for modality, fn in self.feature_functions.items():
                patcher.set_attr(inner, fn, FeaturesWindow(self, patcher.original(inner, fn), modality))
            self.install_layout(patcher, inner)
            shrink = PromptShrink(self.model, self.image_token_id, inner.get_image_features,
                                  vision_kwargs=self.image_kwargs, modalities=self.extra_modalities(inner),
                                  grow=self.grow_runs)
            patcher.set_attr(self.model, "forward", ShrinkingForward(shrink, patcher.original(self.model, "forward")))
        else:
            shrink = None
            patcher.hook(inner.register_forward_pre_hook(PromptBegin(self), with_kwargs=True))
            self.decoder.install(patcher, method)
            patcher.set_attr(self.model, "forward", PrunedLabels(self, patcher.original(self.model, "forward")))
        patcher.set_attr(self.model, "generate", VlmGenerate(shrink, patcher.original(self.model, "generate")))

    # -- the tower's result, for packing -----------------------------------------------------------------------
    def tower_selection(self, num_rows: int, tokens: int) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor],
                                                                   bool]:
        """What the last tower pass did to its ``num_rows`` rows of ``tokens`` tokens each: ``(kept, size,
        reduced)``. ``kept`` / ``size`` are ``[num_rows, tokens]`` (index of each token at the tower-output site,
        prefix counted; patches each stands for) for a ``TOWER_OUT`` method that says which tokens it kept, else
        None; ``reduced`` is False when every row still holds its patches whole and in order (the model's own
        packing then applies)."""
        rec, method = self.record, self.method
        kept = size = None
        if rec is not None and method is not None and method.site == Site.TOWER_OUT:
            kept = rec.kept.get(self.feature_layer)
            size = rec.size
            if kept is not None and tuple(kept.shape) != (num_rows, tokens):
                kept = None
            if size is not None and tuple(size.shape[:2]) != (num_rows, tokens):
                size = None
        patches = self.patch_grid[0] * self.patch_grid[1]
        if tokens != patches:
            return kept, size, True
        if kept is None:
            # No index says otherwise: a full set of patches is the unreduced grid (a pool to the full grid, or a
            # host method that merged nothing).
            return None, size, False
        first = self.num_prefix if bool((kept[:, 0] >= self.num_prefix).all()) else 0
        identity = torch.arange(first, first + tokens, device=kept.device).expand_as(kept)
        return kept, size, not bool((kept == identity).all())

    # -- info --------------------------------------------------------------------------------------------------
    def info(self) -> ReductionInfo:
        method = self.method
        if method.site == Site.LLM_LAYER:
            return self._llm_info()
        rec = self.finished_record()
        cost = tower_cost(self.vision, self._vision_host())
        if method.site == Site.TOWER_OUT:  # the tower runs whole; the method acts on its output
            n = rec.layers[-1].tokens_in
            info = self.vision_info(cost.macs([(n, n)] * (self.feature_layer + 1)))
            info.tokens_per_layer = [n] * (self.feature_layer + 1)
            return info
        return self.vision_info(cost.macs([(l.tokens_in, l.tokens_mid) for l in rec.layers]))

    def _llm_info(self) -> ReductionInfo:
        rec = self.record
        if rec is not None and rec.status == Status.FAILED:
            raise RuntimeError(f"the last forward raised {rec.error}; info() describes only a completed forward")
        p = rec.decoder if rec is not None else None
        if p is None or not p.tokens:
            raise RuntimeError("no forward has run through the language model since the model was patched: call "
                               "the model first")
        first = p.tokens[0][0]
        tokens = [p.query_len] * first + [n for _, n in p.tokens]
        layers = list(self.lm.layers)
        attn_dim = int(self.lm.config.num_attention_heads) * int(layers[0].self_attn.head_dim)
        # Language-model MACs of this forward: linear layers plus QKᵀ and PV against its own tokens (cached keys of
        # earlier forwards are not counted).
        macs = sum(n * linear_macs(layers[i]) + 2 * n * n * attn_dim for i, n in enumerate(tokens))
        valid = p.valid if p.pruned else None
        return ReductionInfo(size=torch.ones(p.chunk_valid.shape[0], tokens[-1]), source=None,
                             tokens_per_layer=tokens, macs=int(macs), kept=dict(rec.kept), valid=valid,
                             tokens_per_sample=valid.sum(dim=1) if valid is not None else None,
                             method_state=rec.carry)


def needs_of(method: ReductionMethod, num_layers: int) -> FrozenSet[str]:
    """Everything ``method`` reads at its first ``num_layers`` sites, in inference and training."""
    return frozenset().union(*(method.needs_at(i, t) for i in range(num_layers) for t in (False, True)))
