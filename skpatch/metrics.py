"""Evaluation metrics for image anomaly detection.

Detection is scored per image (:func:`image_auroc`), localization per pixel
(:func:`pixel_auroc`) and per defect region (:func:`pro_curve`,
:func:`aupro`). :func:`image_auroc_scorer`, :func:`pixel_auroc_scorer` and
:func:`aupro_scorer` plug them into
:class:`~sklearn.model_selection.GridSearchCV`; the pixel scorers read the
ground-truth masks from ``y`` built by :func:`make_targets`.

Conventions
-----------
* **Labels**: ``0`` = normal, ``1`` = anomalous, for image labels and for
  ground-truth masks alike (``bool`` masks are accepted). scikit-learn's
  outlier detectors *predict* ``+1`` (inlier) / ``-1`` (outlier); labels in
  that form are refused with an error rather than silently re-mapped, because
  feeding them to a ranking metric inverts the result (an AUROC of 0.9 reads
  as 0.1). Convert them with ``y = (y == -1).astype(int)``.
* **Scores**: anomaly scores and anomaly maps are *higher = more anomalous*.
  This is minus scikit-learn's ``score_samples`` (higher = more normal); the
  scorers do the negation for you.

All functions are pure NumPy / SciPy / scikit-learn: they take arrays, never
an estimator, except the scorers.
"""

import numbers

import numpy as np
from scipy import ndimage
from sklearn.metrics import roc_auc_score

__all__ = [
    "aupro",
    "aupro_scorer",
    "image_auroc",
    "image_auroc_scorer",
    "make_anomaly_scorer",
    "make_targets",
    "pixel_auroc",
    "pixel_auroc_scorer",
    "pro_curve",
]

_CONVERT_HINT = (
    "skpatch labels are 0 = normal, 1 = anomalous. Labels in scikit-learn's "
    "outlier convention (+1 inlier, -1 outlier) must be converted with "
    "`y = (y == -1).astype(int)`; passing them unchanged would invert the "
    "metric."
)


# --------------------------------------------------------------------------
# input validation
# --------------------------------------------------------------------------


def _check_labels(y_true, *, name="y_true", require_both=True):
    """Return ``y_true`` as a 1-D int array of 0 / 1, or raise.

    A ``y`` of :func:`make_targets` gives its labels.
    """
    y = np.asarray(y_true)
    if y.dtype.names is not None and "label" in y.dtype.names:
        y = y["label"]
    if y.ndim != 1:
        raise ValueError(f"{name} must be 1-D (one label per image), got shape {y.shape}.")
    if y.dtype != bool and y.dtype.kind not in "iuf":
        raise ValueError(
            f"{name} must be numeric 0 / 1 labels, got dtype {y.dtype}. {_CONVERT_HINT}"
        )
    if y.dtype != bool:
        if np.any(y == -1):
            raise ValueError(f"{name} contains -1. {_CONVERT_HINT}")
        if not np.all((y == 0) | (y == 1)):
            bad = np.unique(y[~((y == 0) | (y == 1))])[:5]
            raise ValueError(
                f"{name} must contain only 0 (normal) and 1 (anomalous), "
                f"found {bad.tolist()}."
            )
    y = y.astype(np.int64)
    if require_both and (not np.any(y == 0) or not np.any(y == 1)):
        raise ValueError(
            f"{name} must contain both normal (0) and anomalous (1) images for "
            f"an AUROC; got only {'anomalous' if y.size and y[0] else 'normal'} "
            f"({y.size} labels)."
        )
    return y


def _check_finite(values, name):
    """Return ``values`` as a float array (float32 kept: half the sort cost)."""
    values = np.asarray(values)
    if values.dtype.kind != "f":
        if values.dtype != bool and values.dtype.kind not in "iu":
            raise ValueError(f"{name} must be numeric, got dtype {values.dtype}.")
        values = values.astype(np.float64)
    if not np.all(np.isfinite(values)):
        n_bad = int(np.count_nonzero(~np.isfinite(values)))
        raise ValueError(f"{name} contains {n_bad} NaN or infinite value(s).")
    return values


