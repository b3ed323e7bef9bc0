"""Robust per-position statistics, batched over positions (torch).

The kernels of RPaDiM (Kare & Swynghedauw, 2023): the nearest neighbours
and the local outlier factor of every training patch among the patches at
the same position (§3.4), the trimming of the patches with the largest
factors (§4.1), the geometric median by Weiszfeld iterations (§3.2), the
scatter of the kept patches about it (§4.1) and the leave-one-out distances
of a Gaussian about a fixed center (for the calibration of ``offset_``).

Like :mod:`skpatch._gaussian`, every function takes position-major tensors:
``x`` of shape ``(P, n, d)`` holds the ``d``-dimensional embeddings of ``n``
images at each of ``P`` patch positions, and ``weights`` of shape ``(P, n)``
marks (0 / 1) or weighs the patches that count. Nothing loops over positions
or patches in Python; callers chunk over positions to bound memory (the LOF
needs ``P n²`` distances, the median ``P n d`` differences).
"""

import math

import torch

# Added to the mean reachability distance before inverting it, as
# scikit-learn's LocalOutlierFactor does, so that a patch with more exact
# duplicates than neighbours gets a finite (huge) density instead of 1/0.
_LRD_EPS = 1e-10


def _rounding_floor(sq_a, sq_b, dtype):
    """Bound on the rounding error of ``|a|² + |b|² - 2 a·b`` (squared norms given)."""
    return 8 * torch.finfo(dtype).eps * (sq_a + sq_b)


def pairwise_distances(x):
    """Euclidean distances ``(P, n, n)`` between the patches of each position.

    Gram-matrix form ``|a|² + |b|² - 2 a·b`` (one batched matrix product), on
    data centred per position, which keeps the cancellation error small.
    Squared distances within rounding error of zero are set to exactly zero,
    so that duplicated patches are at distance 0, as in scikit-learn.
    """
    x = x - x.mean(dim=1, keepdim=True)
    sq = (x * x).sum(dim=2)
    d2 = torch.baddbmm(sq.unsqueeze(2) + sq.unsqueeze(1), x, x.transpose(1, 2), alpha=-2)
    floor = _rounding_floor(sq.unsqueeze(2), sq.unsqueeze(1), x.dtype)
    d2 = torch.where(d2 <= floor, torch.zeros((), dtype=x.dtype, device=x.device), d2)
    return d2.sqrt_()


def nearest_neighbors(x, n_neighbors):
    """The ``k`` nearest other patches of every patch, at every position.

    Same distances as :func:`pairwise_distances` (a patch is never its own
    neighbour; duplicates are at distance 0), computed for the neighbours
    only: the ``n x n`` matrix holds ``|b|² - 2 a·b``, which ranks the
    candidates ``b`` of a row ``a`` as the distance does, so that the only
    full-size passes are one matrix product and one top-k.

    Parameters
    ----------
    x : torch.Tensor of shape (P, n, d)
        Patches.
    n_neighbors : int
        ``k``, at most ``n - 1``.

    Returns
    -------
    distances : torch.Tensor of shape (P, n, k)
        Distances to the neighbours, ascending.
    indices : torch.Tensor of shape (P, n, k)
        Their indices among the ``n`` patches of the position.
    """
    x = x - x.mean(dim=1, keepdim=True)
    sq = (x * x).sum(dim=2)
    partial = torch.baddbmm(sq.unsqueeze(1), x, x.transpose(1, 2), alpha=-2)
    partial.diagonal(dim1=1, dim2=2).fill_(float("inf"))  # a patch is not its own neighbour
    partial, indices = partial.topk(n_neighbors, dim=2, largest=False)  # ascending
    sq_neighbors = sq.gather(1, indices.flatten(1)).view_as(indices)
    d2 = partial + sq.unsqueeze(2)
    floor = _rounding_floor(sq.unsqueeze(2), sq_neighbors, x.dtype)
    d2 = torch.where(d2 <= floor, torch.zeros((), dtype=x.dtype, device=x.device), d2)
    # Zeroing near-duplicates can break the order among the k: sort again.
    d2, order = d2.sort(dim=2)
    return d2.sqrt_(), indices.gather(2, order)


