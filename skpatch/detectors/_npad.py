"""N-pad: neighbouring-pixel-based anomaly detection (Jang, Hwang & Park)."""

import math
import warnings
from numbers import Integral, Real

import numpy as np
import torch
from sklearn.base import _fit_context, clone
from sklearn.pipeline import make_pipeline
from sklearn.utils import check_random_state
from sklearn.utils._param_validation import Interval, StrOptions

from .. import _gaussian, _npad_kernels
from .._embedder import PatchEmbedder
from .._maps import map_size_tuple, postprocess
from .._shift import ImageShiftDetector
from .._torch_utils import empty, gather_last, resolve_device, to_numpy
from ..backbones import get_backbone
from ..exceptions import DegenerateTrainingSetWarning
from ._base import BaseGaussianDetector, BasePatchDetector

# Folds of the cross-fitted calibration (calibration="cross-fit").
_CALIBRATION_FOLDS = 5

# Patches per block when counting nonzero values on a CPU: the comparison's
# boolean temporary of a whole chunk leaves the cache (64 images of 3136
# patches x 176 channels: 146-155 ms against 21-30 in blocks of 4096 rows).
_COUNT_BLOCK_ROWS = 4096


def _count_nonzero_per_channel_(counts, x):
    """Add the nonzero values of each channel of ``x (b, C, h, w)`` to ``counts``."""
    rows = x.permute(0, 2, 3, 1)
    if x.device.type != "cpu" or not rows.is_contiguous():
        counts += (x != 0).sum(dim=(0, 2, 3))
        return
    rows = rows.reshape(-1, x.shape[1])  # channels-last: a view
    for start in range(0, len(rows), _COUNT_BLOCK_ROWS):
        counts += (rows[start : start + _COUNT_BLOCK_ROWS] != 0).sum(dim=0)


# Images whose aggregated features (eq. 7) are computed at a time in fit on a
# CPU (a whole chunk at a time on a GPU). Their grids and window sums (8 x
# 3136 x 100 floats, 10 MB each, for EfficientNet-Lite0) stay under glibc's
# 32 MB mmap threshold, so malloc recycles them instead of mapping (and
# page-faulting) fresh memory for every chunk of 32 images. Aggregating 411
# ELPV-sized grids on 2 cores took 0.56-0.63 s by chunks of 32, 0.13-0.19 s
# by 8 (the sums with a padded copy, by 32: 1.1-2.6 s).
_AGGREGATE_IMAGES = 8


class _Rows:
    """The rows ``index`` of an array, as the fit and the scoring read it: chunk by chunk.

    A fold of the cross-fitted calibration reads its images twice (its
    statistics, then its scores); this reads them a chunk at a time
    instead of copying a fifth of the embeddings.
    """

    def __init__(self, array, index):
        self.array, self.index = array, index
        self.shape = (len(index), *array.shape[1:])
        self.dtype, self.itemsize = array.dtype, array.itemsize

    def __len__(self):
        return len(self.index)

    def __getitem__(self, rows):
        return self.array[self.index[rows]]


