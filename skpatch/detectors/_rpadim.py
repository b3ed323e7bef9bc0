"""RPaDiM: PaDiM made robust to contaminated training sets (Kare & Swynghedauw, 2023)."""

import math
import warnings
from numbers import Integral, Real

import torch
from sklearn.base import _fit_context
from sklearn.pipeline import make_pipeline
from sklearn.utils import gen_batches
from sklearn.utils._chunking import get_chunk_n_rows
from sklearn.utils._param_validation import Interval

from .. import _gaussian, _robust
from .._torch_utils import (
    as_tensor,
    empty,
    gather_last,
    map_on_cores,
    resolve_device,
    to_numpy,
)
from ._base import BaseGaussianDetector, locally_aware_embedder

# Working memory of a chunk of positions in fit on a CPU, about the size of a
# last-level cache. With sklearn's working_memory alone (1 GB), the chunks
# spill it on every iteration of the geometric median: the detector's fit on
# 411 ELPV cells (3136 positions, Rd 100), 4 runs in alternating order, took
# 2.2-3.0 s (median 2.6), against 1.3-1.8 s (1.6) with this budget.
_CPU_CHUNK_BYTES = 32 * 2**20


class RobustPaDiMDetector(BaseGaussianDetector):
    """Robust PaDiM: LOF-denoised patches, a geometric median and a Gaussian per position.

    Implements RPaDiM (Kare & Swynghedauw, 2023), PaDiM for training sets that
    may hold defective images. At every patch position:

    1. **Denoising** (§4.1, LOF of §3.4): the local outlier factor of every
       training patch among the ``N`` training patches at the same position,
       with ``K = n_neighbors`` neighbours; the patches whose LOF is above
       the ``tau`` quantile of all LOF scores (one global quantile, as in
       SoftPatch) are dropped.
    2. **Robust Gaussian** (§3.2-3.3, §4.1): the geometric median of the
       kept patches (Weiszfeld iterations) as center, and their covariance
       about the median plus ``ξI`` (``ξ = epsilon``).
    3. **Scoring** (§3.3 eq. 2, §4.2): the Mahalanobis distance of a test
       patch to the median of its position; the anomaly map is upsampled
       and blurred as in PaDiM, and the image score is its maximum.

    The locally aware patch features of §3.5 (the last two of PaDiM's three
    stages, each ``3 x 3`` average-pooled) are the embedder's job:
    :func:`make_rpadim_pipeline` builds the recommended pipeline.

    Parameters
    ----------
    n_features : int, default=None
        Size of the random channel subset (PaDiM's "Rd"); None keeps every
        channel (the paper does not reduce RPaDiM's embeddings).
    n_neighbors : int, default=1
        ``K``, the number of neighbours of the LOF (§5.4.2 uses 1; its
        Table 3 shows 3 and 6 work as well). Clipped to ``N - 1``.
    tau : float in (0, 1], default=0.85
        Fraction of the training patches kept (§5.4.2): the patches whose LOF
        is above the ``tau`` quantile of the LOF of all training patches
        (all positions together) are dropped; 1 keeps them all. Every
        position keeps at least half of its patches, whatever ``tau``.
    max_iter : int, default=100
        Maximum number of Weiszfeld iterations of the geometric median.
    tol : float, default=1e-5
        The iterations stop when every position's step is at most ``tol``
        times the mean distance of its kept patches to the median.
    epsilon : float, default=0.01
        Ridge ``ξ`` added to every covariance (§4.1; PaDiM's ``ε``).
    sigma : float, default=4
        Standard deviation, in map pixels, of the Gaussian blur of the
        anomaly maps (PaDiM §IV-B); 0 disables it.
    map_size : int, pair of int or None, default=224
        Size ``(H, W)`` of the anomaly maps; None keeps the patch grid.
    contamination : float in (0, 0.5], default=0.1
        Expected fraction of anomalies: ``offset_`` is this quantile of the
        training images' ``score_samples``, computed as ``calibration`` says.
    calibration : {"leave-one-out", "in-sample"}, default="leave-one-out"
        Which training scores set ``offset_``, as in
        :class:`PaDiMDetector`. ``"leave-one-out"`` scores every kept
        training patch with its position's covariance re-estimated without
        it, in closed form (Sherman-Morrison, see Notes), at the cost of
        in-sample scoring; the LOF selection and the medians stay those of
        the full fit. ``"in-sample"`` (scikit-learn's rule) scores with the
        final model, which sets a threshold that flags far more than
        ``contamination`` of new normal images.
    random_state : int, RandomState instance or None, default=None
        Seeds the channel subset.
    device : str, default="auto"
        Torch device for the statistics and scoring; "auto" uses CUDA when
        available. The fitted state is NumPy whatever the device.

    Attributes
    ----------
    feature_indices_ : ndarray of shape (n_selected,)
        Channels kept (sorted).
    patch_lof_ : ndarray of shape (n_samples, h * w)
        LOF of every training patch among the patches at its position.
    lof_threshold_ : float
        The ``tau`` quantile of ``patch_lof_``: patches above it are dropped
        (unless needed to keep half of a position's patches).
    support_ : ndarray of shape (n_samples, h * w), dtype bool
        True for the training patches kept by the denoising.
    median_ : ndarray of shape (h * w, n_selected)
        Geometric median of the kept patches per position (row-major grid).
    precision_cholesky_ : ndarray of shape (h * w, n_selected, n_selected)
        Upper-triangular ``U`` with ``Σ⁻¹ = U Uᵀ`` per position, ``Σ`` the
        covariance of the kept patches about the median plus ``ξI``.
    n_iter_ : int
        Weiszfeld iterations run (the most over the chunks of positions).
    offset_ : float
        Threshold on ``score_samples``; ``decision_function = score_samples - offset_``.
    grid_shape_ : tuple of int
        Patch grid ``(h, w)`` seen in fit (``(1, 1)`` for 2-D input).
    n_features_in_ : int
        Number of embedding channels ``C`` seen in fit.

    See Also
    --------
    make_rpadim_pipeline : The recommended embedder and this detector in a pipeline.
    PaDiMDetector : The non-robust model (mean and sample covariance).
    sklearn.neighbors.LocalOutlierFactor : The LOF, one data set at a time.

    Notes
    -----
    **Global quantile.** ``tau`` is one quantile over the LOF of all
    ``N x h x w`` training patches, as SoftPatch (which RPaDiM follows) does,
    not one per position. The LOF is a ratio of densities (about 1 for an
    inlier whatever the position's scale), so scores are comparable across
    positions, and a global threshold drops many patches where the defects
    of contaminating images are and few elsewhere; a per-position quantile
    would drop the same ``1 - tau`` everywhere, trimming the tails of clean
    positions and too little at defective ones. The floor of half the
    patches per position (the breakdown point of the geometric median: a
    position with more than half defective patches cannot be recovered) keeps
    every covariance well estimated.

    **Duplicates.** Patches at distance 0 (exact duplicates) are handled as
    in scikit-learn: ``1e-10`` is added to the mean reachability distance.
    Distances are computed in the Gram-matrix form on data centred per
    position; squared distances within rounding error of 0 count as 0.

    **Geometric median.** Weiszfeld's iteration divides by the distance of
    every patch to the iterate; when the iterate lands on a patch, the
    modification of Vardi & Zhang (2000) is used, which converges to the
    median also when it is a patch.

    **Small clusters of defects.** The LOF compares a patch with its ``K``
    nearest neighbours only: more than ``K`` near-identical defective patches
    at one position (the same defect repeated on several training images)
    are each other's neighbours and look like inliers. With the default
    ``K = 1``, two patches that are each other's nearest neighbour both get a
    LOF of exactly 1. Raise ``n_neighbors`` when defects repeat.

    **Leave-one-out calibration.** A kept patch ``x`` at a position with
    ``n`` kept patches and in-sample squared distance ``D²`` to the median
    has the squared distance ``(n-2)/(n-1) · D² / (1 - D²/(n-1))`` to the
    Gaussian fitted without it (a rank-one downdate of the scatter about the
    fixed median; exact for a ridge ``ξ (n-1)/(n-2)``). The median moves
    little when one patch leaves (its influence is bounded), so it is kept
    fixed, as is the LOF selection; it is the covariance that makes in-sample
    scores optimistic.

    **Cost.** For ``N`` training images, ``P = h x w`` positions and ``d``
    channels: the LOF costs ``O(P N² d)`` time and ``N²`` floats of memory
    per position, the median ``O(T P N d)`` for ``T`` iterations, the covariances
    ``O(P N d²)`` and ``O(P d³)``, as PaDiM. Both are computed in chunks of
    positions sized by scikit-learn's ``working_memory`` (and on a CPU by a
    cache-sized 32 MB). Unlike PaDiM the
    fit needs all training embeddings at once (LOF and median are not
    running sums), so there is no ``partial_fit``. Scoring is PaDiM's.

    References
    ----------
    .. [1] K. Kare, M. Swynghedauw, "Robust Patch Distribution Modeling for
       Sensory Anomaly Detection", preprint hal-04370178, 2023.
    .. [2] T. Defard, A. Setkov, A. Loesch, R. Audigier, "PaDiM: a Patch
       Distribution Modeling Framework for Anomaly Detection and
       Localization", ICPR Workshops, 2021.
    .. [3] M. M. Breunig, H.-P. Kriegel, R. T. Ng, J. Sander, "LOF:
       Identifying Density-Based Local Outliers", SIGMOD, 2000.
    .. [4] X. Jiang, J. Liu, J. Wang, Q. Nie, K. Wu, Y. Liu, C. Wang, F. Zheng,
       "SoftPatch: Unsupervised Anomaly Detection with Noisy Data", NeurIPS, 2022.
    .. [5] Y. Vardi, C.-H. Zhang, "The multivariate L1-median and associated
       data depth", PNAS 97(4), 2000.

    Examples
    --------
    >>> import numpy as np
    >>> from skpatch import RobustPaDiMDetector
    >>> rng = np.random.RandomState(0)
    >>> X = rng.normal(size=(60, 4, 3, 3)).astype(np.float32)
    >>> # six training images with a defect (each a different one) in the middle
    >>> X[:6, :, 1, 1] += 10 * np.vstack([np.eye(4), -np.eye(4)[:2]])
    >>> detector = RobustPaDiMDetector(map_size=None, random_state=0).fit(X)
    >>> bool(detector.support_[:6, 4].any())  # their defective patches are dropped
    False
    >>> detector.anomaly_map(X[:2]).shape
    (2, 3, 3)
    >>> detector.predict(X[6:9] + 10)
    array([-1, -1, -1])
    """

    _parameter_constraints = {
        **BaseGaussianDetector._parameter_constraints,
        "n_neighbors": [Interval(Integral, 1, None, closed="left")],
        "tau": [Interval(Real, 0, 1, closed="right")],
        "max_iter": [Interval(Integral, 1, None, closed="left")],
        "tol": [Interval(Real, 0, None, closed="left")],
    }

    def __init__(
        self,
        n_features=None,
        *,
        n_neighbors=1,
        tau=0.85,
        max_iter=100,
        tol=1e-5,
        epsilon=0.01,
        sigma=4.0,
        map_size=224,
        contamination=0.1,
        calibration="leave-one-out",
        random_state=None,
        device="auto",
    ):
        self.n_features = n_features
        self.n_neighbors = n_neighbors
        self.tau = tau
        self.max_iter = max_iter
        self.tol = tol
        self.epsilon = epsilon
        self.sigma = sigma
        self.map_size = map_size
        self.contamination = contamination
        self.calibration = calibration
        self.random_state = random_state
        self.device = device

    # ------------------------------------------------------------------ fitting
    def _position_chunks(self, x, bytes_per_position):
        """List of slices of positions whose working memory fits ``working_memory``.

        On a CPU, also the cache (``_CPU_CHUNK_BYTES``): the median's
        iterations and the LOF pass over their chunk many times.
        """
        n_positions = x.shape[0]
        chunk = get_chunk_n_rows(row_bytes=bytes_per_position, max_n_rows=n_positions)
        if resolve_device(self.device).type == "cpu":
            chunk = min(chunk, max(1, _CPU_CHUNK_BYTES // bytes_per_position))
        return list(gen_batches(n_positions, chunk))

    def _block(self, x, positions, device):
        """Selected channels of all images at a slice of positions: ``(p, N, d)``.

        ``x`` is the position-major ``(P, N, C)`` view of the embeddings;
        the block is a contiguous copy.
        """
        return gather_last(x[positions], self._channel_index(x.device)).to(device)

    def _denoise(self, x, device):
        """LOF per position and the ``tau`` trimming: ``(lof (P, N), threshold, keep (P, N))``."""
        n_images = x.shape[1]
        d = len(self.feature_indices_)
        itemsize = x.element_size()
        # the n x n matrix of a position and the top-k buffers, plus the patches
        row_bytes = itemsize * (2 * n_images * n_images + 2 * n_images * d)

        def chunk_lof(positions):
            return _robust.local_outlier_factor(self._block(x, positions, device),
                                                self.n_neighbors)

        lof = torch.cat(map_on_cores(chunk_lof, self._position_chunks(x, row_bytes), device))
        threshold = _robust.quantile_threshold(lof, self.tau)
        # At least half of each position's patches (and 2, for a covariance).
        min_keep = min(n_images, max(2, math.ceil(n_images / 2)))
        return lof, threshold, _robust.trim_mask(lof, threshold, min_keep)

    def _robust_moments(self, x, keep, device):
        """Per-position ``(count, median, scatter about the median)`` of the kept patches."""
        n_images = x.shape[1]
        d = len(self.feature_indices_)
        row_bytes = x.element_size() * (4 * n_images * d + d * d)

        def chunk_moments(positions):
            block = self._block(x, positions, device)
            weights = keep[positions]
            median, n_iter = _robust.geometric_median(
                block, weights, max_iter=self.max_iter, tol=self.tol
            )
            return (*_robust.scatter_about(block, median, weights), median, n_iter)

        chunks = self._position_chunks(x, row_bytes)
        counts, scatters, medians, n_iters = zip(*map_on_cores(chunk_moments, chunks, device))
        self.n_iter_ = max(n_iters)
        # the (P, d, d) scatter in NumPy's memory: see skpatch._torch_utils.empty
        scatter = empty((x.shape[0], d, d), scatters[0].dtype, scatters[0].device)
        return torch.cat(counts), torch.cat(medians), torch.cat(scatters, out=scatter)

    def _training_scores(self, X, keep, count, device):
        """Image scores of the training images, as ``calibration`` says.

        ``"leave-one-out"``: every kept patch is scored by its position's
        Gaussian without it, in closed form (the LOF selection and the median
        stay fixed); a dropped patch is not in the model, so its in-sample
        distance already is a left-out one.
        """
        if self.calibration == "in-sample":
            return self._anomaly_scores(X)
        median = self._fitted_tensor("median_", device)
        prec_chol = self._fitted_tensor("precision_cholesky_", device)
        shift = self._fitted_shift(*self._scoring_state, device)  # kept for scoring too
        count = count.unsqueeze(1)
        scores = self._empty_scores(X)
        for batch, x in self._iter_chunks(X, device):
            kept = keep[:, batch]

            def patch_scores(x, kept=kept):
                sq = _gaussian.mahalanobis(
                    self._positions(x.to(median.dtype)), median, prec_chol,
                    self._channel_index(x.device), shift,
                )
                sq = sq.square()
                # A covariance left without one of 2 patches is undefined: in-sample there.
                loo = kept & (count >= 3)
                sq = torch.where(loo, _robust.leave_one_out_sq_about_center(sq, count), sq)
                return sq.sqrt().T.reshape(len(x), *self.grid_shape_)

            scores[batch] = to_numpy(self._image_scores(x, patch_scores))
        return scores

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y=None):
        """Denoise the training patches and fit a robust Gaussian per position.

        Parameters
        ----------
        X : ndarray of shape (n, C, h, w) or (n, d)
            Patch embeddings of the training images, which may include some
            anomalous ones.
        y : None
            Ignored.

        Returns
        -------
        self : RobustPaDiMDetector
            The fitted detector.
        """
        X = self._validate_embeddings(X, reset=True)
        n_images = len(X)
        self._check_n_samples(n_images, 2, type(self).__name__)
        if self.n_neighbors >= n_images:
            warnings.warn(
                f"n_neighbors ({self.n_neighbors}) is not less than the number of training "
                f"images ({n_images}); the LOF uses n_neighbors={n_images - 1}.",
                UserWarning,
            )
        self.feature_indices_ = self._select_features(X.shape[1])
        device = resolve_device(self.device)
        # (P, N, C) on the CPU, a view: position blocks are gathered from it.
        x = self._positions(as_tensor(X, "cpu"))
        with torch.inference_mode():
            lof, threshold, keep = self._denoise(x, device)
            moments = self._robust_moments(x, keep, device)
            count, median, scatter = moments
            # PaDiM eq. (1) with each position's number of kept patches.
            self.median_ = to_numpy(median)
            whitening = self._whitening((count.view(-1, 1, 1), median, scatter))
            self.precision_cholesky_ = to_numpy(whitening[1])
            train_scores = self._training_scores(X, keep, count, device)
        self.patch_lof_ = to_numpy(lof.T)
        self.lof_threshold_ = float(threshold)
        self.support_ = to_numpy(keep.T)
        self._set_offset(train_scores)
        return self

    # ------------------------------------------------------------------ scoring
    _scoring_state = ("median_", "precision_cholesky_")


def make_rpadim_pipeline(
    backbone="efficientnet_lite0", *, embedder_params=None, memory=None, **detector_params
):
    """The RPaDiM pipeline: locally aware patch features and a robust detector.

    Builds ``make_pipeline(PatchEmbedder(...), RobustPaDiMDetector(...))`` with
    the embedding of RPaDiM §3.5 and §4.1: the *last two* of the backbone's
    default stages (PaDiM uses three), each ``3 x 3`` average-pooled
    (``pool_size=3``), upsampled to the larger map and concatenated. For a
    ResNet that is ``layer2`` + ``layer3`` (strides 8 and 16), as in the
    paper; for EfficientNet-Lite, ``stage2`` + ``stage4`` (the same strides).

    Parameters
    ----------
    backbone : str, default="efficientnet_lite0"
        Registered backbone name (see :func:`skpatch.backbones.available_backbones`).
    embedder_params : dict or None, default=None
        Other :class:`~skpatch.PatchEmbedder` parameters (``weights``,
        ``image_size``, ``crop_size``, ``device``, ...); they may also
        override ``layers`` and ``pool_size``.
    memory : str, joblib.Memory or None, default=None
        Passed to :func:`~sklearn.pipeline.make_pipeline`: caches the
        embeddings of the training images between fits (e.g. in a grid
        search over ``tau`` or ``n_neighbors``).
    **detector_params : dict
        Parameters of :class:`RobustPaDiMDetector` (``tau``, ``n_neighbors``,
        ``n_features``, ``random_state``, ...).

    Returns
    -------
    pipeline : sklearn.pipeline.Pipeline
        Steps ``"patchembedder"`` and ``"robustpadimdetector"``.

    See Also
    --------
    RobustPaDiMDetector : The detector.
    PatchEmbedder : The embedder.

    Examples
    --------
    >>> import numpy as np
    >>> from skpatch import make_rpadim_pipeline
    >>> pipe = make_rpadim_pipeline(
    ...     embedder_params={"weights": None, "image_size": 64, "crop_size": None},
    ...     map_size=64, random_state=0,
    ... )
    >>> pipe[0].layers, pipe[0].pool_size
    (('stage2', 'stage4'), 3)
    >>> images = np.random.RandomState(0).randint(0, 256, (8, 64, 64), dtype=np.uint8)
    >>> pipe.fit(images).score_samples(images).shape
    (8,)
    """
    return make_pipeline(
        locally_aware_embedder(backbone, embedder_params), RobustPaDiMDetector(**detector_params), memory=memory
    )