def _check_scores(y, anomaly_scores, name="anomaly_scores"):
    scores = np.asarray(anomaly_scores)
    if scores.ndim != 1:
        raise ValueError(f"{name} must be 1-D (one score per image), got shape {scores.shape}.")
    if scores.shape[0] != y.shape[0]:
        raise ValueError(
            f"y_true and {name} must have the same length, got {y.shape[0]} and {scores.shape[0]}."
        )
    return _check_finite(scores, name)


def _check_masks_and_maps(masks, anomaly_maps):
    """Return (bool masks, float64 maps), both of shape (n, H, W)."""
    masks = np.asarray(masks)
    maps = np.asarray(anomaly_maps)
    if masks.ndim != 3 or maps.ndim != 3:
        raise ValueError(
            "masks and anomaly_maps must both be (n_images, height, width), got "
            f"shapes {masks.shape} and {maps.shape} (for one image use x[None]; "
            "for (n, 1, H, W) use x[:, 0])."
        )
    if masks.shape != maps.shape:
        raise ValueError(
            f"masks and anomaly_maps must have the same shape, got {masks.shape} and {maps.shape}."
        )
    if masks.dtype != bool:
        if masks.dtype.kind not in "iuf":
            raise ValueError(f"masks must be boolean or 0 / 1, got dtype {masks.dtype}.")
        is_binary = (masks == 0) | (masks == 1)
        if not np.all(is_binary):
            bad = np.unique(masks[~is_binary])[:5]
            raise ValueError(
                "masks must be boolean or contain only 0 (normal) and 1 "
                f"(anomalous) pixels, found {bad.tolist()} (for 0 / 255 mask "
                "images use masks > 0)."
            )
        masks = masks.astype(bool)
    return masks, _check_finite(maps, "anomaly_maps")


# --------------------------------------------------------------------------
# image and pixel AUROC
# --------------------------------------------------------------------------


def image_auroc(y_true, anomaly_scores):
    """Area under the ROC curve of image-level anomaly scores.

    Parameters
    ----------
    y_true : array-like of shape (n_images,)
        Ground truth: ``0`` = normal, ``1`` = anomalous (``bool`` accepted).
        scikit-learn's ``+1`` / ``-1`` outlier labels are refused; convert
        them with ``y = (y == -1).astype(int)``.

    anomaly_scores : array-like of shape (n_images,)
        Anomaly scores, higher = more anomalous (e.g.
        ``-detector.score_samples(X)``). Must be finite.

    Returns
    -------
    auroc : float
        Probability that a random anomalous image scores higher than a
        random normal one (ties count one half): 1.0 is perfect, 0.5 is
        chance, 0.0 is perfectly inverted.

    See Also
    --------
    image_auroc_scorer : The same metric as a scorer for ``GridSearchCV``.
    pixel_auroc : AUROC over pixels.

    Examples
    --------
    >>> from skpatch.metrics import image_auroc
    >>> image_auroc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
    0.75
    """
    y = _check_labels(y_true)
    scores = _check_scores(y, anomaly_scores)
    return float(roc_auc_score(y, scores))


def pixel_auroc(masks, anomaly_maps):
    """Area under the ROC curve over all pixels of all images.

    Every pixel of every image is one sample; large defects therefore weigh
    more than small ones (see :func:`aupro` for the region-balanced view).

    Parameters
    ----------
    masks : array-like of shape (n_images, height, width)
        Ground-truth masks, ``bool`` or ``0`` (normal) / ``1`` (anomalous).

    anomaly_maps : array-like of shape (n_images, height, width)
        Anomaly maps, higher = more anomalous. Must be finite.

    Returns
    -------
    auroc : float
        Pixel-level AUROC.

    See Also
    --------
    aupro : Area under the per-region overlap curve.

    Examples
    --------
    >>> from skpatch.metrics import pixel_auroc
    >>> masks = [[[1, 0], [0, 0]]]
    >>> maps = [[[0.9, 0.1], [0.5, 0.95]]]
    >>> round(pixel_auroc(masks, maps), 4)  # 0.9 beats 2 of 3 normal pixels
    0.6667
    """
    masks, maps = _check_masks_and_maps(masks, anomaly_maps)
    if masks.all() or not masks.any():
        raise ValueError(
            "masks must contain both normal and anomalous pixels for a pixel "
            f"AUROC; got only {'anomalous' if masks.all() else 'normal'} pixels."
        )
    return float(roc_auc_score(masks.ravel(), maps.ravel()))


