"""PatchCore: a coreset memory bank of training patches (Roth et al., 2022)."""

import copy
import math
from numbers import Integral, Real

import numpy as np
import torch
from sklearn.base import _fit_context
from sklearn.pipeline import make_pipeline
from sklearn.utils import check_random_state, gen_batches
from sklearn.utils._chunking import get_chunk_n_rows
from sklearn.utils._param_validation import Interval, StrOptions

from .. import _memory_bank, _robust
from .._torch_utils import as_tensor, resolve_device, to_numpy
from ._base import BasePatchDetector, locally_aware_embedder

# Training images kept by partial_fit to calibrate offset_ (all channels: 15 MB
# for a 28 x 28 grid of 152 channels), as PaDiMDetector does.
_CALIBRATION_SIZE = 32

# Attributes set on first use after partial_fit (see __getattr__).
_LAZY = ("memory_bank_", "memory_weights_", "n_patches_stored_", "lof_threshold_",
         "offset_", "_train_scores")

# The state of a partial fit that is not finalized yet.
_STREAM = ("_store", "_store_groups", "_n_stored", "_n_offered", "_n_images_seen",
           "_calibration_sample", "_calibration_ids", "_calibration_offered")
# What of it the finalized model drops (the images seen stay counted).
_STORE = tuple(name for name in _STREAM if name != "_n_images_seen")


def _patches(x):
    """Embeddings ``(b, C, h, w)`` -> patch features ``(b * h * w, C)`` (image-major)."""
    return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])


