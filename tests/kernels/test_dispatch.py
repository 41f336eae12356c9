"""Dispatch between the Triton kernels and the PyTorch references in ``tokenreduce.ops``."""
import pytest
import torch

import tokenreduce
from tokenreduce.kernels import dispatch
from tokenreduce.ops import matching, merge

from ..conftest import tiny_vit
from .conftest import DEVICE, INTERPRETED

needs_interpreter = pytest.mark.skipif(not INTERPRETED, reason="CPU dispatch to kernels needs TRITON_INTERPRET=1")


def counting(monkeypatch, module_name, function_name):
    """Wrap a kernel entry point so the test can see whether the ops called it."""
    module = dispatch.kernels(module_name)
    original = getattr(module, function_name)
    calls = []

    def wrapper(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, function_name, wrapper)
    return calls


def test_mode_parsing(monkeypatch):
    monkeypatch.delenv("TOKENREDUCE_KERNELS", raising=False)
    assert dispatch.mode() == "auto"
    for raw, expected in [("0", "off"), ("1", "on"), ("auto", "auto"), (" ON ", "on"), ("false", "off"), ("", "auto")]:
        monkeypatch.setenv("TOKENREDUCE_KERNELS", raw)
        assert dispatch.mode() == expected
    monkeypatch.setenv("TOKENREDUCE_KERNELS", "sometimes")
    with pytest.raises(ValueError, match="TOKENREDUCE_KERNELS"):
        dispatch.mode()


def test_override_wins_over_the_environment(monkeypatch):
    monkeypatch.setenv("TOKENREDUCE_KERNELS", "1")
    with dispatch.override("off"):
        assert dispatch.mode() == "off"
        with dispatch.override("auto"):
            assert dispatch.mode() == "auto"
        assert dispatch.mode() == "off"
    assert dispatch.mode() == "on"
    with pytest.raises(ValueError):
        with dispatch.override("fast"):
            pass


def test_cpu_tensors_use_pytorch_unless_forced_under_the_interpreter(monkeypatch):
    t = torch.randn(2, 3, 4)
    monkeypatch.delenv("TOKENREDUCE_KERNELS", raising=False)
    assert not dispatch.use_kernel(t)                      # auto: CUDA only
    monkeypatch.setenv("TOKENREDUCE_KERNELS", "0")
    assert not dispatch.use_kernel(t)
    monkeypatch.setenv("TOKENREDUCE_KERNELS", "1")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert dispatch.use_kernel(t, torch.zeros(2, 3, dtype=torch.long))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not dispatch.use_kernel(t)                      # forced, but the CPU has no compiled Triton backend


@pytest.mark.parametrize("mode", ["1", "auto"])
def test_what_always_stays_on_pytorch(monkeypatch, mode):
    monkeypatch.setenv("TOKENREDUCE_KERNELS", mode)
    if not INTERPRETED and DEVICE == "cpu":
        pytest.skip("no device the kernels can run on")
    if mode == "auto" and DEVICE == "cpu":
        pytest.skip("auto never uses kernels on CPU tensors")
    x = torch.randn(2, 3, 4, device=DEVICE)
    assert dispatch.use_kernel(x)
    assert not dispatch.use_kernel(x.double())                                  # float64: reference only
    w = x.clone().requires_grad_()
    assert not dispatch.use_kernel(w)                                           # no backward in the kernels
    with torch.no_grad():
        assert dispatch.use_kernel(w)
    assert not dispatch.use_kernel(x, torch.randn(2, 3, 4, device="meta"))       # mixed devices
    assert not dispatch.use_kernel(torch.randn(2, 3, device="meta"))             # no kernel for this device


def test_forcing_without_triton_raises(monkeypatch):
    monkeypatch.setattr(dispatch, "_triton_ok", False)
    monkeypatch.setattr(dispatch, "_triton_error", "ModuleNotFoundError: No module named 'triton'")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("TOKENREDUCE_KERNELS", "1")
    with pytest.raises(RuntimeError, match="triton cannot be imported"):
        dispatch.use_kernel(torch.randn(2, 3, device=DEVICE))
    monkeypatch.setenv("TOKENREDUCE_KERNELS", "auto")
    assert not dispatch.use_kernel(torch.randn(2, 3, device=DEVICE))


