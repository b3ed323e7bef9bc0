"""skpatch.plotting: what the artists show, not only that they are drawn."""

import sys

import numpy as np
import pytest

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from sklearn.metrics import roc_curve  # noqa: E402
from sklearn.pipeline import make_pipeline  # noqa: E402

from skpatch import PaDiMDetector, PatchEmbedder, anomaly_map  # noqa: E402
from skpatch.metrics import aupro, image_auroc, pixel_auroc, pro_curve  # noqa: E402
from skpatch.plotting import (  # noqa: E402
    AnomalyRocDisplay,
    ProCurveDisplay,
    plot_anomaly_grid,
    plot_anomaly_map,
)


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


@pytest.fixture
def maps_and_masks():
    rng = np.random.RandomState(0)
    masks = np.zeros((3, 20, 20), dtype=bool)
    masks[0, 2:6, 3:9] = True
    masks[1, 10:18, 10:12] = True
    maps = rng.rand(3, 20, 20) + 0.8 * masks
    return maps, masks


# ------------------------------------------------------------------ overlays


def test_overlay_stretches_the_map_over_the_image():
    image = np.arange(30 * 40, dtype=np.uint8).reshape(30, 40)
    heat = np.linspace(0, 1, 15 * 20).reshape(15, 20)
    ax = plot_anomaly_map(image, heat, alpha=0.3, cmap="viridis", vmin=0.2, vmax=0.8)
    shown_image, shown_map = ax.images
    np.testing.assert_array_equal(shown_image.get_array(), image)
    assert shown_image.get_cmap().name == "gray" and shown_image.get_clim() == (0, 255)
    np.testing.assert_array_equal(shown_map.get_array(), heat)
    # A 15 x 20 map covers the 30 x 40 image, pixel edges on pixel edges.
    assert shown_map.get_extent() == [-0.5, 39.5, 29.5, -0.5]
    assert shown_image.get_extent() == [-0.5, 39.5, 29.5, -0.5]
    assert shown_map.get_alpha() == 0.3 and shown_map.get_cmap().name == "viridis"
    assert shown_map.get_clim() == (0.2, 0.8)
    assert not ax.axison


def test_overlay_defaults_to_the_map_range_and_draws_rgb_as_is():
    image = np.random.RandomState(0).rand(8, 8, 3)
    heat = np.random.RandomState(1).rand(8, 8) * 5 + 2
    ax = plot_anomaly_map(image, heat)
    np.testing.assert_allclose(ax.images[0].get_array(), image)
    assert ax.images[1].get_clim() == (heat.min(), heat.max())


def test_overlay_outlines_the_ground_truth_and_the_threshold():
    image = np.zeros((16, 16), dtype=np.uint8)
    heat = np.zeros((16, 16))
    heat[4:8, 4:8] = 1.0
    mask = np.zeros((16, 16), dtype=bool)
    mask[10:14, 10:14] = True
    ax = plot_anomaly_map(image, heat, mask=mask, threshold=0.5)
    truth, predicted = ax.collections  # contour sets, in drawing order
    for contour, (low, high) in ((truth, (9, 14)), (predicted, (3, 8))):
        vertices = np.concatenate([path.vertices for path in contour.get_paths()])
        assert low <= vertices.min() and vertices.max() <= high
    assert matplotlib.colors.to_hex(truth.get_edgecolor()[0]) == "#ffffff"
    assert matplotlib.colors.to_hex(predicted.get_edgecolor()[0]) == "#000000"


def test_no_outline_when_the_threshold_is_never_reached():
    heat = np.random.RandomState(0).rand(8, 8)
    ax = plot_anomaly_map(np.zeros((8, 8)), heat, threshold=2.0, colorbar=True)
    assert not ax.collections
    assert len(ax.figure.axes) == 2  # the colorbar


def test_overlay_draws_on_the_given_axes():
    fig, axes = plt.subplots(1, 2)
    ax = plot_anomaly_map(np.zeros((4, 4)), np.ones((4, 4)), ax=axes[1])
    assert ax is axes[1] and not axes[0].images


