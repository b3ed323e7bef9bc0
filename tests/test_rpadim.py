import warnings

import joblib
import numpy as np
import pytest
from sklearn.model_selection import GridSearchCV
from sklearn.neighbors import LocalOutlierFactor
from sklearn.utils.estimator_checks import parametrize_with_checks

from skpatch import PaDiMDetector, RobustPaDiMDetector, anomaly_map, make_rpadim_pipeline
from skpatch.metrics import image_auroc, image_auroc_scorer

from _common import assert_same_embeddings, expected_failed_checks


def embeddings(n=40, c=6, h=3, w=4, seed=0, dtype=np.float32):
    rng = np.random.RandomState(seed)
    # correlated channels, position-dependent means
    mix = rng.normal(size=(c, c))
    x = rng.normal(size=(n, h, w, c)) @ mix + np.arange(h * w).reshape(h, w, 1)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2)).astype(dtype)


def contaminated(n_normal=60, n_defective=12, seed=0):
    """Normal images then defective ones, each with its own defect at position (1, 2).

    One draw of :func:`embeddings` (one distribution); a defect is a shift of
    norm 20 in a random direction.
    """
    X = embeddings(n=n_normal + n_defective, seed=seed, dtype=np.float64)
    rng = np.random.RandomState(seed + 1)
    shift = rng.normal(size=(n_defective, X.shape[1]))
    X[n_normal:, :, 1, 2] += 20 * shift / np.linalg.norm(shift, axis=1, keepdims=True)
    return X, np.r_[np.zeros(n_normal, int), np.ones(n_defective, int)]


def split(X, y, n_train_normal, n_train_defective):
    """Training set (normal + defective) and test set (the rest) of one draw."""
    normal, defective = np.flatnonzero(y == 0), np.flatnonzero(y == 1)
    train = np.r_[normal[:n_train_normal], defective[:n_train_defective]]
    test = np.r_[normal[n_train_normal:], defective[n_train_defective:]]
    return X[train], y[train], X[test], y[test]


def _geometric_median(points, iters=5000):
    z = points.mean(0)
    for _ in range(iters):
        w = 1 / np.linalg.norm(points - z, axis=1)
        z = (w[:, None] * points).sum(0) / w.sum()
    return z


@parametrize_with_checks(
    [
        RobustPaDiMDetector(map_size=8),
        RobustPaDiMDetector(map_size=8, calibration="in-sample"),
        RobustPaDiMDetector(
            n_features=1, n_neighbors=3, tau=0.9, random_state=0, calibration="in-sample"
        ),
    ],
    expected_failed_checks=expected_failed_checks,
)
def test_sklearn_compatible_on_2d_input(estimator, check):
    with warnings.catch_warnings():
        # the checks fit on a handful of samples: n_neighbors gets clipped
        warnings.filterwarnings("ignore", message="n_neighbors", category=UserWarning)
        check(estimator)


@pytest.mark.parametrize("k", [1, 3, 5])
def test_lof_per_position_matches_sklearn(k):
    X, _ = contaminated()
    det = RobustPaDiMDetector(n_neighbors=k, map_size=None).fit(X)
    assert det.patch_lof_.shape == (72, 12)
    for p, (i, j) in [(0, (0, 0)), (6, (1, 2)), (11, (2, 3))]:
        ref = -LocalOutlierFactor(n_neighbors=k).fit(X[:, :, i, j]).negative_outlier_factor_
        np.testing.assert_allclose(det.patch_lof_[:, p], ref, rtol=1e-8)


def test_tau_is_a_global_quantile_with_a_floor_per_position():
    X, _ = contaminated()
    det = RobustPaDiMDetector(map_size=None).fit(X)
    lof = det.patch_lof_
    assert det.lof_threshold_ == pytest.approx(np.quantile(lof, 0.85))
    np.testing.assert_array_equal(det.support_, lof <= det.lof_threshold_)
    assert det.support_.mean() == pytest.approx(0.85, abs=0.01)
    # tau=1 keeps every patch; a tiny tau keeps half of every position
    assert RobustPaDiMDetector(tau=1.0, map_size=None).fit(X).support_.all()
    strict = RobustPaDiMDetector(tau=0.01, map_size=None).fit(X)
    below = (strict.patch_lof_ <= strict.lof_threshold_).sum(0)
    np.testing.assert_array_equal(strict.support_.sum(0), np.maximum(below, 36))
    assert below.min() < 36


def test_denoising_drops_the_defective_patches():
    X, y = contaminated()
    defect = 1 * 4 + 2
    det = RobustPaDiMDetector(n_neighbors=3, map_size=None).fit(X)
    assert not det.support_[y == 1, defect].any()
    # elsewhere the defective images are ordinary
    assert det.support_[y == 1].mean() > 0.75
    # K=1: two outliers that are each other's nearest neighbour have LOF 1
    # exactly (both reachability distances are their distance), so some survive
    det = RobustPaDiMDetector(n_neighbors=1, map_size=None).fit(X)
    lof = det.patch_lof_[y == 1, defect]
    assert det.support_[y == 1, defect].any() and (lof == 1).sum() >= 2


