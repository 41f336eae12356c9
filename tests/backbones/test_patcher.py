"""The Patcher: every change recorded and restored exactly, and forwards installed by others (accelerate's device
hooks) keep running while a model is patched."""
import torch
from accelerate.hooks import ModelHook, add_hook_to_module, remove_hook_from_module

import tokenreduce
from tokenreduce.backbones.patcher import Patcher

from ..conftest import tiny_vit
from ..llava_helpers import greedy, left_pad, pixels, prompts, tiny_llava


class Counting(ModelHook):
    """An accelerate hook that counts the calls it wraps (as AlignDevicesHook moves tensors around them)."""

    def __init__(self):
        self.calls = 0

    def pre_forward(self, module, *args, **kwargs):
        self.calls += 1
        return args, kwargs


class _Thing:
    pass


def test_set_attr_restores_what_was_there():
    obj, patcher = _Thing(), Patcher()
    obj.keep = "mine"
    patcher.set_attr(obj, "keep", "theirs")
    patcher.set_attr(obj, "new", 1)
    patcher.set_attr(obj, "keep", "again")
    assert obj.keep == "again" and obj.new == 1
    patcher.restore()
    assert obj.keep == "mine" and not hasattr(obj, "new")


def test_hooks_are_removed():
    layer, patcher = torch.nn.Linear(2, 2), Patcher()
    seen = []
    patcher.hook(layer.register_forward_hook(lambda m, i, o: seen.append(1)))
    layer(torch.zeros(1, 2))
    patcher.restore()
    layer(torch.zeros(1, 2))
    assert seen == [1] and not layer._forward_hooks


def test_accelerate_hooks_keep_running_on_a_patched_vit():
    model, reference = tiny_vit(), tiny_vit()
    hooks = [Counting() for _ in model.blocks]
    for blk, hook in zip(model.blocks, hooks):
        add_hook_to_module(blk, hook)
    x = torch.randn(2, 3, 32, 32)
    tokenreduce.patch(model, "tome", r=4)
    tokenreduce.patch(reference, "tome", r=4)
    with torch.no_grad():
        out, expected = model(x), reference(x)
    assert [h.calls for h in hooks] == [1] * len(hooks)  # accelerate's wrapper ran around tokenreduce's forward
    assert torch.equal(out, expected) and tokenreduce.info(model).tokens_per_layer[-1] < 65
    tokenreduce.unpatch(model)
    tokenreduce.unpatch(reference)
    with torch.no_grad():
        assert torch.equal(model(x), reference(x))
    assert [h.calls for h in hooks] == [2] * len(hooks)  # still accelerate's module after unpatch
    for blk in model.blocks:
        remove_hook_from_module(blk)
        assert "_old_forward" not in blk.__dict__  # accelerate took its wrapper away; ours left nothing behind
    with torch.no_grad():
        assert torch.equal(model(x), reference(x))


def test_accelerate_hooks_keep_running_on_llava_decoder_layers():
    model, reference = tiny_llava(), tiny_llava()
    layers = list(model.model.language_model.layers)
    hooks = [Counting() for _ in layers]
    for layer, hook in zip(layers, hooks):
        add_hook_to_module(layer, hook)
    ids, mask = left_pad(prompts(lengths=((3, 5), (5, 2))))
    pv = pixels(2)
    for m in (model, reference):
        tokenreduce.patch(m, "dart", layer=1, image_pivots=2, text_pivots=2, per_pivot=4)
    got, want = greedy(model, ids, mask, pv, max_new_tokens=3), greedy(reference, ids, mask, pv, max_new_tokens=3)
    assert torch.equal(got[0], want[0])
    torch.testing.assert_close(got[1], want[1], atol=0, rtol=0)
    assert all(h.calls == 3 for h in hooks)  # one prefill and two decode steps, each through accelerate's wrapper
