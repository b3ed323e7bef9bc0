"""Plots of anomaly maps and of detection and localization curves.

* :func:`plot_anomaly_map` overlays an anomaly map on its image, optionally
  with the outlines of the ground truth and of the thresholded map.
* :func:`plot_anomaly_grid` draws one row per image: the image, its ground
  truth, the anomaly map over the image and the predicted mask.
* :class:`AnomalyRocDisplay` draws the ROC curve of image scores or of map
  pixels, :class:`ProCurveDisplay` the per-region overlap (PRO) curve; both
  follow scikit-learn's display objects (``from_predictions``,
  ``from_estimator``, then ``plot``).

matplotlib is optional: it is imported when a plot is drawn, and its absence
raises an :class:`ImportError` that says how to install it.
"""

import numpy as np

from .metrics import _check_labels, _check_masks_and_maps, _check_scores, pro_curve

__all__ = [
    "AnomalyRocDisplay",
    "ProCurveDisplay",
    "plot_anomaly_grid",
    "plot_anomaly_map",
]


def _pyplot():
    """``matplotlib.pyplot``, or an ImportError that names the extra to install."""
    try:
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ImportError(
            "skpatch.plotting needs matplotlib: install it with "
            "`pip install skpatch[examples]` (or `pip install matplotlib`)."
        ) from exc
    return plt


def _get_ax(ax):
    if ax is None:
        _, ax = _pyplot().subplots()
    else:
        _pyplot()
    return ax


# --------------------------------------------------------------------------
# images and maps
# --------------------------------------------------------------------------


def _check_image(image, name="image"):
    """``(H, W)`` or ``(H, W, 3|4)`` array, uint8 or float in [0, 1]; squeeze (H, W, 1)."""
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[-1] not in (3, 4)):
        raise ValueError(
            f"{name} of shape {image.shape}: expected one image (H, W) or (H, W, 3); "
            "for a batch pass images[i]."
        )
    # Drawn with fixed limits (0-255 for uint8, 0-1 for floats): any other
    # range would be drawn saturated, e.g. a float image in [0, 255] all white.
    if image.dtype.kind == "f":
        if image.size and (np.nanmin(image) < 0 or np.nanmax(image) > 1):
            raise ValueError(
                f"{name}: float pixel values must be in [0, 1], got [{np.nanmin(image):.3g}, "
                f"{np.nanmax(image):.3g}]; divide by 255, or pass uint8."
            )
    elif image.dtype != np.uint8:
        raise ValueError(f"{name} of dtype {image.dtype}: expected uint8 or float in [0, 1].")
    return image


def _check_map(anomaly_map, name="anomaly_map", ndim=2):
    anomaly_map = np.asarray(anomaly_map)
    if anomaly_map.ndim != ndim:
        expected = "one map (H, W); for a batch of maps pass maps[i]" if ndim == 2 else "(n, h, w)"
        raise ValueError(f"{name} of shape {anomaly_map.shape}: expected {expected}.")
    if anomaly_map.dtype.kind not in "biuf" or not np.isfinite(anomaly_map).all():
        # a NaN would make the colour scale NaN and blank the whole overlay
        raise ValueError(f"{name} must hold finite numbers (no NaN or infinity).")
    return anomaly_map


def _check_mask(mask):
    """One mask ``(H, W)`` (or ``(H, W, 1)``) as booleans, non-zero = anomalous."""
    mask = np.asarray(mask)
    if mask.ndim == 3 and mask.shape[-1] == 1:
        mask = mask[..., 0]
    if mask.ndim != 2:
        raise ValueError(
            f"mask of shape {mask.shape}: expected one mask (H, W); for a batch pass masks[i]."
        )
    return mask != 0


def _extent(shape):
    """imshow extent that puts an array of ``shape`` over an image of that shape.

    Maps, masks and images of different resolutions (a 224 x 224 map of a
    300 x 300 image) are stretched over the same pixel coordinates.
    """
    height, width = shape[:2]
    return (-0.5, width - 0.5, height - 0.5, -0.5)