# --------------------------------------------------------------------------
# per-region overlap
# --------------------------------------------------------------------------


def _label_regions(masks, connectivity):
    """Label the connected components of every mask in one call.

    A 3-D structuring element whose first and last planes are empty connects
    pixels within an image only, so the labels of all images come out of a
    single ``ndimage.label`` call, unique across images.
    """
    if connectivity not in (4, 8):
        raise ValueError(f"connectivity must be 4 or 8, got {connectivity!r}.")
    structure = np.zeros((3, 3, 3), dtype=bool)
    if connectivity == 8:
        structure[1] = True
    else:
        structure[1] = ndimage.generate_binary_structure(2, 1)
    return ndimage.label(masks, structure=structure)


def pro_curve(masks, anomaly_maps, *, connectivity=8):
    """Per-region overlap (PRO) against false positive rate, at every threshold.

    Follows the MVTec AD evaluation (Bergmann et al., IJCV 2021). Every
    connected component of every ground-truth mask is one region. At a
    threshold ``t`` a pixel is positive when its score is ``>= t``, and

    * ``FPR(t)`` = positive pixels outside every region / pixels outside
      every region, counted over all images (normal images included);
    * ``PRO(t)`` = mean over all regions of the fraction of the region's
      pixels that are positive. Each region counts once whatever its size.

    Parameters
    ----------
    masks : array-like of shape (n_images, height, width)
        Ground-truth masks, ``bool`` or ``0`` (normal) / ``1`` (anomalous).
        Images without defect contribute to the FPR only.

    anomaly_maps : array-like of shape (n_images, height, width)
        Anomaly maps, higher = more anomalous. Must be finite.

    connectivity : {8, 4}, default=8
        Pixel connectivity of a region: 8 (diagonal neighbours connect, as in
        the MVTec AD evaluation code) or 4.

    Returns
    -------
    fpr : ndarray of shape (n_thresholds + 1,)
        False positive rates, non-decreasing, from 0 to 1.

    pro : ndarray of shape (n_thresholds + 1,)
        Per-region overlap at the same thresholds, non-decreasing, from 0
        to 1.

    See Also
    --------
    aupro : Normalized area under this curve up to an FPR limit.

    Notes
    -----
    The curve is exact: it has one point per distinct score (pixels with
    tied scores become positive together) plus the starting point ``(0, 0)``
    for a threshold above every score; the last point, at the lowest score,
    is ``(1, 1)``. It is computed with one sort of all pixels and cumulative
    sums in float64, so the cost is that of the sort.

    References
    ----------
    .. [1] P. Bergmann, K. Batzner, M. Fauser, D. Sattlegger, C. Steger,
       "The MVTec Anomaly Detection Dataset: A Comprehensive Real-World
       Dataset for Unsupervised Anomaly Detection", IJCV 129, 2021.

    Examples
    --------
    One image of four pixels, the first two form a defect:

    >>> from skpatch.metrics import pro_curve
    >>> fpr, pro = pro_curve([[[1, 1, 0, 0]]], [[[0.9, 0.4, 0.6, 0.1]]])
    >>> fpr
    array([0. , 0. , 0.5, 0.5, 1. ])
    >>> pro
    array([0. , 0.5, 0.5, 1. , 1. ])
    """
    masks, maps = _check_masks_and_maps(masks, anomaly_maps)
    regions, n_regions = _label_regions(masks, connectivity)
    if n_regions == 0:
        raise ValueError("masks contain no anomalous pixel: the PRO curve is undefined.")
    regions = regions.ravel()
    n_outside = int(np.count_nonzero(regions == 0))
    if n_outside == 0:
        raise ValueError("masks contain no normal pixel: the false positive rate is undefined.")

    # Each region pixel weighs 1 / (its region's size): summed over the
    # positive pixels this gives, per region, the fraction that is covered.
    sizes = np.bincount(regions, minlength=n_regions + 1)
    weight_of_region = np.zeros(n_regions + 1, dtype=np.float64)
    weight_of_region[1:] = 1.0 / sizes[1:]

    # Descending order of scores; the order inside a run of ties does not
    # matter (only the end of each run is kept), so no stable sort is needed.
    order = np.argsort(maps.ravel())[::-1]
    sorted_scores = maps.ravel()[order]
    # position of the last pixel of each run of tied scores
    last_of_tie = np.flatnonzero(np.r_[sorted_scores[1:] != sorted_scores[:-1], True])
    del sorted_scores
    sorted_regions = regions[order]
    del order

    false_pos = np.cumsum(sorted_regions == 0, dtype=np.int64)[last_of_tie]
    true_pos = last_of_tie + 1 - false_pos
    overlap = np.cumsum(weight_of_region[sorted_regions], dtype=np.float64)[last_of_tie]
    pro = np.minimum(overlap / n_regions, 1.0)
    # once every region pixel is positive PRO is exactly 1 (the float sum of
    # the 1 / size weights may round to 1 - 1e-16): a perfect map scores 1.0
    pro[true_pos == regions.size - n_outside] = 1.0

    fpr = np.concatenate(([0.0], false_pos / n_outside))
    pro = np.concatenate(([0.0], pro))
    return fpr, pro


