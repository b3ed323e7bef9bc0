"""Calls that work on a detector or on a Pipeline that ends in one."""

from numbers import Integral

import numpy as np
from sklearn.base import clone
from sklearn.pipeline import Pipeline
from sklearn.utils import gen_batches


def _split(estimator):
    """``(transform steps, detector)`` of a Pipeline, or ``([], estimator)``."""
    if isinstance(estimator, Pipeline):
        return [step for _, step in estimator.steps[:-1] if step not in (None, "passthrough")], (
            estimator.steps[-1][1]
        )
    return [], estimator


def anomaly_map(estimator, X):
    """Anomaly maps of images from a fitted detector or pipeline.

    The one call for localization: with a ``Pipeline`` such as
    ``make_pipeline(PatchEmbedder(), PaDiMDetector())``, ``X`` are images and
    are passed through the transform steps first; with a bare detector,
    ``X`` are patch embeddings.

    Parameters
    ----------
    estimator : Pipeline or detector
        Fitted; its last step has an ``anomaly_map`` method.
    X : array-like or sequence
        Input of the estimator's first step (images for a pipeline).

    Returns
    -------
    maps : ndarray of shape (n, H, W)
        Anomaly maps, higher = more anomalous.

    Examples
    --------
    >>> import numpy as np
    >>> from sklearn.pipeline import make_pipeline
    >>> from skpatch import PatchEmbedder, PaDiMDetector, anomaly_map
    >>> images = np.random.RandomState(0).randint(0, 256, (4, 32, 32), dtype=np.uint8)
    >>> pipe = make_pipeline(
    ...     PatchEmbedder(weights=None, image_size=32, crop_size=None),
    ...     PaDiMDetector(n_features=10, map_size=32, random_state=0),
    ... ).fit(images)
    >>> anomaly_map(pipe, images[:2]).shape
    (2, 32, 32)
    """
    transformers, detector = _split(estimator)
    if not hasattr(detector, "anomaly_map"):
        raise TypeError(
            f"{type(detector).__name__} has no anomaly_map method: the estimator (or the "
            "last step of the pipeline) must be a skpatch detector."
        )
    for transformer in transformers:
        X = transformer.transform(X)
    return detector.anomaly_map(X)


def fit_in_batches(estimator, X, *, batch_size=64):
    """Fit a detector or pipeline on more images than fit in memory.

    Slices ``X`` into batches and streams them through the pipeline's
    transform steps into the detector's ``partial_fit``: only one batch of
    images and embeddings is in memory at a time, and the detector's
    statistics do not grow with the number of images. ``X`` can be a list
    of file paths (decoded batch by batch) or a memory-mapped array. From a
    :class:`~skpatch.PatchEmbedder` into a skpatch detector, every batch is
    embedded into the memory of the first (the detectors copy what they
    keep; see the notes of :meth:`PatchEmbedder.transform
    <skpatch.PatchEmbedder.transform>`), which saves the first touches of a
    fresh array per batch.

    Parameters
    ----------
    estimator : Pipeline or detector
        Its last step must implement ``partial_fit``; the other steps must
        be stateless transformers (such as :class:`~skpatch.PatchEmbedder`).
        Any previous fit of the detector is discarded.
    X : sequence or array-like
        Training images (or embeddings for a bare detector), sliceable.
    batch_size : int, default=64
        Images per batch.

    Returns
    -------
    estimator : Pipeline or detector
        The fitted estimator, finished: what ``partial_fit`` defers to
        first use (the ``offset_`` threshold; PatchCore's coreset) is
        computed before it returns. If a batch fails (an unreadable image,
        NaN embeddings, ...), the error is raised and the detector is left
        unfitted, not fitted on the batches before it; so it is when ``X``
        holds too few images for a model (one), with the error of ``fit``.

    Examples
    --------
    >>> import numpy as np
    >>> from sklearn.pipeline import make_pipeline
    >>> from skpatch import PatchEmbedder, PaDiMDetector, fit_in_batches
    >>> images = np.random.RandomState(0).randint(0, 256, (6, 32, 32), dtype=np.uint8)
    >>> pipe = make_pipeline(
    ...     PatchEmbedder(weights=None, image_size=32, crop_size=None),
    ...     PaDiMDetector(n_features=10, random_state=0),
    ... )
    >>> fit_in_batches(pipe, images, batch_size=4).predict(images).shape
    (6,)
    """
    if not isinstance(batch_size, Integral) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"fit_in_batches' batch_size must be an int >= 1, got {batch_size!r}.")
    if len(X) == 0:
        raise ValueError("fit_in_batches got no training images: X is empty.")
    transformers, detector = _split(estimator)
    if not hasattr(detector, "partial_fit"):
        raise TypeError(
            f"{type(detector).__name__} has no partial_fit: it cannot be fitted in batches."
        )
    for transformer in transformers:
        transformer.fit(None)
    # Start from an unfitted copy of the parameters: partial_fit accumulates.
    fresh = clone(detector)
    detector.__dict__.clear()
    detector.__dict__.update(fresh.__dict__)
    n_samples = len(X)
    try:
        for batch in gen_batches(n_samples, batch_size):
            # The batch before is no longer referred to here: an embedder
            # writes this one into its memory (see PatchEmbedder.transform).
            Xt = X[batch] if not isinstance(X, (list, tuple)) else list(X[batch])
            for transformer in transformers:
                Xt = transformer.transform(Xt)
            detector.partial_fit(np.asarray(Xt) if isinstance(Xt, list) else Xt)
        if hasattr(detector, "_check_scorable"):
            # A stream too short for a model (one image) fails as fit does.
            detector._check_scorable()
    except BaseException:
        # A model of the batches before the failure would pass for a fitted
        # one: an unfitted detector is better than a silently wrong one.
        detector.__dict__.clear()
        detector.__dict__.update(fresh.__dict__)
        raise
    # The stream has ended: finish the model now (partial_fit defers the
    # threshold, and PatchCore its coreset, to first use), so that the fit
    # time is spent here and not in the first call to score.
    getattr(detector, "offset_", None)
    return estimator