def test_compiling_uses_pytorch(monkeypatch):
    monkeypatch.setenv("TOKENREDUCE_KERNELS", "1")
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert not dispatch.use_kernel(torch.randn(2, 3, device=DEVICE))


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_ops_route_to_kernels_and_agree(monkeypatch, dtype):
    """ops.best_match / merge_weighted / energy_score give the same results on both paths; with kernels forced the
    kernel entry points are what ran."""
    g = torch.Generator().manual_seed(0)
    metric = torch.randn(2, 41, 32, generator=g)
    unit = (metric / metric.norm(dim=-1, keepdim=True)).to(dtype)
    x = torch.randn(2, 41, 24, generator=g).to(dtype)
    size = torch.ones(2, 41, dtype=dtype)

    monkeypatch.setenv("TOKENREDUCE_KERNELS", "0")
    ref_match = matching.best_match(unit[:, ::2], unit[:, 1::2], 1, 0)
    ref_tome = matching.bipartite_soft_matching(metric.to(dtype), 10, 1)
    ref_merge = merge.merge_weighted(x, size, ref_tome.assign, ref_tome.num_out)

    monkeypatch.setenv("TOKENREDUCE_KERNELS", "1")
    match_calls = counting(monkeypatch, "matching", "best_match")
    merge_calls = counting(monkeypatch, "merge", "merge_weighted")
    got_match = matching.best_match(unit[:, ::2], unit[:, 1::2], 1, 0)
    got_tome = matching.bipartite_soft_matching(metric.to(dtype), 10, 1)
    got_merge = merge.merge_weighted(x, size, got_tome.assign, got_tome.num_out)
    assert len(match_calls) == 2 and len(merge_calls) == 1

    assert torch.equal(got_match[1], ref_match[1])
    torch.testing.assert_close(got_match[0], ref_match[0])
    assert torch.equal(got_tome.assign, ref_tome.assign)
    torch.testing.assert_close(got_merge[0], ref_merge[0], **({} if dtype == torch.float32 else dict(atol=1e-2,
                                                                                                    rtol=1e-2)))
    torch.testing.assert_close(got_merge[1], ref_merge[1])


@needs_interpreter
def test_energy_routes_to_kernel(monkeypatch):
    from tokenreduce.ops import energy
    metric = torch.randn(2, 30, 16)
    monkeypatch.setenv("TOKENREDUCE_KERNELS", "0")
    ref = energy.energy_score(metric, 0.5, 1.0)
    monkeypatch.setenv("TOKENREDUCE_KERNELS", "1")
    calls = counting(monkeypatch, "energy", "energy_score")
    got = energy.energy_score(metric, 0.5, 1.0)
    assert calls, "ops.energy_score did not dispatch to the kernel"
    torch.testing.assert_close(got, ref, rtol=0, atol=2e-6)


@needs_interpreter
@pytest.mark.parametrize("method,params,kernel", [("tome", {"r": 8}, ("merge", "merge_weighted")),
                                                  ("pitome", {"ratio": 0.9}, ("energy", "energy_score"))])
def test_patched_model_same_output_on_both_paths(monkeypatch, method, params, kernel):
    """A small timm ViT patched with ToMe / PiToMe: the forward through the kernels equals the PyTorch forward."""
    model = tokenreduce.patch(tiny_vit(), method, **params)
    images = torch.randn(2, 3, 32, 32)
    monkeypatch.setenv("TOKENREDUCE_KERNELS", "0")
    with torch.no_grad():
        ref = model(images)
        ref_size = tokenreduce.info(model).size
    monkeypatch.setenv("TOKENREDUCE_KERNELS", "1")
    calls = counting(monkeypatch, *kernel)
    with torch.no_grad():
        got = model(images)
    assert calls, f"the forward did not go through the {kernel[0]} kernel"
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(tokenreduce.info(model).size, ref_size)
