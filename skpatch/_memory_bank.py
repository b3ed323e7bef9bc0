"""Memory-bank kernels: greedy k-center coreset and chunked nearest neighbours (torch).

The kernels of the detectors that keep training patches instead of a
distribution per position (PatchCore, SPADE, PNI):

* :func:`greedy_coreset`: the greedy k-center (minimax facility location)
  selection of PatchCore (Roth et al., 2022, §3.2, Algorithm 1), in its
  approximate form: distances are taken between Johnson-Lindenstrauss random
  projections ``ψ: R^d -> R^d*`` of the features (``d* = 128`` in the
  official code). The picks are
  returned in order, so the first ``k`` indices are the greedy coreset of
  size ``k`` (nested coresets, as PNI's ``C_dist ⊂ C_emb`` needs).
* :func:`nearest_neighbors`: exact Euclidean k-nearest neighbours of
  queries in a bank, in chunks whose working memory is bounded by
  scikit-learn's ``working_memory`` (as :func:`sklearn.metrics.pairwise_distances_chunked`).
* :func:`largest_nearest_distance`: for each image, the largest of its
  patches' nearest-neighbour distances (PatchCore's image score), exactly,
  by branch and bound: cells of the bank (an inverted file) bound each
  patch's distance, and only the patches that can still be the largest
  are searched in the whole bank.

Pure torch on the device of the inputs: nothing loops over patches in
Python except the greedy selection, whose picks are sequential by nature
(each iteration is one matrix-vector product over all candidates).
"""

import contextlib
import math

import numpy as np
import sklearn
import torch
from sklearn.utils import check_random_state

from ._torch_utils import as_tensor, gather_last, single_threaded

__all__ = [
    "fill_reservoir",
    "greedy_coreset",
    "largest_nearest_distance",
    "nearest_neighbors",
    "patch_rows",
    "random_projection",
    "reservoir_slots",
]


def _to_tensor(x, device=None, dtype=None):
    """ndarray or tensor -> tensor on ``device`` (default: its own, or the CPU)."""
    if not torch.is_tensor(x):
        x = np.asarray(x)
        if not x.flags.writeable or not x.flags.c_contiguous:
            x = np.array(x, order="C")
        x = torch.from_numpy(x)
    if dtype is None and not x.is_floating_point():
        dtype = torch.float32
    return x.to(device=device if device is not None else x.device, dtype=dtype)


def random_projection(n_features, n_components, random_state=None, *, dtype=torch.float32, device=None):
    """Gaussian random projection matrix ``(n_features, n_components)``.

    Entries ``N(0, 1 / n_components)`` (as
    :class:`sklearn.random_projection.GaussianRandomProjection`), drawn from
    a NumPy generator seeded by ``random_state``, so that the projection is
    the same on every device. Squared distances are preserved in expectation.
    """
    rng = check_random_state(random_state)
    matrix = rng.standard_normal((n_features, n_components)) / math.sqrt(n_components)
    return torch.from_numpy(matrix).to(device=device, dtype=dtype)


