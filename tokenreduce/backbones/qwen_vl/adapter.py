"""Adapters for Hugging Face ``Qwen2_5_VLForConditionalGeneration`` and ``Qwen3VLForConditionalGeneration``
(transformers >= 5.18): dynamic-resolution towers with a 2×2 patch merger, 3-D M-RoPE language models, images and
videos. One adapter class serves both; the two registered subclasses differ only in which model class they claim.

Which site runs depends only on the method's site:

- ``TOWER_OUT`` (VisionZip, FasterVLM, VisPruner, DivPrune, pooling, random, ...): on the merger's tokens of each
  image / video (:class:`~tokenreduce.backbones.qwen_vl.tower.QwenTowerSite`), before the language model. The prompt
  then keeps exactly the placeholder slots of the kept tokens, with their original (t, h, w) positions
  (:mod:`tokenreduce.backbones.qwen_vl.prompt`); Qwen3-VL's deepstack features follow the kept tokens.
- ``LLM_LAYER`` (DART, FastV): before decoder layers at prefill (the shared
  :class:`~tokenreduce.backbones.vlm.decoder.DecoderSite`); kept tokens keep their M-RoPE positions, Qwen3-VL's
  deepstack injections follow them. Methods that renumber positions are refused (no faithful 3-D renumbering).
- Inside the vision tower (``BLOCK_*``: ToMe, PiToMe, ...): refused with the reason (the merger needs whole 2×2
  blocks, Qwen2.5-VL's windowed layers fixed windows, Qwen3-VL's deepstack taps fixed token counts).

See ``docs/backbones/qwen_vl.md``. Nothing enters the ``state_dict``; no class is rebound; ``unpatch`` restores what
the Patcher recorded.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple


import torch
import torch.nn as nn

from ...core import Geometry, ReductionInfo, ReductionMethod, Site, Status
from ...core.registry import register_adapter
from ...core.requirements import VISION_BLOCK_NEEDS
from ...ops.merge import gather_tokens
from ..macs import linear_macs
from ..patcher import Original, Replacement
from ..vlm.decoder import DECODER_NEEDS, DecoderSite
from ..vlm.adapter import VlmAdapter
from ..vlm.labels import PrunedLabels
from ..vlm.shrink import PromptShrink, ShrinkingForward, VlmGenerate, pad_token_id
from ..vlm.tower import MERGED_TOWER_NEEDS
from .prompt import rope_deltas, shrink_prompt, surviving_slots, token_types
from .tower import QwenTowerSite

try:  # transformers is an optional dependency (the ``vlm`` extra)
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen3VLForConditionalGeneration
except ImportError:  # pragma: no cover
    Qwen2_5_VLForConditionalGeneration = Qwen3VLForConditionalGeneration = None  # type: ignore

VISION_BLOCK_SITES = (Site.BLOCK_IN, Site.BLOCK_MID, Site.BLOCK_OUT)


# ---------------------------------------------------------------------------------------------------------------
# Replacements and hooks (classes, so a patched model pickles)
# ---------------------------------------------------------------------------------------------------------------
class TowerFeatures(Replacement):
    """Instance ``get_image_features`` / ``get_video_features`` of the inner model: the tower runs in the adapter's
    window and every image's (video's) merged tokens are reduced by the method."""

    def __init__(self, adapter: "QwenVLAdapter", modality: str, names: Tuple[str, str], original: Original) -> None:
        self.adapter, self.modality, self.names, self.original = adapter, modality, names, original

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        adapter = self.adapter
        if adapter.tower_busy:  # Qwen3-VL's get_video_features calls get_image_features: reduce once, outside
            return self.original(*args, **kwargs)
        given = dict(zip(self.names, args))
        given.update(kwargs)
        pixels, grid = given.pop(self.names[0]), given.pop(self.names[1], None)
        if grid is None:
            raise ValueError(f"{self.names[1]} is needed to reduce the {self.modality} tokens of a Qwen-VL model")
        return_dict = given.pop("return_dict", None)
        rec = adapter.begin_forward()
        adapter.tower.begin_call()
        adapter.tower_busy = True
        try:
            out = self.original(pixels, grid, return_dict=True, **given)
            out, rows = adapter.tower.reduce_output(out, grid, self.modality)
        except BaseException as error:
            rec.fail(error)
            raise
        finally:
            adapter.tower_busy = False
        if not adapter.collecting:
            adapter.rows, adapter.call_macs = [], []
        adapter.rows.extend(rows)
        adapter.call_macs.append((adapter.tower.macs(int(grid.prod(-1).sum())), len(rows)))
        rec.status = Status.DONE
        return out.to_tuple() if return_dict is False else out


class QwenPromptShrink(PromptShrink):
    """Encode images and videos once, then keep exactly the placeholder slots of the kept tokens, with the M-RoPE
    positions the full prompt gives them (see :mod:`tokenreduce.backbones.qwen_vl.prompt`)."""

    def __init__(self, adapter: "QwenVLAdapter") -> None:
        inner, cfg = adapter.inner, adapter.cfg
        super().__init__(adapter.model, cfg.image_token_id, inner.get_image_features, ("image_grid_thw",))
        self.adapter = adapter
        self.video_token_id = int(cfg.video_token_id)
        # (mm_encoder_outputs key, pixels argument, grid argument, encoder)
        self.inputs = (("image", "pixel_values", "image_grid_thw", inner.get_image_features),
                       ("video", "pixel_values_videos", "video_grid_thw", inner.get_video_features))

    def pixel_names(self) -> Tuple[str, ...]:
        return tuple(pixels for _, pixels, _, _ in self.inputs)

    def encode_all(self, input_ids: torch.Tensor, arguments: Dict[str, Any], names: Sequence[str]
                   ) -> Tuple[Dict[str, Any], Optional[Dict[str, torch.Tensor]]]:
        """Encode the images and videos of a call (reduced by the method) and shrink the prompt to them."""
        adapter = self.adapter
        adapter.rows, adapter.call_macs, adapter.collecting = [], [], True
        encoded: Dict[str, Any] = {}
        try:
            for key, pixels, grid, encode in self.inputs:
                if arguments.get(pixels) is not None:
                    encoded[key] = encode(arguments[pixels], arguments.get(grid), return_dict=True)
        finally:
            adapter.collecting = False
        return encoded, self.shrink_all(input_ids, arguments, "labels" in names)

    def shrink_all(self, input_ids: torch.Tensor, arguments: Dict[str, Any], with_labels: bool
                   ) -> Dict[str, torch.Tensor]:
        """The shrunk prompt (``input_ids``, ``attention_mask``, ``position_ids [3, B, S']``, ``mm_token_type_ids``,
        ``labels``), from the full prompt's M-RoPE positions."""
        adapter = self.adapter
        inner = adapter.inner
        mask = arguments.get("attention_mask")
        types = token_types(input_ids, self.image_token_id, self.video_token_id)
        positions = arguments.get("position_ids")
        if positions is None:
            positions, _ = inner.get_rope_index(input_ids, mm_token_type_ids=types,
                                                image_grid_thw=arguments.get("image_grid_thw"),
                                                video_grid_thw=arguments.get("video_grid_thw"),
                                                second_per_grid_ts=arguments.get("second_per_grid_ts"),
                                                attention_mask=mask)
        elif positions.dim() == 2:
            positions = positions[None].expand(3, -1, -1)
        survive = torch.zeros(input_ids.shape, dtype=torch.bool, device=input_ids.device)
        for key, token in (("image", self.image_token_id), ("video", self.video_token_id)):
            rows = [r for r in adapter.rows if r["modality"] == key]
            if rows:
                survive |= surviving_slots(input_ids, token, [r["tokens"] for r in rows], [r["index"] for r in rows])
        shrunk = shrink_prompt(input_ids, positions.to(input_ids.device), mask, survive, types != 0,
                               pad_token_id(self.model.config), labels=arguments.get("labels") if with_labels else None,
                               token_type_ids=types)
        # a decode step without explicit positions continues from each row's largest position
        inner.rope_deltas = rope_deltas(shrunk["position_ids"][-3:], shrunk["attention_mask"])
        if arguments.get("mm_token_type_ids") is not None:  # generate's kwargs: keep them consistent
            arguments["mm_token_type_ids"] = shrunk["mm_token_type_ids"]
        return shrunk


class TokenTypes(Replacement):
    """``generate`` below the left-aligning one: ``mm_token_type_ids`` recomputed from the (left-aligned, possibly
    shrunk) ``input_ids``, so transformers' M-RoPE positions see the prompt it runs."""

    def __init__(self, adapter: "QwenVLAdapter", original: Any) -> None:
        self.adapter, self.original = adapter, original

    def __call__(self, inputs: Optional[torch.Tensor] = None, *args: Any, **kwargs: Any) -> Any:
        ids = inputs if inputs is not None else kwargs.get("input_ids")
        if ids is not None and ids.dim() == 2 and kwargs.get("mm_token_type_ids") is not None:
            cfg = self.adapter.cfg
            kwargs["mm_token_type_ids"] = token_types(ids, int(cfg.image_token_id), int(cfg.video_token_id))
        return self.original(inputs, *args, **kwargs)


class PromptBegin:
    """Forward pre-hook (with kwargs) on the inner model: a fresh record with the prompt's visual-token mask (image
    and video placeholders) for methods inside the language model."""

    def __init__(self, adapter: "QwenVLAdapter") -> None:
        self.adapter = adapter

    def __call__(self, module: nn.Module, args: Any, kwargs: Dict[str, Any]) -> None:
        adapter = self.adapter
        rec = adapter.begin_forward()
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")
        ids = (int(adapter.cfg.image_token_id), int(adapter.cfg.video_token_id))
        if input_ids is not None:
            rec.image_mask = (input_ids == ids[0]) | (input_ids == ids[1])
        elif embeds is not None:
            table = module.get_input_embeddings()
            rec.image_mask = torch.zeros(embeds.shape[:2], dtype=torch.bool, device=embeds.device)
            for token in ids:
                rec.image_mask |= (embeds == table(torch.tensor(token, device=embeds.device))).all(-1)


class DeepstackFollow(Replacement):
    """Instance ``_deepstack_process`` of Qwen3-VL's text model: after a site shortened the prompt, the deepstack
    features are added to the visual tokens that survived (gathered by the site's kept indices)."""

    def __init__(self, adapter: "QwenVLAdapter", original: Original) -> None:
        self.adapter, self.original = adapter, original

    def __call__(self, hidden_states: torch.Tensor, visual_pos_masks: torch.Tensor,
                 visual_embeds: torch.Tensor) -> torch.Tensor:
        rec = self.adapter.record
        p = rec.decoder if rec is not None else None
        if p is None or not p.prefill or not p.pruned or visual_pos_masks is None:
            return self.original(hidden_states, visual_pos_masks, visual_embeds)
        masks = visual_pos_masks.to(hidden_states.device)
        full = visual_embeds.new_zeros(*masks.shape, visual_embeds.shape[-1])
        full[masks] = visual_embeds.to(full.device)
        index = p.kept.clamp(min=0)
        kept_masks = gather_tokens(masks, index) & (p.kept >= 0)
        return self.original(hidden_states, kept_masks, gather_tokens(full, index)[kept_masks])


def llm_info(record: Any, lm: nn.Module) -> ReductionInfo:
    """``info()`` of a method inside the language model: tokens entering every decoder layer of the last forward and
    the language model's MACs on them (linear layers, ``QKᵀ`` and ``PV`` against the forward's own tokens)."""
    if record is not None and record.status == Status.FAILED:
        raise RuntimeError(f"the last forward raised {record.error}; info() describes only a completed forward")
    p = record.decoder if record is not None else None
    if p is None or not p.tokens:
        raise RuntimeError("no forward has run through the language model since the model was patched: call the "
                           "model first")
    first = p.tokens[0][0]
    tokens = [p.query_len] * first + [n for _, n in p.tokens]
    layers = list(lm.layers)
    attn_dim = int(lm.config.num_attention_heads) * int(layers[0].self_attn.head_dim)
    macs = sum(n * linear_macs(layers[i]) + 2 * n * n * attn_dim for i, n in enumerate(tokens))
    valid = p.valid if p.pruned else None
    return ReductionInfo(size=torch.ones(p.chunk_valid.shape[0], tokens[-1]), source=None, tokens_per_layer=tokens,
                         macs=int(macs), kept=dict(record.kept), valid=valid,
                         tokens_per_sample=valid.sum(dim=1) if valid is not None else None,
                         method_state=record.carry)


# ---------------------------------------------------------------------------------------------------------------
# The adapter
# ---------------------------------------------------------------------------------------------------------------
class QwenVLAdapter(VlmAdapter):
    """The shared adapter of Qwen2.5-VL and Qwen3-VL (the registered subclasses name the model class)."""

    model_class: Any = None
    family = "Qwen-VL"
    provides = {Site.TOWER_OUT: MERGED_TOWER_NEEDS, Site.LLM_LAYER: DECODER_NEEDS,
                # offered only to refuse them with the reason (see geometry)
                Site.BLOCK_IN: VISION_BLOCK_NEEDS, Site.BLOCK_MID: VISION_BLOCK_NEEDS,
                Site.BLOCK_OUT: VISION_BLOCK_NEEDS}

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.cfg = model.config
        self.inner = model.model
        self.visual = self.inner.visual
        self.lm = self.inner.language_model
        self.decoder = DecoderSite(self, self.lm, position_axes=3)
        self.tower = QwenTowerSite(self, self.visual)
        self.tower_busy = False
        self.collecting = False
        self.rows: List[Dict[str, Any]] = []
        self.call_macs: List[Tuple[int, int]] = []

    # -- geometry and checks -----------------------------------------------------------------------------------
    def geometry(self, site: Site) -> Geometry:
        if site == Site.LLM_LAYER:
            tc = self.lm.config
            return Geometry(num_blocks=len(self.lm.layers), num_prefix=0, num_patches=None,
                            dim=int(tc.hidden_size), num_heads=int(tc.num_attention_heads), has_class_token=False)
        if site in VISION_BLOCK_SITES:
            raise ValueError(self.tower_refusal())
        vc = self.visual.config
        return Geometry(num_blocks=len(self.tower.blocks), num_prefix=0, num_patches=None,
                        dim=int(vc.out_hidden_size), num_heads=int(vc.num_heads), has_class_token=False)

    def tower_refusal(self) -> str:
        """Why methods cannot act between the vision tower's blocks of this model."""
        name = type(self.model).__name__
        reasons = ["its patch merger concatenates every 2x2 block of patches (4 consecutive tokens) into one visual "
                   "token, so the tower must keep whole, ordered 2x2 blocks, which merging or pruning single tokens "
                   "between blocks breaks"]
        if self.tower.windowed:
            reasons.append("its windowed layers attend within windows fixed from the unreduced grid before the "
                           f"first block (full attention only in blocks {list(self.visual.fullatt_block_indexes)})")
        if getattr(self.visual, "deepstack_visual_indexes", None):
            reasons.append("its deepstack mergers read blocks "
                           f"{list(self.visual.deepstack_visual_indexes)} at the full token count")
        return (f"methods inside the vision tower (between its blocks) cannot run on {name}: " + "; ".join(reasons) +
                ". Reduce the merged tokens at the tower's output instead (methods acting at 'tower_out') or inside "
                "the language model (methods acting at 'llm_layer' that keep positions)")

    def check_method(self, method: ReductionMethod) -> None:
        if method.site == Site.LLM_LAYER:
            self.decoder.check(method)
        elif method.site == Site.TOWER_OUT:
            attn = self.tower.blocks[-1].attn
            if not isinstance(getattr(attn, "qkv", None), nn.Linear):
                raise ValueError(f"{method.name} reads the last vision block's attention, and tokenreduce supports "
                                 f"Qwen-VL towers with a fused qkv projection; {type(attn).__name__} has none")
        else:  # pragma: no cover - geometry refuses these first
            raise ValueError(self.tower_refusal())

    # -- install -----------------------------------------------------------------------------------------------
    def install(self, method: ReductionMethod, options: Dict[str, Any]) -> None:
        self.method, self.options = method, dict(options)
        patcher, inner, model = self.patcher, self.inner, self.model
        generate = TokenTypes(self, patcher.original(model, "generate"))
        if method.site == Site.TOWER_OUT:
            self.tower.install(patcher, method)
            for modality, names in (("image", ("pixel_values", "image_grid_thw")),
                                    ("video", ("pixel_values_videos", "video_grid_thw"))):
                attr = f"get_{modality}_features"
                patcher.set_attr(inner, attr, TowerFeatures(self, modality, names, patcher.original(inner, attr)))
            shrink = QwenPromptShrink(self)
            patcher.set_attr(model, "forward", ShrinkingForward(shrink, patcher.original(model, "forward")))
        else:
            shrink = None
            patcher.hook(inner.register_forward_pre_hook(PromptBegin(self), with_kwargs=True))
            self.decoder.install(patcher, method)
            if callable(getattr(self.lm, "_deepstack_process", None)):
                patcher.set_attr(self.lm, "_deepstack_process",
                                 DeepstackFollow(self, patcher.original(self.lm, "_deepstack_process")))
            patcher.set_attr(model, "forward", PrunedLabels(self, patcher.original(model, "forward")))
        patcher.set_attr(model, "generate", VlmGenerate(shrink, generate))

    # -- info --------------------------------------------------------------------------------------------------
    def info(self) -> ReductionInfo:
        if self.method.site == Site.LLM_LAYER:
            return llm_info(self.record, self.lm)
        rec = self.finished_record()
        rows = self.rows
        if not rows:
            raise RuntimeError("no image or video went through the vision tower since the model was patched")
        counts = torch.tensor([int(r["index"].numel()) for r in rows])
        width = int(counts.max())
        kept = torch.full((len(rows), width), -1, dtype=torch.long)
        for i, r in enumerate(rows):
            kept[i, :counts[i]] = r["index"].cpu()
        valid = kept >= 0
        patches = max(int(torch.tensor(r["grid"]).prod()) for r in rows)
        macs = sum(m for m, _ in self.call_macs) / max(1, sum(n for _, n in self.call_macs))
        return ReductionInfo(size=valid.to(torch.float64), source=None,
                             tokens_per_layer=[patches] * len(self.tower.blocks), macs=int(round(macs)),
                             kept={self.tower.feature_layer: kept}, valid=valid, tokens_per_sample=counts,
                             method_state=rec.carry)


@register_adapter
class Qwen2_5_VLAdapter(QwenVLAdapter):
    model_class = Qwen2_5_VLForConditionalGeneration
    name = ("transformers Qwen2_5_VLForConditionalGeneration (transformers >= 5.18; tower-output methods on the "
            "patch merger's tokens, in-LLM methods that keep M-RoPE positions)")


@register_adapter
class Qwen3VLAdapter(QwenVLAdapter):
    model_class = Qwen3VLForConditionalGeneration
    name = ("transformers Qwen3VLForConditionalGeneration (transformers >= 5.18; tower-output methods on the patch "
            "merger's tokens with deepstack features following them, in-LLM methods that keep M-RoPE positions)")
