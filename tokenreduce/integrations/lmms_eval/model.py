"""The lmms-eval model ``tokenreduce``: any VLM family from ``pretrained=``, patched with ``method=`` / ``config=``.

    lmms-eval --model tokenreduce \\
        --model_args pretrained=llava-hf/llava-1.5-7b-hf,method=visionzip,dominant=54,contextual=10 \\
        --tasks gqa,mme,pope --batch_size 8

Everything in ``--model_args`` that is not an option of this class is a parameter of the method
(``tokenreduce.method_params(method)``), validated before the weights load. ``config=vlm/llava15/visionzip_64``
takes method and parameters from a config file instead (explicit parameters override it). Without ``method``
and ``config`` the model runs unpatched.

Requests are batched (grouped by generation settings, longest first, left padded). ``generate_until`` decodes
greedily unless the task asks for sampling; ``loglikelihood`` returns the negative log-likelihood of the
continuation (lmms-eval's multiple choice takes the ``argmin``), averaged over its tokens by default like
lmms-eval's built-in LLaVA models (``loglikelihood=sum`` for the plain sum). Every sample's visual tokens
entering the language model, kept to its last layer and averaged over its layers, and the batch's prefill time
are appended to :attr:`TokenReduceLMM.records` (and to ``records=PATH`` as JSON lines).
"""
from __future__ import annotations

import inspect
import json
import os
from dataclasses import asdict
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from tqdm import tqdm

from lmms_eval.api.instance import GenerationResult, Instance
from lmms_eval.api.model import lmms

from .loading import LoadedVLM, load_vlm
from .measure import PrefillMeter
from .patching import PatchSpec
from .prompting import continuation_length, render, score_tails

_LL_REDUCTIONS = ("mean", "sum")


