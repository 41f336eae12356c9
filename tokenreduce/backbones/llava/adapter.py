"""Adapter for Hugging Face ``LlavaForConditionalGeneration`` (transformers >= 5): LLaVA-1.5 and models built like it.

It wires the shared VLM pieces to LLaVA's modules; which one runs depends only on the method's site:

- ``BLOCK_MID`` / ``BLOCK_OUT`` (ToMe, PiToMe, ...): inside the CLIP tower's encoder layers through the shared
  :class:`~tokenreduce.backbones.layer_host.LayerHost`, over the layers that feed LLaVA's features
  (``vision_feature_layer``; 23 of 24 for LLaVA-1.5). LLaVA's feature selection and projector then run unchanged on
  the fewer tokens.
- ``TOWER_OUT`` (VisionZip, ...): at the feature layer, before the projector
  (:class:`~tokenreduce.backbones.vlm.tower.TowerSite`).
- ``LLM_LAYER`` (DART, FastV, ...): inside the language model at prefill
  (:class:`~tokenreduce.backbones.vlm.decoder.DecoderSite`).

Vision methods change how many image features come back, so ``forward`` and ``generate`` shrink each image's run of
image tokens to match (:mod:`tokenreduce.backbones.vlm.shrink`). Nothing enters the ``state_dict``; no class is
rebound; ``unpatch`` restores exactly what the Patcher recorded.
"""
from __future__ import annotations

import inspect
from typing import Any, Dict, Optional

import torch
import torch.nn as nn

from ...core import Geometry, ReductionInfo, ReductionMethod, Site, Status
from ...core.registry import register_adapter
from ...core.requirements import VISION_BLOCK_NEEDS
from ..base import Adapter
from ..hf_clip import HFEncoderFamily, check_additive_mask, check_clip_layers, tower_cost
from ..layer_host import LayerHost
from ..macs import linear_macs
from ..patcher import Original, Replacement
from ..vlm.decoder import DECODER_NEEDS, DecoderSite
from ..vlm.shrink import PromptShrink, ShrinkingForward, VlmGenerate
from ..vlm.tower import TOWER_NEEDS, TowerSite, feature_layer_index

try:  # transformers is an optional dependency (the ``vlm`` extra)
    import transformers
    from transformers import LlavaForConditionalGeneration
    from transformers.models.clip.modeling_clip import CLIPVisionModel
except ImportError:  # pragma: no cover
    transformers = LlavaForConditionalGeneration = CLIPVisionModel = None  # type: ignore

VISION_SITES = frozenset({Site.BLOCK_MID, Site.BLOCK_OUT, Site.TOWER_OUT})


class FeaturesWindow(Replacement):
    """``get_image_features`` of a patched LLaVA: a fresh record around the tower pass (picklable)."""

    def __init__(self, adapter: "LlavaAdapter", original: Original) -> None:
        self.adapter, self.original = adapter, original

    def __call__(self, pixel_values: torch.Tensor = None, vision_feature_layer: Any = None,
                 vision_feature_select_strategy: Any = None, **kwargs: Any) -> Any:
        self.adapter.check_feature_layer(vision_feature_layer)
        rec = self.adapter.begin_forward()
        try:
            out = self.original(pixel_values=pixel_values, vision_feature_layer=vision_feature_layer,
                                vision_feature_select_strategy=vision_feature_select_strategy, **kwargs)
        except BaseException as error:
            rec.fail(error)
            raise
        rec.status = Status.DONE
        return out


class PromptBegin:
    """Forward pre-hook (with kwargs) on the inner ``LlavaModel``: a fresh record with the prompt's image mask, for
    methods inside the language model (picklable)."""

    def __init__(self, adapter: "LlavaAdapter") -> None:
        self.adapter = adapter

    def __call__(self, module: nn.Module, args: Any, kwargs: Dict[str, Any]) -> None:
        rec = self.adapter.begin_forward()
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")
        image_id = self.adapter.image_token_id
        if input_ids is not None:
            rec.image_mask = input_ids == image_id
        elif embeds is not None:
            token = module.get_input_embeddings()(torch.tensor(image_id, device=embeds.device))
            rec.image_mask = (embeds == token).all(-1)


class PrunedLabels(Replacement):
    """``forward`` of a LLaVA patched inside its language model: the logits cover only the kept tokens, so the loss
    is computed from the kept tokens' labels (next-token targets within the kept sequence; image tokens and
    synthesised tokens carry -100)."""

    def __init__(self, adapter: "LlavaAdapter", original: Original) -> None:
        self.adapter, self.original = adapter, original
        self.signature = inspect.signature(type(adapter.model).forward)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        model = self.adapter.model
        bound = self.signature.bind(model, *args, **kwargs)
        a = dict(bound.arguments)
        a.pop(next(iter(self.signature.parameters)))
        var_kw = next((p.name for p in self.signature.parameters.values() if p.kind is p.VAR_KEYWORD), None)
        extra = dict(a.pop(var_kw, {})) if var_kw else {}
        labels = a.pop("labels", None)
        if labels is None:
            return self.original(*args, **kwargs)
        return_dict = extra.pop("return_dict", None)
        out = self.original(**a, **extra, return_dict=True)
        rec = self.adapter.record
        kept = self.adapter.decoder.final_kept(rec.decoder if rec is not None else None)
        if kept is not None:
            labels = labels.to(kept.device).gather(1, kept.clamp(min=0)).masked_fill(kept < 0, -100)
        out.loss = model.loss_function(logits=out.logits, labels=labels,
                                       vocab_size=model.config.text_config.vocab_size, **extra)
        return out.to_tuple() if return_dict is False else out


