"""Adapter for Hugging Face ``LlavaForConditionalGeneration`` (transformers >= 5).

Three kinds of method run here, chosen by the method's site:

- ``BLOCK_MID`` / ``BLOCK_OUT`` (ToMe, PiToMe, ...): inside the CLIP vision tower's encoder layers, through
  :class:`~tokenreduce.backbones.hf_clip.ClipTowerHost`, over the layers that feed LLaVA's features
  (``vision_feature_layer``; 23 of 24 for LLaVA-1.5). LLaVA's own feature selection and projector then run unchanged
  on the fewer tokens.
- ``TOWER_OUT`` (VisionZip): at the layer LLaVA takes its features from. Forward hooks on that layer's ``q_proj`` /
  ``k_proj`` and on its output give the method the CLS attention row (one ``q_cls·Kᵀ``, no eager attention), the
  head-averaged keys and the hidden states (CLS included); a forward pre-hook on ``multi_modal_projector`` replaces its
  input with the method's tokens, so ``get_image_features`` returns the reduced, projected features.
- ``LLM_LAYER`` (DART): inside the language model at prefill. The layers from K on get an instance ``forward`` that
  hands the method layer K's input, prunes it, and gives layers K.. the pruned hidden states with the kept tokens'
  original rotary embeddings and a causal/padding mask built by transformers' ``create_causal_mask`` for the KV-cache
  layout of layer K (which holds only kept tokens). Which layout each cache holds is remembered per cache object, so
  decoding, padding and a second prefill on a warm cache stay correct with SDPA and eager attention.

Vision methods change how many image features come back. HF v5 scatters features into the positions of
``config.image_token_id`` and requires one position per feature row, so the patched ``forward`` and ``generate``
shrink each image's run of image tokens in ``input_ids`` (and ``attention_mask``, ``labels``, ``position_ids``) before
the language model (:func:`shrink_image_runs`): users pass processor outputs unchanged. ``generate`` shrinks before
HF's loop starts (so the attention mask and positions it carries match the KV cache) and returns ``sequences`` with the
caller's original prompt in front of the new tokens, so ``out[:, inputs.input_ids.shape[1]:]`` still slices the
answer. The image features computed to learn the counts go to the language model as transformers' own pre-encoded
``mm_encoder_outputs``, so the tower runs once per prompt.

Nothing enters the ``state_dict``; no class is rebound; ``unpatch`` removes exactly the instance attributes and hooks.
"""
from __future__ import annotations

import functools
import inspect
import sys
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from ..methods.base import Geometry, ReductionMethod, Site
from ..ops.merge import gather_tokens
from ..state import ForwardState, ReductionInfo, TokenState
from .base import Adapter, register_adapter
from . import host
from .hf_clip import ANALYSIS, ClipTowerHost, analysis_inputs, check_clip_layers

try:  # transformers is an optional dependency (the ``llava`` extra)
    import transformers
    from transformers import LlavaForConditionalGeneration
    from transformers.cache_utils import DynamicCache
    from transformers.masking_utils import create_causal_mask
    from transformers.models.clip.modeling_clip import CLIPVisionModel
except ImportError:  # pragma: no cover
    transformers = LlavaForConditionalGeneration = DynamicCache = create_causal_mask = CLIPVisionModel = None

VISION_SITES = frozenset({Site.BLOCK_MID, Site.BLOCK_OUT, Site.TOWER_OUT})


# ---------------------------------------------------------------------------------------------------------------
# Prompt helpers (pure)
# ---------------------------------------------------------------------------------------------------------------
def image_runs(row: torch.Tensor, image_token_id: int) -> List[Tuple[int, int]]:
    """``[(start, end), ...]`` of the maximal runs of ``image_token_id`` in a 1-D id tensor, in order."""
    is_img = (row == image_token_id).to(torch.int8)
    edges = torch.diff(is_img, prepend=is_img.new_zeros(1), append=is_img.new_zeros(1))
    starts = (edges == 1).nonzero()[:, 0].tolist()
    ends = (edges == -1).nonzero()[:, 0].tolist()
    return list(zip(starts, ends))


