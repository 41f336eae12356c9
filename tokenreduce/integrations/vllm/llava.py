"""vLLM's LLaVA-1.5 with tokenreduce's vision-side methods (imported by vLLM only, never by ``import tokenreduce``).

:class:`TokenReduceLlavaForConditionalGeneration` is registered under vLLM's own architecture name
``LlavaForConditionalGeneration``. Without a ``tokenreduce`` key in the model config it *is* vLLM's class (nothing is
installed, every method is inherited). With one (``hf_overrides={"tokenreduce": {"method": ..., **params}}``):

- the processing info reports the reduced number of image tokens, so vLLM's prompt update writes exactly that many
  placeholders and the scheduler, KV cache and ``prompt_token_ids`` see the shorter prompt;
- every encoder layer of the (feature-layer-truncated) CLIP tower gets an instance ``forward`` that re-composes
  vLLM's own submodules (``layer_norm1``, ``self_attn.qkv_proj`` / ``attn`` / ``out_proj``, ``layer_norm2``,
  ``mlp``) so that the method's site sits where tokenreduce puts it on Hugging Face (between the attention residual
  and the MLP, after the layer, or at the feature layer's output). Queries and keys are the ``qkv_proj`` output the
  layer computes anyway (all-gathered over tensor-parallel ranks only at layers where the method reads them), so the
  CLS attention row is one ``q_cls·Kᵀ``; vLLM's fused encoder attention runs unchanged unless proportional
  attention must add ``log(size)``, which then goes to ``F.scaled_dot_product_attention`` as an additive mask;
- ``_image_pixels_to_features`` runs the tower with a fresh per-forward run and checks that exactly the promised
  number of embeddings per image comes back.
"""
from __future__ import annotations

import contextlib
import functools
import json
import logging
from typing import Any, Dict, Iterator, Optional, Tuple

import torch
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
class TowerReducer:
    """Runs a plan inside a vLLM ``CLIPVisionModel``: one instance ``forward`` per encoder layer, one run per
    forward."""

    def __init__(self, tower: CLIPVisionModel, plan: _bridge.Plan) -> None:
        if not isinstance(tower, CLIPVisionModel):
            raise _bridge.Unsupported(f"tokenreduce reduces vLLM's CLIPVisionModel; this tower is "
                                      f"{type(tower).__name__}")
        layers = list(tower.vision_model.encoder.layers)
        if len(layers) != plan.tower.num_layers:
            raise RuntimeError(f"vLLM built {len(layers)} tower layers, the plan expects {plan.tower.num_layers}")
        self.plan = plan
        self.run: Optional[_bridge.Run] = None
        for i, layer in enumerate(layers):
            if not isinstance(layer, CLIPEncoderLayer):
                raise _bridge.Unsupported(f"tower layer {i} is a {type(layer).__name__}, not vLLM's CLIPEncoderLayer")
            layer.forward = functools.partial(self._layer_forward, layer, i, layer.forward)

    @contextlib.contextmanager
    def forward(self) -> Iterator[_bridge.Run]:
        self.run = self.plan.begin()
        try:
            yield self.run
        finally:
            self.run = None

    def _layer_forward(self, layer: CLIPEncoderLayer, i: int, original: Any, hidden_states: torch.Tensor):
        """``[B, N, C]`` -> ``[B, N', C]``: vLLM's CLIPEncoderLayer with the method's site placed in it."""
        run = self.run
        if run is None:  # the tower called outside _image_pixels_to_features: unchanged
            return original(hidden_states)
        plan = self.plan
        bias = run.attention_bias(hidden_states.shape[1])
        acts = plan.acts[i]
        if not acts and bias is None:
            return original(hidden_states)
        x = hidden_states
        attn_out, q, k = self._attention(layer, layer.layer_norm1(x), bias, run.wants_qk(i))
        x = x + attn_out
        if acts and plan.site_mid:
            x = run.reduce(x, i, q, k, bias)
        x = x + layer.mlp(layer.layer_norm2(x))
        if acts and not plan.site_mid:
            x = run.reduce(x, i, q, k, bias)
        return x

    @staticmethod
    def _attention(layer: CLIPEncoderLayer, h: torch.Tensor, bias: Optional[torch.Tensor], want_qk: bool):
        """vLLM's CLIPAttention, returning its output ``[B, N, C]`` and, when asked, the queries and keys of all
        heads ``[B, N, H·d]`` (gathered over tensor-parallel ranks). With a bias, the attention itself is
        ``F.scaled_dot_product_attention`` with that additive mask (vLLM's encoder attention takes no mask)."""
        attn = layer.self_attn
        qkv, _ = attn.qkv_proj(h)
        q, k, v = qkv.chunk(3, dim=-1)
        if bias is None:
            out = attn.attn(q, k, v)
        else:
            b, n, _ = q.shape
            heads, d = attn.num_heads_per_partition, attn.head_dim
            q4, k4, v4 = (t.reshape(b, n, heads, d).transpose(1, 2) for t in (q, k, v))
            out = F.scaled_dot_product_attention(q4, k4, v4, attn_mask=bias.to(q.dtype), scale=attn.scale)
            out = out.transpose(1, 2).reshape(b, n, heads * d)
        out, _ = attn.out_proj(out)
        if not want_qk:
            return out, None, None
        if attn.tp_size > 1:  # each rank holds a slice of the heads; the method reads all of them, in head order
            q = tensor_model_parallel_all_gather(q.contiguous(), dim=-1)
            k = tensor_model_parallel_all_gather(k.contiguous(), dim=-1)
        return out, q, k


@MULTIMODAL_REGISTRY.register_processor(_build_processor, info=_build_info, dummy_inputs=LlavaDummyInputsBuilder)
class TokenReduceLlavaForConditionalGeneration(LlavaForConditionalGeneration):
    """vLLM's LLaVA; with ``hf_overrides={"tokenreduce": {...}}`` its vision tower reduces tokens."""

    def __init__(self, *, vllm_config: Any, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        plan = plan_for(vllm_config.model_config.hf_config)
        self._tokenreduce = TowerReducer(self.vision_tower, plan) if plan is not None else None

    def _image_pixels_to_features(self, vision_tower: Any, pixel_values: Any) -> Any:
        reducer = self._tokenreduce
        if reducer is None:
            return super()._image_pixels_to_features(vision_tower, pixel_values)
        plan = reducer.plan
        # A TOWER_OUT method's tokens replace LLaVA's feature selection (its CLS token included), as on HF.
        strategy = "full" if plan.at_output else self.config.vision_feature_select_strategy
        with reducer.forward():
            features = vision_tower(pixel_values, feature_select_strategy=strategy)
        got = features.shape[1] if torch.is_tensor(features) else {int(f.shape[0]) for f in features}
        if got != plan.tokens_per_image:
            raise RuntimeError(f"tokenreduce promised vLLM {plan.tokens_per_image} image tokens per image but "
                               f"{plan.describe().split(':')[0]} returned {got}; the method's output count is not "
                               "fixed for this input (please report this with the spec)")
        return features


__all__ = ["SPEC_KEY", "TokenReduceLlavaForConditionalGeneration", "TokenReduceLlavaProcessingInfo", "plan_for",
           "tower_of"]