class NPadDetector(BaseGaussianDetector):
    """N-pad: neighbour-weighted and aggregated Gaussians per position, and a centroid bank.

    Implements N-pad (Jang, Hwang & Park, KAIST), modules A to C of its
    Fig. 1; module D (image shifting) needs the CNN and is
    :class:`~skpatch.ImageShiftDetector` around a pipeline
    (:func:`make_npad_pipeline` builds both).

    1. **Channel selection** (§3.1): the ``n_features`` channels with the
       fewest nonzero values over the training embeddings (ties broken at
       random), or a random subset (the paper's ablation).
    2. **(A) Weighted-similarity distributions** (§3.2): a Gaussian per
       position (eq. 2-3); the similarity ``m_a = exp(-BC / γ)`` of each
       position to every position ``a`` of its ``p x p`` window, with the
       Bhattacharyya term ``BC`` simplified as in eq. (5); then the
       weighted mean and covariance of eq. (6) over the window, plus ``εI``.
    3. **(B) Aggregated-feature distributions** (§3.3): the embeddings
       averaged over ``p x p`` windows (eq. 7), a Gaussian per position of
       them, and the k-means centroids of the aggregated training features
       (``kmeans_ratio`` of them, Table 4) as memory bank.
    4. **(C) Inference** (§3.4): ``D1``, the smallest Mahalanobis distance of
       a patch to the weighted Gaussians of its ``q x q`` window (eq. 8-9);
       ``D2``, the Mahalanobis distance of its aggregated feature (eq. 10);
       the patch score ``sqrt(D1 · D2)`` (eq. 11), upsampled and blurred
       into the anomaly map; and the image score of eq. (12)-(14): the
       ``top_k`` largest ``D1`` and the distances of the same patches'
       aggregated features to their nearest centroid, each sorted, summed
       products.

    Everything is batched over positions: one batched operation per offset
    of a window, the weighted statistics from per-position sums.

    Parameters
    ----------
    n_features : int, default=100
        ``d``, the number of channels kept (the paper keeps 550 of the 1792
        of Wide-ResNet-50-2; 100 of the 176 of EfficientNet-Lite0, see the
        user guide). None keeps every channel.
    feature_selection : {"least-nonzero", "most-nonzero", "random"}, default="least-nonzero"
        ``"least-nonzero"`` keeps the channels with the fewest nonzero
        training values, as §3.1 words it, ties broken at random;
        ``"most-nonzero"`` those with the most, which its rationale (ReLU
        zeros distort the Gaussians) may have meant (see the user guide);
        ``"random"`` a random subset (PaDiM's rule, the paper's ablation of
        §4.3).
    p : int, default=3
        Neighbourhood of the weighted (A) and aggregated (B) distributions:
        the window of offsets up to ``p // 2`` (eq. 1). 1 disables both
        (A becomes PaDiM's Gaussian, B the embeddings themselves).
    q : int, default=2
        Neighbourhood of the Gaussians over which ``D1`` is minimized
        (eq. 8-9), a window of offsets up to ``q // 2`` (eq. 1: ``q=2``
        and ``q=3`` are both the 3 x 3 window). 1 scores each patch with its
        own position's Gaussian only (ablations A and A+B).
    gamma : float, default=0.25
        Balancing parameter ``γ`` of the similarities ``exp(-BC / γ)``
        (eq. 4); larger values weight neighbours more.
    distributions : {"both", "weighted", "aggregated"}, default="both"
        Which pixel maps make the patch score: ``sqrt(D1 · D2)`` (eq. 11),
        ``D1`` only (module A) or ``D2`` only (module B), for the ablations
        of Table 2.
    image_score : {"top-k", "max"}, default="top-k"
        ``"top-k"``: eq. (12)-(14) (with ``distributions="aggregated"``,
        ``D2`` takes the place of ``D1``); ``"max"``: the maximum of the
        anomaly map, as PaDiM (no k-means is fitted then).
    top_k : int, default=10
        ``k`` of eq. (12)-(14), clipped to the number of positions. The
        paper does not give it; see the user guide.
    kmeans_ratio : float in (0, 1], default=0.1
        Number of centroids as a fraction of the aggregated training
        features clustered (Table 4's best trade-off, 10 %).
    kmeans_max_samples : int, default=10000
        At most this many aggregated training features (drawn at random
        over images and positions) are clustered: the cost of k-means grows
        as the square of the number of features, ``N x h x w`` of them in
        the paper (see Notes). None clusters them all.
    epsilon : float, default=0.01
        Ridge ``ε`` added to every covariance (eq. 3, and to those of eq. 6
        and of the aggregated features).
    sigma : float, default=4
        Standard deviation, in map pixels, of the Gaussian blur of the
        anomaly maps; 0 disables it.
    map_size : int, pair of int or None, default=224
        Size ``(H, W)`` of the anomaly maps; None keeps the patch grid.
    contamination : float in (0, 0.5], default=0.1
        Expected fraction of anomalies: ``offset_`` is this quantile of the
        training images' ``score_samples`` (as ``calibration`` says).
    calibration : {"cross-fit", "in-sample"}, default="cross-fit"
        How the training images are scored for ``offset_``:
        ``"cross-fit"`` scores each of 5 folds of them with a detector
        fitted on the other 4 (see Notes), at the cost of 5 more fits
        (from the model's statistics less each fold's) and one more pass
        over the images (fewer folds with fewer than 5 images; with 2,
        in-sample, with a warning); ``"in-sample"`` with this detector, whose
        scores of its own training images are optimistic.
    random_state : int, RandomState instance or None, default=None
        Seeds the channel selection (ties or random subset), the features
        clustered and the k-means initialization.
    device : str, default="auto"
        Torch device for the statistics and scoring; "auto" uses CUDA when
        available. The fitted state is NumPy whatever the device.

    Attributes
    ----------
    feature_indices_ : ndarray of shape (n_selected,)
        Channels kept (sorted).
    nonzero_counts_ : ndarray of shape (n_channels,)
        Nonzero training values per channel (not with ``"random"``).
    neighbor_weights_ : ndarray of shape (h, w, K)
        Normalized similarities ``m'`` of every position to the ``K``
        positions of its ``p x p`` window (row-major offsets; 0 outside the
        grid). Absent when ``distributions="aggregated"``.
    weighted_mean_ : ndarray of shape (h * w, n_selected)
        Weighted means of eq. (6) (row-major grid order).
    weighted_precision_cholesky_ : ndarray of shape (h * w, n_selected, n_selected)
        Upper-triangular ``U`` with ``Σ⁻¹ = U Uᵀ`` of the weighted covariances.
    aggregated_mean_ : ndarray of shape (h * w, n_selected)
        Means of the aggregated features (absent when ``distributions="weighted"``).
    aggregated_precision_cholesky_ : ndarray of shape (h * w, n_selected, n_selected)
        ``U`` of the covariances of the aggregated features.
    centroids_ : ndarray of shape (n_clusters, n_selected)
        k-means centroids of the aggregated training features (the memory
        bank ``C``); absent when ``image_score="max"``.
    kmeans_n_iter_ : int
        Lloyd iterations run by the k-means.
    n_samples_seen_ : int
        Number of training images.
    offset_ : float
        Threshold on ``score_samples``; ``decision_function = score_samples - offset_``.
    grid_shape_ : tuple of int
        Patch grid ``(h, w)`` seen in fit (``(1, 1)`` for 2-D input).
    n_features_in_ : int
        Number of embedding channels ``C`` seen in fit.

    See Also
    --------
    make_npad_pipeline : Embedder, this detector and image shifting.
    ImageShiftDetector : Module D, image shifting, around a pipeline.
    PaDiMDetector : One Gaussian per position.

    Notes
    -----
    **Weighted statistics from sums.** With per-position means ``μ_a`` and
    scatters ``S_a`` of the ``N`` training images, eq. (6) is
    ``μ = Σ_a m'_a μ_a`` and ``Σ = Σ_a m'_a (S_a + N (μ_a - μ)(μ_a -
    μ)ᵀ) / (N - Σ_a m'_a²)``: the training embeddings are read once, for the
    sums, as in PaDiM.

    **Borders.** Neighbours outside the grid do not exist: they get no
    weight in eq. (6), no place in the minimum of eq. (9), and the averages
    of eq. (7) are over the in-grid neighbours. So a window wider than the
    grid (``p`` or ``q`` above ``2 max(h, w) - 1``) acts as the widest one
    that fits.

    **2-D input** ``(n, d)`` is a grid of one patch: A is PaDiM's Gaussian
    (``m' = 1``), B the same Gaussian, the patch score their Mahalanobis
    distance, and the top-k image score that distance times the distance to
    the nearest of the k-means centroids.

    **Calibration.** ``offset_`` is the ``contamination`` quantile of the
    training images' scores. Scored by the detector itself they are far too
    low: N-pad's minimum over neighbouring Gaussians, its similarity
    weights and its centroid bank all learn each training image, and no
    closed-form leave-one-out score exists as for PaDiM. So by default
    (``calibration="cross-fit"``) the images are split into 5 folds at
    random (``random_state``), and each fold is scored by a detector fitted
    on the other 4 with the same parameters and channels; the fitted model
    itself uses every image. On ELPV mono (411 training images) the
    in-sample threshold flagged 45 % of the normal test images for
    ``contamination=0.1``, the cross-fitted one 8.5 %; the fit on
    embeddings took 4.4-4.9 s in-sample and 12.9-15.9 s cross-fitted (2 CPU
    threads). A fold's moments are the model's less the fold's own (one
    more pass over the images in all, read a chunk at a time), and its
    centroid bank clusters the model's k-means sample of its images into
    as many centroids as the model's. ``"in-sample"`` saves that work where
    only the scores matter (ranking, AUROC, a grid search scored by them).

    **Cost.** With ``P = h x w`` positions, ``d`` channels and windows of
    ``K_p = (2 (p // 2) + 1)²`` and ``K_q`` offsets: fit costs PaDiM's sums
    twice (plain and aggregated features), ``P (K_p - 1) / 2`` Cholesky
    factorizations of ``d x d`` matrices for the similarities, ``K_p``
    weighted sums of the ``(P, d, d)`` scatters and two batched Cholesky
    inversions, plus k-means on at most ``kmeans_max_samples`` features; the
    statistics take about ``4 P d²`` floats while fitting and ``2 P d²``
    after. Anomaly maps cost ``K_q + 1`` PaDiM scorings (``K_q = 9`` for
    ``q = 2``). The top-k image score (eq. 12-14) needs ``D1`` at the
    ``top_k`` largest positions of each image only, found by branch and
    bound: the distance to the position's own Gaussian, one of the window's,
    bounds ``D1`` from above, so ``D1`` is computed where that bound can
    beat the ``top_k``-th largest ``D1`` found (about 1 % of the positions
    on ELPV), and the aggregated features of eq. (13) at the ``top_k``
    positions alone: ``score_samples`` costs about one PaDiM scoring
    (``D2`` is not needed for it). The scores equal those of the full
    computation up to rounding.

    References
    ----------
    .. [1] J. Jang, E. Hwang, S.-H. Park, "N-pad: Neighboring Pixel-based
       Industrial Anomaly Detection", CVPR Workshops (VAND), 2023.

    Examples
    --------
    >>> import numpy as np
    >>> from skpatch import NPadDetector
    >>> rng = np.random.RandomState(0)
    >>> X = rng.normal(size=(40, 8, 6, 6)).astype(np.float32)
    >>> detector = NPadDetector(n_features=4, map_size=None, random_state=0).fit(X)
    >>> detector.anomaly_map(X[:2]).shape
    (2, 6, 6)
    >>> detector.predict(X[:3] + 10)
    array([-1, -1, -1])
    """

    _parameter_constraints = {
        **BasePatchDetector._parameter_constraints,
        "n_features": [Interval(Integral, 1, None, closed="left"), None],
        "feature_selection": [StrOptions({"least-nonzero", "most-nonzero", "random"})],
        "p": [Interval(Integral, 1, None, closed="left")],
        "q": [Interval(Integral, 1, None, closed="left")],
        "gamma": [Interval(Real, 0, None, closed="neither")],
        "distributions": [StrOptions({"both", "weighted", "aggregated"})],
        "image_score": [StrOptions({"top-k", "max"})],
        "top_k": [Interval(Integral, 1, None, closed="left")],
        "kmeans_ratio": [Interval(Real, 0, 1, closed="right")],
        "kmeans_max_samples": [Interval(Integral, 1, None, closed="left"), None],
        "epsilon": [Interval(Real, 0, None, closed="left")],
        "calibration": [StrOptions({"cross-fit", "in-sample"})],
        "random_state": ["random_state"],
    }

    def __init__(
        self,
        n_features=100,
        *,
        feature_selection="least-nonzero",
        p=3,
        q=2,
        gamma=0.25,
        distributions="both",
        image_score="top-k",
        top_k=10,
        kmeans_ratio=0.1,
        kmeans_max_samples=10000,
        epsilon=0.01,
        sigma=4.0,
        map_size=224,
        contamination=0.1,
        calibration="cross-fit",
        random_state=None,
        device="auto",
    ):
        self.n_features = n_features
        self.feature_selection = feature_selection
        self.p = p
        self.q = q
        self.gamma = gamma
        self.distributions = distributions
        self.image_score = image_score
        self.top_k = top_k
        self.kmeans_ratio = kmeans_ratio
        self.kmeans_max_samples = kmeans_max_samples
        self.epsilon = epsilon
        self.sigma = sigma
        self.map_size = map_size
        self.contamination = contamination
        self.calibration = calibration
        self.random_state = random_state
        self.device = device

    # ------------------------------------------------------------------ fitting
    @property
    def _uses_weighted(self):
        return self.distributions in ("both", "weighted")

    @property
    def _uses_aggregated(self):
        return self.distributions in ("both", "aggregated")

    def _select_channels(self, X, device, rng):
        """Channel selection of §3.1 (fewest or most nonzero values) or a random subset."""
        n_channels = X.shape[1]
        n_selected = n_channels if self.n_features is None else self.n_features
        if n_selected > n_channels:
            raise ValueError(
                f"n_features={self.n_features} exceeds the {n_channels} channels of the "
                "embeddings; choose n_features <= n_channels or None."
            )
        if self.feature_selection == "random":
            return np.sort(rng.choice(n_channels, n_selected, replace=False))
        counts = torch.zeros(n_channels, dtype=torch.int64, device=device)
        for _, x in self._iter_chunks(X, device):
            _count_nonzero_per_channel_(counts, x)
        self.nonzero_counts_ = to_numpy(counts)
        # Fewest (or most) nonzero values first; ties (all channels, for a
        # backbone whose stages end without ReLU) in a random order.
        sign = 1 if self.feature_selection == "least-nonzero" else -1
        order = np.lexsort((rng.permutation(n_channels), sign * self.nonzero_counts_))
        return np.sort(order[:n_selected])

    def _grid(self, x, dtype=None):
        """The selected channels of ``x (b, C, h, w)`` as a contiguous ``(h, w, b, d)`` copy.

        Position-major, the layout of the kernels: a position's features are
        one block (neighbour gathers, batched products over positions), and
        the channel gather writes straight into it.
        """
        grid = gather_last(x.permute(2, 3, 0, 1), self._channel_index(x.device))
        return grid if dtype is None else grid.to(dtype)

    def _kmeans_sample(self, n_images, rng):
        """Sorted flat indices (image-major) of the aggregated features to cluster."""
        n_positions = self.grid_shape_[0] * self.grid_shape_[1]
        total = n_images * n_positions
        n_draw = total if self.kmeans_max_samples is None else min(total, self.kmeans_max_samples)
        if n_draw == total:
            return np.arange(total)
        return np.sort(rng.choice(total, n_draw, replace=False))

    def _aggregated_chunks(self, X, device, sample, collected):
        """Yield aggregated positions ``(P, b, d)``; collect the k-means sample on the way.

        Every chunk is written into the memory of the first, and computed
        ``_AGGREGATE_IMAGES`` images at a time on a CPU (see there): use a
        chunk before asking for the next.
        """
        h, w = self.grid_shape_
        n_positions = h * w
        buffer = None
        for batch, x in self._iter_chunks(X, device):
            if buffer is None:  # the first chunk is the largest
                buffer = empty((h, w, len(x), len(self.feature_indices_)), x.dtype, x.device)
            chunk = buffer[:, :, : len(x)]
            step = _AGGREGATE_IMAGES if x.device.type == "cpu" else len(x)
            for start in range(0, len(x), step):
                images = slice(start, start + step)
                _npad_kernels.aggregate(self._grid(x[images]), self.p, out=chunk[:, :, images])
            agg = chunk.flatten(0, 1)  # (P, b, d), a view
            if sample is not None:
                lo, hi = np.searchsorted(sample, [batch.start * n_positions,
                                                  batch.stop * n_positions])
                flat = torch.as_tensor(sample[lo:hi] - batch.start * n_positions,
                                       device=agg.device)
                # image-major sample order, from position-major rows
                collected.append(agg[flat % n_positions, flat // n_positions])
            yield agg

    def _n_clusters(self, n_samples):
        """Centroids of a bank clustered from ``n_samples`` features (Table 4's ratio)."""
        return max(1, math.ceil(self.kmeans_ratio * n_samples))

    def _fit_kmeans(self, samples, seed, n_clusters=None):
        """The centroid bank: ``n_clusters`` (:meth:`_n_clusters` of the samples when None)."""
        if n_clusters is None:
            n_clusters = self._n_clusters(len(samples))
        generator = torch.Generator().manual_seed(seed)
        centroids, self.kmeans_n_iter_ = _npad_kernels.kmeans(samples, n_clusters, generator)
        return to_numpy(centroids)

    def _plain_moments(self, X, device):
        """Moments ``(count, mean, scatter)`` of the selected channels (module A)."""
        return _gaussian.chunked_moments(
            (self._positions(x) for _, x in self._iter_chunks(X, device)),
            index=self._channel_index(device),
        )

    def _aggregated_statistics(self, X, device, sample=None, moments=True):
        """Moments of the aggregated features (eq. 7, module B; None if unused or not
        ``moments``) and the k-means features at the flat indices ``sample``
        (:meth:`_kmeans_sample`; None if None).
        """
        collected = []
        chunks = self._aggregated_chunks(X, device, sample, collected)
        if moments and self._uses_aggregated:
            moments = _gaussian.chunked_moments(chunks)
        else:
            moments = None
            for _ in chunks:
                pass
        return moments, None if sample is None else torch.cat(collected)

    def _fit_weighted(self, moments):
        """Module A from the plain moments: similarities, weighted Gaussians (eq. 2-6).

        The scatter is overwritten.
        """
        h, w = self.grid_shape_
        count, mean, scatter = moments
        d = mean.shape[1]
        if not self._uses_aggregated:
            self._warn_degenerate(count, mean, scatter)
        covariance = _gaussian.regularized_covariance(scatter, count, self.epsilon)
        _gaussian.check_finite_covariance(covariance)  # not "not positive definite" below
        weights = _npad_kernels.bhattacharyya_weights(
            mean.view(h, w, d), covariance.view(h, w, d, d), self.p, self.gamma
        )
        del covariance
        weighted_mean, weighted_cov = _npad_kernels.weighted_moments(
            count, mean.view(h, w, d), scatter.view(h, w, d, d), weights, self.p
        )
        weighted_cov += self.epsilon * torch.eye(d, dtype=mean.dtype, device=mean.device)
        self.neighbor_weights_ = to_numpy(weights)
        self.weighted_mean_ = to_numpy(weighted_mean.reshape(h * w, d))
        self.weighted_precision_cholesky_ = to_numpy(
            _gaussian.precision_cholesky(weighted_cov.view(h * w, d, d), overwrite=True)
        )

    def _fit_aggregated(self, moments):
        """Module B from the aggregated moments (the scatter is overwritten)."""
        mean, prec_chol = self._whitening(moments)
        self.aggregated_mean_ = to_numpy(mean)
        self.aggregated_precision_cholesky_ = to_numpy(prec_chol)

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y=None):
        """Fit the weighted and aggregated Gaussians and the centroid bank.

        Parameters
        ----------
        X : ndarray of shape (n, C, h, w) or (n, d)
            Patch embeddings of normal training images.
        y : None
            Ignored.

        Returns
        -------
        self : NPadDetector
            The fitted detector.
        """
        X = self._validate_embeddings(X, reset=True)
        self._check_n_samples(len(X), 2, type(self).__name__)
        rng = check_random_state(self.random_state)
        device = resolve_device(self.device)
        for attribute in (
            "nonzero_counts_", "neighbor_weights_", "weighted_mean_",
            "weighted_precision_cholesky_", "aggregated_mean_",
            "aggregated_precision_cholesky_", "centroids_", "kmeans_n_iter_",
        ):
            self.__dict__.pop(attribute, None)
        with torch.inference_mode():
            self.feature_indices_ = self._select_channels(X, device, rng)
            self.n_samples_seen_ = len(X)
            plain = self._plain_moments(X, device) if self._uses_weighted else None
            sample = self._kmeans_sample(len(X), rng) if self.image_score == "top-k" else None
            aggregated, features = None, None
            if self._uses_aggregated or sample is not None:
                aggregated, features = self._aggregated_statistics(X, device, sample)
            kmeans_seed = None if sample is None else int(rng.randint(np.iinfo(np.int32).max))
            cross_fit = self._calibrates_out_of_sample(len(X))
            if cross_fit:
                # before the model's own fit, which overwrites the scatters
                scores = self._cross_fitted_scores(X, device, rng, plain, aggregated,
                                                   features, sample)
            if plain is not None:
                self._fit_weighted(plain)
            del plain  # its scatter, before module B's arrays are made
            if aggregated is not None:
                self._fit_aggregated(aggregated)
            del aggregated
            if features is not None:
                self.centroids_ = self._fit_kmeans(features, kmeans_seed)
            self._set_offset(scores if cross_fit else self._anomaly_scores(X))
        return self

    def _cross_fitted_scores(self, X, device, rng, plain, aggregated, features, sample):
        """Scores of the training images, each by a detector fitted without its fold.

        The images are split into ``_CALIBRATION_FOLDS`` random folds (fewer
        with fewer images). A fold's detector has this one's parameters and
        channels (§3.1's selection counts over every image: not redone per
        fold, for little change). Its moments are the model's (``plain``,
        ``aggregated``) less the fold's own
        (:func:`~skpatch._gaussian.downdate_moments_`; summed anew where that
        would cancel): one more pass over the images in all, not one per
        fold. Its centroid bank clusters the model's k-means ``features`` (at
        ``sample``) of its images into as many centroids as the model's bank
        (a sample that misses all its images, with a tiny
        ``kmeans_max_samples``: its own).
        """
        n_images = len(X)
        n_positions = self.grid_shape_[0] * self.grid_shape_[1]
        n_clusters = None if features is None else self._n_clusters(len(features))
        scores = self._empty_scores(X)
        folds = np.array_split(rng.permutation(n_images), min(_CALIBRATION_FOLDS, n_images))
        for held_out in folds:
            held_out = np.sort(held_out)
            images = _Rows(X, held_out)
            rest = _Rows(X, np.setdiff1d(np.arange(n_images), held_out))
            fold = clone(self)
            fold.n_features_in_, fold.grid_shape_ = self.n_features_in_, self.grid_shape_
            fold.feature_indices_ = self.feature_indices_
            fold.n_samples_seen_ = n_images - len(held_out)
            with warnings.catch_warnings():
                # the model's own fit warns, if at all
                warnings.simplefilter("ignore", DegenerateTrainingSetWarning)
                # One module at a time: one set of the fold's (P, d, d) arrays.
                # Summed anew where the fold's images hold nearly all the
                # scatter (the subtraction would cancel).
                if plain is not None:
                    moments = _gaussian.downdate_moments_(
                        plain, self._plain_moments(images, device)
                    ) or self._plain_moments(rest, device)
                    fold._fit_weighted(moments)
                    del moments
                if aggregated is not None:
                    moments = _gaussian.downdate_moments_(
                        aggregated, self._aggregated_statistics(images, device)[0]
                    ) or self._aggregated_statistics(rest, device)[0]
                    fold._fit_aggregated(moments)
                    del moments
            if features is not None:
                kept = ~np.isin(sample // n_positions, held_out)
                if kept.any():
                    fold_features = features[torch.as_tensor(kept, device=features.device)]
                else:
                    # a sample too small to reach the fold's images (kmeans_max_samples):
                    # the fold draws its own, at the cost of a pass over its images
                    fold_features = self._aggregated_statistics(
                        rest, device, self._kmeans_sample(len(rest), rng), moments=False
                    )[1]
                seed = int(rng.randint(np.iinfo(np.int32).max))
                fold.centroids_ = fold._fit_kmeans(fold_features, seed, n_clusters)
            scores[held_out] = fold._anomaly_scores(images)
        return scores

    # ------------------------------------------------------------------ scoring
    _scoring_state = ("weighted_mean_", "weighted_precision_cholesky_")

    def _bytes_per_image(self, X, device):
        n_positions = X.shape[2] * X.shape[3]
        n_selected = len(getattr(self, "feature_indices_", range(X.shape[1])))
        return 8 * n_positions * n_selected * X.itemsize

    def _fitted_dtype(self):
        fitted = self.weighted_mean_ if self._uses_weighted else self.aggregated_mean_
        return torch.float64 if fitted.dtype == np.float64 else torch.float32

    def _distances(self, x, top_k=None):
        """``(D1 or None, D2 or None)`` of a chunk ``x (b, C, h, w)`` (eq. 8-10).

        ``top_k``: what eq. (12)-(14) read and no more: ``D1`` only where it
        can be among the ``top_k`` largest of its image (``-inf`` elsewhere,
        see :func:`~skpatch._npad_kernels.neighbour_min_mahalanobis_top`),
        read from ``x`` itself, and ``D2`` only when it takes ``D1``'s place.
        """
        h, w = self.grid_shape_
        d1 = d2 = None
        if self._uses_weighted:
            names = ("weighted_mean_", "weighted_precision_cholesky_")
            mean, prec_chol = (self._fitted_tensor(name, x.device) for name in names)
            shift = self._fitted_shift(*names, x.device)
            if top_k is not None:
                d1 = _npad_kernels.neighbour_min_mahalanobis_top(
                    x.to(self._fitted_dtype()), mean, prec_chol, self.q, top_k,
                    index=self._channel_index(x.device), shift=shift,
                )
                return d1, None
        grid = self._grid(x, self._fitted_dtype())
        if self._uses_weighted:
            d1 = _npad_kernels.neighbour_min_mahalanobis(grid, mean, prec_chol, self.q, shift=shift)
        if self._uses_aggregated:
            names = ("aggregated_mean_", "aggregated_precision_cholesky_")
            d2 = _gaussian.mahalanobis(
                _npad_kernels.aggregate(grid, self.p).view(h * w, len(x), -1),
                *(self._fitted_tensor(name, x.device) for name in names),
                shift=self._fitted_shift(*names, x.device),
            ).T.reshape(len(x), h, w)
        return d1, d2

    @staticmethod
    def _combine(d1, d2):
        if d1 is None:
            return d2
        if d2 is None:
            return d1
        return (d1 * d2).sqrt()  # eq. (11)

    def _patch_scores(self, x):
        return self._combine(*self._distances(x))

    def _image_scores(self, x, patch_scores=None):
        """Eq. (12)-(14) (``image_score="top-k"``) or the maximum of the map."""
        if self.image_score == "max":
            grid = self._combine(*self._distances(x))
            if x.shape[-2:] == (1, 1):
                return grid.flatten(1).amax(dim=1)
            maps = postprocess(grid, map_size_tuple(self.map_size), self.sigma)
            return maps.flatten(1).amax(dim=1)
        x = x.to(self._fitted_dtype())  # once, for both reads below
        d1, d2 = self._distances(x, top_k=self.top_k)
        return _npad_kernels.topk_image_score(
            d1 if d1 is not None else d2,
            x,
            self._fitted_tensor("centroids_", x.device),
            self.top_k,
            self.p,
            index=self._channel_index(x.device),
        )


def make_npad_pipeline(
    backbone="efficientnet_lite0",
    *,
    max_shift=4,
    embedder_params=None,
    memory=None,
    **detector_params,
):
    """The N-pad pipeline: embedder, :class:`NPadDetector` and image shifting.

    Builds ``ImageShiftDetector(make_pipeline(PatchEmbedder(...),
    NPadDetector(...)), max_shift=max_shift)``. The embedder takes the
    backbone's three default stages (strides 4, 8 and 16, the paper's
    hierarchy levels 1-3), upsampled to the largest map and concatenated,
    without pooling: the ``p x p`` aggregation of module B is the
    detector's. ``max_shift=0`` returns the pipeline alone (no shifting).

    Parameters
    ----------
    backbone : str, default="efficientnet_lite0"
        Registered backbone name (see :func:`skpatch.backbones.available_backbones`).
    max_shift : int, default=4
        ``r`` of eq. (15): test images are scored at every shift of up to
        ``r // 2`` pixels in each direction; 0 disables shifting.
    embedder_params : dict or None, default=None
        Other :class:`~skpatch.PatchEmbedder` parameters (``weights``,
        ``image_size``, ``crop_size``, ``layers``, ``device``, ...).
    memory : str, joblib.Memory or None, default=None
        Passed to :func:`~sklearn.pipeline.make_pipeline`: caches the
        embeddings of the training images between fits.
    **detector_params : dict
        Parameters of :class:`NPadDetector` (``p``, ``q``, ``gamma``,
        ``n_features``, ``random_state``, ...).

    Returns
    -------
    estimator : ImageShiftDetector or sklearn.pipeline.Pipeline
        The shifting wrapper around the pipeline (steps ``"patchembedder"``
        and ``"npaddetector"``), or the pipeline when ``max_shift=0``.
        Grid-search its parameters as ``max_shift`` and
        ``estimator__npaddetector__gamma``.

    See Also
    --------
    NPadDetector : The detector (modules A-C).
    ImageShiftDetector : Image shifting (module D).

    Examples
    --------
    >>> import numpy as np
    >>> from skpatch import make_npad_pipeline
    >>> model = make_npad_pipeline(
    ...     max_shift=2,
    ...     embedder_params={"weights": None, "image_size": 32, "crop_size": None},
    ...     n_features=4, map_size=32, random_state=0,
    ... )
    >>> images = np.random.RandomState(0).randint(0, 256, (6, 32, 32), dtype=np.uint8)
    >>> model.fit(images).anomaly_map(images[:2]).shape
    (2, 32, 32)
    """
    get_backbone(backbone)  # an unknown name fails here, as in the other make_*_pipeline
    pipeline = make_pipeline(
        PatchEmbedder(backbone, **(embedder_params or {})),
        NPadDetector(**detector_params),
        memory=memory,
    )
    if max_shift == 0:
        return pipeline
    return ImageShiftDetector(pipeline, max_shift=max_shift)
