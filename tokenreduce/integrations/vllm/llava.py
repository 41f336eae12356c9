"""vLLM's LLaVA-1.5 with tokenreduce's vision-side methods (imported by vLLM only, never by ``import tokenreduce``).

:class:`TokenReduceLlavaForConditionalGeneration` is registered under vLLM's own architecture name
``LlavaForConditionalGeneration``. Without a ``tokenreduce`` key in the model config it *is* vLLM's class (nothing is
installed, every method is inherited). With one (``hf_overrides={"tokenreduce": {"method": ..., **params}}``):

- the processing info reports the reduced number of image tokens, so vLLM's prompt update writes exactly that many
  placeholders and the scheduler, KV cache and ``prompt_token_ids`` see the shorter prompt;
- every encoder layer of the (feature-layer-truncated) CLIP tower runs through tokenreduce's own layer host (the loop
  its timm and Hugging Face CLIP adapters use) with :class:`VllmClipFamily`, which re-composes vLLM's submodules
  (``layer_norm1``, ``self_attn``, ``layer_norm2``, ``mlp``) so the method's site sits where tokenreduce puts it on
  Hugging Face. Queries and keys are the ``qkv_proj`` output the layer computes anyway (all-gathered over
  tensor-parallel ranks only where the method reads them), so the CLS attention row is one ``q_cls·Kᵀ``; vLLM's
  fused encoder attention runs unchanged unless proportional attention must add ``log(size)``;
- a ``TOWER_OUT`` method (VisionZip, FasterVLM, VisPruner) runs through tokenreduce's tower-output site: on the
  feature layer's output, CLS included, with that layer's q/k, its tokens replacing the projector's input (as on
  Hugging Face, where they replace LLaVA's feature selection);
- ``_process_image_input`` runs tower and projector inside one per-forward record and checks that exactly the
  promised number of embeddings per image comes back.
"""
from __future__ import annotations

import json
import logging
from typing import Any, Dict, FrozenSet, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from vllm.distributed import tensor_model_parallel_all_gather
from vllm.model_executor.models.clip import CLIPEncoderLayer, CLIPVisionModel
from vllm.model_executor.models.llava import (LlavaDummyInputsBuilder, LlavaForConditionalGeneration,
                                              LlavaMultiModalProcessor, LlavaProcessingInfo,
                                              _build_llava_or_pixtral_hf_info, _build_llava_or_pixtral_hf_processor)
from vllm.multimodal import MULTIMODAL_REGISTRY

from . import _bridge
from .config import SPEC_KEY, spec_of

logger = logging.getLogger("tokenreduce.vllm")

_PLANS: Dict[Tuple[str, _bridge.Tower], _bridge.Plan] = {}


# ---------------------------------------------------------------------------------------------------------------
# From the HF config to a plan
# ---------------------------------------------------------------------------------------------------------------
def tower_of(hf_config: Any) -> _bridge.Tower:
    """The CLIP tower LLaVA feeds from, as vLLM builds it (truncated at ``vision_feature_layer``).

    ValueError (with what to use instead) for a tower or feature selection the plugin does not reduce.
    """
    vc = hf_config.vision_config
    if getattr(vc, "model_type", None) != "clip_vision_model":
        raise _bridge.Unsupported(f"tokenreduce reduces LLaVA's CLIP vision tower; this model's tower is "
                                  f"{getattr(vc, 'model_type', type(vc).__name__)!r}")
    vfl = hf_config.vision_feature_layer
    if not isinstance(vfl, int):
        raise _bridge.Unsupported(f"tokenreduce needs a single vision_feature_layer; this LLaVA concatenates layers "
                                  f"{vfl}")
    total = int(vc.num_hidden_layers)
    if not -(total + 1) <= vfl <= total:
        raise ValueError(f"vision_feature_layer={vfl} is out of range for a {total}-layer tower")
    num_layers = vfl % (total + 1)  # hidden_states[vfl]: index 0 is the embeddings
    if num_layers == 0:
        raise _bridge.Unsupported("vision_feature_layer selects the patch embeddings: no encoder layer to reduce in")
    strategy = hf_config.vision_feature_select_strategy
    if strategy not in ("default", "full"):
        raise _bridge.Unsupported(f"vision_feature_select_strategy={strategy!r}: tokenreduce supports 'default' "
                                  "(CLS dropped) and 'full'")
    grid = int(vc.image_size) // int(vc.patch_size)
    return _bridge.Tower(num_layers=num_layers, num_patches=grid * grid, dim=int(vc.hidden_size),
                         num_heads=int(vc.num_attention_heads), drops_cls=strategy == "default")


