"""PaDiM: one Gaussian per patch position (Defard et al., 2021)."""

import numpy as np
import torch
from sklearn.base import _fit_context
from sklearn.utils import check_random_state

from .. import _gaussian, _memory_bank
from .._torch_utils import as_tensor, numpy_dtype, resolve_device, to_numpy
from ._base import BaseGaussianDetector

# Training images kept by partial_fit to calibrate offset_ (selected channels
# only: 40 MB for a 56 x 56 grid of 100 channels).
_CALIBRATION_SIZE = 32

# Images per chunk of the running sums (see _moments for the memory). Each
# chunk reads and writes the (P, d, d) scatter once, and the outer products
# run faster with more rows: 1.4-1.6 ms per image in chunks of 32 against
# 0.9-1.0 in chunks of 64 (ELPV's 3,136 positions, d = 100, 2 threads). The
# chunks are views of the embeddings on a CPU: a larger one costs no memory.
_MOMENT_CHUNK = 128


class PaDiMDetector(BaseGaussianDetector):
    """Patch Distribution Modeling: a multivariate Gaussian per patch position.

    Implements PaDiM (Defard et al., 2021): a random subset of the embedding
    channels (§III-A, "Rd"), one Gaussian ``N(μ_ij, Σ_ij)`` per grid position
    with the regularized sample covariance of eq. (1), the Mahalanobis
    distance of eq. (2) as patch score, maps upsampled and blurred with a
    Gaussian of ``sigma = 4`` (§IV-B), and the maximum of the map as image
    score (§III-C).

    The statistics are running sums (count, mean, scatter), so
    :meth:`partial_fit` streams images through in batches with memory
    independent of their number, and gives the same model as :meth:`fit`.
    Scoring whitens all positions at once with the Cholesky factors of the
    covariances (no matrix inverse, no loop over positions).

    Parameters
    ----------
    n_features : int, default=None
        Size of the random channel subset (the paper's Rd: 100 for ResNet-18,
        550 for Wide-ResNet-50-2). None keeps every channel.
    epsilon : float, default=0.01
        Ridge ``ε`` added to every covariance (eq. 1).
    sigma : float, default=4
        Standard deviation, in map pixels, of the Gaussian blur of the anomaly
        maps; 0 disables it.
    map_size : int, pair of int or None, default=224
        Size ``(H, W)`` of the anomaly maps (the crop size of the embedder by
        default); None keeps the patch grid.
    contamination : float in (0, 0.5], default=0.1
        Expected fraction of anomalies: ``offset_`` is this quantile of the
        training images' ``score_samples``, computed as ``calibration`` says.
    calibration : {"leave-one-out", "in-sample"}, default="leave-one-out"
        Which training scores set ``offset_``. A Gaussian scores the images
        it was fitted on much lower than new normal images, so the in-sample
        rule of scikit-learn's ``EllipticEnvelope`` sets a threshold that
        flags far more than ``contamination`` of new normal images (75 % of
        held-out good ELPV cells for ``contamination=0.1``).
        ``"leave-one-out"`` scores every training image with the model
        fitted without it, in closed form (Sherman-Morrison on each
        position's covariance, see Notes), at the cost of in-sample scoring;
        it needs 3 training images, and with 2 falls back to in-sample, with
        a warning.
    random_state : int, RandomState instance or None, default=None
        Seeds the channel subset.
    device : str, default="auto"
        Torch device for the statistics and scoring; "auto" uses CUDA when
        available. The fitted state is NumPy whatever the device (on a
        GPU, :meth:`partial_fit` keeps its running sums there between
        batches and copies ``mean_`` and ``scatter_`` to the host when
        first read).

    Attributes
    ----------
    feature_indices_ : ndarray of shape (n_selected,)
        Channels kept (sorted).
    n_samples_seen_ : int
        Number of training images.
    mean_ : ndarray of shape (h * w, n_selected)
        Mean embedding per position (row-major grid order).
    scatter_ : ndarray of shape (h * w, n_selected, n_selected)
        Scatter matrix about the mean per position, ``Σ_k (x_k-μ)(x_k-μ)ᵀ``
        (kept so that :meth:`partial_fit` can continue).
    precision_cholesky_ : ndarray of shape (h * w, n_selected, n_selected)
        Upper-triangular ``U`` with ``Σ⁻¹ = U Uᵀ`` per position. Not
        stored in saved files (it would double their size): it is computed
        again from ``scatter_`` on first use after loading.
    offset_ : float
        Threshold on ``score_samples``; ``decision_function = score_samples - offset_``.
    grid_shape_ : tuple of int
        Patch grid ``(h, w)`` seen in fit (``(1, 1)`` for 2-D input).
    n_features_in_ : int
        Number of embedding channels ``C`` seen in fit.

    See Also
    --------
    skpatch.PatchEmbedder : Produces the embeddings.
    sklearn.covariance.EllipticEnvelope : The same idea for one Gaussian.

    Notes
    -----
    Leave-one-out scores: removing image ``i`` from the ``N`` training
    images is a rank-one downdate of every position's scatter and a shift of
    its mean, so its squared distance to the model without it is
    ``(N/(N-1))² (N-2)/(N-1) · D² / (1 - N D²/(N-1)²)`` in terms of its
    in-sample squared distance ``D²`` (exact for a ridge of ``ε (N-1)/(N-2)``
    instead of ``ε``). The image score of the left-out image then follows
    as usual (map, blur, max).

    With :meth:`partial_fit`, scoring every image seen would need them all
    again, and scoring each batch with the model of its time would set
    ``offset_`` far too high (the early, small-sample models give large
    distances). So :meth:`partial_fit` keeps a uniform reservoir sample of
    at most 32 of the images seen (selected channels only, seeded by
    ``random_state``), and ``offset_`` is the ``contamination`` quantile of
    their scores under the final model (leave-one-out when ``calibration``
    says so; in-sample while fewer than 3 images have been seen), computed
    on first use. A saved detector stores ``offset_``, not the sample; a
    :meth:`partial_fit` after loading (or after :meth:`fit`) calibrates on
    a sample of the images it is given from then on.

    References
    ----------
    .. [1] T. Defard, A. Setkov, A. Loesch, R. Audigier, "PaDiM: a Patch
       Distribution Modeling Framework for Anomaly Detection and
       Localization", ICPR Workshops, 2021.

    Examples
    --------
    >>> import numpy as np
    >>> from skpatch import PaDiMDetector
    >>> rng = np.random.RandomState(0)
    >>> X = rng.normal(size=(50, 8, 4, 4)).astype(np.float32)
    >>> detector = PaDiMDetector(n_features=4, random_state=0, map_size=None).fit(X)
    >>> detector.anomaly_map(X[:2]).shape
    (2, 4, 4)
    >>> detector.predict(X[:3] + 10)
    array([-1, -1, -1])
    """

    def __init__(
        self,
        n_features=None,
        *,
        epsilon=0.01,
        sigma=4.0,
        map_size=224,
        contamination=0.1,
        calibration="leave-one-out",
        random_state=None,
        device="auto",
    ):
        self.n_features = n_features
        self.epsilon = epsilon
        self.sigma = sigma
        self.map_size = map_size
        self.contamination = contamination
        self.calibration = calibration
        self.random_state = random_state
        self.device = device

    # ------------------------------------------------------------------ fitting
    def _moments(self, X, device, start=None):
        """Count, mean and scatter of the images ``X`` (tensors on ``device``).

        ``start``: the running moments, which ``X``'s are added to in place.
        """
        dtype = None if start is None else start[1].dtype  # the stream keeps its first dtype
        # Working memory per image: the chunk's copy, if it is one (to a GPU,
        # of a read-only array, or converted), and on a GPU the selected
        # channels of every position, gathered as one block. On a CPU the
        # blocks are small and the chunks views, which the scoring's budget
        # cut anyway, at a cost in time: 64 images of Wide-ResNet-50-2 at
        # Rd 550 in two chunks, each a pass over the 3.8 GB sums, took
        # 2.8-3.7 s against 1.8-2.3 s in one.
        row_bytes = self._copy_bytes(X, device, dtype)
        if torch.device(device).type != "cpu":
            itemsize = (dtype or as_tensor(X[:0], "cpu").dtype).itemsize
            row_bytes += X.shape[2] * X.shape[3] * len(self.feature_indices_) * itemsize
        return _gaussian.chunked_moments(
            (self._positions(x.to(dtype))
             for _, x in self._iter_chunks(X, device, max_rows=_MOMENT_CHUNK, row_bytes=row_bytes)),
            start=start,
            index=self._channel_index(device),
        )

    def _update(self, X, device, whiten=True):
        """Add the images ``X`` (validated) to the model; set the scoring state.

        Returns a scorer of the training images (see ``calibration``), or
        None while fewer than 2 images have been seen or ``whiten=False``
        (the precision factor is then computed on first use).
        """
        previous = self.__dict__.pop("_running", None)
        if previous is None and getattr(self, "n_samples_seen_", 0):
            previous = (
                self.n_samples_seen_,
                as_tensor(self.mean_, device),
                as_tensor(self.scatter_, device),
            )
        # In place: the running sums are the only (P, d, d) arrays of a stream
        # (a merge of per-batch sums cost 40 % of partial_fit on a CPU).
        try:
            moments = self._moments(X, device, start=previous)
        except BaseException:
            if previous is not None:
                # Interrupted half-way, the sums hold part of the batch: an
                # unfitted detector is better than a silently wrong one.
                params = self.get_params(deep=False)
                self.__dict__ = {k: v for k, v in self.__dict__.items() if k in params}
            raise
        self.n_samples_seen_ = int(moments[0])
        # The ridge of this fit: the precision factor, recomputed after
        # loading, keeps it if epsilon is changed without a refit.
        self._fit_epsilon = self.epsilon
        self.__dict__.pop("mean_", None)
        self.__dict__.pop("scatter_", None)
        if whiten or torch.device(device).type == "cpu":
            self.mean_ = to_numpy(moments[1])  # on the CPU: the tensors' memory
            self.scatter_ = to_numpy(moments[2])
        if not whiten:
            # Streaming: the next batch merges into these sums in place. On a
            # GPU they stay there between batches, and mean_ and scatter_ are
            # copied to the host on first use (__getattr__), not per batch.
            self._running = moments
        count = moments[0]
        self.__dict__.pop("precision_cholesky_", None)
        if count < 2 or not whiten:
            return None
        mean, prec_chol = self._whitening(moments, self._fit_epsilon)
        self.precision_cholesky_ = to_numpy(prec_chol)
        loo = count if self._calibrates_out_of_sample(count) else None
        shift = self._fitted_shift(*self._scoring_state, device)  # kept for scoring too
        return self._patch_scorer(mean, prec_chol, loo, shift=shift)

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y=None):
        """Fit one Gaussian per patch position on normal images.

        Parameters
        ----------
        X : ndarray of shape (n, C, h, w) or (n, d)
            Patch embeddings of normal training images.
        y : None
            Ignored.

        Returns
        -------
        self : PaDiMDetector
            The fitted detector.
        """
        X = self._validate_embeddings(X, reset=True, keep_tensor=True)
        self._check_n_samples(len(X), 2, type(self).__name__)
        for attribute in ("n_samples_seen_", "precision_cholesky_", "_train_scores",
                          "_calibration_sample", "_n_offered", "_running"):
            self.__dict__.pop(attribute, None)
        self.feature_indices_ = self._select_features(X.shape[1])
        device = resolve_device(self.device)
        with torch.inference_mode():
            training_scorer = self._update(X, device)
            self._train_scores = self._anomaly_scores(X, training_scorer)
        self._set_offset(self._train_scores)
        return self

    @_fit_context(prefer_skip_nested_validation=True)
    def partial_fit(self, X, y=None):
        """Add a batch of normal images to the running statistics.

        Streaming: memory does not depend on the number of images seen, and
        the final model equals :meth:`fit` on all images at once. ``offset_``
        is set on first use from a uniform sample of the images seen (see
        Notes). The running sums are updated in place, so an error half-way
        through a batch (out of memory, an interrupt) leaves the detector
        unfitted rather than with part of the batch.

        Parameters
        ----------
        X : ndarray of shape (n, C, h, w) or (n, d)
            Patch embeddings of a batch of normal images.
        y : None
            Ignored.

        Returns
        -------
        self : PaDiMDetector
            The updated detector.
        """
        first = not hasattr(self, "n_samples_seen_")
        X = self._validate_embeddings(X, reset=first, keep_tensor=True)
        if first:
            self.feature_indices_ = self._select_features(X.shape[1])
        with torch.inference_mode():
            # Only the running sums: one Cholesky per position, at first use,
            # instead of one per batch.
            self._update(X, resolve_device(self.device), whiten=False)
        self._sample_for_calibration(X)
        # The model changed: offset_ is recomputed on first use (__getattr__).
        self.__dict__.pop("offset_", None)
        self.__dict__.pop("_train_scores", None)
        return self

    def _sample_for_calibration(self, X):
        """Reservoir sampling (Vitter's algorithm R) of the streamed images.

        Keeps a uniform sample of at most ``_CALIBRATION_SIZE`` of the images
        passed to :meth:`partial_fit`, selected channels only, for ``offset_``.
        """
        sample = self.__dict__.get("_calibration_sample")
        n_offered = self.__dict__.get("_n_offered", 0)
        seed = check_random_state(self.random_state).randint(2**31)
        rng = np.random.default_rng([seed, n_offered])  # reproducible across calls
        if sample is None:
            shape = (0, len(self.feature_indices_), *X.shape[2:])
            sample = _memory_bank.channels_last_empty(shape, numpy_dtype(X.dtype))
        positions, slots = _memory_bank.reservoir_slots(n_offered, len(X), _CALIBRATION_SIZE, rng)
        # only the images and channels kept are gathered (and copied to the host)
        sample = _memory_bank.fill_reservoir(sample, X, positions, slots, self.feature_indices_)
        self._calibration_sample = sample
        self._n_offered = n_offered + len(X)

    def _calibrate_on_sample(self):
        """``offset_`` from the calibration sample, scored by the current model."""
        sample = self._calibration_sample
        count = self.n_samples_seen_
        if count < 2:
            self._check_n_samples(count, 2, type(self).__name__)
        device = resolve_device(self.device)
        with torch.inference_mode():
            center = as_tensor(self.mean_, device)
            prec_chol = as_tensor(self.precision_cholesky_, device)
            loo = count if self._calibrates_out_of_sample(count) else None
            shift = self._fitted_shift(*self._scoring_state, device)
            scorer = self._patch_scorer(center, prec_chol, loo, selected=True, shift=shift)
            self._train_scores = self._anomaly_scores(sample, scorer)
        self._set_offset(self._train_scores)

    def __getattr__(self, name):
        # Called only for attributes not set. offset_ after partial_fit is
        # computed once, when first needed, so that every sampled image is
        # scored by the final model; precision_cholesky_ is computed on first
        # use after partial_fit, and after loading (it is not saved: it would
        # double the file), with the ridge of the last fit (files saved before
        # it was recorded: epsilon).
        state = self.__dict__
        if name in ("mean_", "scatter_") and "_running" in state:
            state[name] = to_numpy(state["_running"][1 if name == "mean_" else 2])
            return state[name]
        if (name in ("offset_", "_train_scores") and "_calibration_sample" in state
                and state.get("n_samples_seen_", 0) >= 2):
            self._calibrate_on_sample()
            return state[name]
        if name == "precision_cholesky_" and state.get("n_samples_seen_", 0) >= 2:
            device = resolve_device(self.device)
            moments = state.get("_running") or (
                self.n_samples_seen_,
                as_tensor(self.mean_, device),
                as_tensor(self.scatter_, device),
            )
            epsilon = state.get("_fit_epsilon", self.epsilon)
            with torch.inference_mode():
                self.precision_cholesky_ = to_numpy(self._whitening(moments, epsilon)[1])
            return state[name]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __getstate__(self):
        if "_running" in self.__dict__:
            self.mean_, self.scatter_  # noqa: B018 (copied to the host now)
        # a copy: object.__getstate__ returns the live __dict__ (Python 3.11+)
        state = dict(super().__getstate__())
        state.pop("_running", None)
        if "scatter_" in state:
            state.pop("precision_cholesky_", None)
        if "_calibration_sample" in state and self.n_samples_seen_ >= 2:
            # Save offset_ (computed now), not the sample: the file stays small;
            # a later partial_fit starts a new sample from its own images.
            # (With one image there is no offset_ yet: the sample is saved.)
            state["offset_"] = self.offset_
            state["_train_scores"] = self._train_scores
            for key in ("_calibration_sample", "_n_offered"):
                state.pop(key, None)
        return state

    def _check_scorable(self):
        super()._check_scorable()
        if not hasattr(self, "precision_cholesky_"):
            self._check_n_samples(self.n_samples_seen_, 2, type(self).__name__)
