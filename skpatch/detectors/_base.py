"""Estimator plumbing shared by every patch detector.

A detector maps patch embeddings ``(n, C, h, w)`` to a patch-score grid
``(n, h, w)`` (its method, :meth:`_patch_scores`); this base class turns that
grid into anomaly maps (upsample + Gaussian blur), image scores (max of the
map), and scikit-learn's outlier interface (``score_samples``,
``decision_function``, ``predict``, ``offset_`` from ``contamination``).

A 2-D input ``(n, d)`` is a grid of one patch, ``(n, d, 1, 1)``: the image score
is then the patch score and every detector is an ordinary tabular outlier
detector, which scikit-learn's common checks exercise.
"""

import functools
import math
import warnings
import weakref
from abc import abstractmethod
from numbers import Integral, Real

import numpy as np
import torch
from sklearn.base import BaseEstimator, OutlierMixin
from sklearn.utils import check_random_state, gen_batches
from sklearn.utils._chunking import get_chunk_n_rows
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import (
    assert_all_finite,
    check_array,
    check_is_fitted,
    validate_data,
)

from .. import _gaussian
from .._maps import check_size, map_size_tuple, postprocess
from .._torch_utils import (
    all_finite,
    as_tensor,
    canonical_device,
    cpu_fallback_state,
    is_view_on,
    numpy_dtype,
    oom_advice,
    overflow_advice,
    resolve_device,
    to_numpy,
)
from ..exceptions import DegenerateTrainingSetWarning


# Public methods whose out-of-memory errors get advice (see __init_subclass__).
_OOM_METHODS = (
    "fit", "partial_fit", "score_samples", "decision_function", "predict", "anomaly_map"
)


# Detector -> {(name, device): (fitted arrays, tensors made from them)}.
_DEVICE_COPIES = weakref.WeakKeyDictionary()


def _with_oom_advice(method):
    """Wrap a detector method so that running out of memory says what to change."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with oom_advice(f"{type(self).__name__}.{method.__name__}", self._oom_advice):
            return method(self, *args, **kwargs)

    return wrapper


def _check_finite(X):
    """Raise scikit-learn's error if the tensor ``X`` holds a NaN or an infinity."""
    if not all_finite(X):
        what = "NaN" if bool(torch.isnan(X).any()) else "infinity"
        raise ValueError(f"Input X contains {what}.")


