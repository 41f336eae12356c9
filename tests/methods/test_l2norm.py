"""l2norm, the worked example of docs/writing_a_method.md: against a per-sample loop, zero reduction, batching."""
import pytest
import torch

import tokenreduce

from ..conftest import tiny_vit


def _loop_reference(model, x, layers, keep):
    """The same model, run block by block in Python: after each of ``layers`` keep CLS and the ``keep`` tokens of
    largest L2 norm in their original order, one sample at a time."""
    outs = []
    for sample in x:
        h = model._pos_embed(model.patch_embed(sample[None]))
        for i, blk in enumerate(model.blocks):
            h = blk(h)
            if i in layers:
                norms = h[0, 1:].norm(dim=-1)
                top = sorted(torch.topk(norms, keep).indices.tolist())
                h = h[:, [0] + [t + 1 for t in top]]
        outs.append(model.forward_head(model.norm(h)))
    return torch.cat(outs)


def test_matches_a_loop_reference():
    model = tiny_vit(depth=4).double()
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        expected = _loop_reference(model, x, {1, 2}, 20)
        tokenreduce.patch(model, "l2norm", keep=20, layers=[1, 2])
        out = model(x)
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=1e-12)
    assert tokenreduce.info(model).tokens_per_layer == [65, 65, 21, 21]


def test_keep_everything_equals_unpatched_and_batch_equals_alone():
    model = tiny_vit()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        with pytest.warns(UserWarning, match="reduces nothing"):
            tokenreduce.patch(model, "l2norm", keep_ratio=1.0)
        assert torch.equal(model(x), ref)
        tokenreduce.patch(model, "l2norm", keep_ratio=0.5)
        batch = model(x)
        alone = torch.cat([model(x[i:i + 1]) for i in range(4)])
    torch.testing.assert_close(batch, alone, atol=1e-6, rtol=1e-5)


def test_declares_no_needs_and_runs_on_the_clip_tower():
    import transformers
    cfg = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                        num_attention_heads=4, image_size=32, patch_size=4)
    clip = transformers.CLIPVisionModel(cfg).eval()
    tokenreduce.patch(clip, "l2norm", keep_ratio=0.5)
    with torch.no_grad():
        clip(pixel_values=torch.randn(2, 3, 32, 32))
    assert tokenreduce.info(clip).tokens_per_layer[-1] < 65