def local_outlier_factor(x, n_neighbors):
    """LOF of every patch among the patches at its position (RPaDiM §3.4).

    For each position, with ``N_k(a)`` the ``k`` nearest neighbours of patch
    ``a`` (itself excluded) and ``k-distance(b)`` the distance of ``b`` to its
    ``k``-th neighbour:

    * ``reach-dist_k(a, b) = max(k-distance(b), d(a, b))``;
    * ``lrd(a) = 1 / (mean_{b in N_k(a)} reach-dist_k(a, b) + 1e-10)``;
    * ``LOF(a) = mean_{b in N_k(a)} lrd(b) / lrd(a)``.

    This is Breunig et al.'s definition and scikit-learn's implementation
    (``-LocalOutlierFactor(n_neighbors=k).fit(x[p]).negative_outlier_factor_``),
    including its ``1e-10`` guard against duplicates.

    Parameters
    ----------
    x : torch.Tensor of shape (P, n, d)
        Patches of ``n`` images at ``P`` positions.
    n_neighbors : int
        ``k``; clipped to ``n - 1`` as scikit-learn does.

    Returns
    -------
    lof : torch.Tensor of shape (P, n)
        Local outlier factors: about 1 for inliers, larger for outliers.
    """
    n_positions, n = x.shape[:2]
    if n < 2:
        raise ValueError(f"the local outlier factor needs at least 2 samples, got {n}.")
    k = min(int(n_neighbors), n - 1)
    knn_dist, knn = nearest_neighbors(x, k)
    flat = knn.reshape(n_positions, n * k)
    k_distance = knn_dist[:, :, -1]
    neighbour_k_distance = k_distance.gather(1, flat).view(n_positions, n, k)
    reach = torch.maximum(knn_dist, neighbour_k_distance)
    lrd = 1.0 / (reach.mean(dim=2) + _LRD_EPS)
    return lrd.gather(1, flat).view(n_positions, n, k).mean(dim=2) / lrd


def quantile_threshold(scores, q):
    """The ``q`` quantile of all ``scores`` (linear interpolation, as ``np.quantile``).

    ``torch.quantile`` refuses inputs of more than 2**24 elements; a sort
    does not.
    """
    values = scores.flatten().sort().values
    position = q * (values.numel() - 1)
    lo = math.floor(position)
    hi = min(lo + 1, values.numel() - 1)
    return values[lo] + (values[hi] - values[lo]) * (position - lo)


def trim_mask(scores, threshold, min_keep):
    """Keep the patches scoring at most ``threshold``, and at least ``min_keep`` per position.

    Parameters
    ----------
    scores : torch.Tensor of shape (P, n)
        Outlier scores (LOF) of the patches, higher = more isolated.
    threshold : float or torch.Tensor
        Patches scoring above it are dropped.
    min_keep : int
        Floor: at every position, the ``min_keep`` lowest-scoring patches are
        kept whatever the threshold.

    Returns
    -------
    keep : torch.Tensor of shape (P, n), dtype bool
        True for the patches kept.
    """
    keep = scores <= threshold
    min_keep = min(int(min_keep), scores.shape[1])
    if min_keep > 0:
        # Rank of each patch at its position (0 = lowest score); stable for ties.
        order = scores.argsort(dim=1, stable=True)
        positions = torch.arange(scores.shape[1], device=scores.device).expand_as(order)
        rank = torch.empty_like(order).scatter_(1, order, positions)
        keep |= rank < min_keep
    return keep