def aupro(masks, anomaly_maps, *, fpr_limit=0.3, connectivity=8):
    """Normalized area under the PRO curve up to a false positive rate.

    The area under ``PRO(FPR)`` from ``FPR = 0`` to ``fpr_limit`` (trapezoidal
    rule on the exact curve of :func:`pro_curve`, with ``PRO`` linearly
    interpolated at ``fpr_limit``), divided by ``fpr_limit`` so that a
    perfect anomaly map scores 1.0.

    Parameters
    ----------
    masks : array-like of shape (n_images, height, width)
        Ground-truth masks, ``bool`` or ``0`` (normal) / ``1`` (anomalous).
        At least one anomalous pixel is required.

    anomaly_maps : array-like of shape (n_images, height, width)
        Anomaly maps, higher = more anomalous. Must be finite.

    fpr_limit : float, default=0.3
        Upper integration limit on the false positive rate, in ``(0, 1]``;
        0.3 is the MVTec AD convention.

    connectivity : {8, 4}, default=8
        Pixel connectivity of a ground-truth region (see :func:`pro_curve`).

    Returns
    -------
    aupro : float
        Normalized area, in ``[0, 1]``; 1.0 is perfect.

    See Also
    --------
    pro_curve : The curve itself.
    pixel_auroc : The pixel-weighted alternative.

    Examples
    --------
    >>> from skpatch.metrics import aupro
    >>> masks = [[[1, 1, 0, 0]]]
    >>> aupro(masks, [[[0.9, 0.4, 0.6, 0.1]]], fpr_limit=1.0)
    0.75
    >>> aupro(masks, [[[1.0, 1.0, 0.0, 0.0]]])  # perfect map
    1.0
    """
    is_real = isinstance(fpr_limit, numbers.Real) and not isinstance(fpr_limit, bool)
    if not is_real or not 0 < fpr_limit <= 1:
        raise ValueError(f"fpr_limit must be a float in (0, 1], got {fpr_limit!r}.")
    fpr, pro = pro_curve(masks, anomaly_maps, connectivity=connectivity)
    fpr_limit = float(fpr_limit)
    # points with fpr <= fpr_limit; fpr[-1] == 1 >= fpr_limit, so when the
    # limit falls strictly between two points, fpr[end] > fpr_limit exists
    end = int(np.searchsorted(fpr, fpr_limit, side="right"))
    x, y = fpr[:end], pro[:end]
    if x[-1] < fpr_limit:
        slope = (pro[end] - y[-1]) / (fpr[end] - x[-1])
        x = np.append(x, fpr_limit)
        y = np.append(y, y[-1] + slope * (fpr_limit - x[-2]))
    area = np.sum(np.diff(x) * (y[1:] + y[:-1])) / 2.0
    return float(area / fpr_limit)


# --------------------------------------------------------------------------
# scorers
# --------------------------------------------------------------------------


def _anomaly_scores(estimator, X):
    """Image anomaly scores of a fitted estimator: ``-score_samples(X)``."""
    if not hasattr(estimator, "score_samples"):
        raise TypeError(
            f"{type(estimator).__name__} has no score_samples: anomaly scorers "
            "need an outlier detector (or a Pipeline ending in one) whose "
            "score_samples is higher for more normal samples."
        )
    return -np.asarray(estimator.score_samples(X), dtype=np.float64)


