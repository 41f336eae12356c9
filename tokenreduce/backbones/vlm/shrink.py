"""Shrinking the prompt for vision-side methods: after the tower returns fewer features per image, each image's run
of image tokens must shrink to match, because Hugging Face v5 scatters features into the positions of
``config.image_token_id`` and requires one position per feature row.

The patched ``forward`` and ``generate`` encode the images once, shrink ``input_ids`` (and ``attention_mask``,
``labels``, ``position_ids``) with :func:`~tokenreduce.backbones.vlm.prompt.shrink_image_runs`, and hand the features
to the model as transformers' own pre-encoded ``mm_encoder_outputs``, so the tower runs once per prompt. ``generate``
shrinks before HF's loop starts (so the mask and positions it carries match the KV cache), moves right padding to
the left (HF's ``generate`` would continue a right-padded row after its padding), and returns ``sequences`` with the
caller's prompt in front of the new tokens, so ``out[:, inputs.input_ids.shape[1]:]`` still slices the answer. Users pass processor outputs unchanged; a prompt that already has one image token per feature (the papers'
own prompt contract) is passed through.
"""
from __future__ import annotations

import inspect
from typing import Any, Callable, Dict, Optional

import torch
import torch.nn as nn

from ..patcher import Original, Replacement
from .prompt import left_align, restore_prompt, shrink_image_runs


def pad_token_id(config: Any) -> int:
    """The pad id of a VLM config (its own or its text config's), 0 when neither has one."""
    for cfg in (config, getattr(config, "text_config", None)):
        pad = getattr(cfg, "pad_token_id", None) if cfg is not None else None
        if pad is not None:
            return int(pad)
    return 0


class PromptShrink:
    """The shrinking ``forward`` / ``generate`` of one VLM (picklable callables).

    Args:
        model: the ``...ForConditionalGeneration``.
        image_token_id: the model's image token.
        encode: ``encode(pixel_values, **vision_kwargs) -> features`` with ``features.pooler_output`` a list of
            ``[n_i, D]`` per image (``get_image_features`` of the inner model).
        vision_kwargs: the ``forward`` / ``generate`` arguments ``encode`` takes (e.g. ``vision_feature_layer``).
    """

    def __init__(self, model: nn.Module, image_token_id: int, encode: Callable[..., Any],
                 vision_kwargs=("vision_feature_layer", "vision_feature_select_strategy", "image_sizes")) -> None:
        self.model, self.image_token_id, self.encode = model, int(image_token_id), encode
        self.vision_kwargs = tuple(vision_kwargs)

    def features(self, pixel_values: torch.Tensor, arguments: Dict[str, Any]) -> Any:
        return self.encode(pixel_values=pixel_values, return_dict=True,
                           **{k: arguments.get(k) for k in self.vision_kwargs})

    def shrink(self, input_ids: torch.Tensor, features: Any, **tensors: Optional[torch.Tensor]
               ) -> Optional[Dict[str, torch.Tensor]]:
        """``None`` when the prompt already has one image token per feature, else the shrunk tensors."""
        counts = [int(f.shape[0]) for f in features.pooler_output]
        if int((input_ids == self.image_token_id).sum()) == sum(counts):
            return None
        return shrink_image_runs(input_ids, self.image_token_id, counts, pad_token_id=pad_token_id(self.model.config),
                                 **tensors)


class ShrinkingForward(Replacement):
    """``model.forward`` that shrinks each image's run of image tokens to the reduced feature count."""

    def __init__(self, shrink: PromptShrink, original: Original) -> None:
        self.shrink_, self.original = shrink, original
        self.signature = inspect.signature(type(shrink.model).forward)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        bound = self.signature.bind(self.shrink_.model, *args, **kwargs)
        a = dict(bound.arguments)
        a.pop(next(iter(self.signature.parameters)))
        var_kw = next((p.name for p in self.signature.parameters.values() if p.kind is p.VAR_KEYWORD), None)
        extra = dict(a.pop(var_kw, {})) if var_kw else {}
        pixel_values, input_ids = a.get("pixel_values"), a.get("input_ids")
        if pixel_values is None or input_ids is None or extra.get("mm_encoder_outputs") is not None \
                or a.get("mm_encoder_outputs") is not None:
            return self.original(*args, **kwargs)
        features = self.shrink_.features(pixel_values, {**a, **extra})
        shrunk = self.shrink_.shrink(input_ids, features, attention_mask=a.get("attention_mask"),
                                     labels=a.get("labels"), position_ids=a.get("position_ids"))
        if shrunk is not None:
            a.update(shrunk)
        a["pixel_values"] = None
        extra.pop("mm_encoder_outputs", None)
        a["mm_encoder_outputs"] = {"image": features}
        return self.original(**a, **extra)


class VlmGenerate(Replacement):
    """``model.generate`` of a patched VLM: right padding moved to the left (where ``generate`` needs it), and for
    vision methods the prompt shrunk to the reduced feature counts before HF's loop; the returned sequences carry the
    caller's prompt in front of the new tokens."""

    def __init__(self, shrink: Optional[PromptShrink], original: Original) -> None:
        self.shrink_, self.original = shrink, original

    def __call__(self, inputs: Optional[torch.Tensor] = None, *args: Any, **kwargs: Any) -> Any:
        prompt = inputs if inputs is not None else kwargs.get("input_ids")
        if prompt is None or prompt.dim() != 2:
            return self.original(inputs, *args, **kwargs)
        input_ids = prompt
        aligned = left_align(input_ids, kwargs.get("attention_mask"))
        if aligned is not None:
            if kwargs.get("position_ids") is not None:
                raise ValueError("a right-padded prompt with explicit position_ids: pad on the left instead")
            input_ids, kwargs["attention_mask"] = aligned
        pixel_values = kwargs.get("pixel_values")
        shrunk = None
        if self.shrink_ is not None and pixel_values is not None and kwargs.get("mm_encoder_outputs") is None:
            # Encode once here to learn the counts, and hand the features to generate as transformers' own
            # pre-encoded ``mm_encoder_outputs`` (which it expands for beams and feeds to the prefill).
            features = self.shrink_.features(pixel_values, kwargs)
            kwargs.pop("pixel_values")
            kwargs["mm_encoder_outputs"] = {"image": features}
            shrunk = self.shrink_.shrink(input_ids, features, attention_mask=kwargs.get("attention_mask"),
                                         position_ids=kwargs.get("position_ids"))
        if shrunk is not None:
            for name in ("attention_mask", "position_ids"):
                if name in shrunk:
                    kwargs[name] = shrunk[name]
            input_ids = shrunk["input_ids"]
        if input_ids is prompt:
            return self.original(inputs, *args, **kwargs)
        if inputs is not None:
            inputs = input_ids
        else:
            kwargs["input_ids"] = input_ids
        out = self.original(inputs, *args, **kwargs)
        width = input_ids.shape[1]
        if torch.is_tensor(out):
            return restore_prompt(out, prompt, width)
        if getattr(out, "sequences", None) is not None:
            out.sequences = restore_prompt(out.sequences, prompt, width)
        return out