@register_adapter
class LlavaAdapter(Adapter):
    name = ("transformers LlavaForConditionalGeneration (transformers >= 5; CLIP vision tower for vision-side "
            "methods, a Llama-style language model (Llama, Mistral, Qwen2, Qwen3) for in-LLM methods)")
    provides = {Site.BLOCK_MID: VISION_BLOCK_NEEDS, Site.BLOCK_OUT: VISION_BLOCK_NEEDS, Site.TOWER_OUT: TOWER_NEEDS,
                Site.LLM_LAYER: DECODER_NEEDS}

    @classmethod
    def claims(cls, model: nn.Module) -> bool:
        return LlavaForConditionalGeneration is not None and type(model) is LlavaForConditionalGeneration

    # ----------------------------------------------------------------------------------------------------------
    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.cfg = model.config
        self.image_token_id = int(self.cfg.image_token_id)
        self.vision = model.model.vision_tower
        self.lm = model.model.language_model
        vfl = self.cfg.vision_feature_layer
        self.feature_layer: Optional[int] = None
        if isinstance(vfl, int) and isinstance(self.vision, CLIPVisionModel):
            self.feature_layer = feature_layer_index(vfl, len(self.vision.encoder.layers))
        self.host: Optional[LayerHost] = None
        self.tower: Optional[TowerSite] = None
        self.decoder = DecoderSite(self, self.lm)

    def geometry(self, site: Site) -> Geometry:
        if site == Site.LLM_LAYER:
            tc = self.lm.config
            return Geometry(num_blocks=len(self.lm.layers), num_prefix=0, num_patches=None,
                            dim=int(tc.hidden_size), num_heads=int(tc.num_attention_heads), has_class_token=False)
        self.check_vision(site)
        vc = self.vision.config
        n = int(self.vision.embeddings.num_patches)
        side = int(vc.image_size) // int(vc.patch_size)
        host = self._vision_host()
        return Geometry(num_blocks=self.feature_layer + 1, num_prefix=1, num_patches=n, dim=int(vc.hidden_size),
                        num_heads=int(vc.num_attention_heads), has_class_token=True, grid=(side, side),
                        cost=tower_cost(self.vision, host))

    def _vision_host(self) -> LayerHost:
        if self.host is None:
            self.host = LayerHost(self, HFEncoderFamily(), self.vision.encoder.layers, num_prefix=1,
                                  num_sites=self.feature_layer + 1)
        return self.host

    # -- checks ------------------------------------------------------------------------------------------------
    def check_vision(self, site: Site) -> None:
        if not isinstance(self.vision, CLIPVisionModel):
            raise ValueError(f"methods at '{site.value}' run in the vision tower, and tokenreduce supports LLaVA's "
                             f"tower when it is transformers' CLIPVisionModel; this one is {type(self.vision).__name__}")
        check_clip_layers(self.vision)
        if not isinstance(self.cfg.vision_feature_layer, int):
            raise ValueError(f"methods at '{site.value}' need a single vision_feature_layer; this LLaVA concatenates "
                             f"layers {self.cfg.vision_feature_layer}")
        if self.feature_layer < 0:
            raise ValueError(f"vision_feature_layer={self.cfg.vision_feature_layer} selects the patch embeddings; "
                             "a vision method needs at least one encoder layer before the features")

    def check_feature_layer(self, vision_feature_layer: Any) -> None:
        """A call may name its own feature layer; the patch was resolved for the config's."""
        if vision_feature_layer is None or vision_feature_layer == self.cfg.vision_feature_layer:
            return
        if (isinstance(vision_feature_layer, int) and
                feature_layer_index(vision_feature_layer, len(self.vision.encoder.layers)) == self.feature_layer):
            return
        raise ValueError(f"the model was patched for vision_feature_layer={self.cfg.vision_feature_layer}; "
                         f"re-patch after changing config.vision_feature_layer instead of passing "
                         f"vision_feature_layer={vision_feature_layer!r}")

    def check_method(self, method: ReductionMethod) -> None:
        if method.site == Site.LLM_LAYER:
            self.decoder.check(method)
        else:
            check_additive_mask(self.vision, method)

    # -- install -----------------------------------------------------------------------------------------------
    def install(self, method: ReductionMethod, options: Dict[str, Any]) -> None:
        self.method, self.options = method, dict(options)
        patcher, inner = self.patcher, self.model.model
        if method.site in VISION_SITES:
            if method.site == Site.TOWER_OUT:
                vc = self.vision.config
                side = int(vc.image_size) // int(vc.patch_size)
                self.tower = TowerSite(self, HFEncoderFamily(), self.vision.encoder.layers, self.feature_layer, 1,
                                       inner.multi_modal_projector, (side, side))
                self.tower.install(patcher, method)
            else:
                self._vision_host().install(patcher, method, bool(options.get("trace_source", False)))
            patcher.set_attr(inner, "get_image_features",
                             FeaturesWindow(self, patcher.original(inner, "get_image_features")))
            shrink = PromptShrink(self.model, self.image_token_id, inner.get_image_features)
            patcher.set_attr(self.model, "forward", ShrinkingForward(shrink, patcher.original(self.model, "forward")))
        else:
            shrink = None
            patcher.hook(inner.register_forward_pre_hook(PromptBegin(self), with_kwargs=True))
            self.decoder.install(patcher, method)
            patcher.set_attr(self.model, "forward", PrunedLabels(self, patcher.original(self.model, "forward")))
        patcher.set_attr(self.model, "generate", VlmGenerate(shrink, patcher.original(self.model, "generate")))

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