class BasePatchDetector(OutlierMixin, BaseEstimator):
    """Base class of the patch detectors (not for direct use).

    Subclasses implement ``fit`` and ``_patch_scores(x)`` and may override
    ``_image_scores`` when their paper defines another image score than the
    maximum of the map, and ``_bytes_per_image`` to size the scoring chunks.

    The public methods of every subclass (``fit``, ``partial_fit``,
    ``score_samples``, ``anomaly_map``, ...) are wrapped on class creation so
    that a CUDA (or CPU) out-of-memory error is re-raised, same type, with
    advice (``_oom_advice``, which a subclass may extend) instead of only the
    allocator's message, as scikit-learn wraps ``transform`` for
    ``set_output``.
    """

    _oom_advice = (
        "To use less memory: lower scikit-learn's working_memory (e.g. "
        "sklearn.set_config(working_memory=256), in MiB), which bounds the images "
        "processed at once; keep fewer embedding channels (n_features, or fewer "
        "PatchEmbedder layers) or a coarser patch grid (a smaller PatchEmbedder "
        "image_size / crop_size); pass fewer images per call (and a smaller "
        "PatchEmbedder batch_size); or use device='cpu'."
    )

    # How the patch-score grid is resized to the map: PaDiM §IV-B's bicubic;
    # a detector whose paper says otherwise sets its own.
    _map_interpolation = "bicubic"

    _parameter_constraints = {
        "map_size": [Interval(Integral, 1, None, closed="left"), tuple, list, None],
        "sigma": [Interval(Real, 0, None, closed="left")],
        "contamination": [Interval(Real, 0, 0.5, closed="right")],
        "device": [str],
    }

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        for name in _OOM_METHODS:
            if name in cls.__dict__:
                setattr(cls, name, _with_oom_advice(cls.__dict__[name]))

    def __setstate__(self, state):
        # A detector saved with device="cuda" loads on a CPU-only machine.
        super().__setstate__(cpu_fallback_state(state, type(self).__name__))

    def _on_device(self, key, device, sources, build, keep=False):
        """``build()``, tensors made on ``device`` from the fitted arrays ``sources``, once.

        On a GPU, copying the fitted statistics at every call would cost more
        than the scoring itself (PaDiM's precision factors are hundreds of
        MB). The copies are kept while the attributes hold the same arrays
        (a refit makes new ones), outside the estimator's ``__dict__`` (never
        saved or cloned; predict leaves the estimator unchanged); on the
        CPU, tensors share the arrays' memory and nothing is kept, unless
        ``keep``: tensors computed from the arrays, at a cost.
        """
        if torch.device(device).type == "cpu" and not keep:
            return build()
        copies = _DEVICE_COPIES.setdefault(self, {})
        # "cuda" at fit and "cuda:0" (a tensor's device) at scoring: one copy
        key = (key, str(canonical_device(device)))
        kept = copies.get(key)
        if kept is None or len(kept[0]) != len(sources) or any(
            ref() is not a for ref, a in zip(kept[0], sources)
        ):
            # weak references: arrays a refit replaced are not held on to
            kept = copies[key] = (tuple(weakref.ref(a) for a in sources), build())
        return kept[1]

    def _fitted_tensor(self, name, device):
        """The fitted array ``name`` (or None) as a tensor on ``device``; see :meth:`_on_device`."""
        array = getattr(self, name)
        if array is None:
            return None
        return self._on_device(name, device, (array,), lambda: as_tensor(array, device))

    def _fitted_shift(self, center_name, chol_name, device):
        """``-c U`` (:func:`~skpatch._gaussian.whitened_centers`) of two fitted arrays, kept.

        Computed once per fit on every device (a pass over the ``(P, d,
        d)`` factors at every call cost 12 ms for PaDiM's, 1.5 ms per image
        of a batch of 8), and recomputed when the arrays are replaced.
        """
        center, chol = getattr(self, center_name), getattr(self, chol_name)
        return self._on_device(
            ("shift", center_name, chol_name), device, (center, chol),
            lambda: _gaussian.whitened_centers(as_tensor(center, device), as_tensor(chol, device)),
            keep=True,
        )

    def _validate_params(self):
        # and what the constraints cannot say: the pair map_size holds, a device torch knows
        super()._validate_params()
        check_size(self.map_size, "map_size")
        resolve_device(self.device)

    # ------------------------------------------------------------------ input
    def _validate_embeddings(self, X, *, reset, keep_tensor=False):
        """Check ``X`` and return it as ``(n, C, h, w)`` floats.

        ``reset=True`` records ``n_features_in_`` (C) and ``grid_shape_``
        (h, w); otherwise ``X`` must match them. A torch tensor (from
        ``PatchEmbedder(output="torch")``) stays one, on its device, when
        ``keep_tensor=True`` (scoring); otherwise it becomes a NumPy array.
        """
        if torch.is_tensor(X):
            if keep_tensor:
                return self._validate_tensor(X, reset=reset)
            X = to_numpy(X)
        ndim = X.ndim if hasattr(X, "ndim") else np.asarray(X).ndim
        dtype = [np.float64, np.float32]
        if ndim == 2 or ndim < 2:
            # validate_data raises scikit-learn's usual errors (1-D, sparse, n_features).
            X = validate_data(self, X, reset=reset, dtype=dtype)
            X = X[:, :, None, None]
        elif ndim == 4:
            in_dtype = X.dtype if hasattr(X, "dtype") else np.asarray(X).dtype
            if in_dtype.kind in "biu":
                # Embeddings are floats; 4-D integers are images (n, H, W, 3).
                raise ValueError(
                    f"X has shape {np.shape(X)} and dtype {in_dtype}: this looks "
                    "like images, not patch embeddings. Embed images first, e.g. "
                    f"make_pipeline(PatchEmbedder(), {type(self).__name__}())."
                )
            # Finiteness is checked by torch on every core: NumPy's one-core sum,
            # which check_array runs, cost 17 ms per 64 ELPV embeddings (5 ms).
            X = check_array(
                X, allow_nd=True, dtype=dtype, estimator=self, ensure_all_finite=False
            )
            if is_view_on(X, "cpu"):
                _check_finite(torch.from_numpy(X))
            else:  # read-only (a memory map): torch would warn, NumPy reads it as is
                assert_all_finite(X, estimator_name=type(self).__name__, input_name="X")
            if 0 in X.shape[1:]:
                raise ValueError(
                    f"X has shape {X.shape}: patch embeddings (n, C, h, w) need at least one "
                    "channel and a non-empty grid."
                )
            self._check_features(X.shape[1], reset)
        else:
            raise ValueError(
                f"X has shape {np.shape(X)}: expected patch embeddings (n, C, h, w) from "
                "PatchEmbedder, or a 2-D array (n, d) of one patch per sample."
            )
        grid = tuple(X.shape[2:])
        if reset:
            self.grid_shape_ = grid
        else:
            self._check_grid(grid)
        return X

    def _validate_tensor(self, X, *, reset):
        """:meth:`_validate_embeddings` of a tensor, which stays on its device."""
        if X.ndim == 2:
            X = X[:, :, None, None]
        if X.ndim != 4 or 0 in X.shape:
            raise ValueError(
                f"X has shape {tuple(X.shape)}: expected patch embeddings (n, C, h, w) from "
                "PatchEmbedder, or a 2-D array (n, d) of one patch per sample."
            )
        if not X.is_floating_point():
            raise ValueError(f"X has dtype {X.dtype}: patch embeddings are floats.")
        if X.dtype not in (torch.float32, torch.float64):
            X = X.float()  # half precision: score in float32
        _check_finite(X)
        self._check_features(X.shape[1], reset)
        if reset:
            self.grid_shape_ = tuple(X.shape[2:])
        else:
            self._check_grid(tuple(X.shape[2:]))
        return X.detach()

    def _check_features(self, n_features, reset):
        if reset:
            self.n_features_in_ = n_features
            # column names of an earlier 2-D fit no longer apply (validate_data's reset)
            self.__dict__.pop("feature_names_in_", None)
        elif n_features != self.n_features_in_:
            raise ValueError(
                f"X has {n_features} features, but {type(self).__name__} is expecting "
                f"{self.n_features_in_} features as input."
            )

    def _check_grid(self, grid):
        if grid != tuple(self.grid_shape_):
            raise ValueError(
                f"X has a {grid[0]}x{grid[1]} grid of patches but {type(self).__name__} was "
                f"fitted on a {self.grid_shape_[0]}x{self.grid_shape_[1]} grid (by fit, or "
                "by the earlier batches of partial_fit): embed every image, training and "
                "test, with the same PatchEmbedder settings (image_size, crop_size, "
                "layers); images of another size need an image_size that resizes them."
            )

    @staticmethod
    def _check_n_samples(n_samples, minimum, name):
        if n_samples < minimum:
            raise ValueError(
                f"{name} needs at least {minimum} samples (training images), got "
                f"{n_samples} sample{'s' if n_samples != 1 else ''}."
            )

    def _calibrates_out_of_sample(self, n_images):
        """Whether ``offset_`` is set on scores of models fitted without the image.

        True unless ``calibration="in-sample"`` or there are fewer than 3
        training images: a model without one of 2 images would be fitted on
        one. That fallback to in-sample scores is warned of, as it flags more
        new normal images than ``contamination``.
        """
        if self.calibration == "in-sample":
            return False
        if n_images >= 3:
            return True
        warnings.warn(
            f"{type(self).__name__} has {n_images} training images: "
            f"calibration={self.calibration!r} needs at least 3, so offset_ is the "
            "quantile of the in-sample scores, which flags more new normal images "
            "than contamination. Fit on more images.",
            DegenerateTrainingSetWarning,
            stacklevel=3,
        )
        return False

    # ------------------------------------------------------------------ chunks
    def _bytes_per_image(self, X, device):
        """Working memory of one image scored on ``device`` (override for heavier methods)."""
        return 4 * math.prod(X.shape[1:]) * X.itemsize

    @staticmethod
    def _copy_bytes(X, device, dtype=None):
        """Bytes per image of the copies a chunk of ``X`` costs: to ``device`` and to ``dtype``.

        :func:`as_tensor` copies unless ``X`` can be viewed on ``device``
        (:func:`is_view_on`); ``x.to(dtype)`` copies unless ``dtype`` is
        None or already ``X``'s.
        """
        in_dtype = as_tensor(X[:0], "cpu").dtype
        n_values = math.prod(X.shape[1:])
        copied = 0 if is_view_on(X, device) else n_values * in_dtype.itemsize
        if dtype not in (None, in_dtype):
            copied += n_values * dtype.itemsize
        return copied

    # Images per scoring chunk, at most (see _iter_chunks).
    _SCORE_CHUNK = 32

    def _iter_chunks(self, X, device, max_rows=None, row_bytes=None):
        """Yield ``(slice, tensor on device)`` chunks sized by ``sklearn.get_config()['working_memory']``.

        At most ``max_rows`` images per chunk (default ``_SCORE_CHUNK``):
        scoring's batched products are efficient from a few dozen images on,
        and larger chunks only add memory. PaDiM's running sums take more
        (its ``_MOMENT_CHUNK``). ``row_bytes``: the working memory of one
        image (default :meth:`_bytes_per_image`); 0 sizes the chunks by
        ``max_rows`` alone.
        """
        max_rows = min(len(X), self._SCORE_CHUNK if max_rows is None else max_rows)
        row_bytes = self._bytes_per_image(X, device) if row_bytes is None else row_bytes
        chunk = max_rows
        if row_bytes:
            chunk = get_chunk_n_rows(row_bytes=row_bytes, max_n_rows=max_rows)
        for batch in gen_batches(len(X), chunk):
            yield batch, as_tensor(X[batch], device)

    # ------------------------------------------------------------------ scores
    @abstractmethod
    def _patch_scores(self, x):
        """Patch anomaly scores ``(n, h, w)`` of embeddings ``x (n, C, h, w)`` (tensors)."""

    def _maps(self, x):
        """Anomaly maps of a chunk of embeddings: scores, upsampled and blurred."""
        return postprocess(
            self._patch_scores(x), map_size_tuple(self.map_size), self.sigma, self._map_interpolation
        )

    def _image_scores(self, x, patch_scores=None):
        """Image anomaly scores of a chunk: the maximum of the anomaly map (PaDiM §III-C).

        ``patch_scores`` (a callable like :meth:`_patch_scores`) scores with
        another model than the fitted one, e.g. for out-of-fold calibration.
        """
        grid = (patch_scores or self._patch_scores)(x)
        if x.shape[-2:] == (1, 1):
            # A one-patch grid gives a constant map: its maximum is the patch score.
            return grid.flatten(1).amax(dim=1)
        maps = postprocess(grid, map_size_tuple(self.map_size), self.sigma, self._map_interpolation)
        return maps.flatten(1).amax(dim=1)

    @staticmethod
    def _empty_scores(X):
        """Image-score array for embeddings ``X`` (array or tensor): of their dtype."""
        return np.empty(len(X), numpy_dtype(X.dtype))

    def _anomaly_scores(self, X, patch_scores=None):
        """Image anomaly scores (higher = more anomalous) of validated embeddings."""
        device = resolve_device(self.device)
        scores = self._empty_scores(X)
        with torch.inference_mode():
            for batch, x in self._iter_chunks(X, device):
                scores[batch] = to_numpy(self._image_scores(x, patch_scores))
        return scores

    def _check_not_nan(self, scores, X):
        """Raise instead of returning NaN scores, which ``predict`` would call normal.

        NaN comes from overflow (finite input is checked), e.g. float32
        embeddings near 1e19 and beyond, whose squares are infinite.
        """
        nan = np.isnan(scores.reshape(len(scores), -1)).any(axis=1)
        if nan.any():
            largest = float(abs(X[np.flatnonzero(nan)]).max())
            raise ValueError(
                f"{type(self).__name__} computed NaN anomaly scores for {int(nan.sum())} "
                f"image(s) (the first is X[{int(np.flatnonzero(nan)[0])}]): their embeddings "
                f"(largest |value| {largest:.3g}) overflow {X.dtype} arithmetic. Check the "
                f"embeddings, or {overflow_advice(X.dtype)}."
            )

    def _set_offset(self, anomaly_scores):
        """``offset_``: the ``contamination`` quantile of the training ``score_samples``."""
        with np.errstate(invalid="ignore"):  # inf - inf: reported below
            offset = float(np.percentile(-anomaly_scores, 100.0 * self.contamination))
        if np.isnan(offset) or np.isnan(anomaly_scores).any():
            # A NaN threshold would make predict call every image normal.
            raise ValueError(
                f"{type(self).__name__} computed NaN (or too many infinite) anomaly scores "
                "for training images: the embeddings overflow their dtype's arithmetic. "
                f"Check the embeddings, or {overflow_advice(anomaly_scores.dtype)}."
            )
        self.offset_ = offset

    def _check_scorable(self):
        check_is_fitted(self)

    @_with_oom_advice
    def anomaly_map(self, X):
        """Anomaly maps: patch scores upsampled to ``map_size`` and blurred.

        Parameters
        ----------
        X : ndarray of shape (n, C, h, w) or (n, d)
            Patch embeddings (output of :class:`~skpatch.PatchEmbedder`).

        Returns
        -------
        maps : ndarray of shape (n, H, W)
            Anomaly scores per pixel, higher = more anomalous; ``(H, W)`` is
            ``map_size`` (the grid size when ``map_size=None``).
        """
        self._check_scorable()
        X = self._validate_embeddings(X, reset=False, keep_tensor=True)
        device = resolve_device(self.device)
        out = None
        with torch.inference_mode():
            for batch, x in self._iter_chunks(X, device):
                maps = to_numpy(self._maps(x))
                if out is None:
                    out = np.empty((len(X), *maps.shape[1:]), dtype=maps.dtype)
                out[batch] = maps
        self._check_not_nan(out, X)
        return out

    @_with_oom_advice
    def score_samples(self, X):
        """Opposite of the image anomaly score: higher means more normal.

        Parameters
        ----------
        X : ndarray of shape (n, C, h, w) or (n, d)
            Patch embeddings.

        Returns
        -------
        scores : ndarray of shape (n,)
            Minus the maximum of each anomaly map (scikit-learn's convention
            for outlier detectors).
        """
        self._check_scorable()
        X = self._validate_embeddings(X, reset=False, keep_tensor=True)
        scores = self._anomaly_scores(X)
        self._check_not_nan(scores, X)
        return -scores

    @_with_oom_advice
    def decision_function(self, X):
        """``score_samples(X) - offset_``: negative for outliers.

        Parameters
        ----------
        X : ndarray of shape (n, C, h, w) or (n, d)
            Patch embeddings.

        Returns
        -------
        decision : ndarray of shape (n,)
            Shifted scores; the threshold is 0.
        """
        return self.score_samples(X) - self.offset_

    @_with_oom_advice
    def predict(self, X):
        """Label images: +1 normal, -1 anomalous.

        Parameters
        ----------
        X : ndarray of shape (n, C, h, w) or (n, d)
            Patch embeddings.

        Returns
        -------
        labels : ndarray of shape (n,)
            +1 for inliers, -1 for outliers.
        """
        return np.where(self.decision_function(X) < 0, -1, 1)


