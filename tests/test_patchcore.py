import pickle

import joblib
import numpy as np
import pytest
from sklearn.base import clone
from sklearn.neighbors import NearestNeighbors
from sklearn.utils.estimator_checks import parametrize_with_checks

from skpatch import PatchCoreDetector, anomaly_map, make_patchcore_pipeline
from skpatch._memory_bank import greedy_coreset

from _common import FAST_PARAMS, assert_same_embeddings, expected_failed_checks


def embeddings(n=30, c=6, h=3, w=4, seed=0, dtype=np.float32):
    rng = np.random.RandomState(seed)
    mix = rng.normal(size=(c, c))
    x = rng.normal(size=(n, h, w, c)) @ mix + np.arange(h * w).reshape(h, w, 1)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2)).astype(dtype)


@parametrize_with_checks(
    [
        PatchCoreDetector(map_size=8, random_state=0),
        PatchCoreDetector(0.5, map_size=8, calibration="in-sample", random_state=0),
        PatchCoreDetector(1.0, n_reweight=1, projection_dim=None),
    ],
    expected_failed_checks=expected_failed_checks,
)
def test_sklearn_compatible_on_2d_input(estimator, check):
    check(estimator)


def test_fast_params_entry():
    PatchCoreDetector(**FAST_PARAMS["PatchCoreDetector"]).fit(embeddings(n=5))


def test_memory_bank_is_the_greedy_coreset_of_all_patches():
    X = embeddings()
    det = PatchCoreDetector(0.1, projection_dim=None, random_state=0, map_size=None).fit(X)
    patches = X.transpose(0, 2, 3, 1).reshape(-1, 6)
    assert det.memory_bank_.shape == (36, 6) and det.memory_bank_.dtype == np.float32
    assert det.n_patches_seen_ == det.n_patches_stored_ == 360
    # the same rng stream: the store is not subsampled, so the coreset draws first
    picks = greedy_coreset(patches, 36, projection_dim=None, random_state=np.random.RandomState(0))
    np.testing.assert_array_equal(det.memory_bank_, patches[picks.numpy()])


def test_patch_scores_are_nearest_memory_distances_and_image_score_eq7():
    X = embeddings()
    test = embeddings(n=4, seed=1) + 0.5
    det = PatchCoreDetector(0.2, random_state=0, map_size=None, sigma=0).fit(X)
    bank = det.memory_bank_.astype(np.float64)
    patches = test.transpose(0, 2, 3, 1).reshape(-1, 6).astype(np.float64)
    nn = NearestNeighbors(n_neighbors=1).fit(bank)
    dist, idx = nn.kneighbors(patches)
    maps = det.anomaly_map(test)
    np.testing.assert_allclose(maps.reshape(-1), dist[:, 0], rtol=1e-5)
    # eq. (7): s = (1 - softmax over the 9 items around m* of ‖m_test - m‖ at m*) s*
    grid = dist[:, 0].reshape(4, -1)
    expected = []
    for i in range(4):
        j = grid[i].argmax()
        m_star = idx.reshape(4, -1)[i, j]
        _, support = NearestNeighbors(n_neighbors=9).fit(bank).kneighbors(bank[[m_star]])
        d = np.linalg.norm(bank[support[0]] - patches.reshape(4, -1, 6)[i, j], axis=1)
        weight = 1 - np.exp(d[0]) / np.exp(d).sum()
        expected.append(weight * grid[i, j])
    np.testing.assert_allclose(-det.score_samples(test), expected, rtol=1e-5)
    det.set_params(n_reweight=1)
    np.testing.assert_allclose(-det.score_samples(test), grid.max(axis=1), rtol=1e-5)


def test_max_patches_bounds_the_store_and_bank():
    X = embeddings(n=40)
    det = PatchCoreDetector(0.1, max_patches=100, random_state=0, map_size=None).fit(X)
    assert det.n_patches_seen_ == 480 and det.n_patches_stored_ == 100
    assert det.memory_bank_.shape == (10, 6)
    big = np.concatenate([X] * 4)
    assert PatchCoreDetector(0.1, max_patches=100, random_state=0).fit(big).memory_bank_.shape == (10, 6)


def test_random_state_reproducible():
    X = embeddings()
    a = PatchCoreDetector(0.1, max_patches=200, random_state=1, map_size=None).fit(X)
    b = PatchCoreDetector(0.1, max_patches=200, random_state=1, map_size=None).fit(X)
    c = PatchCoreDetector(0.1, max_patches=200, random_state=2, map_size=None).fit(X)
    np.testing.assert_array_equal(a.memory_bank_, b.memory_bank_)
    np.testing.assert_array_equal(a.score_samples(X), b.score_samples(X))
    assert not np.array_equal(a.memory_bank_, c.memory_bank_)


