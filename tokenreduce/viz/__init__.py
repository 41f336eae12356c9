"""Pictures of what a token-reduction method did to an image: label maps (``labels``), drawing (``render``),
recording a patched model block by block (``capture``), and plots of evaluation results (``results``). The
commands are ``tokenreduce visualize`` and ``tokenreduce plot`` (:mod:`tokenreduce.cli`)."""
from .capture import LayerRecord, ModelView, capture, changed_layers, load_image, model_view, record_layers, visualize
from .labels import alive_to_labels, canonical_labels, kept_to_alive, same_grouping, source_to_labels
from .render import layer_grid, render_overlay, save_png
from .results import plot_results, read_results

__all__ = ["LayerRecord", "ModelView", "alive_to_labels", "canonical_labels", "capture", "changed_layers",
           "kept_to_alive", "layer_grid", "load_image", "model_view", "plot_results", "read_results",
           "record_layers", "render_overlay", "same_grouping", "save_png", "source_to_labels", "visualize"]


def __getattr__(name: str):
    # The commands moved to tokenreduce.cli in 0.2; the old names work for one release.
    moved = {"visualize_main": "tokenreduce.cli.visualize", "plot_main": "tokenreduce.cli.plot"}
    if name in moved:
        import importlib
        import warnings
        warnings.warn(f"tokenreduce.viz.{name} moved to {moved[name]}.main; the old name goes away in 0.3",
                      DeprecationWarning, stacklevel=2)
        return importlib.import_module(moved[name]).main
    raise AttributeError(name)
