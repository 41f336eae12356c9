"""One file per method (a package where a method is large), each registered by name; importing this package
registers the built-in ones. The contracts they implement live in :mod:`tokenreduce.core`."""
from ..core import Geometry, Param, ReductionMethod, Site, get_method, list_methods, method_params, register_method
from . import tome  # noqa: F401,E402  (registers "tome")
from . import pitome  # noqa: F401,E402  (registers "pitome")
from . import atc  # noqa: F401,E402  (registers "atc")
from . import visionzip  # noqa: F401,E402  (registers "visionzip")
from . import dart  # noqa: F401,E402  (registers "dart")
from . import diffrate  # noqa: F401,E402  (registers "diffrate")
from . import zero_tprune  # noqa: F401,E402  (registers "zero_tprune")
from . import baselines  # noqa: F401,E402  (registers "random", "topk_attn")
from . import mctf  # noqa: F401,E402  (registers "mctf")
from . import tofu  # noqa: F401,E402  (registers "tofu")
from . import kmedoids  # noqa: F401,E402  (registers "kmedoids")
from . import dpc_knn  # noqa: F401,E402  (registers "dpc_knn")
from . import evit  # noqa: F401,E402  (registers "evit")
from . import ppt  # noqa: F401,E402  (registers "ppt")
from . import ats  # noqa: F401,E402  (registers "ats")
from . import fastv  # noqa: F401,E402  (registers "fastv")
from . import pdrop  # noqa: F401,E402  (registers "pdrop")
from . import sparsevlm  # noqa: F401,E402  (registers "sparsevlm")
from . import l2norm  # noqa: F401,E402  (registers "l2norm", the worked example of docs/writing_a_method.md)
from . import ltmp  # noqa: F401,E402  (registers "ltmp")
from . import fastervlm  # noqa: F401,E402  (registers "fastervlm")
from . import vispruner  # noqa: F401,E402  (registers "vispruner")
from . import divprune  # noqa: F401,E402  (registers "divprune")
from . import cdpruner  # noqa: F401,E402  (registers "cdpruner")
from . import pool  # noqa: F401,E402  (registers "pool")

__all__ = ["Geometry", "Param", "ReductionMethod", "Site", "get_method", "list_methods", "method_params",
           "register_method"]