def test_leave_one_out_offset_does_not_flag_new_normal_images():
    X = embeddings(n=60)
    new = embeddings(n=300, seed=5)
    # same distribution: embeddings() draws its mixing matrix from the seed
    rng = np.random.RandomState(0)
    mix = rng.normal(size=(6, 6))
    new = (rng.normal(size=(300, 3, 4, 6)) @ mix + np.arange(12).reshape(3, 4, 1)).transpose(0, 3, 1, 2)
    new = np.ascontiguousarray(new, dtype=np.float32)
    loo = PatchCoreDetector(random_state=0, map_size=None).fit(X)
    in_sample = PatchCoreDetector(random_state=0, map_size=None, calibration="in-sample").fit(X)
    flagged_loo = (loo.predict(new) == -1).mean()
    flagged_in = (in_sample.predict(new) == -1).mean()
    assert flagged_loo <= 0.2 < flagged_in
    # in-sample: exactly the contamination share of the training images is flagged
    assert (in_sample.predict(X) == -1).sum() == 6


def test_2d_input_is_a_nearest_neighbour_detector(rng):
    X = rng.normal(size=(50, 3))
    det = PatchCoreDetector(1.0, calibration="in-sample").fit(X)
    test = rng.normal(size=(7, 3))
    ref = NearestNeighbors(n_neighbors=1).fit(X).kneighbors(test)[0][:, 0]
    np.testing.assert_allclose(-det.score_samples(test), ref, rtol=1e-5)


def test_lof_denoising_drops_and_weights_defective_patches():
    X = embeddings(n=60).astype(np.float64)
    rng = np.random.RandomState(1)
    shift = rng.normal(size=(6, 6))
    X[:6, :, 1, 2] += 20 * shift / np.linalg.norm(shift, axis=1, keepdims=True)
    det = PatchCoreDetector(1.0, denoising="lof", random_state=0, map_size=None).fit(X)
    assert abs(len(det.memory_bank_) - 0.85 * 720) <= 2  # tau = 0.85 of the 720 patches
    assert det.memory_weights_.shape == (len(det.memory_bank_),)
    assert det.memory_weights_.max() <= det.lof_threshold_ + 1e-6
    defects = X[:6, :, 1, 2].astype(np.float32)
    distance = np.linalg.norm(det.memory_bank_[:, None] - defects[None], axis=2).min(axis=0)
    assert (distance > 1).all()  # no defective patch is in the bank
    plain = PatchCoreDetector(1.0, random_state=0, map_size=None).fit(X)
    assert plain.memory_weights_ is None
    # soft weights: the patch score is the distance times the nearest item's factor
    test = embeddings(n=3, seed=3)
    bank = det.memory_bank_
    patches = test.transpose(0, 2, 3, 1).reshape(-1, 6)
    d, i = NearestNeighbors(n_neighbors=1).fit(bank).kneighbors(patches)
    maps = det.set_params(sigma=0).anomaly_map(test)
    np.testing.assert_allclose(maps.reshape(-1), d[:, 0] * det.memory_weights_[i[:, 0]], rtol=1e-4)


def test_pipeline_persistence_and_maps(images, tmp_path):
    pipe = make_patchcore_pipeline(
        embedder_params={"weights": None, "image_size": 32, "crop_size": None},
        map_size=32,
        random_state=0,
    )
    assert pipe[0].layers == ("stage2", "stage4") and pipe[0].pool_size == 3
    pipe.fit(images[:8])
    maps = anomaly_map(pipe, images[8:])
    assert maps.shape == (2, 32, 32)
    joblib.dump(pipe, tmp_path / "p.joblib")
    loaded = joblib.load(tmp_path / "p.joblib")
    np.testing.assert_allclose(loaded.score_samples(images[8:]), pipe.score_samples(images[8:]))
    assert isinstance(pipe[-1].memory_bank_, np.ndarray)


def test_bad_parameters():
    X = embeddings(n=5)
    with pytest.raises(ValueError):
        PatchCoreDetector(coreset_ratio=0).fit(X)
    with pytest.raises(ValueError):
        PatchCoreDetector(denoising="knn").fit(X)
    with pytest.raises(ValueError, match="at least 2"):
        PatchCoreDetector().fit(X[:1])
    det = PatchCoreDetector(random_state=0, map_size=None).fit(X)
    with pytest.raises(ValueError, match="grid"):
        det.score_samples(embeddings(n=2, h=2))
    assert clone(det).get_params() == det.get_params()


