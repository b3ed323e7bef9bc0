import math

import numpy as np
import pytest
import sklearn
import torch
from sklearn.neighbors import NearestNeighbors

from skpatch import _memory_bank as memory_bank
from skpatch._memory_bank import (
    channels_last_empty,
    fill_reservoir,
    greedy_coreset,
    largest_nearest_distance,
    nearest_neighbors,
    random_projection,
    reservoir_slots,
)


def _exact_greedy(X, k, start):
    """Textbook greedy k-center in float64."""
    picks = [start]
    d2 = ((X - X[start]) ** 2).sum(1)
    for _ in range(k - 1):
        j = int(d2.argmax())
        picks.append(j)
        d2 = np.minimum(d2, ((X - X[j]) ** 2).sum(1))
    return picks


def test_greedy_coreset_matches_exact_k_center_without_projection(rng):
    # an offset far from 0 checks that the expanded distances stay accurate
    X = rng.normal(size=(500, 20)).astype(np.float32) + 100
    picks = greedy_coreset(X, 60, projection_dim=None, random_state=0)
    assert picks.dtype == torch.long and picks.shape == (60,)
    assert picks.tolist() == _exact_greedy(X.astype(np.float64), 60, int(picks[0]))


def test_greedy_coreset_never_reads_a_pick_on_the_host(rng):
    # Indexing with the argmax tensor reads it on the host (aten::item), a
    # device synchronization per pick on CUDA; the loop must not.
    X = rng.normal(size=(300, 16)).astype(np.float32)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        greedy_coreset(X, 40, projection_dim=None, random_state=0)
    reads = sum(e.count for e in prof.key_averages() if e.key == "aten::_local_scalar_dense")
    assert reads < 5  # outside the loop only, not one or three per pick


