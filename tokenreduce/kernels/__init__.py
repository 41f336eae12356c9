"""Fused Triton kernels for tokenreduce's hot ops, installed as ``tokenreduce.kernels``.

Every kernel has its PyTorch reference in ``tokenreduce.ops``; the ops dispatch to a kernel only when the
tensors live on a CUDA device and Triton imports (``TOKENREDUCE_KERNELS=0/1`` forces the choice; see
:mod:`tokenreduce.kernels.dispatch` and docs/kernels.md).

Modules (imported lazily; only ``dispatch`` is imported by the ops, and it does not import Triton):

- ``matching``: fused max-cosine + argmax (reference ``ops.matching.best_match``)
- ``merge``: fused size-weighted merge, sorted segment reduction (reference ``ops.merge.merge_weighted``)
- ``energy``: fused PiToMe energy (reference ``ops.energy.energy_score``)
- ``dispatch``: the run-time choice between a kernel and its reference
"""