def test_statistics_are_the_median_and_covariance_of_the_kept_patches():
    X, _ = contaminated()
    det = RobustPaDiMDetector(map_size=None, sigma=0, tol=1e-12, max_iter=2000).fit(X)
    test = embeddings(n=3, seed=5, dtype=np.float64)
    maps = det.anomaly_map(test)
    for p, (i, j) in [(0, (0, 0)), (6, (1, 2))]:
        kept = X[det.support_[:, p], :, i, j]
        median = _geometric_median(kept)
        np.testing.assert_allclose(det.median_[p], median, rtol=1e-6, atol=1e-8)
        diff = kept - median
        cov = diff.T @ diff / (len(kept) - 1) + 0.01 * np.eye(6)
        u = det.precision_cholesky_[p]
        np.testing.assert_allclose(u @ u.T, np.linalg.inv(cov), rtol=1e-6)
        # eq. (2): Mahalanobis distance about the median
        delta = test[:, :, i, j] - median
        expected = np.sqrt(np.einsum("nd,de,ne->n", delta, np.linalg.inv(cov), delta))
        np.testing.assert_allclose(maps[:, i, j], expected, rtol=1e-6)
    np.testing.assert_allclose(-det.score_samples(test), maps.reshape(3, -1).max(1))


def test_robust_to_a_contaminated_training_set():
    X_train, _, X_test, y_test = split(*contaminated(n_normal=120, n_defective=56), 80, 16)
    auroc = {}
    for name, det in [
        ("padim", PaDiMDetector(map_size=None)),
        ("padim clean", PaDiMDetector(map_size=None)),
        ("rpadim", RobustPaDiMDetector(map_size=None)),
        ("rpadim K=3", RobustPaDiMDetector(n_neighbors=3, map_size=None)),
    ]:
        train = X_train[:80] if name == "padim clean" else X_train
        auroc[name] = image_auroc(y_test, -det.fit(train).score_samples(X_test))
    assert auroc["padim clean"] == 1 and auroc["padim"] < 0.95
    assert auroc["rpadim"] > auroc["padim"] + 0.03
    assert auroc["rpadim K=3"] == 1


def test_leave_one_out_offset_holds_on_new_normal_images():
    data = embeddings(n=1060)
    X, new = data[:60], data[60:]
    flagged = {}
    for rule in ("in-sample", "leave-one-out"):
        det = RobustPaDiMDetector(contamination=0.1, map_size=None, calibration=rule).fit(X)
        flagged[rule] = (det.predict(new) == -1).mean()
    assert 0.04 < flagged["leave-one-out"] < 0.2
    assert flagged["in-sample"] > flagged["leave-one-out"] + 0.05


def test_leave_one_out_scores_match_refits_with_fixed_median_and_support():
    X, _ = contaminated(n_normal=30, n_defective=4)
    X = X[:, :, :1, :1]  # one position: the image score is the patch score
    det = RobustPaDiMDetector(map_size=None, epsilon=0.5, calibration="in-sample").fit(X)
    loo = RobustPaDiMDetector(map_size=None, epsilon=0.5).fit(X)
    keep = det.support_[:, 0]
    n = keep.sum()
    for i in np.flatnonzero(keep)[:3]:
        rest = X[keep & (np.arange(len(X)) != i), :, 0, 0] - det.median_[0]
        cov = rest.T @ rest / (n - 2) + 0.5 * (n - 1) / (n - 2) * np.eye(6)
        delta = X[i, :, 0, 0] - det.median_[0]
        expected = np.sqrt(delta @ np.linalg.solve(cov, delta))
        np.testing.assert_allclose(-loo_scores(loo, X)[i], expected, rtol=1e-6)
    # dropped patches are not in the model: their in-sample score is left-out already
    dropped = np.flatnonzero(~keep)
    np.testing.assert_allclose(loo_scores(loo, X)[dropped], det.score_samples(X[dropped]))


def loo_scores(det, X):
    """The training scores behind offset_ (minus the anomaly scores)."""
    import torch

    keep = torch.as_tensor(det.support_.T)
    count = keep.sum(1).to(torch.float64)
    with torch.inference_mode():
        return -det._training_scores(X, keep, count, "cpu")


def test_random_channel_subset_is_seeded():
    X = embeddings()
    a = RobustPaDiMDetector(n_features=3, random_state=0, map_size=None).fit(X)
    b = RobustPaDiMDetector(n_features=3, random_state=0, map_size=None).fit(X)
    np.testing.assert_array_equal(a.feature_indices_, b.feature_indices_)
    np.testing.assert_array_equal(a.score_samples(X), b.score_samples(X))
    assert a.median_.shape == (12, 3) and a.precision_cholesky_.shape == (12, 3, 3)
    others = {
        tuple(RobustPaDiMDetector(n_features=3, random_state=s).fit(X).feature_indices_)
        for s in range(8)
    }
    assert len(others) > 1