def _show_image(ax, image):
    """Draw an image with fixed intensity limits (uint8 0-255, float 0-1)."""
    if image.ndim == 2:
        vmax = 255 if image.dtype == np.uint8 else 1.0
        return ax.imshow(image, cmap="gray", vmin=0, vmax=vmax, interpolation="nearest")
    return ax.imshow(image, interpolation="nearest")


def _contour(ax, array, level, extent, color):
    """Outline of ``array > level``; nothing when no value or every value is above it."""
    array = np.asarray(array, dtype=np.float64)
    if not (array.min() <= level < array.max()):
        return None
    height, width = array.shape
    left, right, bottom, top = extent  # imshow's order; row 0 is at the top
    xs = left + (np.arange(width) + 0.5) * (right - left) / width
    ys = top + (np.arange(height) + 0.5) * (bottom - top) / height
    return ax.contour(xs, ys, array, levels=[level], colors=[color], linewidths=1.5)


def plot_anomaly_map(
    image,
    anomaly_map,
    *,
    mask=None,
    threshold=None,
    ax=None,
    alpha=0.5,
    cmap="jet",
    vmin=None,
    vmax=None,
    colorbar=False,
):
    """Overlay an anomaly map on its image.

    The map is drawn semi-transparent over the image and stretched to cover
    it, so a 224 x 224 map of a 300 x 300 image lands on the same pixels.
    The ground-truth mask (white) and the region where the map reaches
    ``threshold`` (black) are outlined.

    Parameters
    ----------
    image : array-like of shape (H, W) or (H, W, 3)
        The image, ``uint8`` in [0, 255] or float in [0, 1]; grayscale
        images are drawn in gray with fixed limits (0 to 255, or 0 to 1).
        With a center-cropping :class:`~skpatch.PatchEmbedder`, pass the
        image as the model saw it (resized and cropped): the map covers the
        crop only.
    anomaly_map : array-like of shape (h, w)
        Anomaly scores per pixel, higher = more anomalous (one map of
        :func:`skpatch.anomaly_map`).
    mask : array-like of shape (h', w') or (h', w', 1), default=None
        Ground-truth mask (non-zero = anomalous) to outline.
    threshold : float, default=None
        Outline the pixels whose anomaly score is above ``threshold`` (as
        ``predict`` flags an image above ``-offset_``): the predicted defect.
    ax : matplotlib Axes, default=None
        Axes to draw on; a new figure when None.
    alpha : float, default=0.5
        Opacity of the map.
    cmap : str or Colormap, default="jet"
        Colormap of the map.
    vmin, vmax : float, default=None
        Limits of the color scale; the map's minimum and maximum when None.
        Give the same limits to compare several maps.
    colorbar : bool, default=False
        Whether to add a colorbar of the anomaly scores.

    Returns
    -------
    ax : matplotlib Axes
        The axes drawn on: ``ax.images[0]`` is the image, ``ax.images[1]``
        the map.

    See Also
    --------
    plot_anomaly_grid : Image, ground truth, map and predicted mask of many images.

    Examples
    --------
    >>> import matplotlib
    >>> matplotlib.use("Agg")
    >>> import numpy as np
    >>> from skpatch.plotting import plot_anomaly_map
    >>> image = np.zeros((32, 32), dtype=np.uint8)
    >>> heat = np.zeros((16, 16))
    >>> heat[4:8, 4:8] = 1.0
    >>> ax = plot_anomaly_map(image, heat, threshold=0.5)
    >>> ax.images[1].get_extent()
    [-0.5, 31.5, 31.5, -0.5]
    """
    image = _check_image(image)
    anomaly_map = _check_map(anomaly_map)
    ax = _get_ax(ax)
    extent = _extent(image.shape)
    _show_image(ax, image)
    vmin = float(np.min(anomaly_map)) if vmin is None else vmin
    vmax = float(np.max(anomaly_map)) if vmax is None else vmax
    heat = ax.imshow(
        anomaly_map, cmap=cmap, alpha=alpha, vmin=vmin, vmax=vmax, extent=extent,
        interpolation="bilinear",
    )
    if mask is not None:
        _contour(ax, _check_mask(mask), 0.5, extent, "white")
    if threshold is not None:
        _contour(ax, anomaly_map, threshold, extent, "black")
    if colorbar:
        ax.figure.colorbar(heat, ax=ax, fraction=0.046, pad=0.04, label="anomaly score")
    ax.set_axis_off()
    return ax


