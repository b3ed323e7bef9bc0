"""Per-position Gaussian statistics, batched over positions (torch).

Every function takes position-major tensors: ``x`` of shape ``(P, n, d)`` holds
the ``d``-dimensional embeddings of ``n`` images at each of ``P`` patch
positions (usually a transposed view of ``(n, P, C)`` channels-last
embeddings, whose kept channels ``index`` are gathered on the way). On a CPU
the work is done in blocks of positions (:func:`position_blocks`); nothing
loops over single positions in Python.

The streaming statistics are the running sums of PaDiM §III-B (count,
``Σx``, ``Σxxᵀ``) kept in their numerically stable form: the count, the mean
and the scatter about the mean, merged batch by batch with the pairwise update
of Chan, Golub & LeVeque (1979). Memory is ``O(P d²)`` whatever the number of
images, and the merge is exact, so a streamed fit equals a one-shot fit and
statistics fitted on separate shards combine into the same model.
"""

import contextlib

import torch

from ._torch_utils import (
    all_finite,
    empty,
    gather_last,
    map_on_cores,
    overflow_advice,
    single_threaded,
)


# Positions per block on a CPU. A block of 32 images x 100 channels is 1.6 MB:
# the gather, centering, product and norm of a block stay in cache, and no
# (P, n, d) copy is allocated (first touches of that much fresh memory cost
# as much as the arithmetic). PaDiM's distances of 32-64 ELPV cells: 3.3 ->
# 1.7-1.9 ms per image on 2 cores against whole-grid tensors.
_POSITION_BLOCK = 128


def position_blocks(x, index=None):
    """Yield ``(positions, block)`` over blocks of positions of ``x (P, n, C)``.

    ``block`` of shape ``(m, n, d)`` holds the channels ``index`` (all when
    None) of the positions ``positions`` (a slice), copied into one buffer
    that every block reuses: use it before asking for the next. On a GPU
    one block holds every position.

    The copy is made image by image (``block`` is the transposed view of an
    ``(n, m, d)`` buffer): each image's positions are one contiguous run of
    the channels-last embeddings, where the same gather position by
    position jumps between images at every row (PaDiM's 64 x 3136 x 100 of
    176 channels on 2 cores: 17.1 -> 13.4 ms; the batched products read the
    transposed view as fast as a contiguous block).
    """
    n_positions, n_samples = x.shape[:2]
    step = _POSITION_BLOCK if x.device.type == "cpu" else n_positions
    d = x.shape[2] if index is None else len(index)
    by_image = x.transpose(0, 1)
    buffer = x.new_empty(min(step, n_positions) * n_samples * d)
    for start in range(0, n_positions, step):
        stop = min(n_positions, start + step)
        block = buffer[: (stop - start) * n_samples * d].view(n_samples, stop - start, d)
        if index is None:
            block.copy_(by_image[:, start:stop])
        else:
            gather_last(by_image[:, start:stop], index, out=block)
        yield slice(start, stop), block.transpose(0, 1)


def chunked_moments(chunks, start=None, index=None):
    """Count, mean and scatter of all the ``(P, b, C)`` chunks of an iterable.

    Sums are taken about a shift (the first chunk's mean, or ``start``'s
    mean), which keeps them as stable as centered sums, and the scatter
    accumulates in place with one batched ``baddbmm`` per block of
    positions: no per-chunk merge of ``(P, d, d)`` arrays. With ``m`` the
    shift, ``c = x - m`` and ``t = Σc`` over the ``n`` samples, the scatter
    about the mean is ``Σccᵀ - ttᵀ / n``. The chunks are not modified.

    Parameters
    ----------
    chunks : iterable of tensors of shape (P, b, C)
        The samples, position-major.
    start : tuple (count, mean, scatter), default=None
        Moments of earlier samples, which the chunks' are added to **in
        place** (``mean`` and ``scatter`` are updated and returned): a
        stream adds a batch to its running sums with no ``(P, d, d)``
        temporary. Their scatter is about their mean, so ``t`` starts at 0.
    index : tensor of int, default=None
        The channels to keep (``d`` of the ``C``); all when None.
    """
    count, shift, total, outer = 0, None, None, None
    if start is not None:
        count, shift, outer = start
        total = torch.zeros_like(shift)
    for x in chunks:
        first = shift is None
        if first:
            d = x.shape[2] if index is None else len(index)
            shift = x.new_empty((x.shape[0], d))
            total = torch.zeros_like(shift)
            outer = empty((x.shape[0], d, d), x.dtype, x.device).zero_()
        for positions, block in position_blocks(x, index):
            if first:
                torch.mean(block, dim=1, out=shift[positions])
            centered = block.sub_(shift[positions].unsqueeze(1))
            total[positions] += centered.sum(dim=1)
            outer[positions].baddbmm_(centered.transpose(1, 2), centered)
        count += x.shape[1]
    if shift is None:
        raise ValueError("no samples to compute moments of")
    mean_shift = total / count
    scatter = outer.baddbmm_(mean_shift.unsqueeze(2), total.unsqueeze(1), alpha=-1)
    return count, shift.add_(mean_shift), scatter


