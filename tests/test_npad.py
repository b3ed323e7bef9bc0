import joblib
import numpy as np
import pytest
import torch
from sklearn.base import BaseEstimator, OutlierMixin, clone
from sklearn.model_selection import GridSearchCV
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import FunctionTransformer
from sklearn.utils.estimator_checks import parametrize_with_checks

from skpatch import (
    ImageShiftDetector,
    NPadDetector,
    PaDiMDetector,
    PatchEmbedder,
    anomaly_map,
    make_npad_pipeline,
)
from skpatch._shift import shift_images, translate_maps
from skpatch.metrics import image_auroc_scorer

from _common import expected_failed_checks


def embeddings(n=40, c=5, h=4, w=5, seed=0, dtype=np.float64):
    rng = np.random.RandomState(seed)
    # correlated channels, smoothly position-dependent means
    mix = rng.normal(size=(c, c))
    yy, xx = np.mgrid[0:h, 0:w]
    trend = np.stack([np.sin(yy + k) + np.cos(xx * (k + 1) / 2) for k in range(c)], -1)
    x = rng.normal(size=(n, h, w, c)) @ mix * 0.5 + 2 * trend
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2)).astype(dtype)


def window(i, j, size, h, w):
    r = size // 2
    return [(a, b) for a in range(i - r, i + r + 1) for b in range(j - r, j + r + 1)
            if 0 <= a < h and 0 <= b < w]


def reference_model(X, p, q, gamma, eps):
    """Brute-force N-pad statistics with NumPy loops over positions (eq. 2-7)."""
    n, c, h, w = X.shape
    mu = X.mean(0).transpose(1, 2, 0)
    cov = np.empty((h, w, c, c))
    for i in range(h):
        for j in range(w):
            cov[i, j] = np.cov(X[:, :, i, j].T) + eps * np.eye(c)
    weights, wmean, wcov = {}, np.empty((h, w, c)), np.empty((h, w, c, c))
    for i in range(h):
        for j in range(w):
            nb = window(i, j, p, h, w)
            m = []
            for a, b in nb:
                delta = mu[i, j] - mu[a, b]
                avg = (cov[i, j] + cov[a, b]) / 2
                m.append(np.exp(-(delta @ np.linalg.solve(avg, delta) / 8) / gamma))
            m = np.array(m) / np.sum(m)
            weights[i, j] = dict(zip(nb, m))
            mean = sum(mk * X[:, :, a, b].mean(0) for mk, (a, b) in zip(m, nb))
            scatter = sum(mk * (X[:, :, a, b] - mean).T @ (X[:, :, a, b] - mean)
                          for mk, (a, b) in zip(m, nb))
            wmean[i, j] = mean
            wcov[i, j] = scatter / (n - np.sum(m ** 2)) + eps * np.eye(c)
    agg = np.empty_like(X)
    for i in range(h):
        for j in range(w):
            nb = window(i, j, p, h, w)
            agg[:, :, i, j] = np.mean([X[:, :, a, b] for a, b in nb], axis=0)
    amean = agg.mean(0).transpose(1, 2, 0)
    acov = np.empty((h, w, c, c))
    for i in range(h):
        for j in range(w):
            acov[i, j] = np.cov(agg[:, :, i, j].T) + eps * np.eye(c)
    return weights, wmean, wcov, amean, acov


def mahalanobis(x, mean, cov):
    diff = x - mean
    return np.sqrt(diff @ np.linalg.solve(cov, diff))


@parametrize_with_checks(
    [
        NPadDetector(n_features=None, map_size=8),
        NPadDetector(n_features=1, feature_selection="random", random_state=0, top_k=3),
        NPadDetector(n_features=None, distributions="weighted", image_score="max"),
        NPadDetector(n_features=None, map_size=8, calibration="in-sample"),
    ],
    expected_failed_checks=expected_failed_checks,
)
def test_sklearn_compatible_on_2d_input(estimator, check):
    check(estimator)


