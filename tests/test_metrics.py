import importlib.util
import pickle
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage
from sklearn.base import clone
from sklearn.covariance import EllipticEnvelope
from sklearn.metrics import average_precision_score
from sklearn.model_selection import GridSearchCV, cross_validate
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from skpatch.metrics import (
    aupro,
    image_auroc,
    image_auroc_scorer,
    make_anomaly_scorer,
    pixel_auroc,
    pro_curve,
)

BENCH_METRICS = Path("/work/shared/bench/metrics.py")


# --------------------------------------------------------------------------
# image AUROC
# --------------------------------------------------------------------------


def test_image_auroc_perfect_inverted_ties():
    y = [0, 0, 1, 1]
    assert image_auroc(y, [0.1, 0.2, 0.8, 0.9]) == 1.0
    assert image_auroc(y, [0.9, 0.8, 0.2, 0.1]) == 0.0
    assert image_auroc(y, [0.5, 0.5, 0.5, 0.5]) == 0.5
    # 4 (anomalous, normal) pairs: 3 ranked right, 1 wrong -> 3/4
    assert image_auroc(y, [0.1, 0.4, 0.35, 0.8]) == 0.75


def test_image_auroc_accepts_bool_and_float_labels():
    scores = [0.1, 0.2, 0.8, 0.9]
    assert image_auroc(np.array([False, False, True, True]), scores) == 1.0
    assert image_auroc(np.array([0.0, 0.0, 1.0, 1.0]), scores) == 1.0


def test_image_auroc_refuses_sklearn_outlier_labels():
    with pytest.raises(ValueError, match=r"contains -1.*\(y == -1\)\.astype\(int\)"):
        image_auroc([1, 1, -1, -1], [0.1, 0.2, 0.8, 0.9])


@pytest.mark.parametrize(
    "y, scores, match",
    [
        ([0, 1, 2], [0.1, 0.2, 0.3], "only 0"),
        ([0, 0, 0], [0.1, 0.2, 0.3], "both normal"),
        ([1, 1], [0.1, 0.2], "both normal"),
        ([0, 1], [0.1, 0.2, 0.3], "same length"),
        ([[0, 1]], [[0.1, 0.2]], "1-D"),
        ([0, 1], [[0.1], [0.2]], "1-D"),
        ([0, 1], [0.1, np.nan], "NaN or infinite"),
        ([0, 1], [0.1, np.inf], "NaN or infinite"),
        (["a", "b"], [0.1, 0.2], "numeric"),
    ],
)
def test_image_auroc_validation(y, scores, match):
    with pytest.raises(ValueError, match=match):
        image_auroc(y, scores)


# --------------------------------------------------------------------------
# pixel AUROC
# --------------------------------------------------------------------------


def test_pixel_auroc_2x2():
    masks = np.array([[[1, 0], [0, 0]]])
    # the anomalous pixel (0.9) beats 0.1 and 0.5 but not 0.95 -> 2/3
    maps = np.array([[[0.9, 0.1], [0.5, 0.95]]])
    assert pixel_auroc(masks, maps) == pytest.approx(2 / 3)
    assert pixel_auroc(masks.astype(bool), maps) == pytest.approx(2 / 3)
    assert pixel_auroc(masks, masks.astype(float)) == 1.0


@pytest.mark.parametrize(
    "masks, maps, match",
    [
        (np.zeros((1, 2, 2)), np.zeros((1, 2, 3)), "same shape"),
        (np.zeros((2, 2)), np.zeros((2, 2)), r"x\[None\]"),
        (np.array([[[0, 255]]]), np.zeros((1, 1, 2)), "masks > 0"),
        (np.array([[[0, 1]]]), np.array([[[0.0, np.nan]]]), "NaN or infinite"),
        (np.zeros((1, 2, 2)), np.zeros((1, 2, 2)), "only normal"),
        (np.ones((1, 2, 2)), np.zeros((1, 2, 2)), "only anomalous"),
    ],
)
def test_pixel_auroc_validation(masks, maps, match):
    with pytest.raises(ValueError, match=match):
        pixel_auroc(masks, maps)


