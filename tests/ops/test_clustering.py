"""Batched agglomerative clustering against scikit-learn's AgglomerativeClustering (precomputed distances)."""
import pytest
import torch

from tokenreduce.ops.clustering import LINKAGES, agglomerative_clustering, cosine_distance
from tokenreduce.ops.merge import merge_source, merge_weighted

import sklearn.cluster as sklearn_cluster  # noqa: E402  (a dev dependency: the reference partitions)


def groups(labels):
    """The partition as a sorted list of tuples of point indices (label values ignored)."""
    out = {}
    for i, label in enumerate(labels.tolist()):
        out.setdefault(label, []).append(i)
    return sorted(tuple(g) for g in out.values())


def sklearn_groups(dist, k, linkage):
    if k == dist.shape[0]:
        return [(i,) for i in range(k)]
    model = sklearn_cluster.AgglomerativeClustering(n_clusters=k, metric="precomputed", linkage=linkage)
    return groups(torch.as_tensor(model.fit(dist.numpy()).labels_))


@pytest.mark.parametrize("linkage", LINKAGES)
@pytest.mark.parametrize("n,d,seed", [(40, 8, 0), (64, 16, 1), (97, 64, 2)])
def test_partitions_equal_sklearn(linkage, n, d, seed):
    g = torch.Generator().manual_seed(seed)
    dist = cosine_distance(torch.randn(4, n, d, generator=g, dtype=torch.float64))
    for k in sorted({1, 2, n // 4, n // 2, n - 5, n - 1, n}):
        labels = agglomerative_clustering(dist, k, linkage)
        assert labels.shape == (4, n) and labels.dtype == torch.long
        for b in range(4):
            assert groups(labels[b]) == sklearn_groups(dist[b], k, linkage), (linkage, k, b)


@pytest.mark.parametrize("linkage", LINKAGES)
def test_clustered_data_and_other_distances(linkage):
    """Well-separated blobs under a Euclidean metric, a case where single linkage chains and the others do not."""
    g = torch.Generator().manual_seed(7)
    centres = 4 * torch.randn(3, 5, 2, generator=g, dtype=torch.float64)
    pts = (centres.repeat_interleave(10, dim=1) + torch.randn(3, 50, 2, generator=g, dtype=torch.float64))
    dist = torch.cdist(pts, pts)
    # cdist is not bitwise symmetric; scikit-learn reads the upper triangle, the op expects a symmetric matrix
    dist = torch.where(torch.ones(50, 50, dtype=torch.bool).triu(1), dist, dist.transpose(1, 2))
    for k in (3, 5, 12, 30):
        labels = agglomerative_clustering(dist, k, linkage)
        for b in range(3):
            assert groups(labels[b]) == sklearn_groups(dist[b], k, linkage)


def test_float32_input_uses_float64_linkage():
    g = torch.Generator().manual_seed(3)
    dist = cosine_distance(torch.randn(2, 60, 12, generator=g))
    assert dist.dtype == torch.float32
    labels = agglomerative_clustering(dist, 20, "average")
    for b in range(2):  # scikit-learn computes in float64 from the same float32 distances
        assert groups(labels[b]) == sklearn_groups(dist[b].double(), 20, "average")


def test_slot_order_and_merge_compatibility():
    """Slots are numbered by each cluster's lowest point index; the assignment feeds merge_weighted directly."""
    g = torch.Generator().manual_seed(4)
    dist = cosine_distance(torch.randn(3, 30, 6, generator=g, dtype=torch.float64))
    labels = agglomerative_clustering(dist, 11, "complete")
    for b in range(3):
        firsts = [min(grp) for grp in groups(labels[b])]
        assert [labels[b, i].item() for i in sorted(firsts)] == list(range(11))
    x = torch.randn(3, 30, 5, dtype=torch.float64)
    size = torch.rand(3, 30, dtype=torch.float64) + 0.5
    merged, new_size = merge_weighted(x, size, labels, 11)
    source = merge_source(torch.eye(30, dtype=torch.float64).expand(3, 30, 30), labels, 11)
    for b in range(3):
        for slot in range(11):
            members = (labels[b] == slot).nonzero().flatten()
            w = size[b, members]
            torch.testing.assert_close(merged[b, slot], (x[b, members] * w[:, None]).sum(0) / w.sum())
            torch.testing.assert_close(new_size[b, slot], w.sum())
            assert source[b, slot].nonzero().flatten().tolist() == members.tolist()


@pytest.mark.parametrize("linkage", LINKAGES)
def test_exact_ties_give_exactly_k_clusters(linkage):
    """Duplicate tokens (flat image regions) make many exactly equal distances; the count must still be K."""
    base = torch.randn(2, 6, 8, dtype=torch.float64)
    metric = base.repeat_interleave(7, dim=1)  # 42 tokens in 6 groups of identical keys
    dist = cosine_distance(metric)
    for k in (1, 3, 6, 10, 25, 41):
        labels = agglomerative_clustering(dist, k, linkage)
        for b in range(2):
            assert len(groups(labels[b])) == k
            assert sorted(set(labels[b].tolist())) == list(range(k))
    labels = agglomerative_clustering(dist, 6, linkage)  # the 6 groups of duplicates are the 6 clusters
    for b in range(2):
        assert groups(labels[b]) == [tuple(range(7 * i, 7 * i + 7)) for i in range(6)]


def test_trivial_sizes():
    dist = cosine_distance(torch.randn(2, 5, 3, dtype=torch.float64))
    assert agglomerative_clustering(dist, 5).tolist() == [list(range(5))] * 2
    assert agglomerative_clustering(dist, 1).tolist() == [[0] * 5] * 2
    one = torch.zeros(3, 1, 1)
    assert agglomerative_clustering(one, 1).tolist() == [[0]] * 3


def test_cosine_distance_is_exactly_symmetric():
    dist = cosine_distance(torch.randn(2, 33, 7))
    assert torch.equal(dist, dist.transpose(1, 2))
    torch.testing.assert_close(dist.diagonal(dim1=1, dim2=2), torch.zeros(2, 33), atol=1e-6, rtol=0)


def test_input_is_not_modified():
    dist = cosine_distance(torch.randn(2, 20, 4, dtype=torch.float64))
    before = dist.clone()
    agglomerative_clustering(dist, 7, "average")
    assert torch.equal(dist, before)


@pytest.mark.parametrize("bad", [0, 6, -1, 2.0, True])
def test_bad_num_clusters(bad):
    with pytest.raises(ValueError, match="num_clusters"):
        agglomerative_clustering(torch.zeros(1, 5, 5), bad)


def test_bad_linkage_and_shape():
    with pytest.raises(ValueError, match="linkage"):
        agglomerative_clustering(torch.zeros(1, 5, 5), 2, "ward")
    with pytest.raises(ValueError, match=r"\[B, N, N\]"):
        agglomerative_clustering(torch.zeros(5, 5), 2)
