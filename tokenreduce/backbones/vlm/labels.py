"""The loss of a VLM whose language model dropped tokens: labels gathered at the kept positions."""
from __future__ import annotations

import inspect
from typing import Any

from ..patcher import Original, Replacement


class PrunedLabels(Replacement):
    """``forward`` of a VLM patched inside its language model, when called with ``labels``: the logits cover only
    the tokens the last decoder layer kept, so the loss is computed from the kept tokens' labels (next-token
    targets within the kept sequence; a token the method synthesised or padded carries -100). Without labels the
    model's own forward runs unchanged.

    ``adapter``: a VLM adapter with ``model``, ``record`` and ``decoder`` (its :class:`DecoderSite`)."""

    def __init__(self, adapter: Any, original: Original) -> None:
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