def merge_moments(first, second):
    """Merge two ``(count, mean, scatter)`` triples (Chan et al.'s pairwise update).

    ``first`` may be ``None`` (nothing seen yet). Neither triple is modified,
    and the result shares no memory with them.
    """
    if first is None:
        count, mean, scatter = second
        return count, mean.clone(), scatter.clone()
    count, mean, scatter = first
    return merge_moments_((count, mean.clone(), scatter.clone()), second)


def merge_moments_(first, second):
    """:func:`merge_moments` that updates ``first``'s mean and scatter in place.

    A streamed fit merges every batch into ``(P, d, d)`` scatters: in place,
    the merge allocates nothing of that size (the out-of-place formula makes
    three such temporaries per batch).
    """
    if first is None:
        return second
    n_a, mean_a, scatter_a = first
    n_b, mean_b, scatter_b = second
    count = n_a + n_b
    delta = mean_b - mean_a
    scatter_a.add_(scatter_b).baddbmm_(
        delta.unsqueeze(2), delta.unsqueeze(1), alpha=n_a * n_b / count
    )
    mean_a.add_(delta, alpha=n_b / count)
    return count, mean_a, scatter_a


def downdate_moments_(total, part, min_share=0.01):
    """The moments of the samples of ``total`` that are not in ``part``, or None.

    :func:`merge_moments` solved for its first triple: with ``n_a = n - n_b``,
    ``μ_a = μ + (μ - μ_b) n_b / n_a`` and ``S_a = S - S_b - (n_a n_b / n) δδᵀ``,
    ``δ = μ_b - μ_a``. ``S_a`` is written over ``part``'s scatter; ``total``
    is not modified. ``part`` must be a subset of ``total``'s samples (which
    this cannot check). None, with nothing written, where the subtraction
    would cancel: where ``S_a`` holds less than ``min_share`` of ``S``'s
    trace at some position, its rounding errors (those of ``S``) can exceed
    its small eigenvalues and the ridge; compute those moments directly.
    """
    count, mean, scatter = total
    n_b, mean_b, scatter_b = part
    n_a = count - n_b
    if n_a < 1:
        raise ValueError(f"cannot remove {n_b} samples from {count}")
    mean_a = torch.add(mean, mean - mean_b, alpha=n_b / n_a)
    delta = mean_b - mean_a
    alpha = n_a * n_b / count
    trace = scatter.diagonal(dim1=-2, dim2=-1).sum(-1)
    trace_a = trace - scatter_b.diagonal(dim1=-2, dim2=-1).sum(-1) - alpha * delta.square().sum(-1)
    if bool((trace_a < min_share * trace).any()):
        return None
    scatter_a = scatter_b.neg_().add_(scatter)
    scatter_a.baddbmm_(delta.unsqueeze(2), delta.unsqueeze(1), alpha=-alpha)
    return n_a, mean_a, scatter_a


def leave_one_out_sq(sq_distances, count):
    """Squared Mahalanobis distances of training samples to the model fitted without them.

    For a sample ``x_i`` of the ``N`` that fitted ``Σ = C / (N - 1) + εI``
    with in-sample squared distance ``D²``, removing it is a rank-one
    downdate of ``C`` and a shift of the mean, and Sherman-Morrison gives

        D²₋ᵢ = (N / (N-1))² (N-2) / (N-1) · D² / (1 - N D² / (N-1)²),

    exact for the leave-one-out model with ridge ``ε (N-1) / (N-2)``
    (``ε`` up to a factor ``1 + 1/(N-2)``). This makes leave-one-out
    calibration as cheap as in-sample scoring. Needs ``N >= 3``.
    """
    n = float(count)
    factor = (n / (n - 1)) ** 2 * (n - 2) / (n - 1)
    # D² <= (N-1)² / N for in-sample points; clamp against rounding.
    denominator = (1.0 - sq_distances * (n / (n - 1) ** 2)).clamp_min(1e-12)
    return factor * sq_distances / denominator