def plot_anomaly_grid(
    images,
    anomaly_maps,
    *,
    masks=None,
    threshold=None,
    titles=None,
    alpha=0.5,
    cmap="jet",
    vmin=None,
    vmax=None,
    size=2.2,
):
    """Image, ground truth, anomaly map and predicted mask, one row per image.

    The columns are the image; its ground-truth mask (when ``masks`` is
    given); the anomaly map over the image (:func:`plot_anomaly_map`); and
    the predicted mask ``anomaly_map > threshold`` (when ``threshold`` is
    given). All maps share one color scale, so that their colors compare.

    Parameters
    ----------
    images : array-like of shape (n, H, W) or (n, H, W, 3)
        Images, ``uint8`` or float in [0, 1].
    anomaly_maps : array-like of shape (n, h, w)
        Their anomaly maps, higher = more anomalous.
    masks : array-like of shape (n, H', W'), default=None
        Ground-truth masks (non-zero = anomalous); adds the ground-truth
        column.
    threshold : float, default=None
        Pixel threshold of the predicted masks; adds the predicted-mask
        column and outlines the predicted region on the overlay.
    titles : sequence of str, default=None
        One title per row, written above its image (e.g. the image score).
    alpha : float, default=0.5
        Opacity of the maps over the images.
    cmap : str or Colormap, default="jet"
        Colormap of the maps.
    vmin, vmax : float, default=None
        Shared color scale of the maps; the minimum and maximum of all maps
        when None.
    size : float, default=2.2
        Side of one panel, in inches.

    Returns
    -------
    fig : matplotlib Figure
        The figure.
    axes : ndarray of matplotlib Axes of shape (n, n_columns)
        The panels, one row per image.

    See Also
    --------
    plot_anomaly_map : The overlay of one map.

    Examples
    --------
    >>> import matplotlib
    >>> matplotlib.use("Agg")
    >>> import numpy as np
    >>> from skpatch.plotting import plot_anomaly_grid
    >>> images = np.zeros((2, 32, 32), dtype=np.uint8)
    >>> maps = np.random.RandomState(0).rand(2, 32, 32)
    >>> masks = maps > 0.9
    >>> fig, axes = plot_anomaly_grid(images, maps, masks=masks, threshold=0.9)
    >>> axes.shape
    (2, 4)
    >>> [ax.get_title() for ax in axes[0]]
    ['image', 'ground truth', 'anomaly map', 'predicted mask']
    """
    plt = _pyplot()
    images = np.asarray(images)
    maps = _check_map(anomaly_maps, "anomaly_maps", ndim=3)
    if images.ndim not in (3, 4) or len(images) != len(maps):
        raise ValueError(
            f"images of shape {images.shape} and anomaly_maps of shape {maps.shape}: "
            "expected (n, H, W) or (n, H, W, 3) images, one per map."
        )
    if masks is not None:
        masks = np.asarray(masks)
        if masks.ndim != 3 or len(masks) != len(maps):
            raise ValueError(
                f"masks of shape {masks.shape}: expected (n, H, W), one per map ({len(maps)})."
            )
    if titles is not None and len(titles) != len(maps):
        raise ValueError(f"{len(titles)} titles for {len(maps)} images.")
    vmin = float(maps.min()) if vmin is None else vmin
    vmax = float(maps.max()) if vmax is None else vmax
    columns = ["image"]
    if masks is not None:
        columns.append("ground truth")
    columns.append("anomaly map")
    if threshold is not None:
        columns.append("predicted mask")

    n_rows, n_cols = len(maps), len(columns)
    fig, axes = plt.subplots(
        n_rows, n_cols, figsize=(size * n_cols, size * n_rows), squeeze=False
    )
    for row in range(n_rows):
        image = _check_image(images[row], "images[i]")
        for col, column in enumerate(columns):
            ax = axes[row, col]
            if column == "image":
                _show_image(ax, image)
                ax.set_axis_off()
            elif column == "ground truth":
                ax.imshow(masks[row] != 0, cmap="gray", vmin=0, vmax=1,
                          extent=_extent(image.shape), interpolation="nearest")
                ax.set_axis_off()
            elif column == "anomaly map":
                plot_anomaly_map(
                    image, maps[row], threshold=threshold, ax=ax, alpha=alpha, cmap=cmap,
                    vmin=vmin, vmax=vmax,
                )
            else:
                ax.imshow(maps[row] > threshold, cmap="gray", vmin=0, vmax=1,
                          extent=_extent(image.shape), interpolation="nearest")
                ax.set_axis_off()
            if row == 0:
                ax.set_title(column, fontsize=10)
        if titles is not None:
            label = titles[row] if row else f"{columns[0]}\n{titles[row]}"
            axes[row, 0].set_title(label, fontsize=9)
    fig.tight_layout()
    return fig, axes