@pytest.mark.parametrize(
    "image, heat",
    [(np.zeros((2, 8, 8)), np.zeros((8, 8))), (np.zeros((8, 8)), np.zeros((1, 8, 8)))],
)
def test_overlay_rejects_batches(image, heat):
    with pytest.raises(ValueError, match="expected one"):
        plot_anomaly_map(image, heat)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_maps_that_are_not_finite_are_refused(bad):
    # a NaN made the colour scale NaN and blanked the overlay, silently
    heat = np.zeros((8, 8))
    heat[2, 3] = bad
    with pytest.raises(ValueError, match=r"anomaly_map must hold finite numbers"):
        plot_anomaly_map(np.zeros((8, 8)), heat)
    with pytest.raises(ValueError, match=r"anomaly_maps must hold finite numbers"):
        plot_anomaly_grid(np.zeros((1, 8, 8)), heat[None])
    with pytest.raises(ValueError, match=r"anomaly_maps of shape \(8, 8\): expected \(n, h, w\)"):
        plot_anomaly_grid(np.zeros((1, 8, 8)), heat)


def test_overlay_takes_an_h_w_1_mask_and_names_a_bad_one():
    image, heat = np.zeros((16, 16), dtype=np.uint8), np.zeros((16, 16))
    mask = np.zeros((16, 16, 1), dtype=bool)
    mask[10:14, 10:14] = True
    assert len(plot_anomaly_map(image, heat, mask=mask).collections) == 1
    for bad in (np.zeros(16), np.zeros((2, 16, 16))):
        with pytest.raises(ValueError, match="mask of shape .*expected one mask"):
            plot_anomaly_map(image, heat, mask=bad)


@pytest.mark.parametrize(
    "image, match",
    [(np.full((8, 8), 200.0), r"\[0, 1\].*divide by 255"), (np.zeros((8, 8), np.int64), "int64")],
)
def test_overlay_names_pixel_values_it_would_draw_wrong(image, match):
    # fixed limits (0-1 for floats): a float image in [0, 255] was drawn white
    with pytest.raises(ValueError, match=match):
        plot_anomaly_map(image, np.zeros((8, 8)))


def test_grid_columns_and_contents(maps_and_masks):
    maps, masks = maps_and_masks
    images = (np.random.RandomState(2).rand(3, 20, 20) * 255).astype(np.uint8)
    fig, axes = plot_anomaly_grid(
        images, maps, masks=masks, threshold=1.2, titles=["a", "b", "c"]
    )
    assert axes.shape == (3, 4) and fig is axes[0, 0].figure
    assert axes[0, 0].get_title() == "image\na" and axes[1, 0].get_title() == "b"
    assert [ax.get_title() for ax in axes[0, 1:]] == [
        "ground truth", "anomaly map", "predicted mask"
    ]
    for row in range(3):
        np.testing.assert_array_equal(axes[row, 0].images[0].get_array(), images[row])
        np.testing.assert_array_equal(axes[row, 1].images[0].get_array(), masks[row])
        overlay = axes[row, 2].images[1]
        np.testing.assert_array_equal(overlay.get_array(), maps[row])
        # One color scale for every map.
        assert overlay.get_clim() == (maps.min(), maps.max())
        np.testing.assert_array_equal(axes[row, 3].images[0].get_array(), maps[row] > 1.2)


def test_predicted_masks_agree_with_predict_at_a_tie():
    # predict calls an image whose score equals -offset_ normal: its mask is empty
    X = np.random.RandomState(0).normal(size=(9, 4, 6, 6)).astype(np.float32)
    detector = PaDiMDetector(map_size=12, sigma=1, contamination=0.25, calibration="in-sample")
    maps = detector.fit(X).anomaly_map(X)
    threshold = -detector.offset_
    assert (maps.max(axis=(1, 2)) == threshold).any()  # in-sample: a training score
    _, axes = plot_anomaly_grid(np.zeros((9, 12, 12)), maps, threshold=threshold)
    predicted = np.array([axes[row, 2].images[0].get_array().any() for row in range(9)])
    np.testing.assert_array_equal(predicted, detector.predict(X) == -1)
    ax = plot_anomaly_map(np.zeros((12, 12)), maps[0] * 0 + threshold, threshold=threshold)
    assert not ax.collections  # no pixel above the threshold: no outline