def test_float32_stays_float32():
    det = RobustPaDiMDetector(map_size=None).fit(embeddings())
    assert det.median_.dtype == np.float32 and det.precision_cholesky_.dtype == np.float32
    assert det.score_samples(embeddings(n=2)).dtype == np.float32


@pytest.mark.filterwarnings("ignore:Could not adhere to working_memory")
@pytest.mark.parametrize("limit", ["working_memory", "cpu_chunk_bytes"])
def test_chunked_fit_equals_one_chunk(limit, monkeypatch):
    import sklearn

    import skpatch.detectors._rpadim as rpadim_module
    from skpatch import _robust

    X, _ = contaminated()
    calls = []
    median = _robust.geometric_median
    monkeypatch.setattr(
        _robust, "geometric_median", lambda x, *a, **k: calls.append(len(x)) or median(x, *a, **k)
    )
    whole = RobustPaDiMDetector(map_size=None, tol=1e-12).fit(X)
    assert calls == [X.shape[2] * X.shape[3]]  # every position in one chunk
    calls.clear()
    if limit == "working_memory":
        with sklearn.config_context(working_memory=0.1):  # one LOF position per chunk
            chunked = RobustPaDiMDetector(map_size=None, tol=1e-12).fit(X)
        assert len(calls) > 1
    else:
        monkeypatch.setattr(rpadim_module, "_CPU_CHUNK_BYTES", 1)  # one position per chunk
        chunked = RobustPaDiMDetector(map_size=None, tol=1e-12).fit(X)
        assert calls == [1] * (X.shape[2] * X.shape[3])
    np.testing.assert_array_equal(chunked.support_, whole.support_)
    np.testing.assert_allclose(chunked.median_, whole.median_, rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(chunked.score_samples(X), whole.score_samples(X), rtol=1e-6)


def test_clear_errors_and_warnings():
    X = embeddings()
    with pytest.raises(ValueError, match="tau"):
        RobustPaDiMDetector(tau=0).fit(X)
    with pytest.raises(ValueError, match="n_neighbors"):
        RobustPaDiMDetector(n_neighbors=0).fit(X)
    with pytest.raises(ValueError, match="at least 2 samples"):
        RobustPaDiMDetector().fit(X[:1])
    with pytest.warns(UserWarning, match="n_neighbors=39"):
        RobustPaDiMDetector(n_neighbors=50, map_size=None).fit(X)
    det = RobustPaDiMDetector(map_size=None).fit(X)
    with pytest.raises(ValueError, match="grid of patches but RobustPaDiMDetector"):
        det.score_samples(embeddings(h=5, w=5))


def test_grid_search_tunes_tau_k_and_n_features():
    X, y = contaminated(n_normal=50, n_defective=14)
    train = np.r_[np.arange(40), np.arange(50, 54)]  # 40 normal + 4 defective images
    test = np.setdiff1d(np.arange(len(X)), train)
    search = GridSearchCV(
        RobustPaDiMDetector(map_size=None, random_state=0),
        {"tau": [0.85, 1.0], "n_neighbors": [1, 3], "n_features": [3, None]},
        scoring=image_auroc_scorer,
        cv=[(train, test)],
        refit=False,
    ).fit(X, y)
    assert len(search.cv_results_["params"]) == 8
    assert search.best_score_ > 0.9


def test_recommended_pipeline_on_images(images, tmp_path):
    pipe = make_rpadim_pipeline(
        embedder_params={"weights": None, "image_size": 32, "crop_size": None},
        n_features=20,
        map_size=32,
        random_state=0,
    )
    embedder, detector = pipe[0], pipe[-1]
    assert embedder.layers == ("stage2", "stage4") and embedder.pool_size == 3
    assert isinstance(detector, RobustPaDiMDetector) and detector.n_features == 20
    pipe.fit(images)
    scores = pipe.score_samples(images)
    maps = anomaly_map(pipe, images[:3])
    assert maps.shape == (3, 32, 32)
    assert_same_embeddings(-scores[:3], maps.reshape(3, -1).max(1), rtol=1e-5)
    assert detector.grid_shape_ == (4, 4)  # stride 8 on 32 x 32 images

    path = tmp_path / "model.joblib"
    joblib.dump(pipe, path)
    loaded = joblib.load(path)
    np.testing.assert_array_equal(loaded.score_samples(images), scores)
    assert not any("torch" in type(v).__module__ for v in vars(loaded[-1]).values())

    resnet = make_rpadim_pipeline("resnet18", embedder_params={"weights": None})
    assert resnet[0].layers == ("layer2", "layer3")
    custom = make_rpadim_pipeline(embedder_params={"pool_size": 1})
    assert custom[0].pool_size == 1