def _split_runs(runs: List[List[Tuple[int, int]]], num_images: int) -> List[List[Tuple[int, int]]]:
    """Split runs holding several adjacent images (``<image><image>``) into one run per image, when every run is a
    whole number of equally long images; ValueError otherwise."""
    total = sum(e - s for row in runs for s, e in row)
    if num_images <= 0 or total % num_images:
        raise ValueError(f"the prompt holds {sum(len(r) for r in runs)} runs of image tokens ({total} tokens) but "
                         f"{num_images} images came back from the vision tower")
    per = total // num_images
    out = []
    for row in runs:
        split = []
        for s, e in row:
            if (e - s) % per:
                raise ValueError(f"an image-token run of {e - s} tokens is not a whole number of {per}-token images")
            split += [(t, t + per) for t in range(s, e, per)]
        out.append(split)
    return out


def shrink_image_runs(input_ids: torch.Tensor, image_token_id: int, counts: Sequence[int],
                      attention_mask: Optional[torch.Tensor] = None, labels: Optional[torch.Tensor] = None,
                      position_ids: Optional[torch.Tensor] = None, pad_token_id: int = 0) -> Dict[str, torch.Tensor]:
    """Shrink each image's run of image tokens to the number of features the (reduced) vision tower returned.

    Args:
        input_ids: ``[B, S]`` prompt ids with one run of ``image_token_id`` per image (as the processor makes them).
        image_token_id: the model's ``config.image_token_id``.
        counts: features per image, in batch-major, left-to-right order (``len(get_image_features(...).pooler_output)``
            entries).
        attention_mask: ``[B, P + S]`` (P cached tokens before this chunk) or None.
        labels: ``[B, S]`` or None; position_ids: ``[B or 1, S]`` or None.
        pad_token_id: used only when rows end up with different lengths and must be re-padded.

    Returns:
        ``{"input_ids", "attention_mask", "labels", "position_ids"}`` (the given ones), each run keeping its first
        ``count`` positions. Later positions shift down so they stay contiguous. Rows that end up shorter than the
        longest are re-padded on the side the mask shows (left when the last column is all ones).
    """
    b, s = input_ids.shape
    runs = [image_runs(input_ids[i], image_token_id) for i in range(b)]
    if sum(len(r) for r in runs) != len(counts):
        runs = _split_runs(runs, len(counts))
    keep = torch.ones(b, s, dtype=torch.bool, device=input_ids.device)
    it = iter(counts)
    for i, row in enumerate(runs):
        for start, end in row:
            c = int(next(it))
            if c > end - start:
                raise ValueError(f"an image has {c} features but only {end - start} image tokens in the prompt")
            keep[i, start + c:end] = False
    lengths = keep.sum(dim=1)
    out: Dict[str, torch.Tensor] = {}
    chunk_mask = attention_mask[:, -s:] if attention_mask is not None else None
    pad_left = chunk_mask is None or bool((chunk_mask[:, -1] != 0).all())
    width = int(lengths.max())

    def pack(t: torch.Tensor, fill) -> torch.Tensor:
        t = t.expand(b, -1) if t.shape[0] != b else t
        rows = []
        for i in range(b):
            kept = t[i][keep[i]]
            pad = t.new_full((width - kept.shape[0],), fill)
            rows.append(torch.cat([pad, kept]) if pad_left else torch.cat([kept, pad]))
        return torch.stack(rows)

    out["input_ids"] = pack(input_ids, pad_token_id)
    if attention_mask is not None:
        out["attention_mask"] = torch.cat([attention_mask[:, :-s], pack(chunk_mask, 0)], dim=1)
    if labels is not None:
        out["labels"] = pack(labels, -100)
    if position_ids is not None:
        removed_before = torch.cumsum(~keep, dim=1) - (~keep).to(torch.long)
        out["position_ids"] = pack(position_ids - removed_before, 0)
    return out


def restore_prompt(sequences: torch.Tensor, prompt: torch.Tensor, shrunk_len: int) -> torch.Tensor:
    """``generate`` output ``[B·k, shrunk_len + T]`` -> the caller's prompt ``[B, S]`` (repeated k times) + the T new
    tokens, so slicing with the caller's prompt length gives the answer."""
    k = sequences.shape[0] // prompt.shape[0]
    return torch.cat([prompt.to(sequences.device).repeat_interleave(k, dim=0), sequences[:, shrunk_len:]], dim=1)


def feature_layer_index(vision_feature_layer: int, num_layers: int) -> int:
    """Index (0-based) of the encoder layer whose output is ``hidden_states[vision_feature_layer]``; -1 for the
    embeddings."""
    n = num_layers + 1
    if not -n <= vision_feature_layer < n:
        raise ValueError(f"vision_feature_layer={vision_feature_layer} is out of range for a {num_layers}-layer tower")
    return vision_feature_layer % n - 1


