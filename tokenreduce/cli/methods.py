"""``tokenreduce methods``: the registered methods, where they act, what they read, their parameters (with the
papers' names as aliases) and defaults."""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Optional, Sequence

from .. import api  # noqa: F401  (registers the built-in methods)
from ..core import COMMON_PARAMS, get_method, list_methods, method_params
from ..core.requirements import need_names


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``tokenreduce methods [NAME ...] [--json]``: methods, where they act, what they need, their parameters."""
    p = argparse.ArgumentParser(prog="tokenreduce methods", description=main.__doc__.split(": ", 1)[1])
    p.add_argument("names", nargs="*", metavar="NAME", help="only these methods (default: all registered)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--common", action="store_true", help="also list the options every method accepts")
    args = p.parse_args(argv)
    names = args.names or list_methods()
    try:
        classes = {n: get_method(n) for n in names}
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    listing = []
    for name, cls in classes.items():
        params = {k: v for k, v in method_params(name).items() if args.common or k not in COMMON_PARAMS}
        listing.append({"name": name, "summary": cls.summary,
                        "sites": [s.value for s in (cls.sites or (cls.site,))], "needs": sorted(need_names(cls.needs)),
                        "params": {k: {"default": _jsonable(v.default), "aliases": list(v.aliases), "doc": v.doc}
                                   for k, v in params.items()}})
    if args.json:
        print(json.dumps(listing, indent=1))
        return 0
    for m in listing:
        needs = ", ".join(m["needs"]) or "nothing"
        print(f"{m['name']}: {m['summary']}\n  acts at {' or '.join(m['sites'])}; needs {needs}")
        for key, info in m["params"].items():
            alias = f"  (also: {', '.join(info['aliases'])})" if info["aliases"] else ""
            print(f"    {key} = {info['default']!r}{alias}\n        {info['doc']}")
        print()
    if not args.common:
        print("Every method also accepts: " + ", ".join(
            f"{k} (default {v.default!r})" for k, v in COMMON_PARAMS.items()) + ". Use --common for details.")
    print("Use: tokenreduce.patch(model, NAME, key=value, ...) or tokenreduce eval --method NAME --param key=value")
    return 0


def _jsonable(value: Any) -> Any:
    try:
        json.dumps(value)
        return value
    except TypeError:
        return repr(value)
