"""vLLM with the plugin against tokenreduce on Hugging Face transformers: same weights, same method, same prompts.

For every servable method: vLLM's greedy tokens equal HF's, its top-k log-probabilities equal HF's (ids and
values), and the prompt length vLLM reports is the unreduced one minus the image tokens the method removed. Without
a ``tokenreduce`` key the plugin's class is vLLM's LLaVA. Once, the engine runs in its own process (spawned), which
proves the plugin was loaded there through the entry point.
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Optional, Sequence

import pytest
import torch

import tokenreduce

MAX_TOKENS = 4
TOP_K = 5
NUM_PATCHES = 64  # tiny tower: 56x56 image, 7x7 patches

#: (spec, image tokens per image the language model gets) at budgets that fit the tiny model.
METHODS = [
    ({"method": "visionzip", "dominant": 10, "contextual": 4}, 14),  # tower output: CLS + 9 dominant + 4 merged
    ({"method": "fastervlm", "keep": 16}, 16),                      # tower output
    ({"method": "vispruner", "keep": 16}, 16),                      # tower output
    ({"method": "divprune", "keep": 16}, 16),                       # tower output, reads the projected features
    ({"method": "pool", "keep": 16}, 16),                           # tower output, reads the patch grid
    ({"method": "tome", "r": 8}, 48),                               # in the layers: 65 -> 57 -> 49, CLS dropped
    ({"method": "pitome", "keep_ratio": 0.8}, 42),                  # 65 -> 53 -> 43, CLS dropped
    ({"method": "random", "keep": 16}, 16),                         # tower output on a VLM
]
ATOL = 1e-4  # float32 on both sides; measured differences are ~5e-7


def hf_reference(model, processor, prompt: str, image, spec: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """Greedy decoding on HF with ``tokenreduce.patch`` (or unpatched): the prompt length the processor gives,
    the new tokens and the log-probabilities ``[T, V]`` of each step."""
    inputs = processor(text=prompt, images=image, return_tensors="pt")
    if spec is not None:
        params = {k: v for k, v in spec.items() if k != "method"}
        tokenreduce.patch(model, spec["method"], **params)
    try:
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=MAX_TOKENS, do_sample=False, return_dict_in_generate=True,
                                 output_logits=True)
    finally:
        if spec is not None:
            tokenreduce.unpatch(model)
    n = inputs["input_ids"].shape[1]
    return {"prompt_len": n, "tokens": out.sequences[0, n:].tolist(),
            "logprobs": torch.stack(list(out.logits), 1)[0].float().log_softmax(-1)}


def vllm_generate(llm, requests_: Sequence) -> List[Any]:
    """All requests in one ``generate`` call: vLLM batches them (and their images) as it schedules."""
    from vllm import SamplingParams

    sampling = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, logprobs=TOP_K)
    prompts = [{"prompt": p, "multi_modal_data": {"image": img}} for p, img in requests_]
    return llm.generate(prompts, sampling, use_tqdm=False)


def compare(out, ref: Dict[str, Any]) -> float:
    """Assert vLLM's output equals the HF reference; returns the largest |Δ log-probability|."""
    completion = out.outputs[0]
    assert list(completion.token_ids) == ref["tokens"], "greedy tokens differ"
    worst = 0.0
    for step, logprobs in enumerate(completion.logprobs):
        top = {tid for tid, lp in logprobs.items() if lp.rank <= TOP_K}
        hf_top = set(ref["logprobs"][step].topk(TOP_K).indices.tolist())
        assert top == hf_top, f"top-{TOP_K} ids differ at step {step}: vLLM {sorted(top)}, HF {sorted(hf_top)}"
        for tid, lp in logprobs.items():
            worst = max(worst, abs(lp.logprob - float(ref["logprobs"][step, tid])))
    assert worst < ATOL, f"log-probabilities differ by {worst}"
    return worst


def report(name: str, **numbers: Any) -> None:
    """Append one line of measured numbers to ``$TOKENREDUCE_VLLM_REPORT`` (the CI job prints it)."""
    path = os.environ.get("TOKENREDUCE_VLLM_REPORT")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"case": name, **numbers}) + "\n")


def check_parity(llm, checkpoint, processor, requests_, spec, per_image):
    model = checkpoint[1]
    outs = vllm_generate(llm, requests_)
    worst, lengths = 0.0, []
    for (prompt, image), out in zip(requests_, outs):
        ref = hf_reference(model, processor, prompt, image, spec)
        assert len(out.prompt_token_ids) == ref["prompt_len"] - NUM_PATCHES + per_image, \
            f"vLLM's prompt is {len(out.prompt_token_ids)} tokens, expected {ref['prompt_len']} - {NUM_PATCHES} + " \
            f"{per_image}"
        worst = max(worst, compare(out, ref))
        lengths.append((ref["prompt_len"], len(out.prompt_token_ids)))
    if spec is not None:  # the comparison is not vacuous: the reduction changed what the model computes
        plain = hf_reference(model, processor, *requests_[0], None)
        reduced = hf_reference(model, processor, *requests_[0], spec)
        assert (plain["logprobs"] - reduced["logprobs"]).abs().max() > 1e-3
    report(spec["method"] if spec else "unreduced", max_abs_dlogprob=worst, tokens_equal=True,
           prompt_lengths_hf_vs_vllm=lengths)
    return worst


def test_without_the_key_it_is_vllms_llava(checkpoint, processor, requests_, make_engine):
    with make_engine(checkpoint[0]) as llm:
        check_parity(llm, checkpoint, processor, requests_, None, NUM_PATCHES)


@pytest.mark.parametrize("spec, per_image", METHODS, ids=[s["method"] for s, _ in METHODS])
def test_parity_with_huggingface(spec, per_image, checkpoint, processor, requests_, make_engine):
    with make_engine(checkpoint[0], spec) as llm:
        check_parity(llm, checkpoint, processor, requests_, spec, per_image)


def test_unservable_method_is_refused_at_startup(checkpoint, make_engine):
    with pytest.raises(Exception, match="inside the language model"):
        with make_engine(checkpoint[0], {"method": "dart"}):
            pass


def test_plugin_loads_in_the_engine_process(checkpoint, processor, requests_, make_engine, tmp_path, monkeypatch):
    trace = tmp_path / "pids"
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")
    monkeypatch.setenv("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
    monkeypatch.setenv("TOKENREDUCE_VLLM_TRACE", str(trace))
    spec, per_image = METHODS[0]
    with make_engine(checkpoint[0], spec) as llm:
        check_parity(llm, checkpoint, processor, requests_[:1], spec, per_image)
    pids = {int(p) for p in trace.read_text().split()}
    assert pids - {os.getpid()}, f"the plugin was loaded only in the test process {pids}"