def _check_scorer_y(y):
    """Image labels of a scorer's ``y``: the labels, or the ``"label"`` field of targets."""
    if y is None:
        raise ValueError(
            "anomaly scorers need image labels y (0 = normal, 1 = anomalous): "
            "pass y to GridSearchCV.fit / cross_validate."
        )
    return _target_labels(y)


def _target_labels(y):
    """Image labels of ``y``: itself, or the ``"label"`` field of :func:`make_targets` output."""
    y = np.asarray(y)
    if y.dtype.names is not None:
        if "label" not in y.dtype.names:
            raise ValueError(
                f"structured y has fields {y.dtype.names}; build it with "
                "skpatch.metrics.make_targets(labels, masks)."
            )
        return y["label"]
    return y


def _target_masks(y, scorer):
    """Ground-truth masks ``(n, H, W)`` carried by ``y`` (see :func:`make_targets`)."""
    y = np.asarray(y) if y is not None else None
    if y is None or y.dtype.names is None or "mask" not in y.dtype.names:
        raise ValueError(
            f"{scorer} needs the ground-truth masks of the test images: pass "
            "y = skpatch.metrics.make_targets(labels, masks) to GridSearchCV.fit / "
            "cross_validate instead of the labels alone."
        )
    return y["mask"]


def make_targets(labels=None, masks=None):
    """Pack image labels and ground-truth masks into one ``y`` for cross-validation.

    scikit-learn passes a single ``y`` through
    :class:`~sklearn.model_selection.GridSearchCV` and indexes it with each
    fold's indices. To let the pixel scorers (:func:`pixel_auroc_scorer`,
    :func:`aupro_scorer`) see the masks of a test fold, pack labels and masks
    into a 1-D NumPy structured array with one record per image: fields
    ``"label"`` (int, 0 = normal, 1 = anomalous) and ``"mask"`` (bool
    ``(H, W)``). Indexing it selects the images' labels and masks together,
    and every skpatch scorer and splitter reads the labels from it, as do
    the image metrics (:func:`image_auroc`...) and
    :class:`~skpatch.plotting.AnomalyRocDisplay` given it as ``y_true``; the
    detectors ignore ``y``.

    Parameters
    ----------
    labels : array-like of shape (n_images,) or None, default=None
        Image labels, ``0`` = normal, ``1`` = anomalous (``bool`` accepted).
        None derives them from the masks (an image is anomalous when its
        mask has an anomalous pixel).
    masks : array-like of shape (n_images, height, width) or None, default=None
        Ground-truth masks, ``bool`` or ``0`` / ``1``, in the coordinates of
        the anomaly maps (see Notes). None packs the labels alone.

    Returns
    -------
    y : ndarray of shape (n_images,), structured
        Records ``(label, mask)``; ``y["label"]`` and ``y["mask"]`` give the
        arrays back.

    Raises
    ------
    ValueError
        If neither is given, the lengths differ, the values are not 0 / 1,
        or an image labelled normal has anomalous pixels.

    See Also
    --------
    pixel_auroc_scorer : Pixel AUROC from ``y`` built here.
    skpatch.model_selection.OneClassKFold : Splits on the labels of ``y``.

    Notes
    -----
    The anomaly maps of a detector are ``map_size`` pixels and cover the
    image the embedder saw, after its resize and center crop. The masks
    must be in the same coordinates: with ``crop_size=None``, resize the
    masks (nearest neighbour) to ``map_size``, as
    :func:`skpatch.datasets.load_mvtec` does with ``image_size``; with a crop,
    crop them the same way. The scorers refuse masks whose size differs
    from the maps'.

    The masks are stored in full (one byte per pixel): for 1,000 images of
    224 x 224, 50 MB, which ``GridSearchCV`` slices per fold and
    ``Pipeline(memory=...)`` hashes along with the training images.

    Examples
    --------
    >>> import numpy as np
    >>> from skpatch.metrics import make_targets
    >>> masks = np.zeros((3, 4, 4), dtype=bool)
    >>> masks[2, 1:3, 1:3] = True
    >>> y = make_targets(masks=masks)
    >>> y["label"]
    array([0, 0, 1])
    >>> y[[0, 2]]["mask"].shape
    (2, 4, 4)
    """
    if labels is None and masks is None:
        raise ValueError("make_targets needs labels, masks or both.")
    if masks is None:
        labels = _check_labels(labels, name="labels", require_both=False)
        return np.rec.fromarrays([labels], names="label").view(np.ndarray)
    masks = np.asarray(masks)
    if masks.ndim != 3:
        raise ValueError(f"masks must be (n_images, height, width), got shape {masks.shape}.")
    masks, _ = _check_masks_and_maps(masks, np.zeros(masks.shape, dtype=np.float32))
    has_defect = masks.any(axis=(1, 2))
    if labels is None:
        labels = has_defect.astype(np.int64)
    labels = _check_labels(labels, name="labels", require_both=False)
    if len(labels) != len(masks):
        raise ValueError(
            f"labels and masks must have the same length, got {len(labels)} and {len(masks)}."
        )
    inconsistent = np.flatnonzero(has_defect & (labels == 0))
    if inconsistent.size:
        raise ValueError(
            f"images {inconsistent[:5].tolist()} are labelled normal (0) but their masks "
            "have anomalous pixels."
        )
    y = np.empty(len(labels), dtype=[("label", np.int64), ("mask", bool, masks.shape[1:])])
    y["label"] = labels
    y["mask"] = masks
    return y