def regularized_covariance(scatter, count, epsilon):
    """PaDiM eq. (1): ``scatter / (N - 1) + εI``."""
    covariance = torch.div(
        scatter, count - 1, out=empty(scatter.shape, scatter.dtype, scatter.device)
    )
    covariance.diagonal(dim1=-2, dim2=-1).add_(epsilon)  # in place: no (P, d, d) εI
    return covariance


# Largest blocks factored by LAPACK in precision_cholesky on a CPU; larger
# ones are halved. On 3136 matrices of 100 x 100 (PaDiM's default), blocks of
# at most 25 took 0.31 s on 2 cores where LAPACK on the whole matrices took
# 0.95 s (batched Cholesky and triangular solves loop over the matrices,
# single-threaded; the products that join the blocks use every core), and
# 0.23-0.25 s against 0.33-0.37 once those products went to fresh tensors.
_LAPACK_BLOCK = 25

# Bytes of matrices factored at a time in precision_cholesky on a CPU. The
# whole batch at once spills the cache at every step of the recursion and
# faults in fresh temporaries of up to a quarter of it: 3136 matrices of
# 100 x 100, 0.25-0.31 -> 0.18-0.23 s; 1024 of 550 x 550, 5.5-6.6 -> 3.8-4.9 s
# (2 cores, alternating runs).
_FACTOR_CHUNK_BYTES = 8 * 2**20


def check_finite_covariance(covariance):
    """Raise if ``covariance`` has an infinite or NaN entry (the embeddings overflowed)."""
    if not all_finite(covariance):
        # Squares of embeddings beyond ~1e19 overflow float32 (1e154 for float64).
        raise ValueError(
            f"the covariances overflow {str(covariance.dtype).replace('torch.', '')} "
            "(infinite or NaN entries): the embeddings are too large; "
            f"{overflow_advice(covariance.dtype)}."
        )