# ---------------------------------------------------------------- partial_fit
def _stream(det, X, batch):
    for start in range(0, len(X), batch):
        det.partial_fit(X[start : start + batch])
    return det


@pytest.mark.parametrize("batch", [20, 3, 1])
def test_partial_fit_equals_fit_when_every_patch_is_stored(batch):
    X = embeddings(n=20)  # 240 patches <= max_patches, 20 <= 32 calibration images
    fitted = PatchCoreDetector(0.2, random_state=0, map_size=None).fit(X)
    streamed = _stream(PatchCoreDetector(0.2, random_state=0, map_size=None), X, batch)
    np.testing.assert_array_equal(streamed.memory_bank_, fitted.memory_bank_)
    assert streamed.offset_ == fitted.offset_
    assert streamed.n_patches_seen_ == streamed.n_patches_stored_ == 240
    test = embeddings(n=4, seed=1)
    np.testing.assert_array_equal(streamed.score_samples(test), fitted.score_samples(test))
    # the store is freed once the coreset is selected
    assert not hasattr(streamed, "_store")


def test_partial_fit_store_is_a_bounded_uniform_sample():
    X = embeddings(n=200)  # 2,400 patches through a store of 300
    det = PatchCoreDetector(0.1, max_patches=300, random_state=0, map_size=None)
    for start in range(0, 200, 7):
        det.partial_fit(X[start : start + 7])
        assert det._n_stored <= 300 and len(det._store) <= 300
    groups = det._store_groups[: det._n_stored]
    assert det._n_stored == 300 and len(np.unique(groups)) > 100
    # uniform over the stream: as many patches from the first half as from the second
    assert 0.4 < (groups < 100).mean() < 0.6
    assert det.n_patches_seen_ == 2400 and det.n_patches_stored_ == 300
    assert det.memory_bank_.shape == (30, 6)


def test_partial_fit_after_fit_counts_the_fitted_images():
    # One more image whose patches evict every bank item from a tiny store:
    # the model has still seen 11 images, not 1.
    X = embeddings(n=10)
    evicted = 0
    for seed in range(10):
        extra = embeddings(n=1, seed=100 + seed)
        det = PatchCoreDetector(1.0, max_patches=2, random_state=seed, map_size=None).fit(X)
        det.partial_fit(extra)
        evicted += not (det._store_groups[: det._n_stored] < 0).any()
        assert det._n_images_seen == 11
        assert det.score_samples(X[:2]).shape == (2,)
    assert evicted  # the case that failed happened


def test_partial_fit_memory_does_not_grow_with_the_stream():
    import tracemalloc

    X = embeddings(n=10, c=32, h=8, w=8)
    PatchCoreDetector(max_patches=500, map_size=None).partial_fit(X)  # one-time imports, caches

    def peak(n_batches):
        det = PatchCoreDetector(0.1, max_patches=500, random_state=0, map_size=None)
        tracemalloc.start()
        for _ in range(n_batches):
            det.partial_fit(X)
        _, top = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        return top

    at_n, at_4n = peak(10), peak(40)
    assert at_4n <= 1.05 * at_n
    # the store (500 patches, an image number each), the calibration sample
    # (32 images, grown by concatenation) and a batch's temporaries
    store = 500 * (32 * 4 + 8)
    calibration = 2 * 32 * X[0].nbytes
    assert at_4n < store + calibration + 2 * X.nbytes


def test_partial_fit_is_seeded():
    X = embeddings(n=60)

    def bank(seed):
        det = PatchCoreDetector(0.1, max_patches=200, random_state=seed, map_size=None)
        return _stream(det, X, 9).memory_bank_

    np.testing.assert_array_equal(bank(3), bank(3))
    assert not np.array_equal(bank(3), bank(4))


def test_partial_fit_checks_grid_and_channels():
    det = PatchCoreDetector(random_state=0, map_size=None).partial_fit(embeddings(n=3))
    with pytest.raises(ValueError, match="3x4 grid"):
        det.partial_fit(embeddings(n=3, h=2))
    with pytest.raises(ValueError, match="expecting 6 features"):
        det.partial_fit(embeddings(n=3, c=5))
    with pytest.raises(ValueError, match="at least 2"):
        PatchCoreDetector(map_size=None).partial_fit(embeddings(n=1)).score_samples(embeddings(n=1))
    with pytest.raises(ValueError, match="use fit"):
        PatchCoreDetector(denoising="lof").partial_fit(embeddings(n=3))


