"""The plugin without an engine: resolving specs (counts, refusals with reasons), the tower checks, the entry point,
and that ``import tokenreduce`` stays free of vLLM."""
from __future__ import annotations

import json
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

import tokenreduce
from tokenreduce.integrations.vllm._bridge import Tower, Unsupported, make_plan

TINY = Tower(num_layers=2, num_patches=64, dim=32, num_heads=4, drops_cls=True)
LLAVA15 = Tower(num_layers=23, num_patches=576, dim=1024, num_heads=16, drops_cls=True)  # CLIP-L/14-336, layer -2


def test_import_tokenreduce_does_not_import_vllm():
    code = "import sys, tokenreduce, tokenreduce.integrations.vllm; assert 'vllm' not in sys.modules, 'vllm imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_entry_point_is_installed():
    from importlib.metadata import entry_points

    eps = {ep.name: ep.value for ep in entry_points(group="vllm.general_plugins")}
    assert eps.get("tokenreduce") == "tokenreduce.integrations.vllm:register", eps


@pytest.mark.parametrize("spec, tower, expected", [
    ({"method": "visionzip", "dominant": 10, "contextual": 4}, TINY, 14),  # CLS + 9 dominant + 4 contextual
    ({"method": "tome", "r": 8}, TINY, 48),                               # 65 -> 57 -> 49, CLS dropped
    ({"method": "pitome", "keep_ratio": 0.8}, TINY, 42),                  # 65 -> 53 -> 43, CLS dropped
    ({"method": "pitome", "ratio": 0.8}, TINY, 42),                       # the paper's name, an alias
    ({"method": "random", "keep": 16}, TINY, 16),                         # a VLM's tower output
    ({"method": "fastervlm", "keep": 16}, TINY, 16),
    ({"method": "fastervlm", "keep_ratio": 0.25}, LLAVA15, 144),
    ({"method": "vispruner", "keep": 16}, TINY, 16),
    ({"method": "divprune", "keep_ratio": 0.1}, LLAVA15, 58),
    ({"method": "pool", "keep": 16}, TINY, 16),
    ({"method": "visionzip", "dominant": 54, "contextual": 10}, LLAVA15, 64),
    ({"method": "visionzip"}, LLAVA15, 64),                               # the paper's defaults
    ({"method": "tome", "r": 16}, LLAVA15, 576 - 23 * 16),
])
def test_plan_counts(spec, tower, expected):
    assert make_plan(spec, tower).tokens_per_image == expected


def test_full_strategy_keeps_cls():
    full = Tower(**{**TINY.__dict__, "drops_cls": False})
    assert make_plan({"method": "tome", "r": 8}, full).tokens_per_image == 49
    assert make_plan({"method": "visionzip", "dominant": 10, "contextual": 4}, full).tokens_per_image == 14


def test_spec_as_json_text():
    plan = make_plan(json.dumps({"method": "visionzip", "dominant": 10, "contextual": 4}), TINY)
    assert plan.tokens_per_image == 14 and plan.at_output


@pytest.mark.parametrize("name", [m for m in tokenreduce.list_methods()
                                  if tokenreduce.get_method(m).site == tokenreduce.Site.LLM_LAYER])
def test_language_model_methods_are_refused_with_the_reason(name):
    with pytest.raises(Unsupported, match="inside the language model"):
        make_plan({"method": name}, TINY)


def test_bad_specs_say_what_to_do():
    with pytest.raises(ValueError, match="registered methods"):
        make_plan({"method": "nope"}, TINY)
    with pytest.raises(TypeError, match="unknown parameter"):
        make_plan({"method": "visionzip", "dominnt": 10}, TINY)
    with pytest.raises(ValueError, match="exceeds"):
        make_plan({"method": "visionzip", "dominant": 100, "contextual": 0}, TINY)
    with pytest.raises(Unsupported, match="trace_source"):
        make_plan({"method": "tome", "r": 4, "trace_source": True}, TINY)
    with pytest.raises(ValueError, match="'method' name"):
        make_plan({"dominant": 10}, TINY)
    with pytest.raises(ValueError, match="not valid JSON"):
        make_plan("{visionzip", TINY)


class _DropsBelowMean(tokenreduce.ReductionMethod):
    """A toy method whose count depends on the content: keeps the tokens whose first feature is above 0."""

    name = "_test_content_dependent"
    site = tokenreduce.Site.BLOCK_OUT

    def reduce(self, state):
        keep = torch.cat([torch.tensor([True]), state.x[0, 1:, 0] > 0]).nonzero()[:, 0]
        return state.replace(x=state.x[:, keep], size=state.size[:, keep])


def test_content_dependent_count_is_refused():
    if _DropsBelowMean.name not in tokenreduce.list_methods():
        tokenreduce.register_method(_DropsBelowMean)
    with pytest.raises(Unsupported, match="depends on the image"):
        make_plan({"method": _DropsBelowMean.name}, TINY)


@pytest.mark.skipif("ats" not in tokenreduce.list_methods(), reason="ATS is not registered")
def test_adaptive_token_sampling_is_refused():
    with pytest.raises(Unsupported, match="number of tokens per image|depends on the image"):
        make_plan({"method": "ats", "keep": 32}, TINY)


def _hf_config(**changes):
    vc = SimpleNamespace(model_type="clip_vision_model", num_hidden_layers=3, image_size=56, patch_size=7,
                         hidden_size=32, num_attention_heads=4)
    cfg = dict(vision_config=vc, vision_feature_layer=-2, vision_feature_select_strategy="default")
    cfg.update(changes)
    return SimpleNamespace(**cfg)


def test_tower_of_llava_config():
    from tokenreduce.integrations.vllm.llava import tower_of

    assert tower_of(_hf_config()) == TINY
    assert tower_of(_hf_config(vision_feature_layer=-1)).num_layers == 3
    with pytest.raises(Unsupported, match="single vision_feature_layer"):
        tower_of(_hf_config(vision_feature_layer=[-2, -1]))
    with pytest.raises(Unsupported, match="'default'"):
        tower_of(_hf_config(vision_feature_select_strategy="class"))
    siglip = SimpleNamespace(**{**_hf_config().vision_config.__dict__, "model_type": "siglip_vision_model"})
    with pytest.raises(Unsupported, match="CLIP vision tower"):
        tower_of(_hf_config(vision_config=siglip))


def test_register_is_idempotent_and_covers_the_refused_models():
    from vllm import ModelRegistry

    from tokenreduce.integrations.vllm import register

    register()
    register()
    from tokenreduce.integrations.vllm import refused

    cls = ModelRegistry._try_load_model_cls("Qwen2_5_VLForConditionalGeneration")
    assert cls is refused.RefusingQwen2_5_VL and cls.__mro__[1].__name__ == "Qwen2_5_VLForConditionalGeneration"
    assert ModelRegistry._try_load_model_cls("LlavaForConditionalGeneration").__name__ == \
        "TokenReduceLlavaForConditionalGeneration"


class _NeedsThePrompt(tokenreduce.ReductionMethod):
    """A toy tower-output method that reads the prompt's instruction (as CDPruner does)."""

    name = "_test_needs_instruction"
    site = tokenreduce.Site.TOWER_OUT
    needs = frozenset({"instruction"})

    def num_output(self, num_tokens):
        return 8

    def reduce(self, state):
        return state


def test_a_method_that_reads_the_prompt_is_refused():
    if _NeedsThePrompt.name not in tokenreduce.list_methods():
        tokenreduce.register_method(_NeedsThePrompt)
    with pytest.raises(Unsupported, match="without its prompt"):
        make_plan({"method": _NeedsThePrompt.name}, TINY)