def plan_for(hf_config: Any) -> Optional[_bridge.Plan]:
    """The plan of a config with a ``tokenreduce`` key (cached per spec and tower), or None without one."""
    spec = spec_of(hf_config)
    if spec is None:
        return None
    if type(getattr(hf_config, "vision_config", None)).__name__ == "PixtralVisionConfig":
        raise _bridge.Unsupported("tokenreduce does not reduce Pixtral-HF's vision tower (dynamic image sizes); "
                                  "remove 'tokenreduce' from hf_overrides")
    tower = tower_of(hf_config)
    key = (json.dumps(spec, sort_keys=True, default=str), tower)
    if key not in _PLANS:
        _PLANS[key] = plan = _bridge.make_plan(spec, tower)
        logger.info("tokenreduce: %s", plan.describe())
    return _PLANS[key]


# ---------------------------------------------------------------------------------------------------------------
# Processing: the placeholder count
# ---------------------------------------------------------------------------------------------------------------
class TokenReduceLlavaProcessingInfo(LlavaProcessingInfo):
    """LLaVA's processing info with the reduced number of image tokens per image."""

    def get_num_image_tokens(self, *, image_width: int, image_height: int) -> int:
        plan = plan_for(self.get_hf_config())
        if plan is None:
            return super().get_num_image_tokens(image_width=image_width, image_height=image_height)
        return plan.tokens_per_image


def _build_info(ctx: Any) -> Any:
    if spec_of(ctx.get_hf_config()) is None:
        return _build_llava_or_pixtral_hf_info(ctx)
    plan_for(ctx.get_hf_config())  # refuse an unsupported spec here, in the front-end process, before any worker
    return TokenReduceLlavaProcessingInfo(ctx)


def _build_processor(info: Any, dummy_inputs: Any) -> Any:
    if isinstance(info, TokenReduceLlavaProcessingInfo):
        return LlavaMultiModalProcessor(info, dummy_inputs)
    return _build_llava_or_pixtral_hf_processor(info, dummy_inputs)