class TokenReduceLMM(lmms):
    """lmms-eval model running a Hugging Face VLM through tokenreduce (see the module docstring)."""

    is_simple = True

    def __init__(self, pretrained: Optional[str] = None, method: Optional[str] = None,
                 config: Optional[str] = None, device: Optional[str] = None, dtype: str = "auto",
                 batch_size: Any = 1, max_batch_size: Any = None, attn_implementation: Optional[str] = None,
                 revision: Optional[str] = None, trust_remote_code: bool = False,
                 chat_template: Optional[str] = None, max_new_tokens: int = 1024, loglikelihood: str = "mean",
                 records: Optional[str] = None, loaded: Optional[LoadedVLM] = None, **params: Any) -> None:
        super().__init__()
        _refuse_several_processes()
        if loglikelihood not in _LL_REDUCTIONS:
            raise ValueError(f"loglikelihood={loglikelihood!r}: use one of {', '.join(_LL_REDUCTIONS)}")
        # Everything is checked before any weight is read. max_batch_size is lmms-eval's; batches are fixed here.
        self.batch_size_per_gpu = _positive_int(batch_size, "batch_size")
        self.max_new_tokens = _positive_int(max_new_tokens, "max_new_tokens")
        self.spec = PatchSpec.from_args(method, config, params)
        self._owns_model = loaded is None
        if loaded is None:
            if not pretrained:
                raise ValueError("the tokenreduce model needs pretrained=PATH_OR_HUB_ID in --model_args")
            loaded = load_vlm(str(pretrained), device=device, dtype=dtype, attn_implementation=attn_implementation,
                              revision=revision, trust_remote_code=trust_remote_code)
        self.loaded: Optional[LoadedVLM] = loaded
        self.spec.apply(loaded.model)
        self.chat_template = chat_template
        self.ll_reduction = loglikelihood
        self.records_path = records
        self.records: List[Dict[str, Any]] = []

    # -- what lmms-eval reads --------------------------------------------------------------------------------
    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: Optional[dict] = None
                               ) -> "TokenReduceLMM":
        """Build from ``--model_args``; lmms-eval's own options (``--device``, ``--batch_size``) fill in only
        what ``--model_args`` leaves out (0.7.3 passes both and fails on a duplicate keyword)."""
        from lmms_eval.utils import simple_parse_args_string

        given = simple_parse_args_string(arg_string)
        defaults = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in given}
        return cls(**defaults, **given)

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def model(self) -> Any:
        return self._loaded().model

    @property
    def device(self) -> torch.device:
        return self._loaded().device

    @property
    def tokenizer(self) -> Any:
        return self._loaded().tokenizer

    def clean(self) -> None:
        """Free the model when this instance loaded it (lmms-eval calls this after the last request); a model
        handed in with ``loaded=`` belongs to the caller. The records stay."""
        if self._owns_model:
            self.loaded = None
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    def _loaded(self) -> LoadedVLM:
        if self.loaded is None:
            raise RuntimeError("this tokenreduce model was cleaned (lmms-eval frees it after evaluating); "
                               "create a new one")
        return self.loaded

    # -- requests --------------------------------------------------------------------------------------------
    def generate_until(self, requests: List[Instance]) -> List[str]:
        items = [self._prepare(i, req.args) for i, req in enumerate(requests)]
        out: List[Optional[str]] = [None] * len(items)
        for batch in self._progress(_batches(items, self.batch_size, key=lambda it: it["gen_key"]), len(items),
                                    "generate_until"):
            for item, text in zip(batch, self._generate(batch)):
                out[item["index"]] = text
        return out  # type: ignore[return-value]

    def loglikelihood(self, requests: List[Instance]) -> List[GenerationResult]:
        items = [self._prepare(i, req.args, scored=True) for i, req in enumerate(requests)]
        out: List[Optional[GenerationResult]] = [None] * len(items)
        for batch in self._progress(_batches(items, self.batch_size, key=lambda it: ""), len(items),
                                    "loglikelihood"):
            for item, (nll, n, greedy) in zip(batch, self._score(batch)):
                value = nll / n if self.ll_reduction == "mean" else nll
                # lmms-eval 0.7.3 turns any other return type into its string; GenerationResult passes through
                out[item["index"]] = GenerationResult(text=(value, greedy))
        return out  # type: ignore[return-value]

    def generate_until_multi_round(self, requests: List[Instance]) -> List[str]:
        raise NotImplementedError("the tokenreduce lmms-eval model does not run multi-round tasks yet")

    # -- building one request --------------------------------------------------------------------------------
    def _prepare(self, index: int, args: tuple, scored: bool = False) -> Dict[str, Any]:
        """A request as ``{index, text, images, gen_kwargs | scored, task, doc_id}`` (prompt rendered)."""
        context, second, doc_to_visual, doc_id, task, split = args
        doc = self.task_dict[task][split][doc_id]
        images = _images(doc_to_visual(doc) if doc_to_visual is not None else [], task)
        processor = self._loaded().processor
        item: Dict[str, Any] = {"index": index, "images": images, "task": task, "doc_id": doc_id}
        prompt = render(processor, context, len(images), chat_template=self.chat_template)
        if scored:
            continuation = second if isinstance(second, str) else second(doc)
            full = render(processor, context, len(images), continuation, chat_template=self.chat_template)
            item.update(text=full, scored=continuation_length(self.tokenizer, prompt, full), kind="loglikelihood")
        else:
            gen_kwargs = dict(second or {})
            item.update(text=prompt, gen_kwargs=gen_kwargs, kind="generate_until",
                        gen_key=json.dumps(gen_kwargs, sort_keys=True, default=str))
        return item

    def _inputs(self, batch: Sequence[Dict[str, Any]]) -> Dict[str, torch.Tensor]:
        """Processor outputs of a batch (left padded), on the model's device, floats in the model's dtype."""
        loaded = self._loaded()
        images = [img for item in batch for img in item["images"]]
        return loaded.to_model(loaded.processor(text=[item["text"] for item in batch], images=images or None,
                                                return_tensors="pt", padding=True))

    # -- running a batch -------------------------------------------------------------------------------------
    def _generate(self, batch: Sequence[Dict[str, Any]]) -> List[str]:
        inputs = self._inputs(batch)
        gen_kwargs = dict(batch[0]["gen_kwargs"])
        until = _until(gen_kwargs.pop("until", None))
        with torch.inference_mode(), PrefillMeter(self.model) as meter:
            meter.start()
            sequences = self.model.generate(**inputs, **self._hf_generation(gen_kwargs))
            self._record(batch, meter)
        texts = self.tokenizer.batch_decode(sequences[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        return [_cut(text, until) for text in texts]

    def _score(self, batch: Sequence[Dict[str, Any]]) -> List[Tuple[float, int, bool]]:
        inputs = self._inputs(batch)
        lengths = [item["scored"] for item in batch]
        extra = {}
        if "logits_to_keep" in inspect.signature(type(self.model).forward).parameters:
            extra["logits_to_keep"] = max(lengths) + 1  # only the scored tail: [B, S, vocab] logits are large
        with torch.inference_mode(), PrefillMeter(self.model) as meter:
            meter.start()
            # Left padding without explicit positions: rotary embeddings are shift invariant, so a padded row
            # scores as it does alone (to rounding), and models with their own position logic (M-RoPE) keep it.
            logits = self.model(**inputs, use_cache=False, **extra).logits
            self._record(batch, meter)
        return score_tails(logits, inputs["input_ids"], lengths)

    def _hf_generation(self, gen_kwargs: Dict[str, Any]) -> Dict[str, Any]:
        """lmms-eval's generation settings as ``generate()`` arguments (greedy unless sampling is asked for)."""
        temperature = float(gen_kwargs.get("temperature") or 0.0)
        sample = bool(gen_kwargs.get("do_sample", False)) or temperature > 0
        out: Dict[str, Any] = {"max_new_tokens": int(gen_kwargs.get("max_new_tokens") or self.max_new_tokens),
                               "do_sample": sample, "num_beams": int(gen_kwargs.get("num_beams") or 1)}
        # Stop where the checkpoint's generation config says (chat models end turns with their own token); pad
        # with its pad token, else the tokenizer's.
        if getattr(self.model.generation_config, "pad_token_id", None) is None:
            out["pad_token_id"] = self.tokenizer.pad_token_id
        if sample:
            out["temperature"] = temperature or 1.0
            if gen_kwargs.get("top_p") is not None:
                out["top_p"] = float(gen_kwargs["top_p"])
        else:  # keep the checkpoint's sampling defaults from warning about being ignored
            out.update(temperature=None, top_p=None, top_k=None)
        return out

    def _record(self, batch: Sequence[Dict[str, Any]], meter: PrefillMeter) -> None:
        rows = []
        for item, rec in zip(batch, meter.records()):
            rows.append({"task": item["task"], "doc_id": item["doc_id"], "request": item["kind"],
                         "method": self.spec.method or "unpatched", **asdict(rec)})
        self.records.extend(rows)
        if self.records_path:
            with open(self.records_path, "a") as f:
                f.writelines(json.dumps(r) + "\n" for r in rows)

    def _progress(self, batches: Iterator[List[Dict[str, Any]]], total: int, what: str
                  ) -> Iterator[List[Dict[str, Any]]]:
        bar = tqdm(total=total, desc=f"tokenreduce {what}", disable=self.rank != 0)
        for batch in batches:
            yield batch
            bar.update(len(batch))
        bar.close()


# ---------------------------------------------------------------------------------------------------------------
# Small pure helpers
# ---------------------------------------------------------------------------------------------------------------
def _batches(items: Sequence[Dict[str, Any]], size: int, key: Callable[[Dict[str, Any]], str]
             ) -> Iterator[List[Dict[str, Any]]]:
    """Chunks of at most ``size`` items sharing ``key``, longest prompts first (less padding, and an
    out-of-memory error shows up in the first batch)."""
    groups: Dict[str, List[Dict[str, Any]]] = {}
    for item in items:
        groups.setdefault(key(item), []).append(item)
    for group in groups.values():
        group = sorted(group, key=lambda it: (-len(it["text"]), it["index"]))
        for start in range(0, len(group), size):
            yield group[start:start + size]


def _images(visuals: Any, task: str) -> list:
    """The PIL images of a document (nested lists flattened). Videos and audio are refused, naming the task."""
    from PIL import Image

    flat: list = []
    stack = list(visuals or [])
    while stack:
        v = stack.pop(0)
        if isinstance(v, (list, tuple)):
            stack[:0] = list(v)
        elif isinstance(v, Image.Image):
            flat.append(v.convert("RGB") if v.mode != "RGB" else v)
        else:
            raise NotImplementedError(f"task {task!r} gives a {type(v).__name__} visual; the tokenreduce "
                                      "lmms-eval model takes images only (no video or audio yet)")
    return flat


def _until(value: Any) -> List[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return list(value)
    raise ValueError(f"generation_kwargs 'until' must be a string or a list of strings, got {value!r}")


def _cut(text: str, until: Sequence[str]) -> str:
    """``text`` up to the first stop string."""
    for stop in until:
        if stop:
            text = text.split(stop, 1)[0]
    return text


def _refuse_several_processes() -> None:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise RuntimeError("the tokenreduce lmms-eval model runs in one process; launch one run per GPU "
                           "(device=cuda:N) instead of accelerate/torchrun with several processes")


def _positive_int(value: Any, name: str) -> int:
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a positive integer, got {value!r}"
                         + (" (automatic batch sizes are not supported)" if name == "batch_size" else "")) from None
    if n < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return n


__all__ = ["TokenReduceLMM"]