def greedy_coreset(x, n_select, *, projection_dim=128, random_state=None, device=None):
    """Greedy k-center coreset (PatchCore's approximate version), picks in order.

    Starts from one point drawn by ``random_state``, then repeatedly picks
    the point farthest from the points already picked (PatchCore
    Algorithm 1), keeping each point's distance to its nearest pick up to
    date (one matrix-vector product per pick). Distances are computed
    between random projections of the points to ``projection_dim``
    dimensions (PatchCore §3.2, Johnson-Lindenstrauss), in float32.

    Parameters
    ----------
    x : ndarray or torch.Tensor of shape (n, d)
        Points (patch features).
    n_select : int
        Number of points to pick; clipped to ``n``.
    projection_dim : int or None, default=128
        Dimension of the Gaussian random projection used for the distances;
        None, or a value not below ``d``, uses the features themselves
        (the exact greedy k-center).
    random_state : int, RandomState instance or None, default=None
        Seeds the projection and the starting point.
    device : str, torch.device or None, default=None
        Where to compute; None keeps ``x`` where it is (the CPU for arrays).

    Returns
    -------
    indices : torch.LongTensor of shape (n_select,)
        Indices into ``x`` in pick order: ``indices[:k]`` is the greedy
        coreset of size ``k`` for every ``k``. On ``device``.

    Notes
    -----
    Cost: ``O(n d p)`` for the projection and ``O(n p)`` per pick, i.e.
    ``O(n p k)`` for ``k`` picks, with memory ``n (p + 3)`` floats besides
    ``x`` (which is not copied when it is a float32 array or tensor on
    ``device``, and a projection is used). On the
    CPU each pick reads the ``n x p`` projected points once (memory bound:
    about 1 ms for ``n = 5 x 10⁴``, ``p = 128``, on 2 cores).

    Once every remaining point coincides with a pick (duplicates), the
    remaining picks are the other points, in no particular order.
    """
    x = _to_tensor(x, device)
    if x.ndim != 2:
        raise ValueError(f"x must be 2-D (n, d), got shape {tuple(x.shape)}.")
    n, d = x.shape
    n_select = int(min(n_select, n))
    if n_select <= 0:
        return torch.empty(0, dtype=torch.long, device=x.device)
    rng = check_random_state(random_state)
    # centring keeps the cancellation error of |a|² + |b|² - 2 a·b small
    x = x.to(torch.float32)
    # z is stored transposed, (p, n): torch's CPU matrix-vector product is
    # 3x faster on a column-major matrix and a contiguous vector (1.0
    # against 3.5 ms per pick for n = 5 x 10⁴, p = 128)
    if projection_dim is not None and projection_dim < d:
        # (x - mean) P = x P - mean P: no centred copy of the whole store
        projection = random_projection(d, projection_dim, rng, device=x.device)
        z = torch.addmm(-(x.mean(dim=0) @ projection)[:, None], projection.T, x.T).T
    else:
        z = (x - x.mean(dim=0)).T.contiguous().T
    sq = z.square().sum(dim=1)
    picks = torch.empty(n_select, dtype=torch.long, device=z.device)
    start = int(rng.randint(n))
    picks[0] = start
    # squared distance of every point to its nearest pick; -inf marks the
    # picks, which are never picked again (rounding may make a distance
    # slightly negative, never -inf)
    min_d2 = sq + sq[start] - 2 * (z @ z[start])
    min_d2[start] = -math.inf
    buffer = torch.empty_like(min_d2)
    # The loop is memory bound (one pass over z per pick): a second thread
    # adds nothing but synchronization, which is costly on a busy machine.
    threads = single_threaded() if z.device.type == "cpu" else contextlib.nullcontext()
    with threads:
        for i in range(1, n_select):
            # The pick stays a one-element tensor, used through index_select
            # and index_fill_: indexing with it would read it on the host, a
            # device synchronization per pick on CUDA.
            idx = torch.argmax(min_d2, dim=0, keepdim=True)
            picks[i:i + 1] = idx
            torch.addmv(sq, z, z.index_select(0, idx)[0], alpha=-2, out=buffer)
            buffer.add_(sq.index_select(0, idx))
            torch.minimum(min_d2, buffer, out=min_d2)
            min_d2.index_fill_(0, idx, -math.inf)
    return picks


# Largest distance block, in bytes: a block is reused across chunks, and a
# larger one only adds first-touch page faults (a fresh 1 GiB block cost as
# much as the matrix product that fills it). A large bank is split into
# blocks rather than the queries into slivers: a product of fewer rows than
# this runs far below the machine's speed.
_MAX_BLOCK_BYTES = 32 * 2**20
_MIN_QUERY_ROWS = 256
# Columns per group of the CPU's two-stage argmin (see _argmin_rows).
_ARGMIN_GROUP = 128