# --------------------------------------------------------------------------
# curves
# --------------------------------------------------------------------------


def _thin_curve(x, y, resolution=2000):
    """Indices of a monotone curve's points enough to draw it within ``1/resolution``.

    A PRO curve has one point per distinct pixel score (millions); drawing
    them all is slow and changes nothing on screen. A point is kept when it
    enters a new cell of a ``resolution x resolution`` grid, with its
    predecessor, so every corner of the staircase stays.
    """
    if len(x) <= 2 * resolution:
        return np.arange(len(x))
    cells = np.floor(np.clip(x, 0, 1) * resolution) * (resolution + 1) + np.floor(
        np.clip(y, 0, 1) * resolution
    )
    change = np.flatnonzero(np.diff(cells) != 0) + 1
    keep = np.unique(np.concatenate(([0, len(x) - 1], change, change - 1)))
    return keep


class AnomalyRocDisplay:
    """ROC curve of anomaly scores, of images or of map pixels.

    Build it with :meth:`from_predictions` (image labels and scores),
    :meth:`from_maps` (ground-truth masks and anomaly maps, every pixel a
    sample) or :meth:`from_estimator` (a fitted pipeline and labelled
    images); then it is drawn with :meth:`plot`. It follows scikit-learn's
    :class:`~sklearn.metrics.RocCurveDisplay`, in skpatch's conventions:
    labels are 0 = normal and 1 = anomalous and scores are higher for more
    anomalous samples (the opposite of ``score_samples``).

    Parameters
    ----------
    fpr : ndarray of shape (n_points,)
        False positive rates, increasing.
    tpr : ndarray of shape (n_points,)
        True positive rates.
    roc_auc : float, default=None
        Area under the curve, written in the legend.
    name : str, default=None
        Name of the curve in the legend.

    Attributes
    ----------
    line_ : matplotlib Line2D
        The curve.
    ax_ : matplotlib Axes
        Axes with the curve.
    figure_ : matplotlib Figure
        Figure with the curve.

    See Also
    --------
    ProCurveDisplay : Per-region overlap curve of anomaly maps.
    skpatch.metrics.image_auroc : The area under the image ROC curve.
    skpatch.metrics.pixel_auroc : The area under the pixel ROC curve.

    Examples
    --------
    >>> import matplotlib
    >>> matplotlib.use("Agg")
    >>> from skpatch.plotting import AnomalyRocDisplay
    >>> display = AnomalyRocDisplay.from_predictions([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
    >>> display.roc_auc
    0.75
    >>> display.line_.get_label()
    'AUROC = 0.750'
    """

    def __init__(self, *, fpr, tpr, roc_auc=None, name=None):
        self.fpr = fpr
        self.tpr = tpr
        self.roc_auc = roc_auc
        self.name = name

    def plot(self, ax=None, *, name=None, chance_level=True, **kwargs):
        """Draw the curve.

        Parameters
        ----------
        ax : matplotlib Axes, default=None
            Axes to draw on; a new figure when None.
        name : str, default=None
            Name of the curve in the legend; overrides the ``name`` given at
            construction.
        chance_level : bool, default=True
            Whether to draw the diagonal of a random scorer.
        **kwargs : dict
            Passed to :meth:`matplotlib.axes.Axes.plot`.

        Returns
        -------
        display : AnomalyRocDisplay
            Object with the matplotlib artists (``line_``, ``ax_``, ``figure_``).
        """
        ax = _get_ax(ax)
        name = self.name if name is None else name
        label = _legend_label(name, "AUROC", self.roc_auc)
        keep = _thin_curve(self.fpr, self.tpr)
        if label is not None:
            kwargs.setdefault("label", label)
        (self.line_,) = ax.plot(self.fpr[keep], self.tpr[keep], **kwargs)
        if chance_level:
            ax.plot([0, 1], [0, 1], color="gray", linestyle=":", linewidth=1)
        ax.set(xlabel="false positive rate", ylabel="true positive rate",
               xlim=(-0.01, 1.01), ylim=(-0.01, 1.01))
        ax.set_aspect("equal")
        if label is not None:
            ax.legend(loc="lower right")
        self.ax_, self.figure_ = ax, ax.figure
        return self

    @classmethod
    def from_predictions(cls, y_true, anomaly_scores, *, name=None, ax=None, **kwargs):
        """ROC curve of image labels and image anomaly scores.

        Parameters
        ----------
        y_true : array-like of shape (n_images,)
            0 = normal, 1 = anomalous (``bool`` accepted).
        anomaly_scores : array-like of shape (n_images,)
            Higher = more anomalous, e.g. ``-pipe.score_samples(X)``.
        name : str, default=None
            Name of the curve in the legend.
        ax : matplotlib Axes, default=None
            Axes to draw on; a new figure when None.
        **kwargs : dict
            Passed to :meth:`matplotlib.axes.Axes.plot`.

        Returns
        -------
        display : AnomalyRocDisplay
            The drawn display.
        """
        from sklearn.metrics import auc, roc_curve

        y = _check_labels(y_true)
        scores = _check_scores(y, anomaly_scores)
        fpr, tpr, _ = roc_curve(y, scores)
        display = cls(fpr=fpr, tpr=tpr, roc_auc=float(auc(fpr, tpr)), name=name)
        return display.plot(ax=ax, **kwargs)

    @classmethod
    def from_maps(cls, masks, anomaly_maps, *, name=None, ax=None, **kwargs):
        """Pixel ROC curve: every pixel of every map is one sample.

        Parameters
        ----------
        masks : array-like of shape (n_images, H, W)
            Ground-truth masks, ``bool`` or 0 / 1.
        anomaly_maps : array-like of shape (n_images, H, W)
            Anomaly maps, higher = more anomalous.
        name : str, default=None
            Name of the curve in the legend.
        ax : matplotlib Axes, default=None
            Axes to draw on; a new figure when None.
        **kwargs : dict
            Passed to :meth:`matplotlib.axes.Axes.plot`.

        Returns
        -------
        display : AnomalyRocDisplay
            The drawn display; ``roc_auc`` equals
            :func:`skpatch.metrics.pixel_auroc`.
        """
        from sklearn.metrics import auc, roc_curve

        masks, maps = _check_masks_and_maps(masks, anomaly_maps)
        y = masks.ravel()
        if y.all() or not y.any():
            raise ValueError("masks must contain both normal and anomalous pixels for a ROC curve.")
        fpr, tpr, _ = roc_curve(y, maps.ravel())
        display = cls(fpr=fpr, tpr=tpr, roc_auc=float(auc(fpr, tpr)), name=name)
        return display.plot(ax=ax, **kwargs)

    @classmethod
    def from_estimator(cls, estimator, X, y, *, name=None, ax=None, **kwargs):
        """Image ROC curve of a fitted detector or pipeline on labelled images.

        Parameters
        ----------
        estimator : Pipeline or detector
            Fitted; its anomaly scores are ``-estimator.score_samples(X)``.
        X : array-like or sequence
            Images (input of the estimator).
        y : array-like of shape (n_images,)
            0 = normal, 1 = anomalous.
        name : str, default=None
            Name of the curve in the legend; the name of the detector's class
            when None.
        ax : matplotlib Axes, default=None
            Axes to draw on; a new figure when None.
        **kwargs : dict
            Passed to :meth:`matplotlib.axes.Axes.plot`.

        Returns
        -------
        display : AnomalyRocDisplay
            The drawn display.
        """
        scores = -np.asarray(estimator.score_samples(X), dtype=np.float64)
        name = _estimator_name(estimator) if name is None else name
        return cls.from_predictions(y, scores, name=name, ax=ax, **kwargs)