# --------------------------------------------------------------------------
# PRO curve and AUPRO
# --------------------------------------------------------------------------


def _hand_example():
    # Image A: region R1 = {(0,0)} (1 pixel), region R2 = {(0,2),(0,3),(1,3)}
    # (3 pixels); 4 normal pixels. Image B: normal, 8 normal pixels.
    # Normal pixels in total: 12.
    masks = np.array(
        [
            [[1, 0, 1, 1],
             [0, 0, 0, 1]],
            [[0, 0, 0, 0],
             [0, 0, 0, 0]],
        ]
    )
    maps = np.array(
        [
            # R1: 0.9; R2: 0.8, 0.5, 0.2; normal: 0.1, 0.0, 0.0, 0.6
            [[0.9, 0.1, 0.8, 0.5],
             [0.0, 0.0, 0.6, 0.2]],
            # normal image: 0.7 and 0.5 (ties with an R2 pixel), rest 0.0
            [[0.7, 0.0, 0.0, 0.0],
             [0.0, 0.5, 0.0, 0.0]],
        ]
    )
    # t     positives added                 FP   FPR    PRO = mean(R1, R2)
    # 0.9   R1                              0    0      (1 + 0)/2   = 1/2
    # 0.8   R2 (1 of 3)                     0    0      (1 + 1/3)/2 = 2/3
    # 0.7   B normal                        1    1/12   2/3
    # 0.6   A normal                        2    2/12   2/3
    # 0.5   R2 (2 of 3) + B normal (tie)    3    3/12   (1 + 2/3)/2 = 5/6
    # 0.2   R2 (3 of 3)                     3    3/12   1
    # 0.1   A normal                        4    4/12   1
    # 0.0   all the rest                    12   1      1
    # (pooling pixels instead of regions would give 1/4 at t=0.9, not 1/2)
    fpr = np.array([0, 0, 0, 1, 2, 3, 3, 4, 12]) / 12
    pro = np.array([0, 1 / 2, 2 / 3, 2 / 3, 2 / 3, 5 / 6, 1, 1, 1])
    return masks, maps, fpr, pro


def test_pro_curve_hand_example():
    masks, maps, fpr_expected, pro_expected = _hand_example()
    fpr, pro = pro_curve(masks, maps)
    np.testing.assert_allclose(fpr, fpr_expected, rtol=0, atol=1e-12)
    np.testing.assert_allclose(pro, pro_expected, rtol=0, atol=1e-12)
    assert fpr[0] == pro[0] == 0.0
    assert fpr[-1] == pro[-1] == 1.0


def test_aupro_hand_example():
    masks, maps, _, _ = _hand_example()
    # Area up to FPR 0.3:
    #   [0, 1/12] and [1/12, 2/12] at PRO 2/3:        2 * (2/3)(1/12) = 1/9
    #   [2/12, 3/12] trapezoid from 2/3 to 5/6:       (3/4)(1/12)     = 1/16
    #   vertical jump at 3/12 (5/6 -> 1):             0
    #   [3/12, 0.3], PRO 1 (interpolated at 0.3 on
    #   the segment (3/12, 1)-(4/12, 1)):             0.05            = 1/20
    #   total 1/9 + 1/16 + 1/20 = 161/720; / 0.3 -> 161/216
    assert aupro(masks, maps) == pytest.approx(161 / 216, abs=1e-12)
    # limit exactly on a point: 1/9 + 1/16 = 25/144; / 0.25 -> 25/36
    assert aupro(masks, maps, fpr_limit=0.25) == pytest.approx(25 / 36, abs=1e-12)
    # whole curve: 1/9 + 1/16 + (1 - 1/4) * 1 = 133/144
    assert aupro(masks, maps, fpr_limit=1.0) == pytest.approx(133 / 144, abs=1e-12)