def precision_cholesky(covariance, overwrite=False):
    """Upper-triangular ``U`` with ``Σ⁻¹ = U Uᵀ`` for every position (batched).

    With ``Σ = L Lᵀ`` (Cholesky), ``U = L⁻ᵀ``, so the Mahalanobis distance is
    ``‖(x - μ) U‖``: one batched matrix product at scoring time, and ``Σ⁻¹``
    itself is never formed. On a CPU, ``L⁻¹`` is computed by halving the
    matrices (the blocked Cholesky of LAPACK, with the inverse built
    alongside): with ``Σ = [[A, Bᵀ], [B, C]]``, ``L₁₁⁻¹`` from ``A``,
    ``L₂₁ = B L₁₁⁻ᵀ``, ``L₂₂⁻¹`` from the Schur complement ``C - L₂₁ L₂₁ᵀ``,
    and ``L⁻¹ = [[L₁₁⁻¹, 0], [-L₂₂⁻¹ L₂₁ L₁₁⁻¹, L₂₂⁻¹]]``. Each block of
    ``L⁻¹`` is written over the block of ``Σ`` it comes from; the
    temporaries are ``L₂₁`` and one product at a time (a quarter of ``Σ``
    each). On a CPU the matrices go 8 MB at a time (``_FACTOR_CHUNK_BYTES``),
    one such chunk per core.

    Parameters
    ----------
    covariance : tensor of shape (P, d, d)
        Symmetric positive-definite matrices (one triangle of each is
        read).
    overwrite : bool, default=False
        Compute ``U`` in the memory of ``covariance`` (which is destroyed)
        instead of a copy: saves a ``(P, d, d)`` array, whose first touch
        alone costs as much as the products on a CPU.
    """
    check_finite_covariance(covariance)
    largest = covariance.diagonal(dim1=-2, dim2=-1).amax(dim=-1)  # for the error below
    factor = covariance if overwrite else covariance.clone()
    block = _LAPACK_BLOCK if covariance.device.type == "cpu" else covariance.shape[-1]
    # L⁻¹ written through the transposed view leaves U = L⁻ᵀ in row-major
    # order (contiguous, as scoring reads it); Σ is symmetric, so the view
    # reads the same matrices, in the column-major order LAPACK works in.
    if covariance.device.type != "cpu":
        failed = _inverse_cholesky_(factor.mT, block)
    else:
        # A few matrices at a time: they stay in cache through the whole
        # recursion, and its products' temporaries stay small enough for
        # malloc to recycle them. One chunk per core, single-threaded: the
        # LAPACK leaves run on one core anyway (on 2 cores, 3136 matrices of
        # 100 x 100: medians 0.21 -> 0.16 s, 20 alternating runs; 1024 of
        # 550 x 550: 3.0 -> 2.5 s, 10 runs).
        step = max(1, _FACTOR_CHUNK_BYTES // (factor[0].numel() * factor.element_size()))
        chunks = [slice(start, start + step) for start in range(0, len(factor), step)]

        def factor_chunk(chunk):
            return _inverse_cholesky_(factor[chunk].mT, block)

        failed = torch.cat(map_on_cores(factor_chunk, chunks, factor.device))
    if bool(failed.any()):
        bad = int(failed.nonzero()[0, 0])
        raise ValueError(
            f"the covariance at patch position {bad} is not positive definite (its largest "
            f"variance is {float(largest[bad]):.3g}): increase epsilon, the ridge added to "
            "every covariance, or rescale the embeddings."
        )
    return factor


def _inverse_cholesky_(a, block):
    """Overwrite ``a`` with its inverse Cholesky factors ``L⁻¹``; return where one failed."""
    d = a.shape[-1]
    if d <= block:
        # LAPACK loops over small matrices and parallelizes inside each one,
        # which only adds synchronization (4-20x slowdowns as soon as another
        # process competes for the cores, measured here on 2 cores).
        with single_threaded() if a.device.type == "cpu" else contextlib.nullcontext():
            chol, info = torch.linalg.cholesky_ex(a)
            eye = torch.eye(d, dtype=a.dtype, device=a.device)
            torch.linalg.solve_triangular(chol, eye.expand_as(chol), upper=False, out=a)
        return info > 0
    h = d // 2
    inv_11, lower_left, inv_22 = a[:, :h, :h], a[:, h:, :h], a[:, h:, h:]
    failed = _inverse_cholesky_(inv_11, block)
    chol_21 = lower_left @ inv_11.mT
    # The products go to fresh (contiguous) tensors: into a block of the
    # transposed view, torch's CPU bmm loops over the matrices one by one
    # (a third of the time of the whole inversion).
    inv_22.sub_(chol_21 @ chol_21.mT)  # the Schur complement
    failed |= _inverse_cholesky_(inv_22, block)
    # -L₂₂⁻¹ L₂₁ L₁₁⁻¹ into B's block (no longer needed)
    torch.bmm(inv_22 @ chol_21, inv_11, out=chol_21)
    lower_left.copy_(chol_21).neg_()
    a[:, :h, h:].zero_()
    return failed


def whitened_centers(center, prec_chol):
    """``-c U`` per position, ``(P, 1, d)``: the centers' part of ``(x - c) U``.

    A pass over all the ``(P, d, d)`` factors (12 ms for PaDiM's 3,136
    positions of 100 channels on 2 CPU threads, memory-bound): scorers
    compute it once per model (:meth:`~skpatch.detectors._base.BasePatchDetector._fitted_shift`),
    not per call.
    """
    return (center.unsqueeze(1) @ prec_chol).neg_()


def mahalanobis(x, center, prec_chol, index=None, shift=None):
    """PaDiM eq. (2): distances ``(P, n)`` of ``x (P, n, C)`` to per-position Gaussians.

    ``index``: the channels of ``x`` the Gaussians are over (all when None).
    ``(x - c) U`` is computed as ``x U - c U`` inside one ``baddbmm`` per
    block of positions, which saves a pass over ``x``; ``shift`` is ``-c U``
    (:func:`whitened_centers`, computed when None).
    """
    if shift is None:
        shift = whitened_centers(center, prec_chol)
    distances = x.new_empty(x.shape[:2], dtype=prec_chol.dtype)
    product = None
    for positions, block in position_blocks(x, index):
        if product is None:  # contiguous, unlike the block
            product = block.new_empty(block.shape)
        z = torch.baddbmm(shift[positions], block, prec_chol[positions], out=product[: len(block)])
        torch.linalg.vector_norm(z, dim=2, out=distances[positions])
    return distances
