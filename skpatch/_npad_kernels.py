"""N-pad kernels: neighbour similarities, weighted statistics, neighbour minima (torch).

Grid layout: statistics are indexed by the patch grid, ``mean (h, w, d)``,
``covariance (h, w, d, d)``; embeddings are ``(b, d, h, w)``. A neighbourhood
of size ``p`` is the window of offsets ``(dy, dx)`` with
``|dy|, |dx| <= p // 2`` (N-pad eq. 1), so every function loops over the
``(2 (p // 2) + 1)²`` offsets of the window, never over positions: each
offset is one batched operation on the shifted grid (the unfold of the grid
written as shifted slices, which needs no copy of the ``d x d`` blocks).
Neighbours outside the grid do not exist: their weight is 0 and their
distance is ignored.
"""

import contextlib

import torch

from . import _gaussian
from ._torch_utils import empty, map_on_cores, single_threaded


def window_offsets(size):
    """Offsets ``(dy, dx)`` of the neighbourhood of size ``size`` (eq. 1), row-major."""
    radius = size // 2
    return [(dy, dx) for dy in range(-radius, radius + 1) for dx in range(-radius, radius + 1)]


def _overlap(n, offset):
    """Slices ``(target, source)`` of an axis of length ``n``: ``target + offset = source``.

    Empty when ``|offset| >= n`` (a window wider than the grid): no position
    has a neighbour there.
    """
    if abs(offset) >= n:
        return slice(0, 0), slice(0, 0)
    if offset >= 0:
        return slice(0, n - offset), slice(offset, n)
    return slice(-offset, n), slice(0, n + offset)


# Bytes of d x d matrices per chunk of grid rows. On a CPU a chunk about the
# size of the cache: each offset of the window passes over it again, from
# cache rather than memory (NPadDetector.fit on 411 ELPV cells, 3136
# positions: 7.55 -> 5.93 s, medians of 4 runs each in alternating order;
# budgets of 4 and 16 MB did as well). On a GPU, fewer and larger launches.
_CPU_BUDGET_BYTES = 8 * 2**20
_GPU_BUDGET_BYTES = 2**28


