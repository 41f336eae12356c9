"""The DiffRate rate-search contracts that a mutation check of the suite showed untested (review §6): eval-mode kept
counts follow the current logits, and the FLOPs loss is weighted by ``flops_weight``."""
import warnings

import torch

import tokenreduce
from tokenreduce.train.rate_search import RateSearch

from ..conftest import tiny_vit


def _search_model():
    model = tiny_vit(depth=4).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the rate-search mode warns that it is not for inference
        tokenreduce.patch(model, "diffrate")
    return model, RateSearch(model)


def _choose(search, patches: int) -> None:
    """Make every block after the first put (almost) all probability on keeping ``patches`` patch tokens."""
    for kind in ("prune", "merge"):
        for layer in range(1, 4):
            candidates = search.rates.candidates(kind, layer)
            value = torch.full_like(search.logits(kind, layer), -30.0)
            value[int((candidates - patches).abs().argmin())] = 30.0
            search.set_logits(kind, layer, value)


def test_eval_counts_follow_the_logits_every_forward():
    model, search = _search_model()
    x = torch.randn(2, 3, 32, 32)
    _choose(search, 64)  # keep every token
    with torch.no_grad():
        model(x)
    assert tokenreduce.info(model).tokens_per_layer == [65, 65, 65, 65]
    _choose(search, 10)  # now a small count: the next forward must use it, not counts cached by the first
    kept = search.kept_counts()["prune"][1]
    assert kept < 65
    with torch.no_grad():
        model(x)
    assert tokenreduce.info(model).tokens_per_layer == [65, 65, kept, kept]


def test_the_flops_loss_is_weighted_by_flops_weight():
    model, _ = _search_model()
    model.train()
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([1, 2])
    losses = {}
    for weight in (1.0, 5.0):
        search = RateSearch(model, flops_weight=weight)
        logits = model(x)
        loss, parts = search.loss(logits, y, target_gflops=0.0)
        losses[weight] = (float(loss), parts)
        assert abs(parts["loss"] - (parts["cls"] + weight * parts["flops"])) < 1e-6 * max(1.0, parts["loss"])
    assert losses[1.0][1]["flops"] > 0
    assert losses[5.0][0] > losses[1.0][0]