def geometric_median(x, weights=None, *, max_iter=100, tol=1e-5):
    """Weighted geometric median of the patches of every position (RPaDiM §3.2).

    ``argmin_z Σ_i w_i ‖z - x_i‖`` by Weiszfeld's iterations with the
    modification of Vardi & Zhang (2000): when the iterate lands on a data
    point (distance exactly 0, where Weiszfeld's step divides by zero), that
    point's weight ``η`` is taken out of the step and the iterate moves by
    ``(1 - η / r)₊`` of it (``r`` the norm of the pull of the other points);
    the iteration then converges to the median also when it is a data point
    (for example a point that holds half of the weight). Starts from the
    weighted mean; all positions iterate together.

    Parameters
    ----------
    x : torch.Tensor of shape (P, n, d)
        Patches.
    weights : torch.Tensor of shape (P, n) or None, default=None
        Non-negative weights (0 / 1 to select patches); None weighs all
        patches 1. Every position needs a positive total weight.
    max_iter : int, default=100
        Maximum number of iterations.
    tol : float, default=1e-5
        Stops when, at every position, the step is at most ``tol`` times the
        mean distance of the patches to the iterate (a scale-free criterion).

    Returns
    -------
    median : torch.Tensor of shape (P, d)
        Geometric median per position.
    n_iter : int
        Iterations run.
    """
    if weights is None:
        weights = torch.ones(x.shape[:2], dtype=x.dtype, device=x.device)
    weights = weights.to(x.dtype)
    total = weights.sum(dim=1, keepdim=True)
    median = (weights.unsqueeze(1) @ x).squeeze(1) / total
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    resolution, tiny = torch.finfo(x.dtype).eps, torch.finfo(x.dtype).tiny
    n_iter = 0
    for n_iter in range(1, max_iter + 1):
        diff = x - median.unsqueeze(1)
        dist = torch.linalg.vector_norm(diff, dim=2)
        # Points closer than the float resolution at the iterate coincide with it.
        at_median = dist <= resolution * median.abs().amax(dim=1, keepdim=True)
        inv = torch.where(at_median, zero, weights / dist.clamp_min(tiny))
        eta = torch.where(at_median, weights, zero).sum(dim=1)
        pull = (inv.unsqueeze(1) @ diff).squeeze(1)  # Σ w_i (x_i - z) / ‖x_i - z‖
        denom = inv.sum(dim=1, keepdim=True)
        r = torch.linalg.vector_norm(pull, dim=1, keepdim=True)
        # Weiszfeld's step is pull / denom; Vardi-Zhang shorten it by the
        # weight η at the iterate: (1 - min(1, η / r)) of it (no step if r = 0).
        stay = (eta.unsqueeze(1) / r.clamp_min(tiny)).clamp(max=1)
        step = pull / denom.clamp_min(tiny) * (1 - stay)
        median = median + step
        spread = (weights * dist).sum(dim=1) / total.squeeze(1)
        if bool((torch.linalg.vector_norm(step, dim=1) <= tol * spread).all()):
            break
    return median, n_iter


def scatter_about(x, center, weights):
    """Weighted count ``(P,)`` and scatter ``(P, d, d)`` of ``x`` about ``center``.

    ``Σ_i w_i (x_i - c)(x_i - c)ᵀ`` per position: the scatter of the kept
    patches about their geometric median (RPaDiM §4.1), when ``weights``
    marks them with 1 and the dropped patches with 0.
    """
    weights = weights.to(x.dtype)
    centered = x - center.unsqueeze(1)
    weighted = centered * weights.unsqueeze(2)
    return weights.sum(dim=1), weighted.transpose(1, 2) @ centered


def leave_one_out_sq_about_center(sq_distances, count):
    """Squared Mahalanobis distances of fitted patches to the model without them.

    For a covariance ``Σ = S / (n - 1) + εI`` built from the scatter ``S`` of
    ``n`` patches about a *fixed* center ``c`` (the geometric median; unlike
    :func:`skpatch._gaussian.leave_one_out_sq` the center does not move),
    removing patch ``v = x - c`` is the rank-one downdate ``S - v vᵀ``, and
    Sherman-Morrison gives its squared distance to the remaining ``n - 1``::

        D²₋ = (n - 2) / (n - 1) · D² / (1 - D² / (n - 1)),

    exact for the left-out model with ridge ``ε (n - 1) / (n - 2)``.

    Parameters
    ----------
    sq_distances : torch.Tensor of shape (P, b)
        In-sample squared distances ``D²`` of patches that are in the model.
    count : torch.Tensor of shape (P, 1) or (P, b)
        ``n``, the number of patches in each position's model; needs ``n >= 3``.

    Returns
    -------
    sq_distances : torch.Tensor of shape (P, b)
        Leave-one-out squared distances.
    """
    count = count.to(sq_distances.dtype)
    # D² <= n - 1 for a patch in the scatter; clamp against rounding.
    denominator = (1.0 - sq_distances / (count - 1)).clamp_min(1e-12)
    return (count - 2) / (count - 1) * sq_distances / denominator
