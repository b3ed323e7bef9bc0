import joblib
import numpy as np
import pytest
from sklearn.neighbors import NearestNeighbors
from sklearn.utils.estimator_checks import parametrize_with_checks

from skpatch import SPADEDetector, anomaly_map, make_spade_pipeline

from _common import FAST_PARAMS, expected_failed_checks


def embeddings(n=30, c=6, h=3, w=4, seed=0, dtype=np.float32):
    rng = np.random.RandomState(seed)
    mix = rng.normal(size=(c, c))
    x = rng.normal(size=(n, h, w, c)) @ mix + np.arange(h * w).reshape(h, w, 1)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2)).astype(dtype)


@parametrize_with_checks(
    [
        SPADEDetector(5, map_size=8),
        SPADEDetector(3, n_gallery_neighbors=2, map_size=8, calibration="in-sample"),
        SPADEDetector(1, global_channels=1),
    ],
    expected_failed_checks=expected_failed_checks,
)
def test_sklearn_compatible_on_2d_input(estimator, check):
    check(estimator)


def test_fast_params_entry():
    SPADEDetector(**FAST_PARAMS["SPADEDetector"]).fit(embeddings(n=5))


def test_image_score_is_mean_squared_distance_to_k_nearest_global_features():
    # SPADE eq. (1): the squared distances are averaged
    X = embeddings()
    test = embeddings(n=4, seed=1)
    det = SPADEDetector(5, global_channels=4, map_size=None).fit(X)
    g = X[:, -4:].mean(axis=(2, 3))
    np.testing.assert_allclose(det.global_features_, g, rtol=1e-6)
    ref = NearestNeighbors(n_neighbors=5).fit(g).kneighbors(test[:, -4:].mean(axis=(2, 3)))[0]
    np.testing.assert_allclose(-det.score_samples(test), (ref**2).mean(axis=1), rtol=1e-5)
    assert det.patches_.shape == (30, 12, 6)


def test_pixel_score_is_squared_distance_to_gallery_of_k_nearest_images():
    # eq. (2): every position of the K nearest images, squared distances averaged
    X = embeddings()
    test = embeddings(n=3, seed=2)
    det = SPADEDetector(4, n_gallery_neighbors=2, map_size=None, sigma=0).fit(X)
    maps = det.anomaly_map(test)
    _, near = NearestNeighbors(n_neighbors=4).fit(X.mean(axis=(2, 3))).kneighbors(test.mean(axis=(2, 3)))
    for i in range(3):
        gallery = X[near[i]].transpose(0, 2, 3, 1).reshape(-1, 6)
        d = NearestNeighbors(n_neighbors=2).fit(gallery).kneighbors(test[i].reshape(6, -1).T)[0]
        np.testing.assert_allclose(maps[i].reshape(-1), (d**2).mean(axis=1), rtol=1e-5)


def test_leave_one_out_calibration_is_exact_knn_loo(rng):
    X = rng.normal(size=(40, 3))
    det = SPADEDetector(3).fit(X)
    d = NearestNeighbors(n_neighbors=4).fit(X).kneighbors(X)[0][:, 1:]  # itself first
    expected = np.percentile(-(d**2).mean(axis=1), 10)
    assert det.offset_ == pytest.approx(expected, rel=1e-5)
    in_sample = SPADEDetector(3, calibration="in-sample").fit(X)
    assert in_sample.offset_ > det.offset_  # its own point at distance 0: optimistic


def test_k_clipped_to_training_set():
    X = embeddings(n=6)
    det = SPADEDetector(50, map_size=None).fit(X)
    ref = np.linalg.norm(X.mean(axis=(2, 3))[None] - (X[:2] + 1).mean(axis=(2, 3))[:, None], axis=2)
    np.testing.assert_allclose(-det.score_samples(X[:2] + 1), (ref**2).mean(axis=1), rtol=1e-5)
    assert det.anomaly_map(X[:2]).shape == (2, 3, 4)


def test_global_channels_checked():
    with pytest.raises(ValueError, match="global_channels"):
        SPADEDetector(global_channels=7).fit(embeddings(n=5))


def test_pipeline_sets_global_channels_and_persists(images, tmp_path):
    pipe = make_spade_pipeline(
        embedder_params={"weights": None, "image_size": 32, "crop_size": None},
        n_neighbors=3,
        map_size=32,
    )
    assert pipe[-1].global_channels == 112  # EfficientNet-Lite0 stage4
    pipe.fit(images[:8])
    assert anomaly_map(pipe, images[8:]).shape == (2, 32, 32)
    joblib.dump(pipe, tmp_path / "s.joblib")
    loaded = joblib.load(tmp_path / "s.joblib")
    np.testing.assert_allclose(loaded.score_samples(images[8:]), pipe.score_samples(images[8:]))
    explicit = make_spade_pipeline(
        embedder_params={"weights": None, "layers": ("stage2",)}, global_channels=3
    )
    assert explicit[-1].global_channels == 3
    assert make_spade_pipeline(embedder_params={"layers": ("stage2",)})[-1].global_channels == 40
    # layers=None is PatchEmbedder's "the backbone's default"
    assert make_spade_pipeline(embedder_params={"layers": None})[-1].global_channels == 112
