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

A model with several visual inputs (LLaVA-OneVision's images and videos, each with its own placeholder token and
encoder) declares one :class:`Modality` per input; each is encoded once and its runs shrunk in turn.
"""
from __future__ import annotations

import inspect
import re
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from ..patcher import Original, Replacement
from .prompt import left_align, restore_prompt, shrink_image_runs


#: The first transformers release whose ``generate`` takes pre-encoded ``mm_encoder_outputs``, which the shrinking
#: forward hands the reduced features through (5.17 and older: "model_kwargs are not used by the model").
MIN_TRANSFORMERS = (5, 18)


def check_transformers(version: Optional[str] = None) -> None:
    """Refuse a transformers older than :data:`MIN_TRANSFORMERS` (``version``: the installed one by default)."""
    if version is None:
        import transformers
        version = transformers.__version__
    parts = [int(p) for p in re.findall(r"\d+", version)[:2]]
    if tuple(parts) < MIN_TRANSFORMERS:
        need = ".".join(map(str, MIN_TRANSFORMERS))
        raise ValueError(f"tokenreduce's VLM backbones need transformers >= {need} (pre-encoded mm_encoder_outputs "
                         f"in generate); this is transformers {version}. Upgrade: pip install -U 'transformers>={need}'")


def pad_token_id(config: Any) -> int:
    """The pad id of a VLM config (its own or its text config's), 0 when neither has one."""
    for cfg in (config, getattr(config, "text_config", None)):
        pad = getattr(cfg, "pad_token_id", None) if cfg is not None else None
        if pad is not None:
            return int(pad)
    return 0


class Modality(NamedTuple):
    """One visual input of a VLM, as the shrinking forward / generate handle it.

    Attributes:
        key: its entry in transformers' ``mm_encoder_outputs`` (``"image"``, ``"video"``).
        pixels: the ``forward`` / ``generate`` argument holding its pixels, also the encoder's (``"pixel_values"``,
            ``"pixel_values_videos"``).
        token_id: its placeholder token in the prompt.
        encode: ``encode(<pixels>=..., return_dict=True, **vision_kwargs) -> features`` whose ``pooler_output``
            iterates over the inputs, ``[n_i, D]`` each (a list, or a ``[N, n, D]`` tensor).
        vision_kwargs: the ``forward`` / ``generate`` arguments ``encode`` takes.
        grow: whether a run may also lengthen (a reduced layout that can exceed the processor's count for some
            inputs); see :func:`~tokenreduce.backbones.vlm.prompt.shrink_image_runs`.
    """

    key: str
    pixels: str
    token_id: int
    encode: Callable[..., Any]
    vision_kwargs: Tuple[str, ...]
    grow: bool = False


class PromptShrink:
    """The shrinking ``forward`` / ``generate`` of one VLM (picklable callables).

    Args:
        model: the ``...ForConditionalGeneration``.
        image_token_id: the model's image token.
        encode: ``encode(pixel_values, **vision_kwargs) -> features`` with ``features.pooler_output`` a list of
            ``[n_i, D]`` per image (``get_image_features`` of the inner model).
        vision_kwargs: the ``forward`` / ``generate`` arguments ``encode`` takes (e.g. ``vision_feature_layer``).
        modalities: further visual inputs (e.g. videos), handled the same way after the images.
        grow: whether an image's run may also lengthen (see :class:`Modality`).
    """

    def __init__(self, model: nn.Module, image_token_id: int, encode: Callable[..., Any],
                 vision_kwargs=("vision_feature_layer", "vision_feature_select_strategy", "image_sizes"),
                 modalities: Sequence[Modality] = (), grow: bool = False) -> None:
        self.model, self.image_token_id, self.encode = model, int(image_token_id), encode
        self.vision_kwargs = tuple(vision_kwargs)
        self.modalities: List[Modality] = [Modality("image", "pixel_values", self.image_token_id, encode,
                                                    self.vision_kwargs, grow), *modalities]

    def features(self, pixel_values: torch.Tensor, arguments: Dict[str, Any],
                 modality: Optional[Modality] = None) -> Any:
        m = modality or self.modalities[0]
        return m.encode(**{m.pixels: pixel_values}, return_dict=True,
                        **{k: arguments.get(k) for k in m.vision_kwargs})

    def shrink(self, input_ids: torch.Tensor, features: Any, modality: Optional[Modality] = None,
               **tensors: Optional[torch.Tensor]) -> Optional[Dict[str, torch.Tensor]]:
        """``None`` when the prompt already has one placeholder token per feature, else the shrunk tensors."""
        m = modality or self.modalities[0]
        counts = [int(f.shape[0]) for f in features.pooler_output]
        if int((input_ids == m.token_id).sum()) == sum(counts):
            return None
        return shrink_image_runs(input_ids, m.token_id, counts, pad_token_id=pad_token_id(self.model.config),
                                 grow=m.grow, **tensors)

    def encode_all(self, input_ids: torch.Tensor, arguments: Dict[str, Any], names: Sequence[str]
                   ) -> Tuple[Dict[str, Any], Optional[Dict[str, torch.Tensor]]]:
        """Encode every modality whose pixels ``arguments`` holds and shrink the prompt for each in turn.

        Args:
            input_ids: ``[B, S]`` the prompt.
            arguments: the call's arguments (pixels, vision kwargs and the tensors named in ``names``).
            names: the prompt tensors to shrink along (``attention_mask``, ``labels``, ``position_ids``).

        Returns:
            ``({key: features}, shrunk)``: ``shrunk`` holds ``input_ids`` and the given ``names`` when any run
            changed, else None.
        """
        encoded: Dict[str, Any] = {}
        current: Dict[str, Optional[torch.Tensor]] = {n: arguments.get(n) for n in names}
        ids, changed = input_ids, False
        for m in self.modalities:
            pixels = arguments.get(m.pixels)
            if pixels is None:
                continue
            features = self.features(pixels, arguments, m)
            encoded[m.key] = features
            shrunk = self.shrink(ids, features, m, **current)
            if shrunk is not None:
                ids, changed = shrunk["input_ids"], True
                current.update({n: shrunk[n] for n in current if n in shrunk})
        if not changed:
            return encoded, None
        return encoded, {"input_ids": ids, **{n: t for n, t in current.items() if t is not None}}

    def pixel_names(self) -> Tuple[str, ...]:
        return tuple(m.pixels for m in self.modalities)


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
        input_ids = a.get("input_ids")
        given = {**a, **extra}
        if input_ids is None or all(given.get(n) is None for n in self.shrink_.pixel_names()) \
                or extra.get("mm_encoder_outputs") is not None or a.get("mm_encoder_outputs") is not None:
            return self.original(*args, **kwargs)
        encoded, shrunk = self.shrink_.encode_all(input_ids, given, ("attention_mask", "labels", "position_ids"))
        if shrunk is not None:
            a.update(shrunk)
        for name in self.shrink_.pixel_names():
            (a if name in a else extra)[name] = None
        extra.pop("mm_encoder_outputs", None)
        a["mm_encoder_outputs"] = encoded
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
        shrunk = None
        if self.shrink_ is not None and kwargs.get("mm_encoder_outputs") is None and \
                any(kwargs.get(n) is not None for n in self.shrink_.pixel_names()):
            # Encode once here to learn the counts, and hand the features to generate as transformers' own
            # pre-encoded ``mm_encoder_outputs`` (which it expands for beams and feeds to the prefill).
            encoded, shrunk = self.shrink_.encode_all(input_ids, kwargs, ("attention_mask", "position_ids"))
            for name in self.shrink_.pixel_names():
                kwargs.pop(name, None)
            kwargs["mm_encoder_outputs"] = encoded
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