def test_pro_is_mean_over_regions_not_pixels():
    # Two regions of sizes 1 and 3 in one image; only the small one detected
    # at the top threshold: PRO = (1 + 0) / 2 = 0.5, while the pixel recall
    # would be 1 / 4.
    masks = np.array([[[1, 0, 1, 1, 1, 0]]])
    maps = np.array([[[1.0, 0.0, 0.5, 0.5, 0.5, 0.0]]])
    fpr, pro = pro_curve(masks, maps)
    np.testing.assert_allclose(fpr, [0, 0, 0, 1])
    np.testing.assert_allclose(pro, [0, 0.5, 1, 1])


def test_normal_image_contributes_to_fpr_only():
    masks, maps, _, _ = _hand_example()
    fpr_a, pro_a = pro_curve(masks[:1], maps[:1])
    fpr_ab, pro_ab = pro_curve(masks, maps)
    # Image A alone: 4 normal pixels (0.6, 0.1, 0.0, 0.0).
    # thresholds 0.9, 0.8, 0.6, 0.5, 0.2, 0.1, 0.0
    np.testing.assert_allclose(fpr_a, [0, 0, 0, 1 / 4, 1 / 4, 1 / 4, 2 / 4, 1])
    np.testing.assert_allclose(pro_a, [0, 1 / 2, 2 / 3, 2 / 3, 5 / 6, 1, 1, 1])
    # adding the normal image changes the FPR axis, never the PRO values
    assert set(np.round(pro_ab, 12)) == set(np.round(pro_a, 12))
    assert not np.array_equal(fpr_a, fpr_ab[: len(fpr_a)])


def test_perfect_map_gives_aupro_one():
    rng = np.random.RandomState(0)
    masks = np.zeros((3, 8, 8), dtype=bool)
    masks[0, 1:3, 1:4] = True
    masks[0, 5:7, 5:7] = True
    masks[1, 4, 2] = True  # image 2 stays normal
    maps = masks.astype(float) + 0.1 * rng.rand(*masks.shape) * ~masks
    assert aupro(masks, maps) == 1.0
    assert aupro(masks, masks.astype(np.float32), fpr_limit=0.05) == 1.0
    fpr, pro = pro_curve(masks, masks)
    np.testing.assert_array_equal(fpr, [0, 0, 1])
    np.testing.assert_array_equal(pro, [0, 1, 1])


def test_connectivity_4_vs_8_on_diagonal_region():
    # {(0,0),(0,1)} and {(1,2)} touch diagonally: one region of 3 pixels with
    # 8-connectivity, two regions (2 and 1 pixels) with 4-connectivity.
    masks = np.array([[[1, 1, 0], [0, 0, 1], [0, 0, 0]]])
    maps = np.array([[[0.5, 0.5, 0.0], [0.0, 0.0, 1.0], [0.0, 0.0, 0.0]]])
    _, pro8 = pro_curve(masks, maps)  # default: 8
    _, pro4 = pro_curve(masks, maps, connectivity=4)
    # at t = 1 only (1,2) is positive: 8 -> 1/3, 4 -> (0 + 1) / 2
    assert pro8[1] == pytest.approx(1 / 3)
    assert pro4[1] == pytest.approx(1 / 2)
    with pytest.raises(ValueError, match="connectivity must be 4 or 8"):
        pro_curve(masks, maps, connectivity=6)


def test_regions_do_not_connect_across_images():
    # the same pixel is anomalous in two images: two regions, not one
    masks = np.ones((2, 1, 2), dtype=bool)
    masks[:, 0, 1] = False
    maps = np.array([[[1.0, 0.0]], [[0.0, 0.0]]])
    fpr, pro = pro_curve(masks, maps)
    np.testing.assert_allclose(pro, [0, 0.5, 1])


@pytest.mark.parametrize(
    "masks, match",
    [
        (np.zeros((2, 3, 3)), "no anomalous pixel"),
        (np.ones((2, 3, 3)), "no normal pixel"),
    ],
)
def test_pro_curve_undefined(masks, match):
    with pytest.raises(ValueError, match=match):
        pro_curve(masks, np.zeros(masks.shape))
    with pytest.raises(ValueError, match=match):
        aupro(masks, np.zeros(masks.shape))


