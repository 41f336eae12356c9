"""``torch.compile`` against eager for every registered method that runs on a timm ViT (docs/concepts.md#compile).

Methods that declare ``compilable = True`` trace whole (``fullgraph=True``); the others run their reduction
outside the graph, so ``torch.compile`` works with graph breaks and ``fullgraph=True`` is refused by dynamo.
Dynamo's ``eager`` backend checks graph capture, the part a method can break; one inductor run checks the kernels.
"""
import pytest
import torch

import tokenreduce
from tokenreduce.core import get_method

from .conftest import tiny_vit

#: A setting that reduces tokens on the 4-block tiny ViT, for every method that runs on it.
SETTINGS = {
    "tome": dict(r=4), "pitome": dict(keep_ratio=0.9), "atc": dict(r=4), "tofu": dict(r=4), "mctf": dict(r=4),
    "diffrate": dict(prune_kept=[65, 60, 50, 40], merge_kept=[65, 58, 45, 30]),
    "zero_tprune": dict(keep_ratio=0.5), "topk_attn": dict(keep_ratio=0.5), "random": dict(keep_ratio=0.5),
    "l2norm": dict(keep_ratio=0.5), "evit": dict(keep_ratio=0.7, layers=[1, 2]), "ppt": dict(r=8, layers=[1, 2]),
    "ats": dict(layers=[1, 2]), "kmedoids": dict(keep_ratio=0.5, layers=[1]), "dpc_knn": dict(keep_ratio=0.5, layers=[1]),
    "ltmp": dict(prune_thresholds=[0.0, 0.01, 0.01, 0.0], merge_thresholds=[1.0, 0.5, 0.5, 1.0]),
}


def _vit_methods():
    out = []
    for name in tokenreduce.list_methods():
        try:
            tokenreduce.check(tiny_vit(), name, **SETTINGS.get(name, {}))
        except (TypeError, ValueError):
            continue  # a VLM method: refused on a ViT (tests/test_reliability.py checks the refusal)
        out.append(name)
    return out


VIT_METHODS = _vit_methods()


def test_every_vit_method_has_a_reducing_setting():
    assert set(VIT_METHODS) <= set(SETTINGS), sorted(set(VIT_METHODS) - set(SETTINGS))
    assert {"tome", "pitome", "atc", "diffrate", "zero_tprune", "random", "topk_attn", "l2norm"} <= set(VIT_METHODS)


@pytest.mark.parametrize("name", VIT_METHODS)
def test_compiled_equals_eager(name):
    torch._dynamo.reset()
    model = tiny_vit()
    tokenreduce.patch(model, name, **SETTINGS[name])
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        eager = model(x)
        tokens = tokenreduce.info(model).tokens_per_layer
        fullgraph = get_method(name).compilable
        compiled = torch.compile(model, backend="eager", fullgraph=fullgraph)(x)
    torch.testing.assert_close(compiled, eager, atol=1e-6, rtol=1e-5)
    assert tokenreduce.info(model).tokens_per_layer == tokens
    assert tokens[-1] < tokens[0]


@pytest.mark.parametrize("name", [n for n in VIT_METHODS if not get_method(n).compilable])
def test_fullgraph_is_refused_for_methods_that_do_not_trace(name):
    torch._dynamo.reset()
    model = tiny_vit()
    tokenreduce.patch(model, name, **SETTINGS[name])
    with torch.no_grad(), pytest.raises(Exception, match="disable"):
        torch.compile(model, backend="eager", fullgraph=True)(torch.randn(2, 3, 32, 32))


def test_inductor_tome_equals_eager():
    torch._dynamo.reset()
    model = tiny_vit()
    tokenreduce.patch(model, "tome", r=4)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(model, fullgraph=True)(x), model(x), atol=1e-5, rtol=1e-5)
