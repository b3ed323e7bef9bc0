"""Image shifting (N-pad §3.4, eq. 15): score shifted copies of each test image."""

from numbers import Integral

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.base import BaseEstimator, MetaEstimatorMixin, OutlierMixin, _fit_context, clone
from sklearn.utils import gen_batches
from sklearn.utils._param_validation import HasMethods, Interval
from sklearn.utils.validation import check_is_fitted

from ._compose import _split
from ._images import _resize_size, stack_images
from ._maps import map_size_tuple


def _empty_rows(part, n_rows):
    """An empty tensor of ``n_rows`` rows shaped as ``part``'s, in its memory layout."""
    channels_last = part.dim() == 4 and part.is_contiguous(memory_format=torch.channels_last)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    return torch.empty(
        (n_rows, *part.shape[1:]), dtype=part.dtype, device=part.device, memory_format=layout
    )


def shift_images(images, dy, dx):
    """Eq. (15): ``x'[h - dy, w - dx] = x[h, w]``, vacated border pixels edge-replicated."""
    radius = max(abs(dy), abs(dx))
    if radius == 0:
        return images
    height, width = images.shape[1:3]
    pad = [(0, 0), (radius, radius), (radius, radius)] + [(0, 0)] * (images.ndim - 3)
    padded = np.pad(images, pad, mode="edge")
    return padded[:, radius + dy:radius + dy + height, radius + dx:radius + dx + width]


def translate_maps(maps, dy, dx):
    """Maps ``(n, H, W)`` translated by ``(dy, dx)`` map pixels (any real shift).

    ``out[i, j] = maps[i - dy, j - dx]``, bilinear between pixels (exact for
    integer shifts), the border value beyond the edges.
    """
    if dy == 0 and dx == 0:
        return maps
    n, height, width = maps.shape
    theta = torch.tensor(
        [[1.0, 0.0, -2.0 * dx / width], [0.0, 1.0, -2.0 * dy / height]], dtype=maps.dtype
    ).expand(n, 2, 3)
    grid = F.affine_grid(theta, (n, 1, height, width), align_corners=False)
    out = F.grid_sample(maps.unsqueeze(1), grid, mode="bilinear", padding_mode="border",
                        align_corners=False)
    return out.squeeze(1)