def image_auroc_scorer(estimator, X, y):
    """Image AUROC of a fitted outlier detector, as a scikit-learn scorer.

    A scorer callable ``scorer(estimator, X, y)`` for ``scoring=`` in
    :class:`~sklearn.model_selection.GridSearchCV`, ``cross_validate``, or a
    dict of scorers. Anomaly scores are ``-estimator.score_samples(X)``, so
    any scikit-learn outlier detector works (``score_samples`` higher = more
    normal), and so does a fitted :class:`~sklearn.pipeline.Pipeline` that
    ends in one.

    Parameters
    ----------
    estimator : fitted estimator
        An object with ``score_samples``.

    X : array-like
        Test samples, whatever ``estimator.score_samples`` accepts.

    y : array-like of shape (n_samples,)
        Labels ``0`` = normal, ``1`` = anomalous (``+1`` / ``-1`` refused),
        or the output of :func:`make_targets` (its labels are used).

    Returns
    -------
    score : float
        :func:`image_auroc` of ``y`` and ``-estimator.score_samples(X)``;
        greater is better.

    See Also
    --------
    image_auroc : The metric on precomputed scores.
    make_anomaly_scorer : Scorers for other metrics.

    Notes
    -----
    Every test fold must contain normal and anomalous images; the training
    folds of an anomaly detector usually contain normal images only (pass
    ``cv`` as a list of ``(train, test)`` index pairs, or a one-class
    splitter).

    Examples
    --------
    >>> import numpy as np
    >>> from sklearn.covariance import EllipticEnvelope
    >>> from skpatch.metrics import image_auroc_scorer
    >>> rng = np.random.RandomState(0)
    >>> X_train = rng.normal(size=(50, 2))
    >>> X_test = np.vstack([rng.normal(size=(10, 2)), rng.normal(6, 1, size=(5, 2))])
    >>> y_test = np.r_[np.zeros(10), np.ones(5)]
    >>> detector = EllipticEnvelope(random_state=0).fit(X_train)
    >>> image_auroc_scorer(detector, X_test, y_test)
    1.0
    """
    y = _check_scorer_y(y)
    return image_auroc(y, _anomaly_scores(estimator, X))


def _anomaly_maps(estimator, X, masks, scorer):
    """Anomaly maps of ``X`` from a fitted detector or pipeline, checked against ``masks``."""
    from ._compose import anomaly_map  # estimator plumbing; metrics stay importable alone

    maps = anomaly_map(estimator, X)
    if maps.shape[1:] != masks.shape[1:]:
        raise ValueError(
            f"{scorer}: the anomaly maps are {maps.shape[1]}x{maps.shape[2]} but the masks "
            f"are {masks.shape[1]}x{masks.shape[2]}; set the detector's map_size to the "
            "masks' size and bring the masks to the embedder's geometry (resize and crop "
            "them as the images are), see skpatch.metrics.make_targets."
        )
    return maps


