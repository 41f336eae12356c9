"""tokenreduce: token merging and pruning for vision transformers, faithful to the papers and fast.

    import timm, tokenreduce
    model = timm.create_model("deit_small_patch16_224", pretrained=True).eval()
    tokenreduce.patch(model, "tome", r=16)
    logits = model(images)
    tokenreduce.info(model).flops
"""
from .api import info, is_patched, list_methods, patch, unpatch
from .methods import Param, ReductionMethod, Site, get_method, method_params, register_method
from .state import ReductionInfo, TokenState

__version__ = "0.1.0"

__all__ = ["Param", "ReductionInfo", "ReductionMethod", "Site", "TokenState", "get_method", "info", "is_patched",
           "list_methods", "method_params", "patch", "register_method", "unpatch"]