# ---------------------------------------------------------------------------------------------------------------
# State
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class _Layout:
    """What cache layers >= K hold after DART pruned: the ``[B, L_K]`` padding mask of those entries (None: no
    padding), and K."""

    mask: Optional[torch.Tensor]
    layer: int


_LAYOUT_ATTR = "_tokenreduce_pruned_layout"


def _linear_macs(module: nn.Module) -> int:
    return sum(m.in_features * m.out_features for m in module.modules() if isinstance(m, nn.Linear))


# ---------------------------------------------------------------------------------------------------------------
# The adapter
# ---------------------------------------------------------------------------------------------------------------
@register_adapter
class LlavaAdapter(Adapter):
    name = ("transformers LlavaForConditionalGeneration (transformers >= 5; CLIP vision tower for vision-side "
            "methods, Llama-style language model for DART)")
    provides = frozenset({"keys", "keys_per_head", "cls_attn", "attn"})
    sites = frozenset({Site.BLOCK_MID, Site.BLOCK_OUT, Site.TOWER_OUT, Site.LLM_LAYER})

    @classmethod
    def claims(cls, model: nn.Module) -> bool:
        return LlavaForConditionalGeneration is not None and isinstance(model, LlavaForConditionalGeneration)

    @classmethod
    def check_model(cls, model: nn.Module) -> None:
        major = int(transformers.__version__.split(".")[0])
        if major < 5:
            raise ValueError(f"tokenreduce supports LLaVA from transformers >= 5, found {transformers.__version__}")

    # ----------------------------------------------------------------------------------------------------------
    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.cfg = model.config
        self.image_token_id = int(self.cfg.image_token_id)
        self.vision = model.model.vision_tower
        self.lm = model.model.language_model
        self.method: Optional[ReductionMethod] = None
        self._hooks: List[Any] = []
        self._patched: List[Tuple[Any, str]] = []  # (object, attribute) instance overrides to remove
        self.host: Optional[ClipTowerHost] = None
        self.tower_fs: Optional[ForwardState] = None
        self.llm_fs: Optional[ForwardState] = None
        self._pending_image_mask: Optional[torch.Tensor] = None
        self._feature_layer: Optional[int] = None
        vfl = self.cfg.vision_feature_layer
        if isinstance(vfl, int) and isinstance(self.vision, CLIPVisionModel):
            self._feature_layer = feature_layer_index(vfl, len(self.vision.encoder.layers))

    def geometry(self) -> Geometry:
        if isinstance(self.vision, CLIPVisionModel) and self._feature_layer is not None:
            vc = self.vision.config
            return Geometry(num_blocks=self._feature_layer + 1, num_prefix=1,
                            num_patches=int(self.vision.embeddings.num_patches), dim=int(vc.hidden_size),
                            num_heads=int(vc.num_attention_heads), has_class_token=True)
        tc = self.lm.config
        return Geometry(num_blocks=len(self.lm.layers), num_prefix=0, num_patches=None, dim=int(tc.hidden_size),
                        num_heads=int(tc.num_attention_heads), has_class_token=False)

    def install(self, method: ReductionMethod, options: Dict[str, Any]) -> None:
        self.method = method
        if method.site in VISION_SITES:
            self._check_vision(method)
            if method.site == Site.TOWER_OUT:
                self._install_tower_out(method)
            else:
                self.host = ClipTowerHost(self.vision, num_blocks=self._feature_layer + 1)
                self.host.install(method, options)
            self._install_prompt_shrink()
        elif method.site == Site.LLM_LAYER:
            self._install_llm(method)
        else:  # pragma: no cover - api.patch checks the site first
            raise ValueError(f"{method.name} acts at {method.site.value}, which LLaVA does not offer")

    def uninstall(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        for obj, attr in self._patched:
            obj.__dict__.pop(attr, None)
        self._patched.clear()
        if self.host is not None:
            self.host.uninstall()
        self._pending_image_mask = None
        self.tower_fs = self.llm_fs = None

    def _override(self, obj: Any, attr: str, fn: Callable) -> None:
        obj.__dict__[attr] = fn
        self._patched.append((obj, attr))

    # ----------------------------------------------------------------------------------------------------------
    # Vision side
    # ----------------------------------------------------------------------------------------------------------
    def _check_vision(self, method: ReductionMethod) -> None:
        if not isinstance(self.vision, CLIPVisionModel):
            raise ValueError(f"{method.name} runs in the vision tower, and tokenreduce supports LLaVA's vision tower "
                             f"when it is transformers' CLIPVisionModel; this one is {type(self.vision).__name__}")
        check_clip_layers(self.vision)
        if not isinstance(self.cfg.vision_feature_layer, int):
            raise ValueError(f"{method.name} needs a single vision_feature_layer; this LLaVA concatenates layers "
                             f"{self.cfg.vision_feature_layer}")
        if self._feature_layer < 0:
            raise ValueError(f"vision_feature_layer={self.cfg.vision_feature_layer} selects the patch embeddings; "
                             f"{method.name} needs at least one encoder layer before the features")

    def _resolve_feature_layer(self, vision_feature_layer: Any) -> None:
        """A call may name its own feature layer; the patch was resolved for the config's."""
        if vision_feature_layer is None or vision_feature_layer == self.cfg.vision_feature_layer:
            return
        if (isinstance(vision_feature_layer, int) and
                feature_layer_index(vision_feature_layer, len(self.vision.encoder.layers)) == self._feature_layer):
            return
        raise ValueError(f"the model was patched for vision_feature_layer={self.cfg.vision_feature_layer}; "
                         f"re-patch after changing config.vision_feature_layer instead of passing "
                         f"vision_feature_layer={vision_feature_layer!r}")

    def _install_tower_out(self, method: ReductionMethod) -> None:
        layer = self.vision.encoder.layers[self._feature_layer]
        self._tower_needs = method.needs_at(self._feature_layer)
        attn = layer.self_attn
        if self._tower_needs & ANALYSIS:
            self._hooks.append(attn.k_proj.register_forward_hook(self._tower_tap("k")))
        if self._tower_needs & {"cls_attn", "attn"}:
            self._hooks.append(attn.q_proj.register_forward_hook(self._tower_tap("q")))
        self._hooks.append(layer.register_forward_hook(self._tower_tap("x")))
        self._hooks.append(self.model.model.multi_modal_projector.register_forward_pre_hook(self._tower_out))
        llava_model = self.model.model
        orig = llava_model.get_image_features

        @functools.wraps(orig)
        def get_image_features(pixel_values=None, vision_feature_layer=None, vision_feature_select_strategy=None,
                               **kwargs):
            self._resolve_feature_layer(vision_feature_layer)
            self.tower_fs = ForwardState()
            self.tower_fs.extras["active"] = True
            try:
                return orig(pixel_values=pixel_values, vision_feature_layer=vision_feature_layer,
                            vision_feature_select_strategy=vision_feature_select_strategy, **kwargs)
            finally:
                self.tower_fs.extras["active"] = False
                self.tower_fs.taps.clear()

        self._override(llava_model, "get_image_features", get_image_features)

    def _tower_tap(self, name: str):
        def hook(module, inputs, output):
            fs = self.tower_fs
            if fs is not None and fs.extras.get("active"):
                fs.taps[name] = output
        return hook

    def _tower_out(self, module, args):
        """Projector pre-hook: replace LLaVA's selected features with the method's tokens."""
        fs = self.tower_fs
        if fs is None or not fs.extras.get("active"):
            return None
        if "x" not in fs.taps:
            raise RuntimeError("the vision tower's feature layer did not run before the projector")
        x = fs.taps["x"]
        layer = self.vision.encoder.layers[self._feature_layer]
        analysis = analysis_inputs(fs.taps, self._tower_needs, layer.self_attn.num_heads, layer.self_attn.scale, None)
        state = host.token_state(fs, x, self._feature_layer, 1, False, analysis)
        out = self.method.reduce(state)
        fs.size = out.size
        fs.blocks = [(x.shape[1], x.shape[1], x.shape[1])] * (self._feature_layer + 1)
        fs.extras["out"] = (x.shape[0], x.dtype, x.device)
        if out.extras.get("kept") is not None:
            fs.kept[self._feature_layer] = out.extras["kept"]
        fs.taps.clear()
        return (out.x,)

    # ----------------------------------------------------------------------------------------------------------
    # Prompt shrinking (vision methods)
    # ----------------------------------------------------------------------------------------------------------
    def _features(self, pixel_values: torch.Tensor, vision_feature_layer=None, vision_feature_select_strategy=None,
                  image_sizes=None):
        return self.model.model.get_image_features(pixel_values=pixel_values, vision_feature_layer=vision_feature_layer,
                                                   vision_feature_select_strategy=vision_feature_select_strategy,
                                                   image_sizes=image_sizes, return_dict=True)

    def _pad_token_id(self) -> int:
        for cfg in (self.cfg, getattr(self.cfg, "text_config", None)):
            pad = getattr(cfg, "pad_token_id", None) if cfg is not None else None
            if pad is not None:
                return int(pad)
        return 0

    def _shrink(self, input_ids: torch.Tensor, features: Any, **tensors: Optional[torch.Tensor]):
        """``None`` when the prompt already has one image token per feature, else the shrunk tensors."""
        counts = [int(f.shape[0]) for f in features.pooler_output]
        if int((input_ids == self.image_token_id).sum()) == sum(counts):
            return None
        return shrink_image_runs(input_ids, self.image_token_id, counts, pad_token_id=self._pad_token_id(), **tensors)

    def _install_prompt_shrink(self) -> None:
        model = self.model
        orig_forward = model.forward
        signature = inspect.signature(orig_forward)
        var_kw = next((p.name for p in signature.parameters.values() if p.kind is p.VAR_KEYWORD), None)

        @functools.wraps(orig_forward)
        def forward(*args, **kwargs):
            bound = signature.bind(*args, **kwargs)
            a = dict(bound.arguments)
            extra = a.pop(var_kw, {}) if var_kw else {}
            pixel_values, input_ids = a.get("pixel_values"), a.get("input_ids")
            if pixel_values is None or input_ids is None or a.get("mm_encoder_outputs") is not None:
                return orig_forward(*args, **kwargs)
            features = self._features(pixel_values, a.get("vision_feature_layer"),
                                      a.get("vision_feature_select_strategy"), a.get("image_sizes"))
            shrunk = self._shrink(input_ids, features, attention_mask=a.get("attention_mask"),
                                  labels=a.get("labels"), position_ids=a.get("position_ids"))
            if shrunk is not None:
                a.update(shrunk)
            a["pixel_values"] = None
            a["mm_encoder_outputs"] = {"image": features}
            return orig_forward(**a, **extra)

        orig_generate = model.generate

        @functools.wraps(orig_generate)
        def generate(inputs=None, *args, **kwargs):
            input_ids = inputs if inputs is not None else kwargs.get("input_ids")
            pixel_values = kwargs.get("pixel_values")
            if input_ids is None or pixel_values is None or kwargs.get("mm_encoder_outputs") is not None:
                return orig_generate(inputs, *args, **kwargs)
            # Encode once here to learn the counts, and hand the features to generate as transformers' own
            # pre-encoded ``mm_encoder_outputs`` (which it expands for beams and feeds to the prefill).
            features = self._features(pixel_values, kwargs.get("vision_feature_layer"),
                                      kwargs.get("vision_feature_select_strategy"), kwargs.get("image_sizes"))
            kwargs.pop("pixel_values")
            kwargs["mm_encoder_outputs"] = {"image": features}
            shrunk = self._shrink(input_ids, features, attention_mask=kwargs.get("attention_mask"),
                                  position_ids=kwargs.get("position_ids"))
            if shrunk is None:
                return orig_generate(inputs, *args, **kwargs)
            for name in ("attention_mask", "position_ids"):
                if name in shrunk:
                    kwargs[name] = shrunk[name]
            if inputs is not None:
                inputs = shrunk["input_ids"]
            else:
                kwargs["input_ids"] = shrunk["input_ids"]
            out = orig_generate(inputs, *args, **kwargs)
            width = shrunk["input_ids"].shape[1]
            if torch.is_tensor(out):
                return restore_prompt(out, input_ids, width)
            if getattr(out, "sequences", None) is not None:
                out.sequences = restore_prompt(out.sequences, input_ids, width)
            return out

        self._override(model, "forward", forward)
        self._override(model, "generate", generate)

    # ----------------------------------------------------------------------------------------------------------
    # Language-model side (DART)
    # ----------------------------------------------------------------------------------------------------------
    def _install_llm(self, method: ReductionMethod) -> None:
        layers = list(self.lm.layers)
        sites = [i for i in range(len(layers)) if method.acts_at(i)]
        if len(sites) != 1 or not 1 <= sites[0] < len(layers):
            raise ValueError(f"{method.name} must act before exactly one decoder layer K with 1 <= K < "
                             f"{len(layers)} (this language model has {len(layers)} layers); it acts at {sites}")
        k = sites[0]
        prev = layers[k - 1].self_attn
        rope = getattr(sys.modules.get(type(prev).__module__), "apply_rotary_pos_emb", None)
        k_src = getattr(prev, "k_norm", None) if isinstance(getattr(prev, "k_norm", None), nn.Module) else None
        k_src = k_src if k_src is not None else getattr(prev, "k_proj", None)
        if rope is None or k_src is None or not hasattr(self.lm, "norm") or not hasattr(prev, "head_dim"):
            raise ValueError(f"{method.name} needs a Llama-style language model (k_proj, rotary embeddings, a final "
                             f"norm); {type(self.lm).__name__} is not one")
        # Sliding-window layers after K would need windowed masks over the pruned layout; they are refused at run
        # time once a sequence is longer than the window (below it, the window masks nothing).
        layer_types = list(getattr(self.lm.config, "layer_types", None) or [])
        window = getattr(self.lm.config, "sliding_window", None)
        if not layer_types and window is not None:
            layer_types = ["sliding_attention"] * len(layers)  # e.g. Mistral: one window for every layer
        if any(t not in ("full_attention", "sliding_attention") for t in layer_types[k:]):
            raise ValueError(f"{method.name} builds causal masks for the pruned layers; this language model has "
                             f"{sorted(set(layer_types[k:]))} layers after layer {k}")
        self._window = window if "sliding_attention" in layer_types[k:] else None
        self._k, self._rope, self._head_dim = k, rope, int(prev.head_dim)
        self._hooks.append(self.model.model.register_forward_pre_hook(self._capture_image_mask, with_kwargs=True))
        self._hooks.append(self.lm.register_forward_pre_hook(self._begin_llm, with_kwargs=True))
        self._hooks.append(k_src.register_forward_hook(self._llm_tap))
        for j in range(k, len(layers)):
            layer = layers[j]
            fn = type(layer).forward
            self._override(layer, "forward",
                           functools.partial(self._llm_layer_forward, layer, j, fn, inspect.signature(fn)))
        self._install_pruned_labels()
        self._llm_linear = [_linear_macs(l) for l in layers]
        tc = self.lm.config
        self._llm_attn_dim = int(tc.num_attention_heads) * self._head_dim

    def _install_pruned_labels(self) -> None:
        """With pruning inside the LLM the logits cover only the kept tokens, so the loss must see only their
        labels: the patched ``forward`` computes the loss itself from the kept labels (next-token targets within the
        kept sequence; image tokens carry -100 anyway)."""
        model = self.model
        orig_forward = model.forward
        signature = inspect.signature(orig_forward)
        var_kw = next((p.name for p in signature.parameters.values() if p.kind is p.VAR_KEYWORD), None)

        @functools.wraps(orig_forward)
        def forward(*args, **kwargs):
            a = dict(signature.bind(*args, **kwargs).arguments)
            extra = dict(a.pop(var_kw, {})) if var_kw else {}
            labels = a.pop("labels", None)
            if labels is None:
                return orig_forward(*args, **kwargs)
            return_dict = extra.pop("return_dict", None)
            out = orig_forward(**a, **extra, return_dict=True)
            kept = self.llm_fs.kept.get(self._k) if self.llm_fs is not None else None
            if kept is not None:
                labels = labels.to(kept.device).gather(1, kept)
            out.loss = model.loss_function(logits=out.logits, labels=labels,
                                           vocab_size=self.cfg.text_config.vocab_size, **extra)
            return out.to_tuple() if return_dict is False else out

        self._override(model, "forward", forward)

    def _capture_image_mask(self, module, args, kwargs):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")
        if input_ids is not None:
            self._pending_image_mask = input_ids == self.image_token_id
        elif embeds is not None:
            token = module.get_input_embeddings()(torch.tensor(self.image_token_id, device=embeds.device))
            self._pending_image_mask = (embeds == token).all(-1)
        else:
            self._pending_image_mask = None

    def _begin_llm(self, module, args, kwargs):
        fs = self.llm_fs = ForwardState()
        embeds = kwargs.get("inputs_embeds")
        ids = kwargs.get("input_ids", args[0] if args else None)
        q = embeds.shape[1] if embeds is not None else ids.shape[1]
        image = self._pending_image_mask
        self._pending_image_mask = None
        mask = kwargs.get("attention_mask")
        if isinstance(mask, dict):  # per-layer-type masks: only the full-attention one is LLaVA's 2-D padding mask
            mask = mask.get("full_attention")
        if torch.is_tensor(mask) and mask.dim() == 4:
            fs.extras["mask4d"] = True
            mask = None
        fs.extras.update(q=q, mask2d=mask.bool() if torch.is_tensor(mask) else None,
                         prune=image is not None and q > 1 and image.shape[1] == q and bool(image.any()))
        fs.extras["image_mask"] = image

    def _llm_tap(self, module, inputs, output):
        fs = self.llm_fs
        if fs is not None and fs.extras.get("prune"):
            fs.taps["k"] = output

    def _llm_layer_forward(self, layer: nn.Module, j: int, fn: Callable, signature: inspect.Signature,
                           *args: Any, **kwargs: Any):
        fs = self.llm_fs
        if fs is None:  # a layer called outside the language model's forward: nothing to do
            return fn(layer, *args, **kwargs)
        names = list(signature.parameters)
        a = dict(signature.bind(layer, *args, **kwargs).arguments)
        var_kw = next((p.name for p in signature.parameters.values() if p.kind is p.VAR_KEYWORD), None)
        extra = a.pop(var_kw, {}) if var_kw else {}
        a.pop(names[0])
        hidden = a.pop(names[1])
        if j == self._k:
            hidden = self._prune_site(hidden, a)
        subs = fs.extras.get("layer_args")
        if subs:
            a.update(subs)
        fs.blocks.append((j, hidden.shape[1]))
        return fn(layer, hidden, **a, **extra)

    def _prune_site(self, hidden: torch.Tensor, a: Dict[str, Any]) -> torch.Tensor:
        """At layer K: prune (a prefill chunk holding image tokens) and, whenever the cache of layers >= K holds a
        pruned layout, set those layers' mask, rotary embeddings and position ids in ``fs.extras["layer_args"]``.
        Returns layer K's (possibly pruned) input."""
        fs = self.llm_fs
        fs.extras["layer_args"] = None
        cache = a.get("past_key_values")
        q = hidden.shape[1]
        mask2d = fs.extras["mask2d"]
        layout = self._layout_of(cache)
        prune = bool(fs.extras.get("prune")) and q == fs.extras["q"]
        if not prune and layout is None:
            return hidden
        if cache is not None and DynamicCache is not None and not isinstance(cache, DynamicCache):
            raise ValueError(f"{self.method.name} keeps fewer tokens in the cache of layers >= {self._k}; it needs a "
                             f"DynamicCache (the default), not {type(cache).__name__}")
        if fs.extras.get("mask4d"):
            raise ValueError(f"{self.method.name} builds its own masks for the pruned layers and cannot follow a "
                             "custom 4-D attention_mask; pass the 2-D padding mask")
        chunk_valid = (mask2d[:, -q:] if mask2d is not None
                       else torch.ones(hidden.shape[0], q, dtype=torch.bool, device=hidden.device))
        subs: Dict[str, Any] = {}
        if prune:
            kept = self._select(hidden, a["position_embeddings"], chunk_valid)
            fs.kept[self._k] = kept
            hidden = gather_tokens(hidden, kept)
            cos, sin = a["position_embeddings"]
            subs["position_embeddings"] = (self._gather_rows(cos, kept), self._gather_rows(sin, kept))
            if a.get("position_ids") is not None:
                subs["position_ids"] = self._gather_rows(a["position_ids"], kept)
            chunk_valid = chunk_valid.gather(1, kept)
        past = cache.get_seq_length(self._k) if cache is not None else 0
        total = cache.get_seq_length(0) if cache is not None else q  # layer 0 already holds this forward's tokens
        if self._window is not None and total > self._window:
            raise ValueError(f"{self.method.name} does not support sliding-window attention over the pruned layers "
                             f"(window {self._window}, sequence {total})")
        if layout is not None and layout.mask is not None:
            past_mask = layout.mask.to(hidden.device)
        elif layout is None and past and mask2d is not None:
            past_mask = mask2d[:, :past]  # never pruned before: layer K holds what layer 0 holds
        else:
            past_mask = torch.ones(hidden.shape[0], past, dtype=torch.bool, device=hidden.device)
        if past_mask.shape[1] != past:
            raise RuntimeError(f"the cache of layer {self._k} holds {past} tokens but tokenreduce recorded "
                               f"{past_mask.shape[1]}; was the cache edited (crop, reorder) after a pruned prefill?")
        mask_k = torch.cat([past_mask, chunk_valid], dim=1)
        padded = not bool(mask_k.all())
        subs["attention_mask"] = create_causal_mask(
            config=self.lm.config, inputs_embeds=hidden, attention_mask=mask_k if padded else None,
            past_key_values=cache, position_ids=None, layer_idx=self._k)
        if cache is not None:
            # On the cache object itself, so copies of the cache (deepcopy, beam search) carry it.
            setattr(cache, _LAYOUT_ATTR, _Layout(mask_k if padded else None, self._k))
        fs.extras["layer_args"] = subs
        return hidden

    def _layout_of(self, cache: Any) -> Optional[_Layout]:
        """The pruned layout a cache holds, if any. A cache pruned without a record (one built by hand from pruned
        tensors) still works when it has no padding; with padding its mask is unknown and that is an error."""
        if cache is None:
            return None
        layout = getattr(cache, _LAYOUT_ATTR, None)
        if layout is not None and layout.layer == self._k:
            return layout
        try:
            pruned = cache.get_seq_length(self._k) != cache.get_seq_length(0)
        except (ValueError, IndexError):
            return None
        if not pruned:
            return None
        mask2d = self.llm_fs.extras["mask2d"]
        if mask2d is not None and not bool(mask2d.all()):
            raise ValueError(f"this cache holds fewer tokens in layers >= {self._k} than in layer 0 but carries no "
                             "record of which were kept; its padding mask for those layers is unknown")
        return _Layout(None, self._k)

    @staticmethod
    def _gather_rows(t: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
        """``t [1 or B, S, ...]`` -> ``[B, S', ...]`` at the kept indices ``[B, S']``."""
        if t.shape[0] != kept.shape[0]:
            t = t.expand(kept.shape[0], *t.shape[1:])
        return gather_tokens(t, kept)

    def _select(self, hidden: torch.Tensor, position_embeddings, valid: torch.Tensor) -> torch.Tensor:
        """Run the method at layer K: ``[B, S']`` sorted kept indices."""
        fs = self.llm_fs
        b, q, _ = hidden.shape
        k = fs.taps.pop("k")
        k = k.reshape(b, q, -1, self._head_dim).transpose(1, 2)
        cos, sin = position_embeddings
        k = self._rope(k, k, cos, sin)[1]
        positions = (valid.long().cumsum(dim=1) - 1).clamp(min=0)
        state = TokenState(x=hidden, size=hidden.new_ones(b, q), num_prefix=0, layer=self._k,
                           extras={"keys_per_head": k, "image_mask": fs.extras["image_mask"], "valid_mask": valid,
                                   "positions": positions, "final_norm": self.lm.norm})
        out = self.method.reduce(state)
        kept = out.extras.get("kept")
        if kept is None or kept.shape[1] != out.x.shape[1]:
            raise RuntimeError(f"{self.method.name} must return extras['kept'] at the LLM_LAYER site")
        return kept

    # ----------------------------------------------------------------------------------------------------------
    def info(self) -> ReductionInfo:
        site = self.method.site if self.method is not None else None
        if site in (Site.BLOCK_MID, Site.BLOCK_OUT):
            return self.host.info()
        if site == Site.TOWER_OUT:
            fs = self.tower_fs
            if fs is None or not fs.blocks:
                raise RuntimeError("no image has gone through the patched model yet: call it first")
            return ReductionInfo(size=fs.size.detach(), source=None, tokens_per_layer=[b[0] for b in fs.blocks],
                                 flops=torch.tensor(float(self._tower_flops(fs.blocks[0][0])), dtype=torch.float64),
                                 kept=dict(fs.kept))
        fs = self.llm_fs
        if fs is None or not fs.blocks:
            raise RuntimeError("no forward has run since the model was patched: call the model first")
        q = fs.extras["q"]
        tokens = [q] * self._k + [n for _, n in fs.blocks]
        kept = fs.kept.get(self._k)
        b = kept.shape[0] if kept is not None else 1
        size = torch.ones(b, tokens[-1])
        # Language-model MACs of this forward (linear layers plus QKᵀ and PV against its own tokens; cached keys
        # of earlier forwards are not counted).
        flops = sum(n * self._llm_linear[i] + 2 * n * n * self._llm_attn_dim for i, n in enumerate(tokens))
        return ReductionInfo(size=size, source=None, tokens_per_layer=tokens,
                             flops=torch.tensor(float(flops), dtype=torch.float64), kept=dict(fs.kept))

    def _tower_flops(self, n: int) -> int:
        host = ClipTowerHost(self.vision)
        return host.flops([(n, n, n)] * (self._feature_layer + 1))
