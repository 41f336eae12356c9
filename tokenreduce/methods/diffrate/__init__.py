"""DiffRate (Chen et al., ICCV 2023): the method, its rate tables and its tensor functions."""
from .method import KINDS, DiffRate, RateLogits, SearchRun
from .rates import CONFIG_DIR, RateTable, list_rate_configs, load_rates

__all__ = ["CONFIG_DIR", "KINDS", "DiffRate", "RateLogits", "RateTable", "SearchRun", "list_rate_configs",
           "load_rates"]
