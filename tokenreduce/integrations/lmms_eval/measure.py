"""Measure what the language model really got at prefill: visual tokens per sample, per layer, and the time.

Read from the model's own inputs, so it is the same for every method and every adapter, patched or not, with
no per-method table: forward hooks (removed afterwards) on

- the multimodal inner model (``model.model``), which receives ``input_ids`` after tokenreduce has shortened each
  image's run of placeholder tokens: the visual tokens entering the language model are the placeholder
  positions of each row (``config.image_token_id`` / ``video_token_id``);
- every decoder layer, whose output length says how many tokens went on from that layer: a method that prunes
  inside the language model (DART, FastV, ...) removes only visual tokens, so a layer's visual count is the
  entering count minus the tokens removed up to it.

Only the first inner-model call after :meth:`PrefillMeter.start` is measured (the prefill; decode steps and
anything after are ignored). The prefill time runs from ``start()`` to the end of that call: vision tower,
projector, reduction and the language-model prefill, whichever order the adapter runs them in.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, List, Optional, Sequence, Set

import torch
import torch.nn as nn

_VISUAL_TOKEN_KEYS = ("image_token_id", "image_token_index", "video_token_id", "video_token_index")


@dataclass
class PrefillRecord:
    """One sample's prefill.

    Attributes:
        visual_in: visual tokens entering the language model.
        visual_kept: visual tokens after the last layer (what the deepest layers attend to).
        visual_mean: visual tokens averaged over the decoder layers (differs from ``visual_kept`` only for
            methods that prune inside the language model).
        sequence: total tokens entering the language model (text, visual and padding of the batch).
        prefill_s: wall time of the batch's prefill, in seconds.
        batch_size: samples in that batch.
    """

    visual_in: int
    visual_kept: int
    visual_mean: float
    sequence: int
    prefill_s: float
    batch_size: int


def visual_token_ids(config: Any) -> Set[int]:
    """Placeholder ids of images and videos named by a VLM config (top level, or its ``text_config``)."""
    ids: Set[int] = set()
    for source in (config, getattr(config, "text_config", None)):
        for key in _VISUAL_TOKEN_KEYS:
            value = getattr(source, key, None) if source is not None else None
            if isinstance(value, int) and value >= 0:
                ids.add(value)
    return ids


def inner_model(model: nn.Module) -> nn.Module:
    """The module that gets ``input_ids`` and runs tower + language model (``model.model`` in transformers 5)."""
    inner = getattr(model, "model", None)
    return inner if isinstance(inner, nn.Module) else model


def decoder_layers(model: nn.Module) -> Sequence[nn.Module]:
    """The language model's decoder layers, found through ``get_decoder()`` (empty when there is none)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    layers = getattr(decoder, "layers", None)
    return list(layers) if isinstance(layers, nn.ModuleList) else []


class PrefillMeter:
    """Context manager that records :class:`PrefillRecord` per sample for each measured call.

    ::

        with PrefillMeter(model) as meter:
            meter.start()
            model.generate(**inputs)
            records = meter.records()   # one per row of inputs
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.ids = sorted(visual_token_ids(model.config))
        self.inner = inner_model(model)
        self.layers = decoder_layers(model)
        self._handles: list = []
        self._reset()

    def _reset(self) -> None:
        self._t0: Optional[float] = None
        self._state = "idle"  # idle -> armed (start) -> running (prefill) -> done
        self._visual: Optional[torch.Tensor] = None
        self._seq = 0
        self._lengths: List[int] = []
        self._elapsed = float("nan")

    def __enter__(self) -> "PrefillMeter":
        self._handles.append(self.inner.register_forward_pre_hook(self._before, with_kwargs=True))
        self._handles.append(self.inner.register_forward_hook(self._after))
        for layer in self.layers:
            self._handles.append(layer.register_forward_hook(self._layer_out))
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def start(self) -> None:
        """Arm for the next call; its prefill time counts from now."""
        self._reset()
        self._sync()
        self._state = "armed"
        self._t0 = time.perf_counter()

    # -- hooks -----------------------------------------------------------------------------------------------
    def _before(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self._state != "armed":
            return
        ids = kwargs.get("input_ids", args[0] if args else None)
        if not isinstance(ids, torch.Tensor):
            raise RuntimeError("PrefillMeter needs input_ids at the model's prefill (inputs_embeds-only calls "
                               "cannot be counted)")
        mask = torch.zeros_like(ids, dtype=torch.bool)
        for token in self.ids:
            mask |= ids == token
        self._visual = mask.sum(1).cpu()
        self._seq = ids.shape[1]
        self._state = "running"

    def _layer_out(self, module: nn.Module, args: tuple, output: Any) -> None:
        if self._state == "running":
            hidden = output[0] if isinstance(output, (tuple, list)) else output
            self._lengths.append(int(hidden.shape[1]))

    def _after(self, module: nn.Module, args: tuple, output: Any) -> None:
        if self._state == "running":
            self._sync()
            self._elapsed = time.perf_counter() - self._t0
            self._state = "done"

    def _sync(self) -> None:
        device = next(self.model.parameters()).device
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    # -- result ----------------------------------------------------------------------------------------------
    def records(self) -> List[PrefillRecord]:
        """One record per row of the measured call. RuntimeError if no prefill ran since :meth:`start`."""
        if self._state != "done" or self._visual is None:
            raise RuntimeError("no prefill was measured: call start() before the model call")
        lengths = self._lengths or [self._seq]
        removed = torch.tensor([self._seq - n for n in lengths])  # tokens removed up to each layer
        rows = []
        for v in self._visual.tolist():
            per_layer = (v - removed).clamp(min=0)
            rows.append(PrefillRecord(visual_in=int(v), visual_kept=int(per_layer[-1]),
                                      visual_mean=float(per_layer.double().mean()), sequence=self._seq,
                                      prefill_s=self._elapsed, batch_size=len(self._visual)))
        return rows


__all__ = ["PrefillMeter", "PrefillRecord", "decoder_layers", "inner_model", "visual_token_ids"]