def test_weighted_and_aggregated_statistics_follow_eq2_to_eq7():
    X = embeddings()
    det = NPadDetector(n_features=None, p=3, gamma=0.25, map_size=None).fit(X)
    weights, wmean, wcov, amean, acov = reference_model(X, 3, 2, 0.25, 0.01)
    h, w = 4, 5
    offsets = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
    for i, j in [(0, 0), (1, 2), (3, 4), (2, 0)]:
        got = det.neighbor_weights_[i, j]
        expected = [weights[i, j].get((i + dy, j + dx), 0.0) for dy, dx in offsets]
        np.testing.assert_allclose(got, expected, rtol=1e-7, atol=1e-12)
        pos = i * w + j
        np.testing.assert_allclose(det.weighted_mean_[pos], wmean[i, j], rtol=1e-9)
        u = det.weighted_precision_cholesky_[pos]
        np.testing.assert_allclose(u @ u.T, np.linalg.inv(wcov[i, j]), rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(det.aggregated_mean_[pos], amean[i, j], rtol=1e-9)
        u = det.aggregated_precision_cholesky_[pos]
        np.testing.assert_allclose(u @ u.T, np.linalg.inv(acov[i, j]), rtol=1e-6, atol=1e-9)
    # the similarities are not uniform: they carry the Bhattacharyya term
    assert np.ptp(det.neighbor_weights_[1, 2]) > 0.01
    assert h * w == len(det.weighted_mean_)


def test_maps_and_image_scores_follow_eq8_to_eq14():
    X = embeddings()
    test = embeddings(n=3, seed=1) + np.random.RandomState(2).normal(size=(3, 5, 4, 5))
    det = NPadDetector(n_features=None, map_size=None, sigma=0, top_k=4, random_state=0).fit(X)
    _, wmean, wcov, amean, acov = reference_model(X, 3, 2, 0.25, 0.01)
    h, w = 4, 5
    d1 = np.empty((3, h, w))
    d2 = np.empty((3, h, w))
    tagg = np.empty_like(test)
    for i in range(h):
        for j in range(w):
            tagg[:, :, i, j] = np.mean([test[:, :, a, b] for a, b in window(i, j, 3, h, w)], 0)
    for k in range(3):
        for i in range(h):
            for j in range(w):
                d1[k, i, j] = min(mahalanobis(test[k, :, i, j], wmean[a, b], wcov[a, b])
                                  for a, b in window(i, j, 2, h, w))
                d2[k, i, j] = mahalanobis(tagg[k, :, i, j], amean[i, j], acov[i, j])
    np.testing.assert_allclose(det.anomaly_map(test), np.sqrt(d1 * d2), rtol=1e-8)
    expected = []
    for k in range(3):
        top = np.argsort(d1[k].ravel())[::-1][:4]
        feats = tagg[k].reshape(5, -1)[:, top].T
        euclid = np.sqrt(((feats[:, None] - det.centroids_[None]) ** 2).sum(-1)).min(1)
        expected.append(np.sum(np.sort(euclid) * np.sort(d1[k].ravel()[top])))
    np.testing.assert_allclose(-det.score_samples(test), expected, rtol=1e-8)
    # ablations: D1 alone, D2 alone
    det.set_params(distributions="weighted").fit(X)
    np.testing.assert_allclose(det.anomaly_map(test), d1, rtol=1e-8)
    det.set_params(distributions="aggregated").fit(X)
    np.testing.assert_allclose(det.anomaly_map(test), d2, rtol=1e-8)


def test_without_neighbourhoods_it_is_padim():
    X = embeddings(dtype=np.float32)
    npad = NPadDetector(n_features=None, p=1, q=1, distributions="weighted",
                        image_score="max", map_size=12, sigma=1.0).fit(X)
    padim = PaDiMDetector(map_size=12, sigma=1.0, calibration="in-sample").fit(X)
    np.testing.assert_allclose(npad.anomaly_map(X[:4]), padim.anomaly_map(X[:4]), rtol=1e-4)
    np.testing.assert_allclose(npad.score_samples(X[:4]), padim.score_samples(X[:4]), rtol=1e-4)
    np.testing.assert_allclose(npad.neighbor_weights_, 1.0)


def test_2d_input_is_one_patch():
    X = embeddings(n=30).reshape(30, -1)[:, :6]
    det = NPadDetector(n_features=None, random_state=0).fit(X)
    padim = PaDiMDetector(calibration="in-sample").fit(X)
    distance = -padim.score_samples(X[:5])
    euclid = np.sqrt(((X[:5, None] - det.centroids_[None]) ** 2).sum(-1)).min(1)
    np.testing.assert_allclose(-det.score_samples(X[:5]), distance * euclid, rtol=1e-6)
    assert len(det.centroids_) == 3  # 10 % of 30


def test_least_nonzero_channel_selection():
    X = embeddings(n=20, c=6, dtype=np.float32)
    zero = np.random.RandomState(1).uniform(size=X[:, 0].shape)
    X[:, 1][zero < 0.8] = 0  # sparse channels (ReLU-like), sparsest first
    X[:, 4][zero < 0.5] = 0
    X[:, 2][zero < 0.2] = 0
    det = NPadDetector(n_features=2, map_size=None, random_state=0).fit(X)
    np.testing.assert_array_equal(det.feature_indices_, [1, 4])
    assert det.nonzero_counts_[1] < det.nonzero_counts_[4] < det.nonzero_counts_[2]
    np.testing.assert_array_equal(det.nonzero_counts_, np.count_nonzero(X, axis=(0, 2, 3)))
    # the densest channels (no zero in 0, 3, 5: ties broken at random) for "most-nonzero"
    most = NPadDetector(n_features=4, feature_selection="most-nonzero", map_size=None,
                        random_state=0).fit(X)
    np.testing.assert_array_equal(most.feature_indices_, [0, 2, 3, 5])
    # channels-last embeddings (the embedder's) are counted by blocks of patches
    channels_last = np.ascontiguousarray(X.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("skpatch.detectors._npad._COUNT_BLOCK_ROWS", 7)
        blocked = NPadDetector(n_features=2, map_size=None, random_state=0).fit(channels_last)
    np.testing.assert_array_equal(blocked.nonzero_counts_, det.nonzero_counts_)
    # all tied (no zero anywhere): a seeded random subset
    Y = embeddings(n=20, c=6, dtype=np.float32) + 100
    picks = {tuple(NPadDetector(n_features=2, random_state=s).fit(Y).feature_indices_)
             for s in range(6)}
    assert len(picks) > 1
    a = NPadDetector(n_features=3, random_state=7, map_size=None).fit(Y)
    b = NPadDetector(n_features=3, random_state=7, map_size=None).fit(Y)
    np.testing.assert_array_equal(a.feature_indices_, b.feature_indices_)
    np.testing.assert_array_equal(a.score_samples(Y), b.score_samples(Y))
    np.testing.assert_array_equal(a.centroids_, b.centroids_)


def test_kmeans_budget_and_ratio():
    X = embeddings(n=30, dtype=np.float32)  # 30 x 20 = 600 aggregated features
    det = NPadDetector(n_features=None, kmeans_ratio=0.05, random_state=0).fit(X)
    assert det.centroids_.shape == (30, 5)
    det.set_params(kmeans_max_samples=100).fit(X)
    assert det.centroids_.shape == (5, 5)
    det.set_params(image_score="max").fit(X)
    assert not hasattr(det, "centroids_")


def test_refit_keeps_no_attribute_of_the_fit_before():
    X = embeddings(n=12, dtype=np.float32)
    det = NPadDetector(n_features=None, kmeans_max_samples=100, random_state=0).fit(X)
    assert hasattr(det, "kmeans_n_iter_")
    det.set_params(image_score="max").fit(X)  # no k-means any more
    fresh = clone(det).fit(X)
    assert set(vars(det)) == set(vars(fresh))
    assert not hasattr(det, "kmeans_n_iter_")


def test_outlier_interface_flags_shifted_images():
    X = embeddings(n=60, dtype=np.float32)
    det = NPadDetector(n_features=None, map_size=None, calibration="in-sample",
                       random_state=0).fit(X)
    assert (det.predict(X) == -1).sum() == 6  # in-sample contamination quantile
    np.testing.assert_allclose(det.decision_function(X), det.score_samples(X) - det.offset_)
    outliers = X[:5] + 5
    assert det.score_samples(outliers).max() < det.score_samples(X).min()
    assert (det.predict(outliers) == -1).all()


def test_cross_fitted_offset_flags_about_contamination_of_new_images():
    # In-sample scores are optimistic (each training image is part of the
    # model): their threshold flags most new normal images. Scored by
    # detectors fitted without them, the training images give a threshold
    # near the contamination; the model itself is the same.
    X = embeddings(n=60, c=8, seed=0, dtype=np.float32)
    new = embeddings(n=400, c=8, seed=0, dtype=np.float32)[60:]  # same mixing, new draws
    params = dict(n_features=None, map_size=None, kmeans_ratio=0.5, random_state=0)
    in_sample = NPadDetector(calibration="in-sample", **params).fit(X)
    cross = NPadDetector(**params).fit(X)
    assert cross.calibration == "cross-fit"
    np.testing.assert_array_equal(cross.score_samples(new), in_sample.score_samples(new))
    assert cross.offset_ < in_sample.offset_
    flagged_in_sample = np.mean(in_sample.predict(new) == -1)
    flagged_cross = np.mean(cross.predict(new) == -1)
    assert flagged_in_sample > 0.3 and flagged_cross < 0.2


@pytest.mark.parametrize("outlier_scale", [1, 300])
def test_cross_fitted_offset_is_the_folds_out_of_fold_quantile(monkeypatch, outlier_scale):
    # Without the centroid bank, a fold's detector is the one fitted on the
    # other folds' images (its statistics come from the model's, less the
    # fold's own; summed anew when one image dwarfs the others, where the
    # subtraction would cancel in float32).
    from skpatch.detectors import _npad

    monkeypatch.setattr(_npad, "_CALIBRATION_FOLDS", 3)
    X = embeddings(n=12, dtype=np.float32)
    X[5] *= outlier_scale
    params = dict(n_features=None, map_size=None, image_score="max")
    det = NPadDetector(random_state=0, **params).fit(X)
    # the same folds, drawn after the model's own draws from the same generator
    rng = np.random.RandomState(0)
    NPadDetector(calibration="in-sample", random_state=rng, **params).fit(X)
    scores = np.empty(len(X))
    for held_out in np.array_split(rng.permutation(len(X)), 3):
        held_out = np.sort(held_out)
        fold = NPadDetector(calibration="in-sample", **params)
        fold.fit(np.delete(X, held_out, axis=0))
        scores[held_out] = fold.score_samples(X[held_out])
    np.testing.assert_allclose(det.offset_, np.percentile(scores, 10), rtol=1e-4)
    # fewer than 3 images: in-sample
    two = NPadDetector(n_features=4, map_size=None, random_state=0).fit(X[:2])
    np.testing.assert_allclose(two.offset_, np.percentile(two.score_samples(X[:2]), 10))


def test_cross_fitted_banks_cluster_the_models_features_of_their_images(monkeypatch):
    # A fold's bank clusters the model's k-means features of the fold's
    # images (not its own sample: that would aggregate them all again),
    # into as many centroids as the model's bank.
    from skpatch.detectors import _npad

    monkeypatch.setattr(_npad, "_CALIBRATION_FOLDS", 3)
    calls = []
    fit_kmeans = NPadDetector._fit_kmeans

    def spy(self, samples, seed, n_clusters=None):
        calls.append((samples.clone(), n_clusters))
        return fit_kmeans(self, samples, seed, n_clusters)

    monkeypatch.setattr(NPadDetector, "_fit_kmeans", spy)
    X = embeddings(n=12, dtype=np.float32)
    det = NPadDetector(n_features=None, map_size=None, kmeans_max_samples=None,
                       random_state=0).fit(X)
    *folds, (features, model_clusters) = calls
    assert len(folds) == 3 and model_clusters is None
    per_image = features.reshape(len(X), 20, -1)  # every feature, image by image
    held_out = []
    for samples, n_clusters in folds:
        assert n_clusters == len(det.centroids_) == 24  # ceil(0.1 x 12 x 20)
        kept = [
            next(i for i in range(len(X)) if torch.equal(per_image[i], image))
            for image in samples.reshape(-1, 20, samples.shape[1])
        ]
        assert kept == sorted(kept) and len(kept) == 8
        held_out.append(set(range(len(X))) - set(kept))
    assert set().union(*held_out) == set(range(len(X)))
    # a sample of one feature: the fold that holds its image out draws its own
    draws = []
    kmeans_sample = NPadDetector._kmeans_sample
    monkeypatch.setattr(NPadDetector, "_kmeans_sample",
                        lambda self, n, rng: draws.append(n) or kmeans_sample(self, n, rng))
    calls.clear()
    det.set_params(kmeans_max_samples=1).fit(X)
    assert draws == [12, 8] and len(calls) == 4


@pytest.mark.parametrize("p, q", [(11, 2), (3, 11), (9, 9)])
def test_windows_wider_than_the_grid_have_no_neighbours_beyond_it(p, q):
    # On a 4 x 4 grid a window of radius 3 (size 7) reaches every position:
    # a wider one adds offsets with no neighbour at all (eq. 1's window
    # outside the grid does not exist).
    X = embeddings(n=8, h=4, w=4, dtype=np.float32)
    params = dict(n_features=None, map_size=None, calibration="in-sample", random_state=0)
    wide = NPadDetector(p=p, q=q, **params).fit(X)
    clipped = NPadDetector(p=min(p, 7), q=min(q, 7), **params).fit(X)
    np.testing.assert_allclose(wide.score_samples(X), clipped.score_samples(X), rtol=1e-5)
    np.testing.assert_allclose(wide.anomaly_map(X), clipped.anomaly_map(X), rtol=1e-5, atol=1e-6)


def test_clear_errors():
    X = embeddings(dtype=np.float32)
    with pytest.raises(ValueError, match="n_features=100 exceeds the 5 channels"):
        NPadDetector().fit(X)
    with pytest.raises(ValueError, match="at least 2 samples"):
        NPadDetector(n_features=None).fit(X[:1])
    with pytest.raises(ValueError, match="gamma"):
        NPadDetector(n_features=None, gamma=0).fit(X)
    det = NPadDetector(n_features=None, map_size=None).fit(X)
    with pytest.raises(ValueError, match="grid of patches"):
        det.score_samples(embeddings(h=3, dtype=np.float32))


# ---------------------------------------------------------------------- image shifting
def test_shift_images_follows_eq15():
    images = np.arange(2 * 5 * 6).reshape(2, 5, 6)
    shifted = shift_images(images, 1, -2)
    # x'[h - a, w - b] = x[h, w]
    np.testing.assert_array_equal(shifted[:, 0, 3], images[:, 1, 1])
    np.testing.assert_array_equal(shifted[:, 2, 4], images[:, 3, 2])
    np.testing.assert_array_equal(shifted[:, 4, 0], images[:, 4, 0])  # edge replicated
    np.testing.assert_array_equal(shift_images(images, 0, 0), images)


def test_translate_maps_is_exact_for_integer_shifts():
    import torch

    maps = torch.arange(2 * 6 * 7, dtype=torch.float32).reshape(2, 6, 7)
    out = translate_maps(maps, 2, -1)
    np.testing.assert_allclose(out[:, 2:, :-1], maps[:, :-2, 1:], atol=1e-4)
    np.testing.assert_allclose(out[:, 0, :-1], maps[:, 0, 1:], atol=1e-4)  # border value


class _ImageAsMap(OutlierMixin, BaseEstimator):
    """A detector whose anomaly map is its (image) input and whose score is the mean."""

    def fit(self, X, y=None):
        self.offset_ = 0.0
        return self

    def anomaly_map(self, X):
        return np.asarray(X, dtype=np.float32)

    def score_samples(self, X):
        return -np.asarray(X, dtype=np.float32).mean(axis=(1, 2))


def test_shifted_maps_are_realigned():
    rng = np.random.RandomState(0)
    images = rng.uniform(size=(3, 12, 12)).astype(np.float32)
    # upsampling x2 between image and map: realignment must scale the shifts
    upsample = FunctionTransformer(lambda x: np.repeat(np.repeat(x, 2, 1), 2, 2))
    model = ImageShiftDetector(make_pipeline(upsample, _ImageAsMap()), max_shift=4)
    model.fit(images)
    model._map_scale = lambda image_shape, map_shape: (2.0, 2.0)
    assert len(model.shifts_) == 25
    maps = model.anomaly_map(images)
    expected = upsample.transform(images)
    # away from the replicated borders, every shifted copy lands back in place
    np.testing.assert_allclose(maps[:, 4:-4, 4:-4], expected[:, 4:-4, 4:-4], atol=1e-5)
    # without realignment the average would be a blur
    assert not np.allclose(maps[:, 4:-4, 4:-4], 0.5, atol=0.1)


@pytest.mark.parametrize("wrap", [lambda d: d, make_pipeline])
def test_image_shift_refuses_a_detector_of_embeddings(wrap):
    # Shifting (n, C, h, w) embeddings as images would shift channels and rows.
    X = np.random.RandomState(0).rand(8, 16, 6, 6).astype(np.float32)
    model = ImageShiftDetector(wrap(NPadDetector(map_size=None)), max_shift=2)
    with pytest.raises(TypeError, match="takes patch embeddings.*PatchEmbedder"):
        model.fit(X)


def test_image_shift_names_an_empty_input():
    images = np.random.RandomState(0).uniform(size=(3, 12, 12)).astype(np.float32)
    model = ImageShiftDetector(make_pipeline(FunctionTransformer(), _ImageAsMap()), max_shift=2)
    with pytest.raises(ValueError, match="holds no image"):
        model.fit(images).score_samples(images[:0])


def test_grouped_shifts_take_any_array_like_embeddings():
    # a transformer that returns a list: the grouped copies are stacked into an array
    images = np.random.RandomState(0).uniform(size=(3, 12, 12)).astype(np.float32)
    as_list = FunctionTransformer(lambda x: list(np.asarray(x)))
    model = ImageShiftDetector(make_pipeline(as_list, _ImageAsMap()), max_shift=2).fit(images)
    model._map_scale = lambda image_shape, map_shape: (1.0, 1.0)
    detector = model.estimator_[-1]
    seen = []
    score_samples = detector.score_samples
    detector.score_samples = lambda X: seen.append(type(X)) or score_samples(X)
    one_per_call = model.set_params(batch_size=1)._scores_and_maps(images)
    grouped = model.set_params(batch_size=32)._scores_and_maps(images)
    # a NumPy array, not a tensor, for a pipeline that does not output tensors
    assert seen[-1] is np.ndarray
    np.testing.assert_allclose(grouped[0], one_per_call[0], rtol=1e-6)
    np.testing.assert_allclose(grouped[1], one_per_call[1], rtol=1e-6)


def test_map_scale_follows_the_embedder():
    pipe = make_npad_pipeline(embedder_params={"weights": None, "image_size": 32,
                                               "crop_size": 24}, map_size=48)
    pipe.estimator_ = pipe.estimator
    # 64 -> 32 (x0.5), crop 24 -> map 48 (x2): one image pixel is one map pixel
    assert pipe._map_scale((64, 80), (48, 48)) == (1.0, 1.0)


@pytest.fixture
def npad_model():
    return make_npad_pipeline(
        max_shift=2,
        embedder_params={"weights": None, "image_size": 32, "crop_size": None},
        n_features=8, map_size=32, random_state=0,
    )


def test_image_shift_pipeline_maps_scores_persistence(images, npad_model, tmp_path):
    model = npad_model.fit(images)
    assert len(model.shifts_) == 9
    test = images[:3]
    scores = model.score_samples(test)
    maps = anomaly_map(model, test)
    assert scores.shape == (3,) and maps.shape == (3, 32, 32)
    # both from one pass over the shifted copies (the benchmark's path)
    both = model._scores_and_maps(test)
    np.testing.assert_allclose(both[0], scores, rtol=1e-6)
    np.testing.assert_allclose(both[1], maps, rtol=1e-6)
    np.testing.assert_allclose(model.decision_function(test), scores - model.offset_)
    assert set(model.predict(test)) <= {-1, 1}
    # the average over shifts differs from the unshifted score, and max_shift=0 is the pipeline
    unshifted = model.estimator_.score_samples(test)
    assert not np.allclose(scores, unshifted)
    model0 = ImageShiftDetector(model.estimator, max_shift=0).fit(images)
    np.testing.assert_allclose(model0.score_samples(test), unshifted, rtol=1e-5)
    np.testing.assert_allclose(model0.anomaly_map(test), anomaly_map(model.estimator_, test),
                               rtol=1e-5)
    # lists of equal-size images work too
    np.testing.assert_allclose(model.score_samples(list(test)), scores, rtol=1e-5)

    path = tmp_path / "npad.joblib"
    joblib.dump(model, path)
    np.testing.assert_array_equal(joblib.load(path).score_samples(test), scores)


@pytest.mark.parametrize("mode", ["P", "I;16"])
def test_image_shift_decodes_files_as_the_embedder(images, npad_model, tmp_path, mode):
    # Palette images are colours, not palette indices; 16-bit ones are
    # scaled to [0, 1]: scoring the files must equal scoring the pipeline's
    # own decoding of them (which fit used).
    from PIL import Image

    paths = []
    for i, image in enumerate(images[:4]):
        pil = Image.fromarray(image).convert("RGB").quantize(16) if mode == "P" else (
            Image.fromarray(image.astype(np.uint16) * 257)
        )
        paths.append(tmp_path / f"{i}.png")
        pil.save(paths[-1])
    model = ImageShiftDetector(npad_model.estimator, max_shift=0).fit(images)
    np.testing.assert_allclose(
        model.score_samples(paths), model.estimator_.score_samples(paths), rtol=1e-5
    )


def test_image_shift_takes_files_of_several_kinds(images, npad_model, tmp_path):
    # 8-bit gray, 16-bit gray and RGB files of one size in one call, as the
    # pipeline takes them (a batch of them was refused as "different shapes")
    from PIL import Image

    kinds = [lambda im: Image.fromarray(im), lambda im: Image.fromarray(im.astype(np.uint16) * 257),
             lambda im: Image.fromarray(im).convert("RGB")]
    paths = []
    for i, (image, kind) in enumerate(zip(images[:3], kinds)):
        paths.append(tmp_path / f"{i}.png")
        kind(image).save(paths[-1])
    model = ImageShiftDetector(npad_model.estimator, max_shift=0).fit(images)
    np.testing.assert_allclose(
        model.score_samples(paths), model.estimator_.score_samples(paths), rtol=1e-5
    )


def test_small_batches_score_several_shifts_per_call(images, npad_model, monkeypatch):
    model = npad_model.fit(images)
    test = images[:3]
    detector = model.estimator_[-1]
    seen = []
    score_samples = detector.score_samples

    def spy(X):
        seen.append(X)
        return score_samples(X)

    monkeypatch.setattr(detector, "score_samples", spy)
    one_per_call = model.set_params(batch_size=1).score_samples(test)
    assert [len(x) for x in seen] == [1] * 27
    seen.clear()
    # 3 images, batch_size 7: two shifts (6 copies) per call, the last alone
    grouped = model.set_params(batch_size=7)._scores_and_maps(test)
    assert [len(x) for x in seen] == [6, 6, 6, 6, 3]
    # the copies keep the embedder's layout (each patch's channels contiguous)
    assert all(x.strides[1] == x.itemsize for x in seen)
    np.testing.assert_allclose(grouped[0], one_per_call, rtol=1e-6)
    model.set_params(batch_size=32)
    np.testing.assert_allclose(model.score_samples(test), one_per_call, rtol=1e-6)
    np.testing.assert_allclose(model.anomaly_map(test), grouped[1], rtol=1e-6)
    monkeypatch.undo()
    np.testing.assert_allclose(
        model.set_params(batch_size=1).anomaly_map(test), grouped[1], rtol=1e-6, atol=1e-6
    )


def test_grid_search_tunes_shift_and_detector(images, npad_model):
    labels = np.r_[np.zeros(8, int), np.ones(2, int)]
    images = images.copy()
    images[8:, 10:20, 10:20] = 255
    search = GridSearchCV(
        npad_model,
        {"max_shift": [0, 2], "estimator__npaddetector__gamma": [0.25, 1.0]},
        scoring=image_auroc_scorer,
        cv=[(np.arange(6), np.arange(6, 10))],
    ).fit(images, labels)
    assert set(search.cv_results_["param_max_shift"]) == {0, 2}
    assert search.best_estimator_.estimator_[-1].gamma in (0.25, 1.0)


def test_make_npad_pipeline_defaults():
    model = make_npad_pipeline(embedder_params={"weights": None})
    assert isinstance(model, ImageShiftDetector) and model.max_shift == 4
    embedder, detector = model.estimator[0], model.estimator[-1]
    assert isinstance(embedder, PatchEmbedder) and embedder.pool_size == 1
    assert (detector.p, detector.q, detector.gamma, detector.kmeans_ratio) == (3, 2, 0.25, 0.1)
    assert detector.n_features == 100
    assert make_npad_pipeline(max_shift=0).steps[-1][0] == "npaddetector"


@pytest.mark.parametrize("size", [3, 5])
def test_weights_and_weighted_moments_do_not_depend_on_the_row_chunks(size, torch_threads):
    import torch

    from skpatch import _npad_kernels

    rng = np.random.RandomState(0)
    h, w, d, n = 5, 6, 4, 20
    mean = torch.from_numpy(rng.normal(size=(h, w, d)))
    factors = torch.from_numpy(rng.normal(size=(h, w, d, 2 * d)))
    scatter = factors @ factors.mT
    covariance = scatter / (n - 1)
    chunks = {"one row": 1, "whole grid": 2**40, "default": None}  # bytes per chunk
    torch_threads(2)  # the chunks (and offsets) go to two workers
    weights = {
        name: _npad_kernels.bhattacharyya_weights(mean, covariance, size, 0.5, budget)
        for name, budget in chunks.items()
    }
    torch_threads(1)  # one after the other, in this thread
    weights["one thread"] = _npad_kernels.bhattacharyya_weights(mean, covariance, size, 0.5)
    torch.testing.assert_close(weights["one thread"], weights["whole grid"], rtol=0, atol=0)
    moments = {
        name: _npad_kernels.weighted_moments(n, mean, scatter, weights["whole grid"], size, budget)
        for name, budget in chunks.items()
    }
    for name in ("one row", "default"):
        torch.testing.assert_close(weights[name], weights["whole grid"], rtol=0, atol=0)
        for got, expected in zip(moments[name], moments["whole grid"]):
            torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert _npad_kernels._row_chunks(h, 3, None, mean.device) == [(0, h)]  # 8 MB on a CPU
    assert len(_npad_kernels._row_chunks(h, 3 * 2**20, None, mean.device)) == 3


def test_neighbour_distances_do_not_depend_on_the_block_size():
    import torch

    from skpatch._npad_kernels import neighbour_min_mahalanobis

    rng = np.random.RandomState(0)
    h, w, b, d = 5, 6, 3, 4
    x = torch.from_numpy(rng.normal(size=(h, w, b, d)))
    mean = torch.from_numpy(rng.normal(size=(h * w, d)))
    prec_chol = torch.from_numpy(np.triu(rng.normal(size=(h * w, d, d))) + 3 * np.eye(d))
    whole = neighbour_min_mahalanobis(x, mean, prec_chol, 3)
    for block_bytes in [1, 2 * 9 * b * d * 8 * 7]:  # one position, then 7, per block
        np.testing.assert_array_equal(neighbour_min_mahalanobis(x, mean, prec_chol, 3, block_bytes), whole)


def _window_problem(h=8, w=9, b=4, d=5, seed=0):
    import torch

    rng = np.random.RandomState(seed)
    mean = rng.normal(size=(h * w, d))
    # Features near their own position's mean, a few far from any (the top
    # of D1), and a fifth drawn at their right neighbour's mean: far from
    # their own Gaussian, near a neighbour's, so that the largest distances
    # to the own Gaussian are not the largest D1 and the search goes on.
    position = np.arange(h * w)[:, None].repeat(b, 1)
    shifted = (rng.uniform(size=(h * w, b)) < 0.2) & (position % w < w - 1)
    center = mean[position + shifted]
    scale = np.where(rng.uniform(size=(h * w, b, 1)) < 0.05, 3.0, 0.5)
    x = center + scale * rng.normal(size=(h * w, b, d))
    prec_chol = np.triu(rng.normal(scale=0.3, size=(h * w, d, d))) + np.eye(d)
    return (torch.from_numpy(x.reshape(h, w, b, d)), torch.from_numpy(mean),
            torch.from_numpy(prec_chol))


@pytest.mark.parametrize("size, k", [(3, 1), (3, 4), (3, 500), (5, 3), (1, 2)])
def test_top_d1_is_exact_where_it_can_be_in_the_top_k(size, k):
    import torch

    from skpatch._npad_kernels import neighbour_min_mahalanobis, neighbour_min_mahalanobis_top

    x, mean, prec_chol = _window_problem()
    full = neighbour_min_mahalanobis(x, mean, prec_chol, size).numpy()
    # the scoring's layout, (b, C, h, w), with two channels the Gaussians are not over
    embeddings = torch.cat([x, torch.ones(x.shape[:3] + (2,), dtype=x.dtype)], dim=3)
    embeddings = embeddings[..., [5, 0, 1, 6, 2, 3, 4]].permute(2, 3, 0, 1)
    index = torch.tensor([1, 2, 4, 5, 6])

    def top_d1(**kwargs):
        return neighbour_min_mahalanobis_top(
            embeddings, mean, prec_chol, size, k, index=index, **kwargs
        ).numpy()

    top = top_d1()
    searched = np.isfinite(top)
    np.testing.assert_allclose(top[searched], full[searched], rtol=1e-12)
    b, n_positions = full.shape[0], full[0].size
    kk = min(k, n_positions)
    for image in range(b):
        expected = np.sort(full[image].ravel())[::-1][:kk]
        np.testing.assert_allclose(np.sort(top[image].ravel())[::-1][:kk], expected, rtol=1e-12)
        # a position left out is below the k-th largest D1
        assert (full[image][~searched[image]] < expected[-1]).all()
    if size > 1 and kk < 10:
        # the own Gaussian's distance bounds D1: most positions are never searched
        assert searched.mean() < 0.5
    # neighbours nearer than the own Gaussian do occur (the search is needed)
    own = neighbour_min_mahalanobis(x, mean, prec_chol, 1).numpy()
    assert size == 1 or (full < own).any()
    # the precision factors gathered one at a time give the same values
    np.testing.assert_array_equal(top_d1(block_bytes=1), top)


@pytest.mark.parametrize("size", [1, 3, 5])
def test_aggregate_at_positions_is_aggregate_bit_for_bit(size):
    import torch

    from skpatch._npad_kernels import aggregate, aggregate_at

    x, _, _ = _window_problem(h=4, w=6, b=3)
    embeddings = x.float().permute(2, 3, 0, 1)  # (b, C, h, w)
    b, _, h, w = embeddings.shape
    index = torch.tensor([0, 2, 3])
    positions = torch.arange(h * w).repeat(b)
    images = torch.arange(b).repeat_interleave(h * w)
    whole = aggregate(embeddings[:, index].permute(2, 3, 0, 1).contiguous(), size)
    whole = whole.view(h * w, b, -1)[positions, images]
    np.testing.assert_array_equal(
        aggregate_at(embeddings, size, positions, images, index).numpy(), whole.numpy()
    )


@pytest.mark.parametrize("size", [1, 3, 5, 7])
@pytest.mark.parametrize("grid", [(4, 6), (2, 3)])  # 7 x 7 windows overhang the 2 x 3 grid
def test_aggregate_is_the_in_grid_window_average(size, grid):
    import torch
    import torch.nn.functional as F

    from skpatch._npad_kernels import aggregate

    h, w = grid
    x = torch.randn(h, w, 3, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    original = x.clone()
    planes = x.permute(2, 3, 0, 1).reshape(6, 1, h, w)
    expected = F.avg_pool2d(planes, size, stride=1, padding=size // 2, count_include_pad=False)
    expected = expected.reshape(3, 2, h, w).permute(2, 3, 0, 1)
    torch.testing.assert_close(aggregate(x, size), expected)
    # into a strided slice of a larger buffer, as the fit fills its chunks
    buffer = torch.full((h, w, 5, 2), float("nan"), dtype=torch.float64)
    aggregate(x, size, out=buffer[:, :, 1:4])
    torch.testing.assert_close(buffer[:, :, 1:4], expected)
    assert buffer[:, :, [0, 4]].isnan().all()
    assert torch.equal(x, original)  # the input is left as it was