class ImageShiftDetector(MetaEstimatorMixin, OutlierMixin, BaseEstimator):
    """Image shifting (N-pad module D): average the scores of shifted test images.

    Implements the last inference step of N-pad (§3.4, eq. 15): every test
    image is shifted by each ``(a, b)`` with integer ``a, b`` in
    ``[-r/2, r/2]`` (``r = max_shift``; 25 copies for ``r = 4``, the
    unshifted image included), each copy goes through the wrapped pipeline
    (CNN and detector), and the anomaly maps, shifted back into place, and
    the image scores are averaged over the copies. Shifting is an inference
    step only: ``fit`` fits the wrapped estimator on the images as given.

    The shift needs the CNN, which a detector does not hold, so this
    meta-estimator wraps the whole pipeline; it is itself an outlier
    detector on images, and its parameters (``max_shift``,
    ``estimator__<step>__<param>``) can be tuned by
    :class:`~sklearn.model_selection.GridSearchCV`.

    Parameters
    ----------
    estimator : Pipeline
        Usually ``make_pipeline(PatchEmbedder(...), NPadDetector(...))``
        (see :func:`make_npad_pipeline`); any pipeline whose last step has
        ``score_samples`` and ``anomaly_map`` and whose input is images.
        Cloned in ``fit``.
    max_shift : int, default=4
        ``r`` of eq. (15): shifts of up to ``r // 2`` pixels of the input
        images in each direction. 0 scores the images as given.
    batch_size : int, default=32
        Shifted copies embedded and scored at a time (bounds memory: the
        embeddings of ``batch_size`` copies at once). The CNN embeds one
        shift of ``min(batch_size, n)`` images per call; a batch of fewer
        images has several shifts scored in one call of the detector (see
        Notes).

    Attributes
    ----------
    estimator_ : Pipeline or detector
        The fitted clone of ``estimator``.
    shifts_ : list of tuple of int
        The ``(a, b)`` shifts, in input-image pixels.
    offset_ : float
        Threshold on ``score_samples``: the wrapped detector's ``offset_``
        (see Notes).

    See Also
    --------
    make_npad_pipeline : Builds this wrapper around the N-pad pipeline.
    NPadDetector : Modules A-C of N-pad.

    Notes
    -----
    Copy ``(a, b)`` is ``x'[h - a, w - b] = x[h, w]``; the pixels it moves in
    from beyond the border repeat the edge row or column. Its anomaly map at
    ``(i, j)`` describes the input pixel ``(i + a, j + b)``, so it is shifted
    back by ``(a, b)`` times the scale from input pixels to map pixels
    (which accounts for the embedder's resize, crop and ``map_size``)
    before averaging. The average (not the minimum) is the aggregation:
    the paper says the scores of all shifted images are aggregated, and the
    mean keeps the calibration of ``offset_`` roughly valid: the shifted
    copies of a normal image score a little worse than the image itself.
    With :class:`NPadDetector`'s cross-fitted ``offset_`` on ELPV mono
    (``contamination=0.1``, ``max_shift=4``), 10 % of 50 normal test
    images were flagged shifted, 6 % unshifted.

    Scoring costs one CNN pass and one detector scoring per copy:
    ``(2 (r // 2) + 1)²`` times the unshifted cost (25 for ``r = 4``). The
    detector scores the copies of ``batch_size // n`` shifts of ``n``
    images in one call (all 25 shifts of a single image with the default
    ``batch_size=32``): N-pad reads its precision factors once per call
    (125 MB on ELPV, about 12 ms on two CPU cores), which one image per
    call paid 25 times. The scores do not depend on the grouping: the
    shifts are summed one by one, in order.

    Examples
    --------
    >>> import numpy as np
    >>> from sklearn.pipeline import make_pipeline
    >>> from skpatch import ImageShiftDetector, NPadDetector, PatchEmbedder
    >>> images = np.random.RandomState(0).randint(0, 256, (6, 32, 32), dtype=np.uint8)
    >>> model = ImageShiftDetector(make_pipeline(
    ...     PatchEmbedder(weights=None, image_size=32, crop_size=None),
    ...     NPadDetector(n_features=4, map_size=32, random_state=0),
    ... ), max_shift=2).fit(images)
    >>> len(model.shifts_), model.score_samples(images).shape
    (9, (6,))
    """

    _parameter_constraints = {
        "estimator": [HasMethods(["fit", "score_samples"])],
        "max_shift": [Interval(Integral, 0, None, closed="left")],
        "batch_size": [Interval(Integral, 1, None, closed="left")],
    }

    def __init__(self, estimator, *, max_shift=4, batch_size=32):
        self.estimator = estimator
        self.max_shift = max_shift
        self.batch_size = batch_size

    @_fit_context(prefer_skip_nested_validation=False)
    def fit(self, X, y=None):
        """Fit the wrapped estimator on the (unshifted) training images.

        Parameters
        ----------
        X : array-like or sequence
            Training images, as the wrapped estimator takes them.
        y : None
            Ignored.

        Returns
        -------
        self : ImageShiftDetector
            The fitted wrapper.
        """
        from .detectors import BasePatchDetector  # the detectors import this module

        transformers, detector = _split(self.estimator)
        if not transformers and isinstance(detector, BasePatchDetector):
            # it would take the embeddings' channel axis for image rows
            name = type(detector).__name__
            raise TypeError(
                f"ImageShiftDetector shifts images, and {name} takes patch embeddings: "
                f"wrap a pipeline that embeds the images first, e.g. "
                f"make_pipeline(PatchEmbedder(), {name}())."
            )
        self.estimator_ = clone(self.estimator).fit(X, y)
        radius = self.max_shift // 2
        self.shifts_ = [(a, b) for a in range(-radius, radius + 1)
                        for b in range(-radius, radius + 1)]
        self.offset_ = float(_split(self.estimator_)[1].offset_)
        return self

    def _map_scale(self, image_shape, map_shape):
        """Map pixels per input-image pixel along ``(H, W)``."""
        transformers, _ = _split(self.estimator_)
        height, width = image_shape
        crop = (height, width)
        scale = (1.0, 1.0)
        embedder = next((t for t in transformers if hasattr(t, "crop_size")), None)
        if embedder is not None:
            size = embedder.image_size
            resized = (height, width) if size is None else _resize_size(height, width, size)
            scale = (resized[0] / height, resized[1] / width)
            crop = resized if embedder.crop_size is None else map_size_tuple(embedder.crop_size)
        return scale[0] * map_shape[0] / crop[0], scale[1] * map_shape[1] / crop[1]

    def _embed(self, images):
        transformers, detector = _split(self.estimator_)
        for transformer in transformers:
            images = transformer.transform(images)
        return images, detector

    def _shifted_outputs(self, X, outputs):
        """Averages over the shifts, one per entry of ``outputs``.

        ``"scores"``: the wrapped ``score_samples``; ``"maps"``: the anomaly
        maps, each shifted back into place. Asking for both embeds every
        shifted copy once.

        The CNN embeds one shift of a batch at a time; a batch of ``n <
        batch_size`` images has the embeddings of ``batch_size // n`` shifts
        scored in one call of the detector, whose fixed cost per call
        (reading N-pad's precision factors: 125 MB on ELPV) is then shared.
        """
        check_is_fitted(self)
        X = stack_images(X, type(self).__name__)
        out = {}
        for batch in gen_batches(len(X), self.batch_size):
            images = X[batch]
            n_images = len(images)
            per_call = min(max(1, self.batch_size // n_images), len(self.shifts_))
            totals = dict.fromkeys(outputs)
            buffer = None
            for first in range(0, len(self.shifts_), per_call):
                group = self.shifts_[first:first + per_call]
                for i, (dy, dx) in enumerate(group):
                    # the last copy's embeddings, dropped: the embedder reuses their memory
                    embeddings = part = None
                    embeddings, detector = self._embed(shift_images(images, dy, dx))
                    if len(group) > 1:
                        # copied into one buffer, reused by every group: a
                        # fresh array per group costs its first touches
                        part = embeddings if torch.is_tensor(embeddings) else torch.as_tensor(
                            np.asarray(embeddings)
                        )
                        if buffer is None:
                            buffer = _empty_rows(part, per_call * n_images)
                        buffer[i * n_images:(i + 1) * n_images] = part
                if len(group) > 1:
                    stacked = buffer[: len(group) * n_images]
                    embeddings = stacked if torch.is_tensor(embeddings) else stacked.numpy()
                for what in outputs:
                    if what == "maps":
                        values = torch.from_numpy(detector.anomaly_map(embeddings))
                        fy, fx = self._map_scale(X.shape[1:3], values.shape[1:])
                    else:
                        values = torch.from_numpy(np.asarray(detector.score_samples(embeddings)))
                    # summed shift by shift, in order, whatever the grouping
                    for (dy, dx), value in zip(group, values.split(n_images)):
                        if what == "maps":
                            value = translate_maps(value, dy * fy, dx * fx)
                        totals[what] = value if totals[what] is None else totals[what] + value
            for what, total in totals.items():
                mean = (total / len(self.shifts_)).numpy()
                if what not in out:
                    out[what] = np.empty((len(X), *mean.shape[1:]), dtype=mean.dtype)
                out[what][batch] = mean
        return [out[what] for what in outputs]

    def _scores_and_maps(self, X):
        """``(score_samples(X), anomaly_map(X))`` with one CNN pass per shifted copy."""
        return tuple(self._shifted_outputs(X, ("scores", "maps")))

    def anomaly_map(self, X):
        """Anomaly maps averaged over the shifted copies, each shifted back into place.

        Parameters
        ----------
        X : ndarray of shape (n, H, W) or (n, H, W, 3), or sequence
            Images (a list must hold images of one size).

        Returns
        -------
        maps : ndarray of shape (n, H_map, W_map)
            Anomaly scores per pixel, higher = more anomalous.
        """
        return self._shifted_outputs(X, ("maps",))[0]

    def score_samples(self, X):
        """Wrapped ``score_samples`` averaged over the shifted copies (higher = more normal).

        Parameters
        ----------
        X : ndarray of shape (n, H, W) or (n, H, W, 3), or sequence
            Images (a list must hold images of one size).

        Returns
        -------
        scores : ndarray of shape (n,)
            Opposite of the image anomaly score.
        """
        return self._shifted_outputs(X, ("scores",))[0]

    def decision_function(self, X):
        """``score_samples(X) - offset_``: negative for outliers.

        Parameters
        ----------
        X : ndarray of shape (n, H, W) or (n, H, W, 3), or sequence
            Images.

        Returns
        -------
        decision : ndarray of shape (n,)
            Shifted scores; the threshold is 0.
        """
        return self.score_samples(X) - self.offset_

    def predict(self, X):
        """Label images: +1 normal, -1 anomalous.

        Parameters
        ----------
        X : ndarray of shape (n, H, W) or (n, H, W, 3), or sequence
            Images.

        Returns
        -------
        labels : ndarray of shape (n,)
            +1 for inliers, -1 for outliers.
        """
        return np.where(self.decision_function(X) < 0, -1, 1)