def test_grid_without_masks_or_threshold_has_two_columns(maps_and_masks):
    maps, _ = maps_and_masks
    fig, axes = plot_anomaly_grid(np.zeros((3, 20, 20, 3)), maps, vmin=0, vmax=3)
    assert axes.shape == (3, 2)
    assert axes[2, 1].images[1].get_clim() == (0, 3)


def test_grid_checks_lengths(maps_and_masks):
    maps, masks = maps_and_masks
    with pytest.raises(ValueError, match="one per map"):
        plot_anomaly_grid(np.zeros((2, 20, 20)), maps)
    with pytest.raises(ValueError, match="masks"):
        plot_anomaly_grid(np.zeros((3, 20, 20)), maps, masks=masks[:2])
    with pytest.raises(ValueError, match="titles"):
        plot_anomaly_grid(np.zeros((3, 20, 20)), maps, titles=["x"])


# ------------------------------------------------------------------ curves


def test_image_roc_display_matches_sklearn():
    rng = np.random.RandomState(0)
    y = np.r_[np.zeros(30, int), np.ones(20, int)]
    scores = rng.rand(50) + 0.5 * y
    display = AnomalyRocDisplay.from_predictions(y, scores, name="PaDiM")
    fpr, tpr, _ = roc_curve(y, scores)
    np.testing.assert_allclose(display.line_.get_xdata(), fpr)
    np.testing.assert_allclose(display.line_.get_ydata(), tpr)
    assert display.roc_auc == pytest.approx(image_auroc(y, scores))
    assert display.line_.get_label() == f"PaDiM (AUROC = {display.roc_auc:.3f})"
    assert display.ax_.get_xlabel() == "false positive rate"
    assert display.figure_ is display.ax_.figure
    # The chance diagonal.
    np.testing.assert_array_equal(display.ax_.lines[1].get_xydata(), [[0, 0], [1, 1]])


def test_roc_display_and_metrics_read_the_labels_of_make_targets():
    from skpatch.metrics import make_targets

    labels, scores = np.array([0, 1, 0, 1]), np.array([0.1, 0.9, 0.2, 0.3])
    masks = np.zeros((4, 3, 3), bool)
    masks[labels == 1, 1, 1] = True
    y = make_targets(labels, masks)
    assert AnomalyRocDisplay.from_predictions(y, scores).roc_auc == image_auroc(labels, scores)
    assert image_auroc(y, scores) == image_auroc(labels, scores)


def test_roc_display_refuses_outlier_labels():
    with pytest.raises(ValueError, match="-1"):
        AnomalyRocDisplay.from_predictions([1, -1, 1], [0.1, 0.9, 0.2])


def test_roc_plot_again_on_other_axes_with_kwargs():
    display = AnomalyRocDisplay.from_predictions([0, 1, 0, 1], [0.1, 0.9, 0.2, 0.3])
    fig, ax = plt.subplots()
    display.plot(ax=ax, name="again", chance_level=False, color="red")
    assert display.ax_ is ax and len(ax.lines) == 1
    assert display.line_.get_color() == "red"
    assert display.line_.get_label() == "again (AUROC = 1.000)"


def test_pixel_roc_display(maps_and_masks):
    maps, masks = maps_and_masks
    display = AnomalyRocDisplay.from_maps(masks, maps)
    assert display.roc_auc == pytest.approx(pixel_auroc(masks, maps))
    fpr, tpr, _ = roc_curve(masks.ravel(), maps.ravel())
    np.testing.assert_allclose(display.line_.get_xdata(), fpr)
    with pytest.raises(ValueError, match="both normal and anomalous"):
        AnomalyRocDisplay.from_maps(np.zeros_like(masks), maps)