@pytest.mark.parametrize("fpr_limit", [0, -0.1, 1.5, "0.3", None, True])
def test_aupro_bad_fpr_limit(fpr_limit):
    masks, maps, _, _ = _hand_example()
    with pytest.raises(ValueError, match="fpr_limit"):
        aupro(masks, maps, fpr_limit=fpr_limit)


def _random_case(seed, n=5, size=24, quantize=True):
    rng = np.random.RandomState(seed)
    blobs = ndimage.gaussian_filter(rng.rand(n, size, size), sigma=(0, 2, 2))
    masks = blobs > np.quantile(blobs, 0.85)
    masks[0] = False  # one normal image
    maps = rng.rand(n, size, size) + 0.3 * masks
    if quantize:  # many ties
        maps = np.round(maps, 2)
    return masks, maps.astype(np.float32)


def _load_bench():
    if not BENCH_METRICS.exists():
        pytest.skip(f"{BENCH_METRICS} not found")
    spec = importlib.util.spec_from_file_location("_bench_metrics", BENCH_METRICS)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _drop_repeated_points(fpr, pro, tol=1e-12):
    keep = np.r_[True, (np.abs(np.diff(fpr)) > tol) | (np.abs(np.diff(pro)) > tol)]
    return fpr[keep], pro[keep]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("quantize", [True, False])
@pytest.mark.parametrize("connectivity", [4, 8])
def test_agrees_with_bench_reference(seed, quantize, connectivity):
    bench = _load_bench()
    masks, maps = _random_case(seed, quantize=quantize)
    fpr, pro = pro_curve(masks, maps, connectivity=connectivity)
    ref_fpr, ref_pro = bench.pro_curve(masks, maps, connectivity=connectivity)
    # the reference repeats the final (1, 1) point and its PRO may round to
    # 1 - 1e-16 where ours is exactly 1: compare the point sequences
    fpr, pro = _drop_repeated_points(fpr, pro)
    ref_fpr, ref_pro = _drop_repeated_points(ref_fpr, ref_pro)
    np.testing.assert_allclose(fpr, ref_fpr, rtol=0, atol=1e-9)
    np.testing.assert_allclose(pro, ref_pro, rtol=0, atol=1e-9)
    for fpr_limit in (0.01, 0.05, 0.3, 1.0):
        expected = bench.aupro(masks, maps, fpr_limit=fpr_limit, connectivity=connectivity)
        actual = aupro(masks, maps, fpr_limit=fpr_limit, connectivity=connectivity)
        assert actual == pytest.approx(expected, rel=0, abs=1e-9)
    assert pixel_auroc(masks, maps) == pytest.approx(bench.pixel_auroc(masks, maps), abs=1e-12)