def test_greedy_coreset_is_nested_seeded_and_unique(rng):
    X = rng.normal(size=(400, 200))
    a = greedy_coreset(X, 50, random_state=3)
    b = greedy_coreset(torch.from_numpy(X), 20, random_state=3)
    assert a[:20].tolist() == b.tolist()  # nested: first k picks = coreset of size k
    assert len(set(a.tolist())) == 50
    assert greedy_coreset(X, 50, random_state=4).tolist() != a.tolist()
    # more picks than points: every point once
    assert sorted(greedy_coreset(X[:30], 100, random_state=0).tolist()) == list(range(30))
    # duplicates are picked only once each, before any repeated copy
    dup = np.repeat(X[:5], 4, axis=0)
    first = greedy_coreset(dup, 5, random_state=0, projection_dim=None)
    assert sorted((first // 4).tolist()) == [0, 1, 2, 3, 4]


def test_greedy_coreset_covers_clusters(rng):
    centers = rng.normal(scale=50, size=(8, 256))
    X = np.repeat(centers, 100, axis=0) + rng.normal(size=(800, 256))
    picks = greedy_coreset(X, 8, projection_dim=64, random_state=0).numpy()
    # one pick per cluster: the projection preserves the far-apart structure
    assert sorted(picks // 100) == list(range(8))


def test_random_projection_preserves_distances_on_average():
    R = random_projection(500, 128, random_state=0, dtype=torch.float64)
    x = torch.from_numpy(np.random.RandomState(1).normal(size=(200, 500)))
    ratio = (x @ R).norm(dim=1) / x.norm(dim=1)
    assert abs(float(ratio.square().mean()) - 1) < 0.05


@pytest.mark.parametrize("working_memory", [None, 0.01])
def test_nearest_neighbors_matches_sklearn(rng, working_memory):
    bank = rng.normal(size=(700, 16)).astype(np.float32) + 50
    queries = rng.normal(size=(90, 16)).astype(np.float32) + 50
    dist, idx = nearest_neighbors(queries, bank, 4, working_memory=working_memory)
    ref_dist, ref_idx = NearestNeighbors(n_neighbors=4).fit(bank).kneighbors(queries)
    np.testing.assert_allclose(dist.numpy(), ref_dist, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(idx.numpy(), ref_idx)


def test_nearest_neighbors_uses_sklearn_working_memory(rng):
    bank = rng.normal(size=(300, 8))
    queries = rng.normal(size=(40, 8))
    ref = nearest_neighbors(queries, bank, 3)
    with sklearn.config_context(working_memory=0.001):
        small = nearest_neighbors(queries, bank, 3)
    np.testing.assert_allclose(ref[0].numpy(), small[0].numpy())
    np.testing.assert_array_equal(ref[1].numpy(), small[1].numpy())


def test_nearest_neighbors_exact_distances_of_duplicates():
    bank = torch.full((5, 3), 1e3, dtype=torch.float32) + torch.arange(5.0).view(5, 1)
    dist, idx = nearest_neighbors(bank, bank, 1)
    assert (dist == 0).all() and idx.flatten().tolist() == list(range(5))


def test_nearest_neighbors_leave_one_group_out(rng):
    X = rng.normal(size=(30, 4))
    groups = np.arange(30) // 3
    dist, idx = nearest_neighbors(X, X, 2, query_groups=groups, bank_groups=groups)
    D = np.linalg.norm(X[:, None] - X[None], axis=2)
    D[groups[:, None] == groups[None]] = np.inf
    np.testing.assert_allclose(dist.numpy(), np.sort(D, axis=1)[:, :2], rtol=1e-10)
    assert (groups[idx.numpy()] != groups[:, None]).all()
    # fewer than k rows outside the group: inf
    dist, _ = nearest_neighbors(X[:3], X[:4], 2, query_groups=groups[:3], bank_groups=groups[:4])
    assert np.isinf(dist[:, 1].numpy()).all() and np.isfinite(dist[:, 0].numpy()).all()


def test_two_stage_argmin_equals_argmin(rng):
    x = torch.from_numpy(rng.randint(0, 50, size=(40, 3 * 128)).astype(np.float32))  # many ties
    x[3] = math.inf
    x[4, 200:] = -math.inf
    x[5, 7] = x[6, 300] = math.nan
    np.testing.assert_array_equal(memory_bank._argmin_rows(x).numpy(), x.argmin(dim=1).numpy())
    # a bank whose width is padded to whole groups finds the same neighbours
    bank, queries = rng.normal(size=(1000, 8)).astype(np.float32), rng.normal(size=(300, 8)).astype(np.float32)
    dist, idx = nearest_neighbors(queries, bank, 1)
    D = np.linalg.norm(queries[:, None] - bank[None], axis=2)
    np.testing.assert_array_equal(idx[:, 0].numpy(), D.argmin(axis=1))
    np.testing.assert_allclose(dist[:, 0].numpy(), D.min(axis=1), rtol=1e-6)


@pytest.mark.parametrize("order", ["greedy", "random"])
@pytest.mark.parametrize("n_probe", [1, 8, 100])
def test_largest_nearest_distance_equals_full_search(rng, order, n_probe):
    bank = rng.normal(size=(400, 5)).astype(np.float32)
    if order == "greedy":
        bank = bank[greedy_coreset(bank, 400, projection_dim=None, random_state=0).numpy()]
    queries = rng.normal(size=(6, 30, 5)).astype(np.float32)
    queries[1, 7] += 6  # one far patch decides its set
    queries[2] = queries[2, 0]  # ties: every query of the set is the same
    queries[3] *= 3  # every query far
    dist, idx = nearest_neighbors(queries.reshape(-1, 5), bank, 1)
    grid = dist.view(6, 30)
    largest, query, nearest = largest_nearest_distance(torch.from_numpy(queries), torch.from_numpy(bank), n_probe=n_probe)
    np.testing.assert_array_equal(largest.numpy(), grid.max(dim=1).values.numpy())
    np.testing.assert_array_equal(query.numpy(), grid.argmax(dim=1).numpy())
    assert query[1] == 7 and query[2] == 0
    np.testing.assert_array_equal(nearest.numpy(), idx.view(6, 30).numpy()[np.arange(6), query.numpy()])


@pytest.mark.parametrize("offset, working_memory", [(0.0, None), (1000.0, None), (0.0, 0.01)])
def test_largest_nearest_distance_prunes_exactly(rng, offset, working_memory, monkeypatch):
    # clustered float32 data far from 0 (a large rounding error in the
    # expanded distances, which the bounds must carry) and chunks of a few rows
    centers = rng.normal(scale=4, size=(20, 16))
    bank = (centers[rng.randint(0, 20, 2000)] + rng.normal(size=(2000, 16)) + offset).astype(np.float32)
    bank = bank[greedy_coreset(bank, 2000, projection_dim=None, random_state=0).numpy()]
    queries = (centers[rng.randint(0, 20, (12, 100))] + rng.normal(size=(12, 100, 16)) + offset).astype(np.float32)
    queries[4, 50] += 3  # a patch off its cluster decides its set
    bank, queries = torch.from_numpy(bank), torch.from_numpy(queries)
    searched = []

    def search(q, *args, **kwargs):
        searched.append(len(q))
        return nearest_neighbors(q, *args, **kwargs)

    monkeypatch.setattr(memory_bank, "nearest_neighbors", search)
    largest, query, nearest = largest_nearest_distance(queries, bank, working_memory=working_memory)
    monkeypatch.undo()
    dist, idx = nearest_neighbors(queries.reshape(-1, 16), bank, 1)
    grid = dist.view(12, 100)
    np.testing.assert_array_equal(largest.numpy(), grid.max(dim=1).values.numpy())
    np.testing.assert_array_equal(query.numpy(), grid.argmax(dim=1).numpy())
    np.testing.assert_array_equal(nearest.numpy(), idx.view(12, 100).numpy()[np.arange(12), query.numpy()])
    assert query[4] == 50
    # the cells' bounds leave few queries to search in the whole bank
    assert sum(searched) < 0.25 * 1200


def test_largest_nearest_distance_leaves_groups_out(rng):
    # each set is a training image whose patches are in the bank: its own
    # rows are left out, and a set alone in the bank keeps its in-sample distances
    queries = rng.normal(size=(7, 60, 6)).astype(np.float32)
    queries[3, 10] += 5
    bank = torch.from_numpy(queries[:6].reshape(-1, 6))
    bank_groups = torch.arange(6).repeat_interleave(60)
    query_groups = torch.tensor([0, 1, 2, 3, 4, 5, 6])
    largest, query, nearest = largest_nearest_distance(
        torch.from_numpy(queries), bank, query_groups=query_groups, bank_groups=bank_groups
    )
    dist, idx = nearest_neighbors(
        queries.reshape(-1, 6), bank, 1, query_groups=query_groups.repeat_interleave(60), bank_groups=bank_groups
    )
    grid, idx = dist.view(7, 60), idx.view(7, 60)
    np.testing.assert_array_equal(largest.numpy(), grid.max(dim=1).values.numpy())
    np.testing.assert_array_equal(query.numpy(), grid.argmax(dim=1).numpy())
    np.testing.assert_array_equal(nearest.numpy(), idx.numpy()[np.arange(7), query.numpy()])
    assert query[3] == 10 and (bank_groups[nearest] != query_groups).all()
    # one image in the bank: its patches have no row outside it
    alone = torch.zeros(60, dtype=torch.long)
    largest, _, _ = largest_nearest_distance(
        torch.from_numpy(queries[:1]), bank[:60], query_groups=torch.tensor([0]), bank_groups=alone
    )
    assert largest[0] == 0  # each patch is in the bank: in-sample distance 0


def test_largest_nearest_distance_small_bank_and_single_query(rng):
    bank = torch.from_numpy(rng.normal(size=(3, 2)))
    queries = torch.from_numpy(rng.normal(size=(2, 1, 2)))
    largest, query, nearest = largest_nearest_distance(queries, bank)
    D = torch.cdist(queries[:, 0], bank)
    np.testing.assert_allclose(largest.numpy(), D.min(dim=1).values.numpy(), rtol=1e-12)
    assert query.tolist() == [0, 0] and nearest.tolist() == D.argmin(dim=1).tolist()


def test_nearest_neighbors_of_no_queries_and_nan_largest(rng):
    dist, idx = nearest_neighbors(np.empty((0, 3)), rng.normal(size=(5, 3)), 2)
    assert dist.shape == idx.shape == (0, 2)
    # a NaN patch is not pruned away: the set's answer is NaN, not a smaller number
    queries = torch.from_numpy(rng.normal(size=(2, 40, 3)))
    queries[1, 5] = float("nan")
    largest, _, _ = largest_nearest_distance(queries, torch.from_numpy(rng.normal(size=(64, 3))))
    assert torch.isfinite(largest[0]) and torch.isnan(largest[1])


def test_nearest_neighbors_checks_input(rng):
    with pytest.raises(ValueError, match="n_neighbors"):
        nearest_neighbors(rng.normal(size=(3, 2)), rng.normal(size=(2, 2)), 3)
    with pytest.raises(ValueError, match="same number of columns"):
        nearest_neighbors(rng.normal(size=(3, 2)), rng.normal(size=(2, 3)))


def _sequential_reservoir(n_seen, n_new, capacity, draws):
    """Algorithm R one item at a time, with the draws the vectorized version makes."""
    slots = {}
    for i in range(n_new):
        t = n_seen + i
        j = t if t < capacity else draws[i]
        if j < capacity:
            slots[j] = i
    return slots


@pytest.mark.parametrize("n_seen, n_new, capacity", [(0, 5, 10), (0, 50, 10), (7, 50, 10), (30, 40, 10)])
def test_reservoir_slots_match_sequential_algorithm_r(n_seen, n_new, capacity):
    positions, slots = reservoir_slots(n_seen, n_new, capacity, np.random.default_rng(0))
    t = n_seen + np.arange(n_new)
    draws = np.full(n_new, -1)
    late = t >= capacity
    if late.any():
        draws[late] = np.random.default_rng(0).integers(0, t[late] + 1)
    expected = _sequential_reservoir(n_seen, n_new, capacity, draws)
    assert dict(zip(slots.tolist(), positions.tolist())) == expected
    assert (np.diff(slots) > 0).all()


def test_reservoir_slots_sample_uniformly():
    counts = np.zeros(100)
    for seed in range(400):
        rng = np.random.default_rng(seed)
        store = np.empty(10, dtype=int)
        for start in range(0, 100, 13):  # batches of 13 items
            n_new = min(13, 100 - start)
            positions, slots = reservoir_slots(start, n_new, 10, rng)
            store[slots] = start + positions
        counts[store] += 1
    # each item is kept with probability 10 / 100: 40 times in 400 runs
    assert counts.sum() == 4000
    assert 20 < counts.min() and counts.max() < 62


@pytest.mark.parametrize("as_tensor", [False, True])
@pytest.mark.parametrize("channels", [None, [4, 0, 2]])
def test_fill_reservoir_grows_and_keeps_channels_last(as_tensor, channels):
    rng = np.random.default_rng(0)
    images = rng.normal(size=(6, 5, 3, 4)).astype(np.float32)
    batch = np.ascontiguousarray(images.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    if as_tensor:
        batch = torch.from_numpy(batch)
    kept = slice(None) if channels is None else channels
    sample = channels_last_empty((0, 5 if channels is None else 3, 3, 4), np.float32)
    # still filling: slots 0 .. 3 are appended
    sample = fill_reservoir(sample, batch[:4], np.arange(4), np.arange(4), channels)
    assert sample.shape == (4, 5 if channels is None else 3, 3, 4)
    assert sample.transpose(0, 2, 3, 1).flags.c_contiguous  # channels-last
    np.testing.assert_array_equal(sample, images[:4][:, kept])
    # replacements: image 5 into slot 1, image 4 into slot 3; nothing grows
    same = sample
    sample = fill_reservoir(sample, batch[4:], np.array([1, 0]), np.array([1, 3]), channels)
    assert sample is same
    np.testing.assert_array_equal(sample, images[[0, 5, 2, 4]][:, kept])
    # nothing kept from a batch
    assert fill_reservoir(sample, batch[4:], np.array([], int), np.array([], int)) is same