class ProCurveDisplay:
    """Per-region overlap (PRO) curve of anomaly maps.

    The PRO of :func:`skpatch.metrics.pro_curve` against the false positive
    rate of the pixels, drawn up to ``fpr_limit``, the range that
    :func:`skpatch.metrics.aupro` integrates (MVTec AD uses 0.3). Build it
    with :meth:`from_maps` or :meth:`from_estimator`.

    Parameters
    ----------
    fpr : ndarray of shape (n_points,)
        False positive rates, non-decreasing.
    pro : ndarray of shape (n_points,)
        Per-region overlap at the same thresholds.
    aupro : float, default=None
        Normalized area up to ``fpr_limit``, written in the legend.
    fpr_limit : float, default=0.3
        Right end of the x axis.
    name : str, default=None
        Name of the curve in the legend.

    Attributes
    ----------
    line_ : matplotlib Line2D
        The curve.
    ax_ : matplotlib Axes
        Axes with the curve.
    figure_ : matplotlib Figure
        Figure with the curve.

    See Also
    --------
    AnomalyRocDisplay : Image or pixel ROC curve.
    skpatch.metrics.pro_curve : The curve.
    skpatch.metrics.aupro : Its normalized area.

    Examples
    --------
    >>> import matplotlib
    >>> matplotlib.use("Agg")
    >>> from skpatch.plotting import ProCurveDisplay
    >>> display = ProCurveDisplay.from_maps(
    ...     [[[1, 1, 0, 0]]], [[[0.9, 0.4, 0.6, 0.1]]], fpr_limit=1.0)
    >>> display.aupro
    0.75
    >>> display.line_.get_xdata()
    array([0. , 0. , 0.5, 0.5, 1. ])
    """

    def __init__(self, *, fpr, pro, aupro=None, fpr_limit=0.3, name=None):
        self.fpr = fpr
        self.pro = pro
        self.aupro = aupro
        self.fpr_limit = fpr_limit
        self.name = name

    def plot(self, ax=None, *, name=None, **kwargs):
        """Draw the curve up to ``fpr_limit``.

        Parameters
        ----------
        ax : matplotlib Axes, default=None
            Axes to draw on; a new figure when None.
        name : str, default=None
            Name of the curve in the legend; overrides the ``name`` given at
            construction.
        **kwargs : dict
            Passed to :meth:`matplotlib.axes.Axes.plot`.

        Returns
        -------
        display : ProCurveDisplay
            Object with the matplotlib artists (``line_``, ``ax_``, ``figure_``).
        """
        ax = _get_ax(ax)
        name = self.name if name is None else name
        label = _legend_label(name, f"AUPRO@{self.fpr_limit:g}", self.aupro)
        # The first point past the limit ends the visible part of the curve.
        end = min(int(np.searchsorted(self.fpr, self.fpr_limit, side="right")) + 1, len(self.fpr))
        fpr, pro = self.fpr[:end], self.pro[:end]
        keep = _thin_curve(fpr / self.fpr_limit, pro)
        if label is not None:
            kwargs.setdefault("label", label)
        (self.line_,) = ax.plot(fpr[keep], pro[keep], **kwargs)
        ax.set(xlabel="false positive rate (pixels)", ylabel="per-region overlap",
               xlim=(0, self.fpr_limit), ylim=(-0.01, 1.01))
        if label is not None:
            ax.legend(loc="lower right")
        self.ax_, self.figure_ = ax, ax.figure
        return self

    @classmethod
    def from_maps(
        cls, masks, anomaly_maps, *, fpr_limit=0.3, connectivity=8, name=None, ax=None, **kwargs
    ):
        """PRO curve of ground-truth masks and anomaly maps.

        Parameters
        ----------
        masks : array-like of shape (n_images, H, W)
            Ground-truth masks, ``bool`` or 0 / 1; every connected component
            is one region.
        anomaly_maps : array-like of shape (n_images, H, W)
            Anomaly maps, higher = more anomalous.
        fpr_limit : float, default=0.3
            False positive rate up to which the curve is drawn and its area
            computed.
        connectivity : {8, 4}, default=8
            Pixel connectivity of a region (see :func:`skpatch.metrics.pro_curve`).
        name : str, default=None
            Name of the curve in the legend.
        ax : matplotlib Axes, default=None
            Axes to draw on; a new figure when None.
        **kwargs : dict
            Passed to :meth:`matplotlib.axes.Axes.plot`.

        Returns
        -------
        display : ProCurveDisplay
            The drawn display; ``aupro`` equals :func:`skpatch.metrics.aupro`.
        """
        from .metrics import aupro

        fpr, pro = pro_curve(masks, anomaly_maps, connectivity=connectivity)
        area = aupro(masks, anomaly_maps, fpr_limit=fpr_limit, connectivity=connectivity)
        display = cls(fpr=fpr, pro=pro, aupro=area, fpr_limit=fpr_limit, name=name)
        return display.plot(ax=ax, **kwargs)

    @classmethod
    def from_estimator(
        cls, estimator, X, masks, *, fpr_limit=0.3, connectivity=8, name=None, ax=None, **kwargs
    ):
        """PRO curve of a fitted detector or pipeline on images with masks.

        Parameters
        ----------
        estimator : Pipeline or detector
            Fitted; its maps are :func:`skpatch.anomaly_map` ``(estimator, X)``,
            which must have the shape of ``masks``.
        X : array-like or sequence
            Images (input of the estimator).
        masks : array-like of shape (n_images, H, W)
            Ground-truth masks at the resolution of the maps.
        fpr_limit : float, default=0.3
            False positive rate up to which the curve is drawn and its area
            computed.
        connectivity : {8, 4}, default=8
            Pixel connectivity of a region.
        name : str, default=None
            Name of the curve in the legend; the name of the detector's class
            when None.
        ax : matplotlib Axes, default=None
            Axes to draw on; a new figure when None.
        **kwargs : dict
            Passed to :meth:`matplotlib.axes.Axes.plot`.

        Returns
        -------
        display : ProCurveDisplay
            The drawn display.
        """
        from ._compose import anomaly_map

        maps = anomaly_map(estimator, X)
        name = _estimator_name(estimator) if name is None else name
        return cls.from_maps(
            masks, maps, fpr_limit=fpr_limit, connectivity=connectivity, name=name, ax=ax,
            **kwargs,
        )


def _legend_label(name, metric, value):
    """``"name (metric = value)"``, ``"name"``, ``"metric = value"`` or None."""
    score = None if value is None else f"{metric} = {value:.3f}"
    if name and score:
        return f"{name} ({score})"
    return name or score


def _estimator_name(estimator):
    from ._compose import _split

    return type(_split(estimator)[1]).__name__