def test_partial_fit_persistence(tmp_path, monkeypatch):
    X = embeddings(n=40)
    det = _stream(PatchCoreDetector(0.1, max_patches=200, random_state=0, map_size=None), X, 8)
    path = tmp_path / "pc.joblib"
    unsaved = _stream(PatchCoreDetector(0.1, max_patches=200, random_state=0, map_size=None), X, 8)
    joblib.dump(det, path)  # selects the coreset first: the file holds the bank, not the store
    loaded = joblib.load(path)
    assert not hasattr(loaded, "_store") and loaded.memory_bank_.shape == (20, 6)
    # the saved detector's own stream is left as it was: a checkpoint changes nothing
    assert "_store" in det.__dict__
    # until the stream goes on, it scores with the model saved, selected once
    calls = []
    select = PatchCoreDetector._select_coreset
    monkeypatch.setattr(PatchCoreDetector, "_select_coreset",
                        lambda *args: calls.append(1) or select(*args))
    np.testing.assert_array_equal(det.memory_bank_, loaded.memory_bank_)
    np.testing.assert_array_equal(det.score_samples(X[:5]), loaded.score_samples(X[:5]))
    assert det.offset_ == loaded.offset_
    assert pickle.loads(pickle.dumps(det)).__dict__.keys() == loaded.__dict__.keys()
    assert calls == []
    det.partial_fit(X[:4])
    unsaved.partial_fit(X[:4])
    np.testing.assert_array_equal(det.memory_bank_, unsaved.memory_bank_)
    assert det.offset_ == unsaved.offset_
    det = _stream(PatchCoreDetector(0.1, max_patches=200, random_state=0, map_size=None), X, 8)
    np.testing.assert_array_equal(loaded.score_samples(X[:5]), det.score_samples(X[:5]))
    assert loaded.offset_ == det.offset_
    # a later partial_fit continues from the bank
    loaded.partial_fit(X[:4])
    assert loaded.n_patches_seen_ == 480 + 48
    assert loaded.n_patches_stored_ == 20 + 48 and loaded.memory_bank_.shape == (7, 6)


def test_one_image_checkpoint_saves_the_filled_store_only():
    # With max_patches, the store is allocated whole at the first batch; a
    # checkpoint after one image (no model yet) saves the patches seen only.
    X = embeddings(n=5, c=32, h=8, w=8)
    det = PatchCoreDetector(0.5, max_patches=5000, random_state=0, map_size=None)
    det.partial_fit(X[:1])
    assert len(det._store) == 5000 and det._n_stored == 64
    blob = pickle.dumps(det)
    # its store and the calibration sample hold that image; 640 kB allocated
    assert len(blob) < 3 * X[0].nbytes
    loaded = pickle.loads(blob)
    assert loaded._store.shape == (64, 32) and loaded._store_groups.shape == (64,)
    assert len(det._store) == 5000  # the detector itself is left as it was
    # the stream goes on (the store grows again) to the uninterrupted model
    expected = PatchCoreDetector(0.5, max_patches=5000, random_state=0, map_size=None)
    expected.partial_fit(X[:1]).partial_fit(X[1:])
    loaded.partial_fit(X[1:])
    assert loaded.n_patches_seen_ == 320
    np.testing.assert_array_equal(loaded.memory_bank_, expected.memory_bank_)
    np.testing.assert_array_equal(loaded.score_samples(X), expected.score_samples(X))
    assert loaded.offset_ == expected.offset_


def test_checkpoint_leaves_a_shared_random_state_as_it_was():
    # The checkpoint selects the coreset on a copy of the detector: it must
    # not draw from the RandomState instance the detector's stream uses.
    X = embeddings(n=8, h=4, w=4)
    test = embeddings(n=3, seed=1, h=4, w=4)

    def stream(checkpoint):
        random_state = np.random.RandomState(0)
        det = PatchCoreDetector(max_patches=40, random_state=random_state, map_size=None)
        det.partial_fit(X[:4])
        if checkpoint:
            state = pickle.dumps(random_state)
            pickle.dumps(det)
            assert pickle.dumps(random_state) == state
        return det.partial_fit(X[4:]).score_samples(test)

    np.testing.assert_array_equal(stream(checkpoint=True), stream(checkpoint=False))


def test_fit_in_batches_pipeline(images):
    from skpatch import fit_in_batches

    params = {"weights": None, "image_size": 32, "crop_size": None}
    fitted = make_patchcore_pipeline(embedder_params=params, map_size=32, random_state=0)
    streamed = make_patchcore_pipeline(embedder_params=params, map_size=32, random_state=0)
    fitted.fit(images[:8])
    fit_in_batches(streamed, images[:8], batch_size=3)
    assert_same_embeddings(streamed[-1].memory_bank_, fitted[-1].memory_bank_)
    assert_same_embeddings(streamed.score_samples(images[8:]), fitted.score_samples(images[8:]), 1e-7)