def _argmin_rows(x):
    """``x.argmin(dim=1)``, 4x faster on the CPU for a width that is a multiple of ``_ARGMIN_GROUP``.

    Torch's CPU argmin along rows is not vectorized (7 ms for 1,677 x 5,120
    floats, where ``amin`` takes 1): the minimum of each group of columns
    is taken with ``amin``, then the argmin among the groups and within the
    winning group. Ties and NaNs resolve as argmin's (the first).
    """
    n_rows, width = x.shape
    if x.device.type != "cpu" or width % _ARGMIN_GROUP or width < 2 * _ARGMIN_GROUP:
        return x.argmin(dim=1)
    groups = x.view(n_rows, width // _ARGMIN_GROUP, _ARGMIN_GROUP)
    group = groups.amin(dim=2).argmin(dim=1)
    within = groups[torch.arange(n_rows, device=x.device), group].argmin(dim=1)
    return group * _ARGMIN_GROUP + within


def _chunk_sizes(n_queries, n_bank, n_features, n_neighbors, itemsize, working_memory):
    """``(query rows, bank rows)`` per block whose distance matrix fits ``working_memory`` MiB."""
    budget = (sklearn.get_config()["working_memory"] if working_memory is None else working_memory) * 2**20
    # A centred bank block, then per query row: the distance row over the
    # block (and top-k's copy of it) and the k neighbours' features (exact
    # recomputation).
    bank_rows = n_bank
    min_query_rows = min(n_queries, 64)
    extra = n_neighbors * (n_features + 4)
    if min_query_rows * (2 * n_bank + extra) * itemsize + n_bank * n_features * itemsize > budget:
        bank_rows = max(1, int(budget // (itemsize * (2 * min_query_rows + n_features))))
    bank_rows = min(bank_rows, _MAX_BLOCK_BYTES // (min(n_queries, _MIN_QUERY_ROWS) * itemsize))
    bank_rows = max(n_neighbors, min(n_bank, bank_rows))
    query_rows = (budget - bank_rows * n_features * itemsize) // ((2 * bank_rows + extra) * itemsize)
    query_rows = min(query_rows, _MAX_BLOCK_BYTES // (bank_rows * itemsize))
    return max(1, min(n_queries, int(query_rows))), bank_rows


def nearest_neighbors(
    queries, bank, n_neighbors=1, *, working_memory=None, exact=True, query_groups=None, bank_groups=None
):
    """Euclidean k-nearest neighbours of every query in a bank, memory-bounded.

    Squared distances in the expanded form ``|a|² + |b|² - 2 a·b`` (one
    matrix product per block, clamped at 0), on data centred by the bank's
    mean to keep the cancellation error small; queries are processed in
    chunks and, for a large bank, the bank in blocks whose running top-k are
    merged, so that the working memory stays within ``working_memory``.
    The distances to the ``k`` neighbours found are then recomputed
    directly as ``|a - b|`` (``exact=True``), so they carry no cancellation
    error (the ranking may differ from the exact one only between near
    ties at the float precision).

    Parameters
    ----------
    queries : ndarray or torch.Tensor of shape (n_queries, d)
        Query points.
    bank : ndarray or torch.Tensor of shape (n_bank, d)
        Memory bank. The computation runs on its device.
    n_neighbors : int, default=1
        ``k``, at most ``n_bank``.
    working_memory : float or None, default=None
        Budget in MiB for the temporary distance blocks; None takes
        ``sklearn.get_config()["working_memory"]``.
    exact : bool, default=True
        Recompute the selected distances directly (see above).
    query_groups, bank_groups : array-like of int of shape (n_queries,) and (n_bank,), default=None
        Leave-one-group-out search: when both are given, the bank rows of
        the query's own group are excluded (e.g. the patches of the query's
        own training image, to score training images as if left out). A
        query with fewer than ``k`` rows outside its group gets the distance
        ``inf`` for the missing neighbours.

    Returns
    -------
    distances : torch.Tensor of shape (n_queries, n_neighbors)
        Distances to the neighbours, ascending, in the bank's dtype.
    indices : torch.LongTensor of shape (n_queries, n_neighbors)
        Their indices in the bank.
    """
    bank = _to_tensor(bank)
    queries = _to_tensor(queries, bank.device, bank.dtype)
    if queries.ndim != 2 or bank.ndim != 2 or queries.shape[1] != bank.shape[1]:
        raise ValueError(
            f"queries and bank must be 2-D with the same number of columns, got "
            f"{tuple(queries.shape)} and {tuple(bank.shape)}."
        )
    n_queries, d = queries.shape
    n_bank = bank.shape[0]
    k = int(n_neighbors)
    if not 1 <= k <= n_bank:
        raise ValueError(f"n_neighbors={k} must be in [1, {n_bank}] (the bank size).")
    if n_queries == 0:
        return bank.new_empty((0, k)), torch.empty((0, k), dtype=torch.long, device=bank.device)
    center = bank.mean(dim=0)
    itemsize = bank.element_size()
    query_rows, bank_rows = _chunk_sizes(n_queries, n_bank, d, k, itemsize, working_memory)
    blocks = []
    for b0 in range(0, n_bank, bank_rows):
        block = bank[b0 : b0 + bank_rows] - center
        block_sq = (block * block).sum(dim=1)
        n_real = len(block)
        if k == 1 and bank.device.type == "cpu" and n_real >= 2 * _ARGMIN_GROUP:
            # rows at infinite distance up to a whole group: the fast argmin
            pad = -n_real % _ARGMIN_GROUP
            block = torch.cat([block, block.new_zeros((pad, d))])
            block_sq = torch.cat([block_sq, block_sq.new_full((pad,), math.inf)])
        blocks.append((b0, n_real, block, block_sq))
    distances = torch.empty((n_queries, k), dtype=bank.dtype, device=bank.device)
    indices = torch.empty((n_queries, k), dtype=torch.long, device=bank.device)
    grouped = query_groups is not None and bank_groups is not None
    if grouped:
        query_groups = _to_tensor(query_groups, bank.device, torch.long)
        bank_groups = _to_tensor(bank_groups, bank.device, torch.long)
    # one distance block for all chunks (flat, so that a smaller last chunk
    # still gets a contiguous view)
    width = max(len(block) for _, _, block, _ in blocks)
    buffer = torch.empty(min(query_rows, n_queries) * width, dtype=bank.dtype, device=bank.device)
    for q0 in range(0, n_queries, query_rows):
        q = queries[q0 : q0 + query_rows] - center
        q_sq = (q * q).sum(dim=1, keepdim=True)
        best_d2 = best_idx = None
        for b0, n_real, block, b_sq in blocks:
            # |b|² - 2 a·b ranks the bank rows of a query as the distance does
            partial = buffer[: len(q) * len(block)].view(len(q), len(block))
            torch.addmm(b_sq.unsqueeze(0), q, block.T, alpha=-2, out=partial)
            if grouped:
                own = query_groups[q0 : q0 + query_rows, None] == bank_groups[None, b0 : b0 + n_real]
                partial[:, :n_real].masked_fill_(own, math.inf)
            if k == 1:  # argmin reads the block once; topk costs half again as much
                idx = _argmin_rows(partial).unsqueeze(1)
                d2 = partial.gather(1, idx)
            else:
                d2, idx = partial.topk(min(k, n_real), dim=1, largest=False)
            idx += b0
            if best_d2 is not None:
                d2 = torch.cat([best_d2, d2], dim=1)
                d2, order = d2.topk(min(k, d2.shape[1]), dim=1, largest=False)
                idx = torch.cat([best_idx, idx], dim=1).gather(1, order)
            best_d2, best_idx = d2, idx
        if exact:
            diff = queries[q0 : q0 + query_rows].unsqueeze(1) - bank[best_idx]
            dist = torch.linalg.vector_norm(diff, dim=2)
            if grouped:
                dist.masked_fill_(torch.isinf(best_d2), math.inf)
        else:
            dist = (best_d2 + q_sq).clamp_(min=0).sqrt_()
        # recomputed distances may reorder near ties
        dist, order = dist.sort(dim=1)
        distances[q0 : q0 + query_rows] = dist
        indices[q0 : q0 + query_rows] = best_idx.gather(1, order)
    return distances, indices


# Distances per block of the cell search: a block this size stays in the
# L2 cache while its minimum is taken; gathered queries per block, at most.
_CELL_BLOCK_ELEMENTS = 2**18
_CELL_BLOCK_QUERIES = 4096


def _least_expanded(a, b, bias, scratch, out, where=None, groups=None):
    """Per row of ``a``, the least ``bias - 2 a·b`` over the rows of ``b`` into ``out`` (its row into ``where``).

    ``groups``: ``(groups of a, groups of b)``; a row of ``b`` in the group
    of a row of ``a`` does not count for it (``inf``).
    """
    rows = max(1, len(scratch) // len(b))
    for start in range(0, len(a), rows):
        chunk = a[start : start + rows]
        block = scratch[: len(chunk) * len(b)].view(len(chunk), len(b))
        torch.addmm(bias, chunk, b.T, alpha=-2, out=block)
        if groups is not None:
            block.masked_fill_(groups[0][start : start + rows, None] == groups[1][None, :], math.inf)
        if where is None:
            torch.amin(block, dim=1, out=out[start : start + rows])
        else:
            torch.min(block, dim=1, out=(out[start : start + rows], where[start : start + rows]))


def _cell_upper_bounds(queries, bank, cell_size, query_groups=None, bank_groups=None):
    """An upper bound of each query's squared distance to its nearest bank row (outside its group).

    The bank is split into cells: ``n_bank // cell_size`` rows evenly spaced
    in it are the heads, and every row belongs to the cell of its nearest
    head (the first rows of a greedy coreset, the farthest from the rest,
    would make a few cells of most of the bank). A query is compared with
    every head and with the rows of its nearest head's cell (an inverted
    file of one probe), which finds its nearest row, or one nearly as near,
    for a few hundred distances instead of ``n_bank``. The distances are
    taken in the expanded form on data centred by the bank's mean, the
    queries a block at a time (copies that stay in the cache). Their
    rounding error is at most ``E = (d + 2) u (|a| + |b|)²`` (Higham's
    bound for the products). The distance :func:`nearest_neighbors`
    returns (the expanded form picks the row, the difference gives the
    distance) is within ``3 E`` of the exact one; the bound adds ``16 E``. With groups, the rows of a query's own
    group are left out (its bound is ``inf`` if its cell has no other).
    """
    grouped = query_groups is not None and bank_groups is not None
    n_bank, d = bank.shape
    n_heads = max(1, n_bank // cell_size)
    center = bank.mean(dim=0)
    centered = bank - center
    centered_sq = centered.square().sum(dim=1)
    head_rows = torch.arange(n_heads, device=bank.device) * (n_bank // n_heads)
    heads, heads_sq = centered[head_rows], centered_sq[head_rows]
    scratch = bank.new_empty(max(_CELL_BLOCK_ELEMENTS, n_bank))
    row_cell = torch.empty(n_bank, dtype=torch.long, device=bank.device)
    _least_expanded(centered, heads, heads_sq, scratch, bank.new_empty(n_bank), row_cell)
    # a head is in its own cell, also when it has duplicates
    row_cell[head_rows] = torch.arange(n_heads, device=bank.device)
    block = queries.new_empty((max(1, min(len(queries), _CELL_BLOCK_QUERIES)), d))
    queries_sq = queries.new_empty(len(queries))
    upper = queries.new_empty(len(queries))
    query_cell = torch.empty(len(queries), dtype=torch.long, device=bank.device)
    for start in range(0, len(queries), len(block)):
        stop = min(len(queries), start + len(block))
        q = torch.sub(queries[start:stop], center, out=block[: stop - start])
        torch.linalg.vector_norm(q, dim=1, out=queries_sq[start:stop])
        groups = (query_groups[start:stop], bank_groups[head_rows]) if grouped else None
        _least_expanded(q, heads, heads_sq, scratch, upper[start:stop], query_cell[start:stop], groups)
    queries_sq.square_()
    # each cell's rows as one slice; its queries gathered a block at a time
    row_order, query_order = row_cell.argsort(), query_cell.argsort()
    row_ends = torch.bincount(row_cell, minlength=n_heads).cumsum(0).tolist()
    query_ends = torch.bincount(query_cell, minlength=n_heads).cumsum(0).tolist()
    rows, rows_sq = centered[row_order], centered_sq[row_order]
    rows_groups = bank_groups[row_order] if grouped else None
    least = queries.new_empty(len(block))
    r0 = q0 = 0
    for r1, q1 in zip(row_ends, query_ends):
        for start in range(q0, q1, len(block)):
            index = query_order[start : min(q1, start + len(block))]
            q = torch.index_select(queries, 0, index, out=block[: len(index)]).sub_(center)
            groups = (query_groups[index], rows_groups[r0:r1]) if grouped else None
            _least_expanded(q, rows[r0:r1], rows_sq[r0:r1], scratch, least[: len(index)], groups=groups)
            upper[index] = torch.minimum(upper[index], least[: len(index)])
        r0, q0 = r1, q1
    unit_roundoff = torch.finfo(bank.dtype).eps / 2
    norms = queries_sq.sqrt() + centered_sq.max().sqrt()
    return upper.add_(queries_sq).add_(16 * (d + 2) * unit_roundoff * norms.square())


def largest_nearest_distance(
    queries, bank, *, query_groups=None, bank_groups=None, n_probe=4, cell_size=128, working_memory=None
):
    """Per set of queries, the largest distance of a query to its nearest bank row.

    Equals taking :func:`nearest_neighbors` ``(queries, bank, 1)`` of every
    query and the largest distance of each set (PatchCore's image score
    ``s*``, §3.3), but searches the whole bank only for the queries that
    can still be the largest, a branch and bound:

    * Upper bounds: each query is compared with a few bank rows near it, the
      rows of its cell (:func:`_cell_upper_bounds`, about
      ``n_bank / cell_size + cell_size`` distances per query). The nearest
      of them is most often the query's nearest row.
    * Lower bounds: in rounds, the ``n_probe`` queries of each set with the
      largest upper bounds not yet searched (twice as many each round) are
      searched in the whole bank; the largest exact distance found is a
      lower bound of the set's answer, and the queries whose upper bound is
      below it are dropped. The rounds end when no more queries are left
      than a round would search; those are searched.

    Exact whatever the order of the bank (the bounds carry the rounding
    error of the expanded form). With groups, each set is searched leaving
    its own group's bank rows out, as :func:`nearest_neighbors` with
    ``query_groups`` does, except that a query with no row outside its group
    keeps its distance to the whole bank (PatchCore's leave-one-out
    calibration). On PatchCore's default bank (5,000 items,
    EfficientNet-Lite0 features of ELPV mono cells, 32 images per call) it
    makes 7 % of the distance computations of a full search.

    Parameters
    ----------
    queries : torch.Tensor of shape (n_sets, n_queries, d)
        Query points, grouped in sets (the patches of each image).
    bank : torch.Tensor of shape (n_bank, d)
        Memory bank, on the queries' device.
    query_groups, bank_groups : torch.LongTensor of shape (n_sets,) and (n_bank,), default=None
        Leave-one-group-out search: the group of each set and of each bank
        row (e.g. the training image of each patch).
    n_probe : int, default=4
        Queries per set searched in the whole bank in the first round.
    cell_size : int, default=128
        Bank rows per cell (on average).
    working_memory : float or None, default=None
        See :func:`nearest_neighbors`.

    Returns
    -------
    distances : torch.Tensor of shape (n_sets,)
        Largest nearest-neighbour distance of each set.
    queries : torch.LongTensor of shape (n_sets,)
        The query that has it (the first one, for ties).
    nearest : torch.LongTensor of shape (n_sets,)
        Its nearest bank row.
    """
    n_sets, n_queries, d = queries.shape
    flat = queries.reshape(-1, d)
    device = bank.device
    groups = {}
    if query_groups is not None and bank_groups is not None:
        groups = {"query_groups": query_groups.repeat_interleave(n_queries), "bank_groups": bank_groups}
    upper = _cell_upper_bounds(flat, bank, cell_size, **groups)
    exact = torch.full((len(flat),), -math.inf, dtype=bank.dtype, device=device)
    nearest = torch.zeros(len(flat), dtype=torch.long, device=device)
    unsearched = torch.ones(len(flat), dtype=torch.bool, device=device)
    lower = torch.full((n_sets,), -math.inf, dtype=bank.dtype, device=device)
    offsets = n_queries * torch.arange(n_sets, device=device)[:, None]
    k = n_probe
    while left := int(unsearched.sum()):
        if left <= n_sets * k:
            probe = torch.nonzero(unsearched)[:, 0]
        else:
            candidates = torch.where(unsearched, upper, -math.inf).view(n_sets, n_queries)
            top = candidates.topk(min(k, n_queries), dim=1)
            probe = (top.indices + offsets)[(top.values > -math.inf) | torch.isnan(top.values)]
        probe_groups = {"query_groups": groups["query_groups"][probe], "bank_groups": bank_groups} if groups else {}
        dist, idx = nearest_neighbors(flat[probe], bank, 1, working_memory=working_memory, **probe_groups)
        if groups:
            # a query with no row outside its own group: its distance to the whole bank
            missing = torch.isinf(dist[:, 0])
            if missing.any():
                dist[missing], idx[missing] = nearest_neighbors(flat[probe[missing]], bank, 1)
        exact[probe], nearest[probe] = dist[:, 0], idx[:, 0]
        unsearched[probe] = False
        found = torch.full_like(lower, -math.inf).scatter_reduce_(0, probe // n_queries, dist[:, 0], "amax")
        lower = torch.maximum(lower, found)
        # not "upper >= lower²": a NaN bound (overflowing input) keeps its
        # query, so that the NaN reaches the result instead of vanishing
        unsearched &= ~(upper < lower.clamp(min=0).square().repeat_interleave(n_queries))
        k *= 2
    # every query dropped is nearer its nearest row than its set's answer
    distances, best = exact.view(n_sets, n_queries).max(dim=1)
    return distances, best, nearest.view(n_sets, n_queries).gather(1, best[:, None])[:, 0]


def reservoir_slots(n_seen, n_new, capacity, rng):
    """Where a batch of new items goes in a uniform reservoir sample (algorithm R).

    Vitter's algorithm R keeps a uniform random sample of at most
    ``capacity`` of the items of a stream: item ``t`` (0-based) fills slot
    ``t`` while ``t < capacity``, and afterwards replaces the item in slot
    ``j``, drawn uniformly from ``0 .. t``, when ``j < capacity``. This
    draws all the ``j`` of a batch at once and resolves the slots hit twice
    in favour of the later item, as the sequential algorithm would.

    Parameters
    ----------
    n_seen : int
        Number of items offered before this batch.
    n_new : int
        Number of items in the batch.
    capacity : int
        Size of the reservoir.
    rng : numpy.random.Generator
        Source of the draws.

    Returns
    -------
    positions : ndarray of int64
        Positions in the batch of the items that enter the reservoir.
    slots : ndarray of int64, sorted
        Their slots; a slot not below ``min(n_seen, capacity)`` is appended
        (the reservoir is still filling; those slots are consecutive).
    """
    t = n_seen + np.arange(n_new, dtype=np.int64)
    filling = t < capacity
    slots = t.copy()
    if not filling.all():
        slots[~filling] = rng.integers(0, t[~filling] + 1)
    positions = np.flatnonzero(slots < capacity)
    slots = slots[positions]
    # the last item that hits a slot keeps it
    _, last = np.unique(slots[::-1], return_index=True)
    last = len(slots) - 1 - last
    return positions[last], slots[last]


def patch_rows(x, indices):
    """Patches ``indices`` of embeddings ``x (N, C, h, w)`` as rows ``(k, C)``.

    ``indices`` number the patches image-major (``image * h * w +
    position``). Works on arrays and tensors, and gathers only the patches
    asked for: the ``(N h w, C)`` matrix of all patches is never made.
    """
    n_images, n_channels = x.shape[:2]
    n_positions = x.shape[2] * x.shape[3]
    return x.reshape(n_images, n_channels, -1)[indices // n_positions, :, indices % n_positions]


def fill_reservoir(sample, X, positions, slots, channels=None):
    """Write the images ``X[positions]`` into ``sample[slots]``, growing it.

    The sample is a host array of shape ``(k, C, h, w)`` (``(k, d)`` for
    flat embeddings) in channels-last memory order, as the embedder's
    arrays are: each image is copied as contiguous rows of patches, straight
    into its slot (no temporary of the batch), and the sample is scored
    without a transposing copy. ``channels`` keeps only those channels
    (PaDiM's selection), gathered on the device of ``X``. Slots past the end
    (a reservoir still filling) grow the sample.

    Returns
    -------
    sample : ndarray
        The sample, a new array if it grew.
    """
    size = int(slots[-1]) + 1 if len(slots) else 0
    if size > len(sample):
        grown = channels_last_empty((size, *sample.shape[1:]), sample.dtype)
        grown[: len(sample)] = sample
        # First touch by NumPy (which asks for huge pages): torch's threads
        # writing fresh pages took 80-110 ms for 32 PaDiM images, this 5-10.
        grown[len(sample) :] = 0
        sample = grown
    if not len(positions):
        return sample
    x = as_tensor(X, X.device if torch.is_tensor(X) else "cpu")
    target = torch.from_numpy(sample)
    if x.ndim == 4:  # (n, h, w, C) views of channels-last images
        x, target = x.permute(0, 2, 3, 1), target.permute(0, 2, 3, 1)
    index = None if channels is None else torch.as_tensor(channels, device=x.device)
    for position, slot in zip(positions.tolist(), slots.tolist()):
        if index is None:
            target[slot].copy_(x[position])
        elif (x.device, x.dtype) == (target.device, target.dtype):
            gather_last(x[position], index, out=target[slot])
        else:  # gathered on the device (only the kept channels cross), or cast
            target[slot].copy_(gather_last(x[position], index))
    return sample


def channels_last_empty(shape, dtype):
    """``np.empty(shape)`` in channels-last order when ``shape`` is ``(n, C, h, w)``."""
    if len(shape) != 4:
        return np.empty(shape, dtype=dtype)
    n, c, h, w = shape
    return np.empty((n, h, w, c), dtype=dtype).transpose(0, 3, 1, 2)