# ---------------------------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------------------------
class VllmClipFamily(_bridge.HFEncoderFamily):
    """How vLLM's ``CLIPEncoderLayer`` is built, for tokenreduce's layer host.

    vLLM fuses q/k/v into one ``qkv_proj`` (a tensor-parallel linear returning ``(output, bias)``); its encoder
    attention takes no mask. So the taps read the q, k or v slice of the ``qkv_proj`` output (all-gathered over
    tensor-parallel ranks, so a method sees every head in order on every rank and all ranks select the same tokens),
    and a layer that needs an additive mask (proportional attention after a merge) runs its attention as
    ``F.scaled_dot_product_attention`` on the same projections; every other layer runs vLLM's own attention.
    """

    # attention / norm1 / norm2 / mlp: the same submodule names as HF's CLIP layer (HFEncoderFamily)
    def attend(self, layer: nn.Module, h: torch.Tensor, mask: Optional[torch.Tensor], kwargs: Dict[str, Any]
               ) -> torch.Tensor:
        """``h [B, N, C]`` (normalised) -> the attention branch ``[B, N, C]``."""
        attn = layer.self_attn
        if mask is None:
            return attn(hidden_states=h)[0]
        qkv, _ = attn.qkv_proj(h)
        b, n, _ = h.shape
        heads, d = attn.num_heads_per_partition, attn.head_dim
        q, k, v = (t.reshape(b, n, heads, d).transpose(1, 2) for t in qkv.chunk(3, dim=-1))
        if mask.dtype != torch.bool:
            mask = mask.to(q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=attn.scale)
        return attn.out_proj(out.transpose(1, 2).reshape(b, n, heads * d))[0]

    def tap_modules(self, layer: nn.Module, names: FrozenSet[str]) -> Dict[str, nn.Module]:
        return {name: layer.self_attn.qkv_proj for name in names}

    def projections(self, layer: nn.Module) -> Dict[str, Tuple[nn.Linear, slice]]:
        return {}  # qkv_proj is a sharded tensor-parallel linear with its own GEMM (not F.linear): computed whole

    def to_heads(self, layer: nn.Module, name: str, output: Any) -> torch.Tensor:
        """The ``qkv_proj`` output -> ``[B, H, N, d]`` of q, k or v over all heads."""
        attn = layer.self_attn
        qkv = output[0] if isinstance(output, tuple) else output
        t = qkv.chunk(3, dim=-1)["qkv".index(name)]
        if attn.tp_size > 1:
            t = tensor_model_parallel_all_gather(t.contiguous(), dim=-1)
        b, n, _ = t.shape
        return t.view(b, n, attn.num_heads, attn.head_dim).transpose(1, 2)

    def num_heads(self, layer: nn.Module) -> int:
        return int(layer.self_attn.num_heads)

    def scale(self, layer: nn.Module) -> float:
        return float(layer.self_attn.scale)


def tower_reducer(tower: Any, projector: nn.Module, plan: _bridge.Plan) -> _bridge.TowerReducer:
    """Install ``plan`` in vLLM's ``CLIPVisionModel`` and LLaVA's projector (Unsupported for any other tower)."""
    if not isinstance(tower, CLIPVisionModel):
        raise _bridge.Unsupported(f"tokenreduce reduces vLLM's CLIPVisionModel; this tower is {type(tower).__name__}")
    layers = list(tower.vision_model.encoder.layers)
    for i, layer in enumerate(layers):
        if not isinstance(layer, CLIPEncoderLayer):
            raise _bridge.Unsupported(f"tower layer {i} is a {type(layer).__name__}, not vLLM's CLIPEncoderLayer")
    return _bridge.TowerReducer(plan, VllmClipFamily(), layers, projector)


@MULTIMODAL_REGISTRY.register_processor(_build_processor, info=_build_info, dummy_inputs=LlavaDummyInputsBuilder)
class TokenReduceLlavaForConditionalGeneration(LlavaForConditionalGeneration):
    """vLLM's LLaVA; with ``hf_overrides={"tokenreduce": {...}}`` its vision tower reduces tokens."""

    def __init__(self, *, vllm_config: Any, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        plan = plan_for(vllm_config.model_config.hf_config)
        self._tokenreduce = (tower_reducer(self.vision_tower, self.multi_modal_projector, plan)
                             if plan is not None else None)

    def _process_image_input(self, image_input: Any) -> Any:
        """Tower and projector for a batch of images, inside one tokenreduce record (a ``TOWER_OUT`` method replaces
        the projector's input); checks that every image got exactly the promised number of embeddings."""
        reducer = self._tokenreduce
        if reducer is None or image_input.get("type") != "pixel_values":  # precomputed embeddings bypass the tower
            return super()._process_image_input(image_input)
        plan = reducer.plan
        with reducer.forward():
            embeds = super()._process_image_input(image_input)
        counts = [int(embeds.shape[1])] if torch.is_tensor(embeds) else [int(e.shape[0]) for e in embeds]
        if any(c != plan.tokens_per_image for c in counts):
            raise RuntimeError(f"tokenreduce promised vLLM {plan.tokens_per_image} image tokens per image but "
                               f"{plan.name} returned {counts}; its output count is not fixed for this input "
                               "(please report this with the spec)")
        return embeds


__all__ = ["SPEC_KEY", "TokenReduceLlavaForConditionalGeneration", "TokenReduceLlavaProcessingInfo", "plan_for",
           "tower_of"]
