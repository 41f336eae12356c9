"""Fused Triton kernels for tokenreduce's hot ops, installed as ``tokenreduce.kernels``.

Every kernel has its PyTorch reference in ``tokenreduce.ops``; the ops dispatch to a kernel only when the
tensors live on a CUDA device and Triton imports (``TOKENREDUCE_KERNELS=0/1`` forces the choice).
"""