def test_pro_curve_is_monotone_and_exact_on_random_data():
    masks, maps = _random_case(3)
    fpr, pro = pro_curve(masks, maps)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(pro) >= -1e-12)
    assert len(fpr) == len(np.unique(maps)) + 1
    # brute force at a few thresholds
    _, n_regions = ndimage.label(masks[1], structure=np.ones((3, 3)))
    assert n_regions > 0
    thresholds = np.unique(maps)[::-1]
    labels = np.stack([ndimage.label(m, structure=np.ones((3, 3)))[0] for m in masks])
    for k in (0, 7, len(thresholds) // 2, len(thresholds) - 1):
        positive = maps >= thresholds[k]
        fpr_k = positive[~masks].mean()
        overlaps = [
            positive[i][labels[i] == r].mean()
            for i in range(len(masks))
            for r in range(1, labels[i].max() + 1)
        ]
        assert fpr[k + 1] == pytest.approx(fpr_k, abs=1e-12)
        assert pro[k + 1] == pytest.approx(np.mean(overlaps), abs=1e-12)


# --------------------------------------------------------------------------
# scorers
# --------------------------------------------------------------------------


class _FakeDetector:
    """score_samples = -x0: the first feature is the anomaly score."""

    def score_samples(self, X):
        return -np.asarray(X)[:, 0]


def _toy_problem(seed=0):
    rng = np.random.RandomState(seed)
    X = np.vstack([rng.normal(size=(60, 2)), rng.normal(5, 1, size=(20, 2))])
    y = np.r_[np.zeros(60, dtype=int), np.ones(20, dtype=int)]
    # train on normal samples only, test on the held-out normals + anomalies
    cv = [
        (np.arange(0, 40), np.r_[40:60, 60:70]),
        (np.arange(20, 60), np.r_[0:20, 70:80]),
    ]
    return X, y, cv


def test_scorer_fake_estimator():
    X = np.array([[0.1], [0.2], [0.9], [0.8]])
    assert image_auroc_scorer(_FakeDetector(), X, [0, 0, 1, 1]) == 1.0
    assert image_auroc_scorer(_FakeDetector(), X, [1, 1, 0, 0]) == 0.0
    with pytest.raises(ValueError, match=r"\(y == -1\)"):
        image_auroc_scorer(_FakeDetector(), X, [1, 1, -1, -1])
    with pytest.raises(ValueError, match="need image labels y"):
        image_auroc_scorer(_FakeDetector(), X, None)
    with pytest.raises(TypeError, match="no score_samples"):
        image_auroc_scorer(object(), X, [0, 0, 1, 1])


def test_scorer_elliptic_envelope_and_pipeline():
    X, y, _ = _toy_problem()
    detector = EllipticEnvelope(random_state=0).fit(X[:40])
    assert image_auroc_scorer(detector, X[40:], y[40:]) == 1.0
    # the sign convention: scikit-learn's ±1 labels would invert it
    assert image_auroc(np.where(y[40:] == 1, -1, 1) == -1, -detector.score_samples(X[40:])) == 1.0
    pipe = make_pipeline(StandardScaler(), EllipticEnvelope(random_state=0)).fit(X[:40])
    assert image_auroc_scorer(pipe, X[40:], y[40:]) == 1.0


def test_scorer_in_grid_search():
    X, y, cv = _toy_problem()
    search = GridSearchCV(
        EllipticEnvelope(random_state=0),
        {"support_fraction": [0.6, 1.0]},
        scoring=image_auroc_scorer,
        cv=cv,
        error_score="raise",
    )
    search.fit(X, y)
    assert search.best_score_ == pytest.approx(1.0)
    assert np.all(np.isfinite(search.cv_results_["mean_test_score"]))


def test_scorers_in_dict_and_pickle():
    X, y, cv = _toy_problem()
    average_precision = make_anomaly_scorer(average_precision_score)
    assert make_anomaly_scorer() is image_auroc_scorer
    assert "average_precision_score" in repr(average_precision)
    scoring = {"auroc": image_auroc_scorer, "ap": pickle.loads(pickle.dumps(average_precision))}
    pipe = make_pipeline(StandardScaler(), EllipticEnvelope(random_state=0))
    results = cross_validate(clone(pipe), X, y, cv=cv, scoring=scoring, error_score="raise")
    np.testing.assert_allclose(results["test_auroc"], 1.0)
    np.testing.assert_allclose(results["test_ap"], 1.0)
    search = GridSearchCV(pipe, {"ellipticenvelope__support_fraction": [0.6, 1.0]},
                          scoring=scoring, refit="auroc", cv=cv, error_score="raise")
    search.fit(X, y)
    assert search.best_score_ == pytest.approx(1.0)
    with pytest.raises(ValueError, match=r"\(y == -1\)"):
        average_precision(search.best_estimator_, X, np.where(y == 1, -1, 1))


def test_make_anomaly_scorer_bad_metric():
    with pytest.raises(ValueError, match="image_auroc"):
        make_anomaly_scorer("roc_auc")
    with pytest.raises(TypeError, match="callable"):
        make_anomaly_scorer(3)