def pixel_auroc_scorer(estimator, X, y):
    """Pixel AUROC of a fitted detector or pipeline, as a scikit-learn scorer.

    A scorer callable ``scorer(estimator, X, y)`` for ``scoring=`` in
    :class:`~sklearn.model_selection.GridSearchCV` or ``cross_validate``.
    The anomaly maps come from :func:`skpatch.anomaly_map` (so the estimator
    is a skpatch detector, or a :class:`~sklearn.pipeline.Pipeline` ending in
    one), and the masks from ``y``, which must be built by
    :func:`make_targets`: scikit-learn slices ``y`` with each test fold's
    indices, so the masks of the fold arrive with it.

    Parameters
    ----------
    estimator : fitted detector or Pipeline
        Its last step has an ``anomaly_map`` method.

    X : array-like
        Test images (or embeddings for a bare detector).

    y : ndarray of shape (n_samples,), structured
        Labels and masks from :func:`make_targets`.

    Returns
    -------
    score : float
        :func:`pixel_auroc` of the masks and the maps; greater is better.

    See Also
    --------
    aupro_scorer : The region-balanced localization scorer.
    make_anomaly_scorer : Several metrics from one computation of the maps.

    Examples
    --------
    >>> import numpy as np
    >>> from skpatch import PaDiMDetector
    >>> from skpatch.metrics import make_targets, pixel_auroc_scorer
    >>> rng = np.random.RandomState(0)
    >>> X = rng.normal(size=(30, 4, 3, 3))
    >>> test = rng.normal(size=(4, 4, 3, 3))
    >>> test[3, :, 0, 0] += 20  # a defect in the corner of the last image
    >>> masks = np.zeros((4, 3, 3), dtype=bool)
    >>> masks[3, 0, 0] = True
    >>> detector = PaDiMDetector(map_size=None, sigma=0).fit(X)
    >>> pixel_auroc_scorer(detector, test, make_targets(masks=masks))
    1.0
    """
    labels = _check_scorer_y(y)
    _check_labels(labels, name="y", require_both=False)
    masks = _target_masks(y, "pixel_auroc_scorer")
    return pixel_auroc(masks, _anomaly_maps(estimator, X, masks, "pixel_auroc_scorer"))


def aupro_scorer(estimator, X, y):
    """AUPRO (up to a false positive rate of 0.3) of a fitted detector, as a scorer.

    As :func:`pixel_auroc_scorer`, with :func:`aupro` (``fpr_limit=0.3``,
    8-connected regions, the MVTec AD convention) as the metric.

    Parameters
    ----------
    estimator : fitted detector or Pipeline
        Its last step has an ``anomaly_map`` method.

    X : array-like
        Test images (or embeddings for a bare detector).

    y : ndarray of shape (n_samples,), structured
        Labels and masks from :func:`make_targets`.

    Returns
    -------
    score : float
        :func:`aupro` of the masks and the maps; greater is better.

    See Also
    --------
    pixel_auroc_scorer : The pixel-weighted localization scorer.

    Examples
    --------
    >>> import numpy as np
    >>> from skpatch import PaDiMDetector
    >>> from skpatch.metrics import aupro_scorer, make_targets
    >>> rng = np.random.RandomState(0)
    >>> X = rng.normal(size=(30, 4, 3, 3))
    >>> test = rng.normal(size=(4, 4, 3, 3))
    >>> test[3, :, 0, 0] += 20
    >>> masks = np.zeros((4, 3, 3), dtype=bool)
    >>> masks[3, 0, 0] = True
    >>> detector = PaDiMDetector(map_size=None, sigma=0).fit(X)
    >>> aupro_scorer(detector, test, make_targets(masks=masks))
    1.0
    """
    labels = _check_scorer_y(y)
    _check_labels(labels, name="y", require_both=False)
    masks = _target_masks(y, "aupro_scorer")
    return aupro(masks, _anomaly_maps(estimator, X, masks, "aupro_scorer"))


_IMAGE_METRICS = {"image_auroc": image_auroc}
_PIXEL_METRICS = {"pixel_auroc": pixel_auroc, "aupro": aupro}


