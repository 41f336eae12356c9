"""``tokenreduce plot``: accuracy against GFLOPs and against images per second, one line per method, from the results
files ``tokenreduce eval`` writes (PNG)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Optional, Sequence

from ..viz.render import _pyplot
from ..viz.results import plot_results, read_results
from .common import error


def build_parser(prog: str = "tokenreduce plot") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog, description="Accuracy against GFLOPs and against images per second, one line per method, from "
                               "the results files `tokenreduce eval` writes.")
    p.add_argument("results", nargs="+", help="results JSON files (tokenreduce eval --results-file ...)")
    p.add_argument("--out", required=True, help="the PNG to write")
    p.add_argument("--title", default=None, help="figure title (default: models and devices of the files)")
    return p


def main(argv: Optional[Sequence[str]] = None, prog: str = "tokenreduce plot") -> int:
    """``tokenreduce plot RESULTS.json... --out OUT.png``."""
    args = build_parser(prog).parse_args(argv)
    try:
        rows = read_results(args.results)
    except (OSError, ValueError) as e:
        return error(str(e))
    if not rows:
        return error("no successful rows in " + ", ".join(args.results))
    title = args.title
    if title is None:
        metas = []
        for path in args.results:
            data = json.loads(Path(path).read_text())
            if isinstance(data, dict):
                desc = " · ".join(str(data[k]) for k in ("model", "device") if data.get(k))
                if data.get("amp"):
                    desc += f" · {data['amp']}"
                if data.get("batch_size"):
                    desc += f" · batch {data['batch_size']}"
                if desc and desc not in metas:
                    metas.append(desc)
        title = "\n".join(metas)
    fig = plot_results(rows, title)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, format="png")
    _pyplot().close(fig)
    methods = sorted({r.get("method") or "none" for r in rows})
    print(f"wrote {args.out}: {len(rows)} points, methods: {', '.join(methods)}")
    return 0