class BaseGaussianDetector(BasePatchDetector):
    """Base of the detectors with one Gaussian per position (PaDiM, RPaDiM).

    Shares the random channel subset (PaDiM §III-A), the regularized
    covariance and its Cholesky factor (eq. 1) and the batched Mahalanobis
    patch scores (eq. 2). Subclasses estimate the center and scatter (the
    mean for PaDiM, the geometric median for RPaDiM) and name the fitted
    center and precision factor in ``_scoring_state``.
    """

    # Every chunk reads all the (P, d, d) precision factors (125 MB for
    # PaDiM's default): 64 images share that read. PaDiM's score_samples on
    # 64 ELPV embeddings, 8 alternating passes: medians 1.78 ms/img in chunks
    # of 32, 1.66 in one of 64; against the previous tree, in two pairs of
    # processes, 1.45-1.80 -> 1.15-1.39 while the host was slow and
    # 1.05-1.15 -> 1.01-1.11 while it was fast.
    _SCORE_CHUNK = 64

    _parameter_constraints = {
        **BasePatchDetector._parameter_constraints,
        "n_features": [Interval(Integral, 1, None, closed="left"), None],
        "epsilon": [Interval(Real, 0, None, closed="left")],
        "calibration": [StrOptions({"leave-one-out", "in-sample"})],
        "random_state": ["random_state"],
    }

    def _select_features(self, n_channels):
        if self.n_features is None:
            return np.arange(n_channels)
        if self.n_features > n_channels:
            raise ValueError(
                f"n_features={self.n_features} exceeds the {n_channels} channels of the "
                "embeddings; choose n_features <= n_channels or None."
            )
        rng = check_random_state(self.random_state)
        return np.sort(rng.choice(n_channels, self.n_features, replace=False))

    @staticmethod
    def _positions(x):
        """Embeddings ``(b, C, h, w)`` -> their position-major ``(P, b, C)`` view.

        No copy for channels-last embeddings (the embedder's) and NCHW ones
        alike; the kernels of :mod:`skpatch._gaussian` gather the selected
        channels (:meth:`_channel_index`) block by block.
        """
        return x.flatten(2).transpose(1, 2).transpose(0, 1)

    def _channel_index(self, device):
        """The selected channels (``feature_indices_``) as a tensor on ``device``."""
        return torch.as_tensor(self.feature_indices_, device=device)

    def _bytes_per_image(self, X, device):
        # The chunk's copies; the whitened channels of a block of positions
        # and their product (position_blocks: a block of _POSITION_BLOCK on a
        # CPU, every position on a GPU); the distances and their grid; the
        # maps. 4 P d values per image cut 64 test images of Wide-ResNet-50-2
        # at Rd 550 in two chunks on a CPU, each a pass over the 3.8 GB of
        # precision factors: 1.26-1.35 s against 1.14-1.19 s in one.
        dtype = as_tensor(getattr(self, self._scoring_state[0])[:0], "cpu").dtype
        n_positions = X.shape[2] * X.shape[3]
        blocked = n_positions
        if torch.device(device).type == "cpu":
            blocked = min(n_positions, _gaussian._POSITION_BLOCK)
        map_values = math.prod(map_size_tuple(self.map_size) or self.grid_shape_)
        n_values = 2 * blocked * len(self.feature_indices_) + 2 * n_positions + 2 * map_values
        return self._copy_bytes(X, device, dtype) + n_values * dtype.itemsize

    def _whitening(self, moments, epsilon=None):
        """``(center, precision Cholesky factor)`` of ``(count, center, scatter)``.

        PaDiM eq. (1) (``scatter / (N - 1) + εI``), then the Cholesky factor.
        ``count`` is a number, or a ``(P, 1, 1)`` tensor of per-position
        counts (RPaDiM keeps a different number of patches at each position).
        ``epsilon`` is the ridge ``ε``; None uses the ``epsilon`` parameter.
        """
        count, center, scatter = moments
        self._warn_degenerate(count, center, scatter)
        if epsilon is None:
            epsilon = self.epsilon
        covariance = _gaussian.regularized_covariance(scatter, count, epsilon)
        return center, _gaussian.precision_cholesky(covariance, overwrite=True)

    def _warn_degenerate(self, count, center, scatter):
        """Warn when the covariances come from ``epsilon`` rather than the data.

        The sample covariance of ``N`` patches has rank ``N - 1`` at most; when
        that is below half the dimension ``d``, most directions of every
        covariance are ``εI`` alone. (Streamed fits warn at every
        :meth:`partial_fit` while the count is that low.)
        """
        name, d = type(self).__name__, scatter.shape[-1]
        counts = count if torch.is_tensor(count) else torch.tensor(float(count))
        # "Identical" up to rounding: an iterated center (RPaDiM's median) is
        # a few ulps off, so the scatter is not exactly 0.
        spread = 100 * torch.finfo(scatter.dtype).eps * float(center.abs().max())
        largest_scatter = float(scatter.diagonal(dim1=-2, dim2=-1).max())
        if math.sqrt(max(largest_scatter, 0.0)) <= math.sqrt(float(counts.max())) * spread:
            warnings.warn(
                f"{name} was fitted on identical training embeddings: every covariance is "
                "epsilon * I, so any test image that differs at all scores as an outlier. "
                "Fit on images that show the normal variation of the parts.",
                DegenerateTrainingSetWarning,
                stacklevel=2,
            )
        elif float(counts.min()) - 1 < d / 2:
            warnings.warn(
                f"{name} has fewer training samples per position ({float(counts.min()):g}) "
                f"than half its {d} embedding dimensions: more than half of the directions "
                "of each covariance are epsilon * I alone, so the scores are dominated by "
                "regularization. Fit on more images, or keep fewer channels (n_features).",
                DegenerateTrainingSetWarning,
                stacklevel=2,
            )

    def _patch_scorer(self, center, prec_chol, leave_one_out=None, selected=False, shift=None):
        """Patch scores (eq. 2) under the Gaussians ``(center, prec_chol)``.

        ``leave_one_out=N`` scores training images of the ``N`` that fitted
        the model as if each had been left out (see
        :func:`skpatch._gaussian.leave_one_out_sq`). ``selected=True`` scores
        embeddings that hold the selected channels only. ``shift``: their
        ``-c U``, computed here when None (once for all the chunks scored).
        """
        if shift is None:
            shift = _gaussian.whitened_centers(center, prec_chol)

        def patch_scores(x):
            index = None if selected else self._channel_index(x.device)
            distances = _gaussian.mahalanobis(
                self._positions(x.to(center.dtype)), center, prec_chol, index, shift
            )
            if leave_one_out is not None:
                distances = _gaussian.leave_one_out_sq(distances.square(), leave_one_out).sqrt()
            return distances.T.reshape(len(x), *self.grid_shape_)

        return patch_scores

    #: Names of the fitted ``center (P, d)`` and ``precision_cholesky (P, d, d)``.
    _scoring_state = ("mean_", "precision_cholesky_")

    def _patch_scores(self, x):
        center, prec_chol = (self._fitted_tensor(name, x.device) for name in self._scoring_state)
        shift = self._fitted_shift(*self._scoring_state, x.device)
        return self._patch_scorer(center, prec_chol, shift=shift)(x)


def locally_aware_embedder(backbone, embedder_params=None):
    """The embedder of PatchCore §3.1 (also RPaDiM's and PNI's).

    The last two of the backbone's default stages (``layer2`` + ``layer3`` of
    a ResNet, ``stage2`` + ``stage4`` of EfficientNet-Lite), each ``3 x 3``
    average-pooled, the deeper one resized bilinearly to the grid of the
    other; ``embedder_params`` may override anything.
    """
    from .._embedder import PatchEmbedder
    from ..backbones import get_backbone

    layers = tuple(get_backbone(backbone).default_layers[-2:])
    # PatchCore §3.1 rescales the deeper map bilinearly, as its official code
    params = {"layers": layers, "pool_size": 3, "upsample_mode": "bilinear",
              **(embedder_params or {})}
    return PatchEmbedder(backbone, **params)
