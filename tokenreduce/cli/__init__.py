"""The ``tokenreduce`` command.

    tokenreduce eval            evaluate accuracy / GFLOPs / img/s (no arguments: the offline default job)
    tokenreduce bench           throughput of unpatched vs patched timm models
    tokenreduce search-rates    DiffRate: learn per-block kept counts for a FLOPs target
    tokenreduce methods         the registered methods, their parameters and defaults
    tokenreduce visualize       draw which patches a method merged or dropped
    tokenreduce plot            accuracy vs GFLOPs and vs img/s from eval results files

Each subcommand has its own ``--help``. Subcommands are imported only when run, so a slow or missing optional
part (e.g. the rate search) never breaks the others.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from contextlib import contextmanager
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

#: name -> (module, function taking argv, one-line help)
COMMANDS: Dict[str, Tuple[str, str, str]] = {
    "eval": ("tokenreduce.cli.eval", "main",
             "evaluate a model unpatched and with methods (top-1/top-5, GFLOPs, img/s); no arguments: the "
             "offline Fashion-MNIST default job"),
    "bench": ("tokenreduce.cli.bench", "main", "throughput of unpatched vs patched timm models"),
    "search-rates": ("tokenreduce.train.rate_search", "main",
                     "DiffRate rate search: learn per-block kept counts for a FLOPs target (torchrun)"),
    "train-thresholds": ("tokenreduce.train.thresholds", "main",
                         "LTMP: learn per-block merge and prune thresholds for a FLOPs target (torchrun)"),
    "methods": ("tokenreduce.cli.methods", "main", "list the registered methods with parameters and defaults"),
    "visualize": ("tokenreduce.cli.visualize", "main", "draw which patches a method merged or dropped (PNG)"),
    "plot": ("tokenreduce.cli.plot", "main", "accuracy vs GFLOPs and vs img/s from eval results files (PNG)"),
    "eval-vlm": ("tokenreduce.integrations.lmms_eval.eval_vlm", "main",
                 "benchmark a VLM unpatched and with methods x budgets through lmms-eval (needs tokenreduce[lmms])"),
}


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser (only for ``--help`` / ``--version``: subcommands parse their own arguments)."""
    from .. import __version__
    p = argparse.ArgumentParser(
        prog="tokenreduce", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Token merging and pruning for vision transformers.",
        epilog="commands:\n" + "\n".join(f"  {name:<14}{text}" for name, (_, _, text) in COMMANDS.items())
        + "\n\nRun `tokenreduce COMMAND --help` for a command's options. With no command: this help.")
    p.add_argument("--version", action="version", version=f"tokenreduce {__version__}")
    p.add_argument("command", nargs="?", choices=list(COMMANDS), help="the command to run")
    return p


@contextmanager
def _prog(name: str) -> Iterator[None]:
    """Make argparse in a subcommand's own parser call itself ``tokenreduce NAME`` in usage and errors."""
    saved = sys.argv[0]
    sys.argv[0] = f"tokenreduce {name}"
    try:
        yield
    finally:
        sys.argv[0] = saved


def _load(name: str) -> Callable[[List[str]], Any]:
    module_name, func, _ = COMMANDS[name]
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise SystemExit(f"tokenreduce {name} is not available in this installation ({module_name}: {e})")
    if not hasattr(module, func):
        raise SystemExit(f"tokenreduce {name} is not available yet: {module_name} has no {func}()")
    return getattr(module, func)


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        parser = build_parser()
        if not argv:
            parser.print_help()
            return 0
        parser.parse_args(argv[:1])  # --help, --version, or an error naming the commands
        return 2
    name, rest = argv[0], argv[1:]
    func = _load(name)
    with _prog(name):
        result = func(rest)
    # Subcommands return an exit status, or their results (benchmark rows, a search summary): success.
    return result if isinstance(result, int) and not isinstance(result, bool) else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