class PatchCoreDetector(BasePatchDetector):
    """PatchCore: nearest-neighbour distance to a coreset of training patches.

    Implements PatchCore (Roth et al., 2022):

    1. **Memory bank** (§3.1): the patch features of the training images
       (the locally aware features of §3.1 are the embedder's job, see
       :func:`make_patchcore_pipeline`).
    2. **Coreset subsampling** (§3.2, Algorithm 1): the greedy k-center
       coreset of ``coreset_ratio`` of the patches, with distances taken
       between random projections to ``projection_dim`` dimensions
       (:func:`skpatch._memory_bank.greedy_coreset`).
    3. **Scoring** (§3.3): the patch score is the distance of a test patch
       to its nearest memory item; the map is upsampled bilinearly and
       blurred (``sigma = 4``); the image score is the largest patch score ``s*``
       reweighted by eq. (7), ``s = (1 - exp‖m* - m_test‖ / Σ_{m ∈ N_b(m*)}
       exp‖m - m_test‖) s*``, where ``m*`` is the memory item nearest to
       the most anomalous test patch and ``N_b(m*)`` its ``b =
       n_reweight`` nearest memory items (``m*`` included).

    **Bounded fit memory.** The patches of the training images are first
    subsampled uniformly at random to at most ``max_patches`` (the store);
    the coreset is then ``coreset_ratio`` of the store. The fit's working
    memory is therefore about ``max_patches x (C + projection_dim + 5)``
    floats plus the input, whatever the number of training images; with
    :meth:`partial_fit` (:func:`skpatch.fit_in_batches`) the input is one
    batch, and the store is a reservoir sample of the stream (see Notes).

    **Denoising** (``denoising="lof"``, SoftPatch, Jiang et al., 2022, the
    noisy-training baseline of RPaDiM): before the store is drawn, the local
    outlier factor of every training patch among the patches at the same
    position (``lof_neighbors`` neighbours, :func:`skpatch._robust.local_outlier_factor`)
    is computed, the patches above the ``tau`` quantile of all factors are
    dropped, and the factor of each memory item is kept as its soft weight:
    a test patch's distance to its nearest item is multiplied by that
    item's factor (items that looked like outliers count less as normal).

    Parameters
    ----------
    coreset_ratio : float in (0, 1], default=0.1
        Fraction of the store kept in the memory bank (the paper's default;
        it reports 0.01 as nearly as good and ten times cheaper to score);
        1 keeps the whole store and skips the coreset selection.
    max_patches : int or None, default=50_000
        Size of the uniform random sample of the training patches that the
        coreset is selected from (the fit's memory budget, and with
        ``coreset_ratio`` the size of the bank: 5,000 items by default, the
        bank size of the anomalib PatchCore run it is benchmarked against);
        None uses every training patch (memory and coreset time then grow
        with the training set: the paper's setting).
    n_reweight : int, default=9
        ``b``, the number of memory items in the reweighting of the image
        score (§3.3, eq. 7); 1 disables the reweighting (the image score is
        the largest patch score). Clipped to the size of the bank. The paper
        gives no value and its official code does not reweight: 9 is
        anomalib's.
    projection_dim : int or None, default=128
        Dimension of the random projection in which the coreset's distances
        are computed (§3.2's ``d*``; 128 is the official code's); None uses
        the features.
    denoising : {None, "lof"}, default=None
        SoftPatch-style patch denoising (see above).
    tau : float in (0, 1], default=0.85
        With ``denoising="lof"``: fraction of the training patches kept
        (SoftPatch and RPaDiM drop the top 15 %).
    lof_neighbors : int, default=6
        With ``denoising="lof"``: neighbours of the local outlier factor.
    sigma : float, default=4
        Standard deviation, in map pixels, of the Gaussian blur of the anomaly
        maps (§3.3); 0 disables it.
    map_size : int, pair of int or None, default=224
        Size ``(H, W)`` of the anomaly maps; None keeps the patch grid.
    contamination : float in (0, 0.5], default=0.1
        Expected fraction of anomalies: ``offset_`` is this quantile of the
        training images' ``score_samples``, computed as ``calibration`` says.
    calibration : {"leave-one-out", "in-sample"}, default="leave-one-out"
        Which training scores set ``offset_``. A nearest-neighbour model
        scores the patches it memorised at 0, so in-sample training scores
        are optimistic and the threshold they set flags far more than
        ``contamination`` of new normal images. ``"leave-one-out"`` scores
        each training image against the memory bank without the items taken
        from that image (see Notes).
    random_state : int, RandomState instance or None, default=None
        Seeds the store's subsample, the projection and the coreset's
        starting point.
    device : str, default="auto"
        Torch device for the coreset selection and scoring; "auto" uses CUDA
        when available. The fitted state is NumPy whatever the device.

    Attributes
    ----------
    memory_bank_ : ndarray of shape (n_memory, n_channels)
        The coreset, float32, in pick order (its first ``k`` rows are the
        greedy coreset of size ``k``).
    memory_weights_ : ndarray of shape (n_memory,) or None
        Soft weights (local outlier factors) of the memory items with
        ``denoising="lof"``, else None.
    n_patches_seen_ : int
        Number of training patches (images x positions).
    n_patches_stored_ : int
        Size of the store the coreset was selected from (at most
        ``max_patches``).
    lof_threshold_ : float or None
        With ``denoising="lof"``: the ``tau`` quantile of the patch factors.
    offset_ : float
        Threshold on ``score_samples``; ``decision_function = score_samples - offset_``.
    grid_shape_ : tuple of int
        Patch grid ``(h, w)`` seen in fit (``(1, 1)`` for 2-D input).
    n_features_in_ : int
        Number of embedding channels ``C`` seen in fit.

    See Also
    --------
    make_patchcore_pipeline : The recommended embedder and this detector in a pipeline.
    SPADEDetector : Nearest training images first, then their patches.
    PaDiMDetector : A Gaussian per position instead of a memory bank.

    Notes
    -----
    **2-D input.** With one patch per sample, the detector is a
    nearest-neighbour outlier detector: the score of a sample is its
    distance to the nearest coreset point (no reweighting, which would only
    rescale the score of a single patch).

    **Leave-one-out calibration.** Every memory item comes from one training
    image; a training image is scored with its own items excluded from the
    nearest-item search (the reweighting's neighbourhood ``N_b(m*)`` is
    taken in the whole bank), which is what a new normal image sees: a bank built without it. Its
    other patches were covered by items of other images or are at their
    in-sample distance, which equals the left-out one. The coreset itself
    is not re-selected (its selection is not re-run per image). An image
    whose patches all come from itself (a bank drawn from one image only)
    keeps its in-sample scores. ``"in-sample"`` is scikit-learn's rule.

    **Cost.** For ``S = min(max_patches, N h w)`` stored patches of ``C``
    channels, ``M = coreset_ratio x S`` memory items and projection ``p``:
    fit memory ``S (C + p + 3)`` floats (57 MB for the defaults and 152
    channels), time ``O(S C p)`` for the projection plus ``O(S p M)`` for
    the greedy selection (one pass over the projected store per pick,
    memory bound) plus the calibration (a scoring of the training images).
    Denoising adds the LOF, ``O(h w N² C)`` time and ``N²`` floats per
    position chunk. Fitted state: ``M x C`` floats. Scoring: ``O(h w M C)``
    per image, in chunks bounded by scikit-learn's ``working_memory``; the
    image score alone (``score_samples``, ``predict``) on the CPU searches
    the whole bank only for the patches that can still have the largest distance
    (:func:`skpatch._memory_bank.largest_nearest_distance`, exact: the
    same scores): each patch is first compared with the items of one cell of
    the bank, which bounds its distance, and 7 % of the distance
    computations of a full search remain on the default bank.

    **Streaming.** :meth:`partial_fit` adds each batch's patches to the
    store by reservoir sampling (Vitter's algorithm R, vectorized per
    batch: :func:`skpatch._memory_bank.reservoir_slots`), so the store is
    a uniform sample of at most ``max_patches`` of all the patches seen,
    seeded by ``random_state``; its memory is ``max_patches x C`` float32
    (plus one int64 image number per patch) and one batch, whatever the
    number of images. The coreset, the memory bank and ``offset_`` are
    computed on first use after the last call (scoring, saving, or reading
    ``memory_bank_`` or ``offset_``), and the store is then freed: the
    greedy selection runs once. ``offset_`` comes, as for
    :class:`PaDiMDetector`, from a uniform reservoir sample of at most 32
    of the streamed images, scored (leave-one-out) by the final bank. While
    ``N h w <= max_patches`` the bank equals :meth:`fit`'s on the same
    images (and ``offset_`` too for at most 32 images). A
    :meth:`partial_fit` after :meth:`fit`, after loading or after the
    coreset was selected continues from the memory bank: its items enter
    the new store as the first patches offered. ``denoising="lof"`` needs
    every image at once and is not available with :meth:`partial_fit`.

    References
    ----------
    .. [1] K. Roth, L. Pemula, J. Zepeda, B. Schölkopf, T. Brox, P. Gehler,
       "Towards Total Recall in Industrial Anomaly Detection", CVPR, 2022.
    .. [2] X. Jiang, J. Liu, J. Wang, Q. Nie, K. Wu, Y. Liu, C. Wang, F. Zheng,
       "SoftPatch: Unsupervised Anomaly Detection with Noisy Data", NeurIPS, 2022.

    Examples
    --------
    >>> import numpy as np
    >>> from skpatch import PatchCoreDetector
    >>> rng = np.random.RandomState(0)
    >>> X = rng.normal(size=(30, 8, 4, 4)).astype(np.float32)
    >>> detector = PatchCoreDetector(map_size=None, random_state=0).fit(X)
    >>> detector.memory_bank_.shape
    (48, 8)
    >>> detector.anomaly_map(X[:2]).shape
    (2, 4, 4)
    >>> detector.predict(X[:3] + 10)
    array([-1, -1, -1])
    """

    # PatchCore §3.3 (and its official code): bilinear upsampling, then the blur
    _map_interpolation = "bilinear"

    _parameter_constraints = {
        **BasePatchDetector._parameter_constraints,
        "coreset_ratio": [Interval(Real, 0, 1, closed="right")],
        "max_patches": [Interval(Integral, 1, None, closed="left"), None],
        "n_reweight": [Interval(Integral, 1, None, closed="left")],
        "projection_dim": [Interval(Integral, 1, None, closed="left"), None],
        "denoising": [StrOptions({"lof"}), None],
        "tau": [Interval(Real, 0, 1, closed="right")],
        "lof_neighbors": [Interval(Integral, 1, None, closed="left")],
        "calibration": [StrOptions({"leave-one-out", "in-sample"})],
        "random_state": ["random_state"],
    }

    def __init__(
        self,
        coreset_ratio=0.1,
        *,
        max_patches=50_000,
        n_reweight=9,
        projection_dim=128,
        denoising=None,
        tau=0.85,
        lof_neighbors=6,
        sigma=4.0,
        map_size=224,
        contamination=0.1,
        calibration="leave-one-out",
        random_state=None,
        device="auto",
    ):
        self.coreset_ratio = coreset_ratio
        self.max_patches = max_patches
        self.n_reweight = n_reweight
        self.projection_dim = projection_dim
        self.denoising = denoising
        self.tau = tau
        self.lof_neighbors = lof_neighbors
        self.sigma = sigma
        self.map_size = map_size
        self.contamination = contamination
        self.calibration = calibration
        self.random_state = random_state
        self.device = device

    # ------------------------------------------------------------------ fitting
    def _denoise(self, X, device):
        """LOF of every training patch at its position: ``(lof (N, P), keep (N, P))``."""
        n_images, n_channels = X.shape[:2]
        flat = as_tensor(np.ascontiguousarray(X).reshape(n_images, n_channels, -1), "cpu")
        n_positions = flat.shape[2]
        row_bytes = flat.element_size() * (2 * n_images * n_images + 2 * n_images * n_channels)
        chunk = get_chunk_n_rows(row_bytes=row_bytes, max_n_rows=n_positions)
        lof = torch.cat(
            [
                _robust.local_outlier_factor(
                    flat[:, :, positions].to(device).permute(2, 0, 1).contiguous(),
                    self.lof_neighbors,
                )
                for positions in gen_batches(n_positions, chunk)
            ]
        ).T  # (N, P)
        threshold = _robust.quantile_threshold(lof, self.tau)
        return lof, threshold, lof <= threshold

    def _draw_store(self, X, candidates, rng):
        """Indices (image * P + position, sorted) of the store: a uniform sample of ``candidates``."""
        n_store = len(candidates) if self.max_patches is None else min(self.max_patches, len(candidates))
        if n_store < len(candidates):
            candidates = np.sort(rng.choice(candidates, n_store, replace=False))
        return candidates

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y=None):
        """Build the coreset memory bank from normal images.

        Parameters
        ----------
        X : ndarray of shape (n, C, h, w) or (n, d)
            Patch embeddings of normal training images.
        y : None
            Ignored.

        Returns
        -------
        self : PatchCoreDetector
            The fitted detector.
        """
        X = self._validate_embeddings(X, reset=True)
        n_images, n_channels = X.shape[:2]
        self._check_n_samples(n_images, 2, type(self).__name__)
        for attribute in _STREAM + ("n_patches_seen_",):
            self.__dict__.pop(attribute, None)
        n_positions = X.shape[2] * X.shape[3]
        rng = check_random_state(self.random_state)
        device = resolve_device(self.device)
        with torch.inference_mode():
            lof = None
            self.lof_threshold_ = None
            if self.denoising == "lof":
                lof, threshold, keep = self._denoise(X, device)
                self.lof_threshold_ = float(threshold)
                candidates = np.flatnonzero(to_numpy(keep).ravel())
            else:
                candidates = np.arange(n_images * n_positions)
            store_ids = self._draw_store(X, candidates, rng)
            images = store_ids // n_positions
            store = np.ascontiguousarray(_memory_bank.patch_rows(X, store_ids), dtype=np.float32)
            picks = self._select_coreset(store, rng, device)
            self.memory_bank_ = store[picks]
            del store
            self.memory_weights_ = None
            if lof is not None:
                self.memory_weights_ = to_numpy(lof.flatten()[torch.as_tensor(store_ids[picks])]).astype(
                    np.float32
                )
            self.n_patches_seen_ = n_images * n_positions
            self._n_images_seen = n_images  # a partial_fit after fit counts on from here
            self.n_patches_stored_ = len(store_ids)
            groups = images[picks] if self.calibration == "leave-one-out" else None
            self._train_scores = self._anomaly_scores(X, groups=groups)
        self._set_offset(self._train_scores)
        return self

    def _select_coreset(self, store, rng, device):
        """Indices (pick order) of the greedy coreset of ``coreset_ratio`` of ``store``."""
        n_memory = max(1, math.ceil(self.coreset_ratio * len(store)))
        if n_memory >= len(store):
            return np.arange(len(store))
        picks = _memory_bank.greedy_coreset(
            store, n_memory, projection_dim=self.projection_dim, random_state=rng, device=device
        )
        return to_numpy(picks)

    @_fit_context(prefer_skip_nested_validation=True)
    def partial_fit(self, X, y=None):
        """Add a batch of normal images to the store; the coreset is selected on first use.

        Streaming (see :func:`skpatch.fit_in_batches`): each batch's patches
        enter a uniform random sample of at most ``max_patches`` of all the
        patches seen (the store, kept by reservoir sampling), so memory does
        not grow with the number of images. The coreset, the memory bank and
        ``offset_`` are computed from the store when first needed after the
        last call; the store is then freed. While every patch fits in the
        store, :meth:`fit` on all the images at once gives the same model as
        one or several calls of :meth:`partial_fit` (``offset_`` included
        while they are at most 32 images, see Notes).

        Parameters
        ----------
        X : ndarray of shape (n, C, h, w) or (n, d)
            Patch embeddings of a batch of normal images.
        y : None
            Ignored.

        Returns
        -------
        self : PatchCoreDetector
            The updated detector.
        """
        if self.denoising is not None:
            raise ValueError(
                f"denoising={self.denoising!r} compares every training image's patches at "
                "each position, which needs all the images at once: use fit, not "
                "partial_fit or fit_in_batches."
            )
        first = not hasattr(self, "n_patches_seen_")
        X = self._validate_embeddings(X, reset=first)
        if first:
            for attribute in _STREAM + _LAZY:
                self.__dict__.pop(attribute, None)
            self.n_patches_seen_ = 0
            self._n_images_seen = 0
        elif "_store" not in self.__dict__:
            self._restart_store()
        self._add_to_store(X)
        self._sample_for_calibration(X)
        self._n_images_seen += len(X)
        # The model changed: the coreset and offset_ are recomputed on first use.
        for attribute in _LAZY:
            self.__dict__.pop(attribute, None)
        return self

    def _stream_rng(self, stream, n_offered):
        """Generator for one partial_fit call's draws, reproducible across calls."""
        seed = check_random_state(self.random_state).randint(2**31)
        return np.random.default_rng([seed, stream, n_offered])

    def _restart_store(self):
        """Continue a finalized model (fit, loaded, or already used) from its memory bank.

        The bank's items stand for the patches seen before (each of those is
        within the coreset radius of an item): they enter the new store as
        the first patches offered to it.
        """
        bank = self.memory_bank_
        self._store = np.array(bank, dtype=np.float32)
        self._store_groups = np.full(len(bank), -1, dtype=np.int64)  # no training image
        self._n_stored = self._n_offered = len(bank)
        self._n_images_seen = self.__dict__.get("_n_images_seen", 0)
        self.__dict__.pop("_calibration_sample", None)
        for attribute in _LAZY:
            self.__dict__.pop(attribute, None)

    def _add_to_store(self, X):
        """Reservoir-sample the patches of ``X`` into the store (vectorized per batch)."""
        n_images, n_channels = X.shape[:2]
        n_positions = X.shape[2] * X.shape[3]
        n_new = n_images * n_positions
        store = self.__dict__.get("_store")
        n_stored = self.__dict__.get("_n_stored", 0)
        capacity = math.inf if self.max_patches is None else self.max_patches
        n_offered = self.__dict__.get("_n_offered", 0)
        rng = self._stream_rng(0, n_offered)
        positions, slots = _memory_bank.reservoir_slots(n_offered, n_new, capacity, rng)
        new_size = max(n_stored, int(slots[-1]) + 1 if len(slots) else 0)
        if store is None or new_size > len(store):
            # With max_patches, one allocation of the whole store: pages of
            # np.empty that are never written take no physical memory.
            # Without, geometric growth.
            if self.max_patches is not None:
                size = max(self.max_patches, new_size)
            else:
                size = max(new_size, 2 * len(store)) if store is not None else new_size
            grown = np.empty((size, n_channels), dtype=np.float32)
            groups = np.empty(size, dtype=np.int64)
            if store is not None:
                grown[:n_stored] = store[:n_stored]
                groups[:n_stored] = self._store_groups[:n_stored]
            store, self._store_groups = grown, groups
        store[slots] = _memory_bank.patch_rows(X, positions)
        self._store_groups[slots] = self._n_images_seen + positions // n_positions
        self._store = store
        self._n_stored = new_size
        self._n_offered = n_offered + n_new
        self.n_patches_seen_ += n_new

    def _sample_for_calibration(self, X):
        """Uniform reservoir sample of at most 32 of the streamed images, for ``offset_``."""
        sample = self.__dict__.get("_calibration_sample")
        if sample is None:
            sample = _memory_bank.channels_last_empty((0, *X.shape[1:]), np.float32)
            ids = np.empty(0, dtype=np.int64)
            offered = 0
        else:
            ids, offered = self._calibration_ids, self._calibration_offered
        rng = self._stream_rng(1, offered)
        positions, slots = _memory_bank.reservoir_slots(offered, len(X), _CALIBRATION_SIZE, rng)
        sample = _memory_bank.fill_reservoir(sample, X, positions, slots)
        if len(sample) > len(ids):
            ids = np.concatenate([ids, np.empty(len(sample) - len(ids), dtype=np.int64)])
        ids[slots] = self._n_images_seen + positions
        self._calibration_sample, self._calibration_ids = sample, ids
        self._calibration_offered = offered + len(X)

    def _can_finalize(self):
        """Whether the store makes a model: 2 images, or 1 after a restart from a bank."""
        restarted = (self._store_groups[: self._n_stored] < 0).any()
        return restarted or self._n_images_seen >= 2

    def _finalize(self):
        """Coreset, memory bank and ``offset_`` from the store; frees the store."""
        if not self._can_finalize():  # checked first: the stream stays whole
            self._check_n_samples(self._n_images_seen, 2, type(self).__name__)
        state = self.__dict__
        store = state.pop("_store")[: self._n_stored]
        store_groups = state.pop("_store_groups")[: self._n_stored]
        sample, ids = state.pop("_calibration_sample"), state.pop("_calibration_ids")
        for attribute in ("_n_stored", "_n_offered", "_calibration_offered"):
            state.pop(attribute, None)
        device = resolve_device(self.device)
        with torch.inference_mode():
            picks = self._select_coreset(store, check_random_state(self.random_state), device)
            self.memory_bank_ = store[picks]
            self.memory_weights_ = None
            self.lof_threshold_ = None
            self.n_patches_stored_ = len(store)
            del store
            loo = self.calibration == "leave-one-out"
            self._train_scores = self._anomaly_scores(
                sample, groups=store_groups[picks] if loo else None, image_ids=ids
            )
        self._set_offset(self._train_scores)

    def __getattr__(self, name):
        # Called only for attributes not set: after partial_fit, the coreset,
        # the memory bank and offset_ are computed once, when first needed, so
        # that the greedy selection runs once on the final store.
        if name in _LAZY and "_store" in self.__dict__ and self._can_finalize():
            self._finalize()
            return self.__dict__[name]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __getstate__(self):
        if "_store" not in self.__dict__ or not self._can_finalize():
            # No model yet (one image): the stream itself is saved, the rows
            # of the store filled only (it is allocated whole, max_patches
            # rows, and grows again as the stream goes on).
            state = dict(super().__getstate__())  # a copy of the live __dict__
            if "_store" in state:
                state["_store"] = state["_store"][: self._n_stored]
                state["_store_groups"] = state["_store_groups"][: self._n_stored]
            return state
        # Save the coreset, not the store. It is selected on a shallow copy,
        # as this detector's stream may go on from its store after a
        # checkpoint, and kept: until the next partial_fit this detector
        # scores with the model saved, without selecting it again.
        if any(name not in self.__dict__ for name in _LAZY):
            finalized = object.__new__(type(self))
            finalized.__dict__.update(self.__dict__)
            # its own RandomState instance: the selection must not advance
            # the one this detector's stream draws from
            finalized.random_state = copy.deepcopy(self.random_state)
            finalized._finalize()
            self.__dict__.update({name: finalized.__dict__[name] for name in _LAZY})
        state = super().__getstate__()
        return {key: value for key, value in state.items() if key not in _STORE}

    # ------------------------------------------------------------------ scoring
    def _check_scorable(self):
        super()._check_scorable()
        if "_store" in self.__dict__ and not self._can_finalize():
            self._check_n_samples(self._n_images_seen, 2, type(self).__name__)

    def _bank(self, device):
        return self._fitted_tensor("memory_bank_", device), self._fitted_tensor(
            "memory_weights_", device
        )

    def _score_chunk(self, x, query_groups=None, bank_groups=None):
        """``(patch scores (b, h, w), image scores (b,))`` of a chunk of embeddings."""
        bank, weights = self._bank(x.device)
        patches = _patches(x.to(bank.dtype))
        if query_groups is not None:
            query_groups = query_groups.repeat_interleave(x.shape[2] * x.shape[3])
        dist, idx = _memory_bank.nearest_neighbors(
            patches, bank, 1, query_groups=query_groups, bank_groups=bank_groups
        )
        dist, idx = dist[:, 0], idx[:, 0]
        if query_groups is not None:
            # a patch with no item outside its own image keeps its in-sample distance
            missing = torch.isinf(dist)
            if missing.any():
                d_in, i_in = _memory_bank.nearest_neighbors(patches[missing], bank, 1)
                dist[missing], idx[missing] = d_in[:, 0], i_in[:, 0]
        if weights is not None:
            dist = dist * weights[idx]
        n_images = len(x)
        grid = dist.view(n_images, -1)
        best = grid.argmax(dim=1)
        top = grid.gather(1, best[:, None])[:, 0]
        rows = torch.arange(n_images, device=x.device) * grid.shape[1] + best
        image_scores = self._reweight(top, patches[rows], idx[rows])
        return grid.view(n_images, *x.shape[2:]), image_scores

    def _reweight(self, top, patch, nearest):
        """PatchCore eq. (7): ``s*`` of the patches ``patch``, whose nearest memory items are ``nearest``."""
        bank = self._fitted_tensor("memory_bank_", top.device)
        b = min(self.n_reweight, len(bank))
        if b == 1 or tuple(self.grid_shape_) == (1, 1):
            return top
        # m* and its b nearest memory items (m* first)
        _, support = _memory_bank.nearest_neighbors(bank[nearest], bank, b)
        support[:, 0] = nearest  # m* itself, also when duplicates tie with it
        distances = torch.linalg.vector_norm(patch.unsqueeze(1) - bank[support], dim=2)
        return (1 - torch.softmax(distances, dim=1)[:, 0]) * top

    def _patch_scores(self, x):
        return self._score_chunk(x)[0]

    def _image_scores(self, x, patch_scores=None, query_groups=None, bank_groups=None):
        """Image scores; on the CPU without memory weights, only the patches that can be the largest are searched."""
        bank, weights = self._bank(x.device)
        # The weights break the pruned search's bound; on a GPU the full
        # search is the one measured (0.13 ms per image on an H100), the
        # pruned one, with its synchronizations, is not.
        if weights is not None or x.device.type != "cpu":
            return self._score_chunk(x, query_groups, bank_groups)[1]
        patches = _patches(x.to(bank.dtype)).view(len(x), -1, bank.shape[1])
        top, best, nearest = _memory_bank.largest_nearest_distance(
            patches, bank, query_groups=query_groups, bank_groups=bank_groups
        )
        return self._reweight(top, patches[torch.arange(len(x), device=x.device), best], nearest)

    def _anomaly_scores(self, X, patch_scores=None, groups=None, image_ids=None):
        """Image anomaly scores; ``groups`` (source image of each memory item) leaves images out.

        ``image_ids`` are the training-image numbers of the rows of ``X``
        (default: ``0 .. n - 1``), matched against ``groups``.
        """
        device = resolve_device(self.device)
        bank_groups = None if groups is None else torch.as_tensor(groups, device=device)
        ids = None if image_ids is None else torch.as_tensor(image_ids, device=device)
        scores = self._empty_scores(X)
        with torch.inference_mode():
            for batch, x in self._iter_chunks(X, device):
                query_groups = None
                if bank_groups is not None and ids is not None:
                    query_groups = ids[batch]
                elif bank_groups is not None:
                    query_groups = torch.arange(batch.start, batch.stop, device=device)
                scores[batch] = to_numpy(self._image_scores(x, None, query_groups, bank_groups))
        return scores