def _row_chunks(n_rows, row_bytes, budget_bytes, device):
    if budget_bytes is None:
        budget_bytes = _CPU_BUDGET_BYTES if device.type == "cpu" else _GPU_BUDGET_BYTES
    step = max(1, int(budget_bytes // max(row_bytes, 1)))
    return [(start, min(start + step, n_rows)) for start in range(0, n_rows, step)]


def _cholesky_solve_sq(matrices, vectors):
    """``vᵀ A⁻¹ v`` for SPD ``A (m, d, d)`` and ``v (m, d)`` (Cholesky, no inverse)."""
    chol, info = torch.linalg.cholesky_ex(matrices)
    if bool((info > 0).any()):
        raise ValueError(
            "an averaged covariance of neighbouring positions is not positive definite; "
            "increase epsilon (the ridge added to every covariance)."
        )
    z = torch.linalg.solve_triangular(chol, vectors.unsqueeze(-1), upper=False)
    return z.squeeze(-1).square().sum(-1)


def bhattacharyya_weights(mean, covariance, size, gamma, budget_bytes=None):
    """Normalized neighbour weights ``m'`` of N-pad eq. (4)-(6): ``(h, w, K)``.

    For every position and every neighbour ``a`` of its window (``K`` offsets,
    :func:`window_offsets`), the simplified Bhattacharyya term of eq. (5),
    ``BC = (μ - μ_a)ᵀ Σ'⁻¹ (μ - μ_a) / 8`` with ``Σ' = (Σ + Σ_a) / 2``, gives
    the similarity ``m_a = exp(-BC / γ)`` (eq. 4); the position itself has
    ``BC = 0``. Weights of neighbours outside the grid are 0, and the weights
    of each position are normalized to sum to 1 (``m'`` of eq. 6).

    ``BC`` is symmetric, so only half of the offsets are solved (one batched
    Cholesky factorization per pair of positions), in chunks of grid rows of
    at most ``budget_bytes`` of ``d x d`` matrices (None: 8 MB on a CPU,
    256 MB on a GPU).
    """
    h, w, d = mean.shape
    offsets = window_offsets(size)
    index = {offset: k for k, offset in enumerate(offsets)}
    bc = torch.full((h, w, len(offsets)), float("inf"), dtype=mean.dtype, device=mean.device)
    bc[:, :, index[(0, 0)]] = 0.0
    row_bytes = 3 * w * d * d * mean.element_size()
    # (offset, chunk of its rows) pairs: each writes its own entries of bc
    tasks = [
        ((dy, dx), chunk)
        for dy, dx in offsets
        if (dy, dx) > (0, 0)  # not the position itself, nor the mirror of a solved offset
        for chunk in _row_chunks(h - abs(dy), row_bytes, budget_bytes, mean.device)
    ]

    def solve(task):
        (dy, dx), (start, stop) = task
        (ty, sy), (tx, sx) = _overlap(h, dy), _overlap(w, dx)
        t_rows = slice(ty.start + start, ty.start + stop)
        s_rows = slice(sy.start + start, sy.start + stop)
        # single-threaded LAPACK: it only parallelizes inside each small matrix
        with single_threaded() if mean.device.type == "cpu" else contextlib.nullcontext():
            averaged = (covariance[t_rows, tx] + covariance[s_rows, sx]) * 0.5
            delta = mean[t_rows, tx] - mean[s_rows, sx]
            values = _cholesky_solve_sq(averaged.reshape(-1, d, d), delta.reshape(-1, d))
        values = values.reshape(stop - start, -1) / 8.0
        bc[t_rows, tx, index[(dy, dx)]] = values
        bc[s_rows, sx, index[(-dy, -dx)]] = values

    map_on_cores(solve, tasks, mean.device)  # one chunk per core on a CPU
    weights = torch.exp(-bc / gamma)  # exp(-inf) = 0 outside the grid
    return weights / weights.sum(dim=2, keepdim=True)


def weighted_moments(count, mean, scatter, weights, size, budget_bytes=None):
    """Weighted mean and covariance of N-pad eq. (6) from per-position sums.

    With ``N`` images, per-position means ``μ_a`` and scatters
    ``S_a = Σ_i (e_i^a - μ_a)(e_i^a - μ_a)ᵀ``, the sums of eq. (6) are

        μ = Σ_a m'_a μ_a,
        Σ = Σ_a m'_a (S_a + N (μ_a - μ)(μ_a - μ)ᵀ) / (N - Σ_a m'_a²),

    since ``Σ_i (e_i^a - μ)(e_i^a - μ)ᵀ = S_a + N (μ_a - μ)(μ_a - μ)ᵀ``: no
    training embedding is needed again. ``mean (h, w, d)``, ``scatter (h, w, d,
    d)``, ``weights (h, w, K)`` from :func:`bhattacharyya_weights`. Returns
    ``(mean (h, w, d), covariance (h, w, d, d))`` (without the ridge ``εI``),
    computed in chunks of grid rows of at most ``budget_bytes`` (as in
    :func:`bhattacharyya_weights`).
    """
    h, w, d = mean.shape
    offsets = window_offsets(size)
    weighted_mean = torch.zeros_like(mean)
    for k, (dy, dx) in enumerate(offsets):
        (ty, sy), (tx, sx) = _overlap(h, dy), _overlap(w, dx)
        weighted_mean[ty, tx] += weights[ty, tx, k, None] * mean[sy, sx]
    covariance = empty(scatter.shape, scatter.dtype, scatter.device).zero_()
    row_bytes = 2 * w * d * d * scatter.element_size()
    for start, stop in _row_chunks(h, row_bytes, budget_bytes, mean.device):
        block = covariance[start:stop]
        for k, (dy, dx) in enumerate(offsets):
            ty, sy = _overlap(h, dy)
            lo, hi = max(ty.start, start), min(ty.stop, stop)
            if lo >= hi:
                continue
            (tx, sx) = _overlap(w, dx)
            target = (slice(lo, hi), tx)
            source = (slice(lo + dy, hi + dy), sx)
            delta = mean[source] - weighted_mean[target]
            term = scatter[source] + count * (delta.unsqueeze(-1) * delta.unsqueeze(-2))
            block[lo - start:hi - start, tx] += weights[target][..., k, None, None] * term
    correction = count - weights.square().sum(dim=2)
    covariance /= correction[..., None, None]
    return weighted_mean, covariance


def _window_sum_(out, source, dim, radius):
    """``out[i] = Σ source[i + o]`` over ``o = -radius .. radius`` along ``dim``, in that order.

    Neighbours outside the grid count as 0. The first term is copied and the
    others added in place, so the sums are those of the zero-padded window
    added in order (:func:`aggregate_at` adds the same terms in the same
    order).
    """
    n = source.shape[dim]
    for offset in range(-radius, radius + 1):
        length = max(0, n - abs(offset))
        first = offset == -radius
        if first:
            out.narrow(dim, 0, n - length).zero_()  # no neighbour at this offset
        if length == 0:
            continue
        target = out.narrow(dim, max(0, -offset), length)
        shifted = source.narrow(dim, max(0, offset), length)
        if first:
            target.copy_(shifted)
        else:
            target += shifted
    return out


def aggregate(x, size, out=None):
    """``p x p`` average of every embedding over its neighbourhood (eq. 7), same grid.

    ``x (h, w, b, d)``, position-major (see :func:`neighbour_min_mahalanobis`).
    The average is over the in-grid neighbours only (as ``avg_pool2d`` with
    ``count_include_pad=False``), so border patches are not pulled toward
    zero. Separable: window sums along the columns, then the rows, each a
    sum of shifted slices of whole ``b x d`` blocks, added in place (no
    padded copy). ``out``: where to write the averages (a new tensor when
    None); ``x`` is not modified.
    """
    radius = size // 2
    if radius == 0:
        return x if out is None else out.copy_(x)
    h, w = x.shape[:2]
    columns = _window_sum_(torch.empty_like(x), x, 1, radius)
    total = _window_sum_(torch.empty_like(x) if out is None else out, columns, 0, radius)

    def in_grid(n):
        index = torch.arange(n, device=x.device)
        return (index + radius).clamp(max=n - 1) - (index - radius).clamp(min=0) + 1

    counts = in_grid(h).view(h, 1) * in_grid(w).view(1, w)
    return total.div_(counts.view(h, w, 1, 1).to(x.dtype))


def neighbour_min_mahalanobis(x, mean, prec_chol, size, block_bytes=None, shift=None):
    """``D1`` of N-pad eq. (8)-(9): ``(b, h, w)``.

    The Mahalanobis distance of the embedding at every position to each of
    the Gaussians of its size-``size`` window, minimized over the window.
    ``x (h, w, b, d)``, contiguous: position-major, so that the features of
    a position are one block of rows to gather (the scoring builds it in
    one copy from ``(b, C, h, w)`` embeddings, selecting the channels on the
    way); ``mean (P, d)`` and ``prec_chol (P, d, d)`` (upper
    ``U`` with ``Σ⁻¹ = U Uᵀ``) in row-major grid order. Gaussian-major: the
    Gaussian at ``y`` whitens the features at ``y - o`` of every offset
    ``o`` of the window in one product of ``k b`` rows (``k`` offsets; a
    product per offset, of ``b`` rows, ran at a third of the speed), in
    blocks of positions whose whitened rows take ``block_bytes``; each
    offset's distances are then shifted back onto the features, and those
    of features outside the grid dropped. The default block is 4 MiB on a
    CPU, which keeps the whitened rows in the cache until their norms are
    taken (64 MiB blocks: 17 against 10 ms per image of 64, ELPV, 2
    threads), and 64 MiB on a GPU. ``shift``: ``-μU`` per Gaussian
    (:func:`skpatch._gaussian.whitened_centers`, computed when None).
    """
    h, w, b, d = x.shape
    offsets = window_offsets(size)
    k, n_positions = len(offsets), h * w
    rows = torch.arange(h, device=x.device).repeat_interleave(w)
    cols = torch.arange(w, device=x.device).repeat(h)
    # the feature at y - o of the Gaussian at y, clamped into the grid (the
    # clamped ones are dropped when shifting back)
    source = torch.stack(
        [(rows - dy).clamp(0, h - 1) * w + (cols - dx).clamp(0, w - 1) for dy, dx in offsets], dim=1
    )
    features = x.view(n_positions, b, d)
    if shift is None:
        shift = _gaussian.whitened_centers(mean, prec_chol)
    dist = torch.empty((n_positions, k, b), dtype=x.dtype, device=x.device)
    if block_bytes is None:
        block_bytes = 2**22 if x.device.type == "cpu" else 2**26
    step = max(1, block_bytes // (2 * k * b * d * x.element_size()))
    for start in range(0, n_positions, step):
        stop = min(n_positions, start + step)
        window = features.index_select(0, source[start:stop].reshape(-1)).view(stop - start, k * b, d)
        z = torch.baddbmm(shift[start:stop], window, prec_chol[start:stop])
        dist[start:stop] = torch.linalg.vector_norm(z, dim=2).view(stop - start, k, b)
    dist = dist.permute(1, 2, 0).reshape(k, b, h, w)
    best = None
    for (dy, dx), offset_dist in zip(offsets, dist):
        # offset_dist[y] belongs to the feature at y - o: shifted by +o; outside
        # the overlap the feature does not exist
        (ty, sy), (tx, sx) = _overlap(h, dy), _overlap(w, dx)
        aligned = torch.full_like(offset_dist, float("inf"))
        aligned[:, ty, tx] = offset_dist[:, sy, sx]
        best = aligned if best is None else torch.minimum(best, aligned)
    return best


def _patch_features(x, images, positions, index):
    """The channels ``index`` (all when None) of the patches ``(images, positions)`` of ``x (b, C, h, w)``."""
    w = x.shape[3]
    features = x[images, :, positions // w, positions % w]  # (m, C)
    return features if index is None else features.index_select(1, index)


def neighbour_min_mahalanobis_top(x, mean, prec_chol, size, k, index=None, block_bytes=None,
                                  shift=None):
    """``D1`` (eq. 8-9) where it can be among each image's ``k`` largest, ``-inf`` elsewhere.

    What eq. (12)-(14) read of ``D1``: the same ``(b, h, w)`` values as
    :func:`neighbour_min_mahalanobis` (up to rounding) at every position
    that can hold one of the ``k`` largest of its image, at a fraction of
    the cost, by branch and bound. The distance ``d₀`` to the position's
    own Gaussian, in the window, bounds ``D1`` from above; it costs one
    product per position where ``D1`` costs one per offset. So ``d₀`` is
    computed everywhere (:func:`skpatch._gaussian.mahalanobis`), then
    ``D1`` exactly at the ``2k`` largest ``d₀`` of each image, then at every
    position whose ``d₀`` is not below the ``k``-th largest ``D1`` found,
    until none is left: a position skipped has ``D1 ≤ d₀`` below that. On
    ELPV (3,136 positions, ``k = 10``) 0.7 % of the positions are searched
    (the first round's 20, and few more), and ``D1`` is 1.2 % below ``d₀``
    on average: the own Gaussian is nearly always the nearest.

    ``x (b, C, h, w)``: the embeddings as the detector gets them (any
    strides), ``index`` the ``d`` channels the Gaussians are over (all when
    None): nothing is copied whole, ``d₀`` gathers the channels a block of
    positions at a time, the search the few patches it visits. ``mean``,
    ``prec_chol`` and ``shift`` as :func:`neighbour_min_mahalanobis`;
    ``block_bytes`` bounds the precision factors gathered at a time (2 MiB
    on a CPU, which stays in the cache; 64 MiB on a GPU).
    """
    b, _, h, w = x.shape
    n_positions = h * w
    d = prec_chol.shape[-1]
    k = min(k, n_positions)
    if shift is None:
        shift = _gaussian.whitened_centers(mean, prec_chol)
    positions = x.flatten(2).transpose(1, 2).transpose(0, 1)  # (P, b, C), a view
    own = _gaussian.mahalanobis(positions, mean, prec_chol, index, shift).T.contiguous()  # d₀
    others = [offset for offset in window_offsets(size) if offset != (0, 0)]
    if not others:  # a window of one: D1 is d₀
        return own.view(b, h, w)
    offsets = torch.tensor(others, device=x.device)
    if block_bytes is None:
        block_bytes = 2**21 if x.device.type == "cpu" else 2**26
    step = max(1, block_bytes // (d * d * prec_chol.element_size()))
    buffer = prec_chol.new_empty((step, d, d))
    d1 = torch.full_like(own, float("-inf"))
    searched = torch.zeros_like(own, dtype=torch.bool)
    first = own.topk(min(2 * k, n_positions), dim=1).indices
    pick = searched.scatter(1, first, True)
    while bool(pick.any()):
        image, position = pick.nonzero(as_tuple=True)
        features = _patch_features(x, image, position, index)  # (m, d)
        # every (picked patch, Gaussian of its window inside the grid) pair
        row = (position // w).unsqueeze(1) + offsets[:, 0]
        col = (position % w).unsqueeze(1) + offsets[:, 1]
        inside = ((row >= 0) & (row < h) & (col >= 0) & (col < w)).nonzero(as_tuple=True)
        pair, gaussian = inside[0], row[inside] * w + col[inside]
        distance = own.new_empty(len(gaussian))
        for start in range(0, len(gaussian), step):
            stop = min(len(gaussian), start + step)
            g = gaussian[start:stop]
            # gathered into a buffer that stays in the cache (one fresh
            # 40 kB matrix per pair cost 4x the products)
            factors = torch.index_select(prec_chol, 0, g, out=buffer[: stop - start])
            z = torch.baddbmm(shift[g], features[pair[start:stop]].unsqueeze(1), factors)
            torch.linalg.vector_norm(z.squeeze(1), dim=1, out=distance[start:stop])
        found = own[image, position].scatter_reduce_(0, pair, distance, reduce="amin")
        d1[image, position] = found
        searched |= pick
        # d₀ >= the k-th largest D1 found (or NaN): D1 may be larger there
        kth = d1.topk(k, dim=1).values[:, -1:]
        pick = ~searched & ~(own < kth)
    return d1.view(b, h, w)


def aggregate_at(x, size, positions, images, index=None):
    """:func:`aggregate` at the flat ``positions`` of the ``images`` only: ``(m, d)``.

    ``x (b, C, h, w)`` and ``index`` as in :func:`neighbour_min_mahalanobis_top`.
    The same sums in the same order (along the columns of the window, then
    its rows), so the values are bit for bit those of :func:`aggregate` on
    the channels ``index``, at the cost of ``p²`` patches per position
    instead of the whole grid.
    """
    _, _, h, w = x.shape
    radius = size // 2
    rows, cols = positions // w, positions % w
    total = None
    for dy in range(-radius, radius + 1):
        column = None
        for dx in range(-radius, radius + 1):
            row, col = rows + dy, cols + dx
            inside = (row >= 0) & (row < h) & (col >= 0) & (col < w)
            neighbour = row.clamp(0, h - 1) * w + col.clamp(0, w - 1)
            value = _patch_features(x, images, neighbour, index)
            value = torch.where(inside.unsqueeze(1), value, 0.0)  # the zero padding
            column = value if column is None else column + value
        total = column if total is None else total + column

    def in_grid(where, n):
        return (where + radius).clamp(max=n - 1) - (where - radius).clamp(min=0) + 1

    counts = in_grid(rows, h) * in_grid(cols, w)
    return total / counts.unsqueeze(1).to(x.dtype)


def topk_image_score(d1, x, centroids, k, size, index=None):
    """Image scores of N-pad eq. (12)-(14): ``(b,)``.

    ``Q_k``: the ``k`` largest entries of ``d1 (b, h, w)`` (eq. 12); ``E_k``:
    the Euclidean distance of the ``size x size`` aggregated feature (eq. 7)
    of each of those positions to its nearest centroid (eq. 13), averaged
    from the embeddings ``x (b, C, h, w)`` (channels ``index``) at those
    positions only; the score is ``Σ_i sort(E_k)[i] · sort(Q_k)[i]``, both
    sorted ascending (eq. 14).
    """
    b, _, h, w = x.shape
    k = min(k, h * w)
    top, where = d1.flatten(1).topk(k, dim=1)
    images = torch.arange(b, device=d1.device).repeat_interleave(k)
    picked = aggregate_at(x, size, where.reshape(-1), images, index)  # (b k, d)
    euclid = torch.cdist(picked, centroids.to(picked.dtype)).amin(dim=1)
    euclid = euclid.view(b, k).sort(dim=1).values
    return (euclid * top.sort(dim=1).values).sum(dim=1)


def _cluster_sums(points, labels, n_clusters):
    """Sum and count of the ``points`` of each cluster, in a fixed order on every device.

    ``index_add_`` sums in any order on CUDA (atomic adds): one ulp of
    difference can move a point to another cluster at the next iteration,
    and two fits with one seed would differ. Sorting by label and differencing
    a float64 running sum is deterministic everywhere.
    """
    counts = torch.bincount(labels, minlength=n_clusters)
    running = torch.cumsum(points[torch.argsort(labels, stable=True)].double(), dim=0)
    running = torch.cat([running.new_zeros(1, points.shape[1]), running])
    ends = counts.cumsum(0)
    sums = (running[ends] - running[ends - counts]).to(points.dtype)
    return sums, counts.to(points.dtype)


def kmeans(points, n_clusters, generator, max_iter=30, tol=1e-4, chunk_size=4096):
    """Lloyd's k-means of ``points (n, d)``: centroids ``(n_clusters, d)`` and iterations run.

    Initialized with ``n_clusters`` distinct points drawn with ``generator``
    (a :class:`torch.Generator`; k-means++ seeding costs ``n_clusters``
    sequential passes over the data, too many for thousands of centroids).
    Assignments are chunked matrix products ``|c|² - 2 x·c``; a cluster that
    empties keeps its centroid. Stops when no centroid moves by more than
    ``tol`` times the mean squared norm of the centred data, or after
    ``max_iter`` iterations.
    """
    n = points.shape[0]
    n_clusters = min(n_clusters, n)
    pick = torch.randperm(n, generator=generator)[:n_clusters].to(points.device)
    centroids = points[pick].clone()
    scale = (points - points.mean(0)).square().sum(1).mean().clamp_min(1e-30)
    n_iter = 0
    for n_iter in range(1, max_iter + 1):
        sq_norms = centroids.square().sum(1)
        labels = torch.cat([
            torch.addmm(sq_norms, points[start:start + chunk_size], centroids.T, alpha=-2)
            .argmin(1)
            for start in range(0, n, chunk_size)
        ])
        sums, counts = _cluster_sums(points, labels, n_clusters)
        filled = counts > 0
        updated = torch.where(filled[:, None], sums / counts.clamp_min(1)[:, None], centroids)
        shift = (updated - centroids).square().sum(1).max()
        centroids = updated
        if shift <= tol * scale:
            break
    return centroids, n_iter