def test_pro_display_is_the_pro_curve_up_to_the_limit(maps_and_masks):
    maps, masks = maps_and_masks
    display = ProCurveDisplay.from_maps(masks, maps, fpr_limit=0.3, name="x")
    fpr, pro = pro_curve(masks, maps)
    np.testing.assert_array_equal(display.fpr, fpr)
    np.testing.assert_array_equal(display.pro, pro)
    assert display.aupro == pytest.approx(aupro(masks, maps, fpr_limit=0.3))
    x, y = display.line_.get_xdata(), display.line_.get_ydata()
    # Every point up to the limit, and the first one past it.
    n_within = np.searchsorted(fpr, 0.3, side="right")
    np.testing.assert_array_equal(x, fpr[: n_within + 1])
    np.testing.assert_array_equal(y, pro[: n_within + 1])
    assert display.ax_.get_xlim() == (0, 0.3)
    assert display.line_.get_label() == f"x (AUPRO@0.3 = {display.aupro:.3f})"


def test_long_pro_curves_are_thinned_within_a_pixel():
    rng = np.random.RandomState(0)
    masks = np.zeros((4, 100, 100), dtype=bool)
    masks[:, 20:50, 30:60] = True
    maps = rng.rand(4, 100, 100) + masks  # 40,000 distinct scores
    display = ProCurveDisplay.from_maps(masks, maps, fpr_limit=1.0)
    x, y = display.line_.get_xdata(), display.line_.get_ydata()
    assert len(x) < len(display.fpr) / 2
    assert (x[0], y[0]) == (0.0, 0.0) and (x[-1], y[-1]) == (1.0, 1.0)
    # Every point of the curve is within 1/2000 (in both axes) of the last
    # drawn point before it: the drawing is exact to well under a pixel.
    kept = np.flatnonzero(np.isin(np.arange(len(display.fpr)), _drawn_indices(display)))
    previous = kept[np.searchsorted(kept, np.arange(len(display.fpr)), side="right") - 1]
    assert np.abs(display.fpr - display.fpr[previous]).max() <= 1 / 2000
    assert np.abs(display.pro - display.pro[previous]).max() <= 1 / 2000


def _drawn_indices(display):
    """Indices of the curve's points that the line draws (matched in order)."""
    x, y = display.line_.get_xdata(), display.line_.get_ydata()
    indices, j = [], 0
    for i, point in enumerate(zip(display.fpr, display.pro)):
        if j < len(x) and point == (x[j], y[j]):
            indices.append(i)
            j += 1
    assert j == len(x)
    return indices


def test_displays_from_a_fitted_pipeline(images):
    pipe = make_pipeline(
        PatchEmbedder(weights=None, image_size=32, crop_size=None),
        PaDiMDetector(n_features=5, map_size=32, random_state=0),
    ).fit(images[:8])
    X = images[8:].copy()
    X[1, 8:16, 8:16] = 255
    roc = AnomalyRocDisplay.from_estimator(pipe, X, [0, 1])
    assert roc.name == "PaDiMDetector"
    assert roc.roc_auc == image_auroc([0, 1], -pipe.score_samples(X))
    masks = np.zeros((2, 32, 32), dtype=bool)
    masks[1, 8:16, 8:16] = True
    pro = ProCurveDisplay.from_estimator(pipe, X, masks)
    assert pro.aupro == pytest.approx(aupro(masks, anomaly_map(pipe, X)))


# ------------------------------------------------------------------ optional


def test_missing_matplotlib_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    with pytest.raises(ImportError, match=r"pip install skpatch\[examples\]"):
        plot_anomaly_map(np.zeros((4, 4)), np.zeros((4, 4)))
    with pytest.raises(ImportError, match="matplotlib"):
        AnomalyRocDisplay.from_predictions([0, 1], [0.1, 0.2])