def make_patchcore_pipeline(
    backbone="efficientnet_lite0", *, embedder_params=None, memory=None, **detector_params
):
    """The PatchCore pipeline: locally aware patch features and a coreset memory bank.

    Builds ``make_pipeline(PatchEmbedder(...), PatchCoreDetector(...))`` with
    the features of PatchCore §3.1: the two middle stages of the backbone
    (the last two of its default stages: ``layer2`` + ``layer3`` of a
    ResNet, ``stage2`` + ``stage4`` of EfficientNet-Lite, strides 8 and 16),
    each ``3 x 3`` average-pooled (``pool_size=3``, the paper's ``p = 3``),
    upsampled to the larger map and concatenated.

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
        embeddings of the training images between fits.
    **detector_params : dict
        Parameters of :class:`PatchCoreDetector` (``coreset_ratio``,
        ``max_patches``, ``random_state``, ...).

    Returns
    -------
    pipeline : sklearn.pipeline.Pipeline
        Steps ``"patchembedder"`` and ``"patchcoredetector"``.

    See Also
    --------
    PatchCoreDetector : The detector.
    PatchEmbedder : The embedder.

    Examples
    --------
    >>> import numpy as np
    >>> from skpatch import make_patchcore_pipeline
    >>> pipe = make_patchcore_pipeline(
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
        locally_aware_embedder(backbone, embedder_params), PatchCoreDetector(**detector_params), memory=memory
    )
