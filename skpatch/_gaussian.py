"""Per-position Gaussian statistics, batched over positions (torch).

Every function takes position-major tensors: ``x`` of shape ``(P, n, d)`` holds
the ``d``-dimensional embeddings of ``n`` images at each of ``P`` patch
positions. Nothing here loops over positions in Python.

The streaming statistics are the running sums of PaDiM §III-B (count,
``Σx``, ``Σxxᵀ``) kept in their numerically stable form: the count, the mean
and the scatter about the mean, merged batch by batch with the pairwise update
of Chan, Golub & LeVeque (1979). Memory is ``O(P d²)`` whatever the number of
images, and the merge is exact, so a streamed fit equals a one-shot fit and
statistics fitted on separate shards combine into the same model.
"""

import torch


def batch_moments(x):
    """Count, mean ``(P, d)`` and scatter ``(P, d, d)`` of one batch ``x (P, n, d)``."""
    count = x.shape[1]
    mean = x.mean(dim=1)
    centered = x - mean.unsqueeze(1)
    scatter = centered.transpose(1, 2) @ centered
    return count, mean, scatter


def merge_moments(first, second):
    """Merge two ``(count, mean, scatter)`` triples (Chan et al.'s pairwise update).

    ``first`` may be ``None`` (nothing seen yet).
    """
    if first is None:
        return second
    n_a, mean_a, scatter_a = first
    n_b, mean_b, scatter_b = second
    count = n_a + n_b
    delta = mean_b - mean_a
    mean = mean_a + delta * (n_b / count)
    outer = delta.unsqueeze(2) * delta.unsqueeze(1)
    scatter = scatter_a + scatter_b + outer * (n_a * n_b / count)
    return count, mean, scatter


def remove_moments(whole, part):
    """Moments of ``whole`` without the samples of ``part`` (the inverse of the merge).

    Gives the statistics of a model fitted without one fold of the data,
    without a second pass over the other folds.
    """
    n, mean, scatter = whole
    n_b, mean_b, scatter_b = part
    n_a = n - n_b
    mean_a = (mean * n - mean_b * n_b) / n_a
    delta = mean_b - mean_a
    outer = delta.unsqueeze(2) * delta.unsqueeze(1)
    return n_a, mean_a, scatter - scatter_b - outer * (n_a * n_b / n)


def shift_scatter(scatter, count, mean, center):
    """Scatter about ``center`` from the scatter about ``mean``: ``S + n (μ-c)(μ-c)ᵀ``."""
    delta = mean - center
    return scatter + count * (delta.unsqueeze(2) * delta.unsqueeze(1))


def regularized_covariance(scatter, count, epsilon):
    """PaDiM eq. (1): ``scatter / (N - 1) + εI``."""
    d = scatter.shape[-1]
    eye = torch.eye(d, dtype=scatter.dtype, device=scatter.device)
    return scatter / (count - 1) + epsilon * eye


def precision_cholesky(covariance):
    """Upper-triangular ``U`` with ``Σ⁻¹ = U Uᵀ`` for every position (batched).

    With ``Σ = L Lᵀ`` (Cholesky), ``U = L⁻ᵀ``, so the Mahalanobis distance is
    ``‖(x - μ) U‖``: one batched matrix product at scoring time, and no matrix
    inverse is ever formed (a triangular solve is stable and half the work).
    """
    chol, info = torch.linalg.cholesky_ex(covariance)
    if bool((info > 0).any()):
        bad = int((info > 0).nonzero()[0, 0])
        raise ValueError(
            f"the covariance at patch position {bad} is not positive definite; "
            "increase epsilon (the ridge added to every covariance)."
        )
    eye = torch.eye(covariance.shape[-1], dtype=covariance.dtype, device=covariance.device)
    inv_chol = torch.linalg.solve_triangular(chol, eye.expand_as(chol), upper=False)
    return inv_chol.transpose(1, 2)


def mahalanobis(x, center, prec_chol):
    """PaDiM eq. (2): distances ``(P, n)`` of ``x (P, n, d)`` to per-position Gaussians.

    ``(x - c) U`` is computed as ``x U - c U`` inside one ``baddbmm``, which
    saves a pass over ``x`` (``c U`` is per position, not per image).
    """
    shift = (center.unsqueeze(1) @ prec_chol).neg_()
    z = torch.baddbmm(shift, x, prec_chol)
    return torch.linalg.vector_norm(z, dim=2)