class _MultiMetricScorer:
    """Scorer returning ``{name: value}``, from one image scoring and one map computation."""

    def __init__(self, names):
        self._names = tuple(names)

    def __call__(self, estimator, X, y):
        from ._compose import _split  # estimator plumbing; metrics stay importable alone

        labels = _check_scorer_y(y)
        results = {}
        # A pipeline's transform steps (the CNN) run once, for the scores and the maps.
        transformers, detector = _split(estimator)
        if transformers:
            for transformer in transformers:
                X = transformer.transform(X)
            estimator = detector
        if any(name in _IMAGE_METRICS for name in self._names):
            scores = _anomaly_scores(estimator, X)
        if any(name in _PIXEL_METRICS for name in self._names):
            masks = _target_masks(y, "make_anomaly_scorer")
            maps = _anomaly_maps(estimator, X, masks, "make_anomaly_scorer")
        for name in self._names:
            if name in _IMAGE_METRICS:
                results[name] = _IMAGE_METRICS[name](labels, scores)
            else:
                results[name] = _PIXEL_METRICS[name](masks, maps)
        return results

    def __repr__(self):
        return f"make_anomaly_scorer({list(self._names)!r})"


class _AnomalyScorer:
    """Scorer ``metric(y, -estimator.score_samples(X))`` (see make_anomaly_scorer)."""

    def __init__(self, metric):
        self._metric = metric

    def __call__(self, estimator, X, y):
        y = _check_scorer_y(y)
        y = _check_labels(y, name="y", require_both=False)
        scores = _check_scores(y, _anomaly_scores(estimator, X), name="-score_samples(X)")
        return float(self._metric(y, scores))

    def __repr__(self):
        return f"make_anomaly_scorer({getattr(self._metric, '__name__', self._metric)!s})"


_NAMED_SCORERS = {
    "image_auroc": image_auroc_scorer,
    "pixel_auroc": pixel_auroc_scorer,
    "aupro": aupro_scorer,
}


def make_anomaly_scorer(metric="image_auroc"):
    """Make a scorer that evaluates an outlier detector on anomaly scores or maps.

    The scorer computes anomaly scores as ``-estimator.score_samples(X)``
    (higher = more anomalous), checks that ``y`` uses skpatch's labels
    (``0`` = normal, ``1`` = anomalous), and returns ``metric(y, scores)``.

    Parameters
    ----------
    metric : str, list of str or callable, default="image_auroc"
        ``"image_auroc"``, ``"pixel_auroc"`` or ``"aupro"`` return
        :func:`image_auroc_scorer`, :func:`pixel_auroc_scorer` or
        :func:`aupro_scorer`. A list of these names returns one scorer that
        gives a dict ``{name: value}`` (scikit-learn's multi-metric scoring
        callable), computing the image scores and the maps once per fold
        instead of once per metric; pass ``refit=False`` or a name as
        ``refit`` of ``GridSearchCV``. A callable
        ``metric(y_true, anomaly_scores) -> float``, greater is better, with
        anomalies as the positive class (e.g.
        :func:`sklearn.metrics.average_precision_score`).

    Returns
    -------
    scorer : callable
        ``scorer(estimator, X, y) -> float`` (or ``-> dict`` for a list),
        usable as ``scoring=`` in :class:`~sklearn.model_selection.GridSearchCV`.

    See Also
    --------
    image_auroc_scorer : The image AUROC scorer.
    make_targets : The ``y`` that the pixel metrics need.

    Examples
    --------
    >>> from sklearn.metrics import average_precision_score
    >>> from skpatch.metrics import make_anomaly_scorer
    >>> make_anomaly_scorer(average_precision_score)
    make_anomaly_scorer(average_precision_score)
    >>> make_anomaly_scorer(["image_auroc", "aupro"])
    make_anomaly_scorer(['image_auroc', 'aupro'])
    """
    names = ", ".join(repr(name) for name in _NAMED_SCORERS)
    if isinstance(metric, str):
        if metric in _NAMED_SCORERS:
            return _NAMED_SCORERS[metric]
        raise ValueError(
            f"metric must be one of {names}, a list of them or a callable, got {metric!r}."
        )
    if isinstance(metric, (list, tuple)):
        unknown = [name for name in metric if name not in _NAMED_SCORERS]
        if unknown or not metric or len(set(metric)) != len(metric):
            raise ValueError(
                f"a list of metrics must hold distinct names among {names}, got {list(metric)!r}."
            )
        return _MultiMetricScorer(metric)
    if callable(metric):
        return _AnomalyScorer(metric)
    raise TypeError(
        f"metric must be one of {names}, a list of them or a callable, "
        f"got {type(metric).__name__}."
    )
