import pickle
import warnings

import joblib
import numpy as np
import pytest
from numpy.testing import assert_allclose
from sklearn.base import clone
from sklearn.pipeline import make_pipeline
from sklearn.utils.estimator_checks import parametrize_with_checks

from skpatch import PaDiMDetector, PatchEmbedder, anomaly_map, fit_in_batches

from _common import assert_same_embeddings, expected_failed_checks


def embeddings(n=40, c=6, h=3, w=4, seed=0, dtype=np.float32):
    rng = np.random.RandomState(seed)
    # correlated channels, position-dependent means
    mix = rng.normal(size=(c, c))
    x = rng.normal(size=(n, h, w, c)) @ mix + np.arange(h * w).reshape(h, w, 1)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2)).astype(dtype)


@parametrize_with_checks(
    [
        PaDiMDetector(map_size=8),
        PaDiMDetector(map_size=8, calibration="in-sample"),
        PaDiMDetector(n_features=1, random_state=0, calibration="in-sample"),
    ],
    expected_failed_checks=expected_failed_checks,
)
def test_sklearn_compatible_on_2d_input(estimator, check):
    check(estimator)


def test_statistics_follow_eq1_per_position():
    X = embeddings(dtype=np.float64)
    det = PaDiMDetector(epsilon=0.01, map_size=None).fit(X)
    assert det.grid_shape_ == (3, 4) and det.n_samples_seen_ == 40
    for p, (i, j) in enumerate([(i, j) for i in range(3) for j in range(4)]):
        patches = X[:, :, i, j]
        np.testing.assert_allclose(det.mean_[p], patches.mean(0))
        cov = np.cov(patches.T) + 0.01 * np.eye(6)
        u = det.precision_cholesky_[p]
        np.testing.assert_allclose(u @ u.T, np.linalg.inv(cov), rtol=1e-7, atol=1e-10)


def test_patch_scores_are_mahalanobis_eq2():
    X = embeddings(dtype=np.float64)
    test = embeddings(n=3, seed=1, dtype=np.float64)
    det = PaDiMDetector(map_size=None, sigma=0).fit(X)
    maps = det.anomaly_map(test)
    i, j = 2, 1
    patches = X[:, :, i, j]
    precision = np.linalg.inv(np.cov(patches.T) + 0.01 * np.eye(6))
    diff = test[:, :, i, j] - patches.mean(0)
    expected = np.sqrt(np.einsum("nd,de,ne->n", diff, precision, diff))
    np.testing.assert_allclose(maps[:, i, j], expected, rtol=1e-8)
    # image score = max of the map
    np.testing.assert_allclose(-det.score_samples(test), maps.reshape(3, -1).max(1))


def test_maps_are_upsampled_blurred_and_scored_by_their_max():
    X = embeddings()
    det = PaDiMDetector(map_size=(12, 16), sigma=1.0).fit(X)
    maps = det.anomaly_map(X[:5])
    assert maps.shape == (5, 12, 16) and maps.dtype == np.float32
    np.testing.assert_allclose(-det.score_samples(X[:5]), maps.reshape(5, -1).max(1), rtol=1e-6)
    det.set_params(map_size=None, sigma=0)
    assert det.anomaly_map(X[:5]).shape == (5, 3, 4)


def test_outlier_interface_and_contamination():
    X = embeddings(n=100)
    det = PaDiMDetector(contamination=0.1, map_size=None, calibration="in-sample").fit(X)
    assert (det.predict(X) == -1).sum() == 10
    det = PaDiMDetector(contamination=0.1, map_size=None).fit(X)
    np.testing.assert_allclose(det.decision_function(X), det.score_samples(X) - det.offset_)
    assert (det.predict(X + 50) == -1).all()
    assert det.score_samples(X + 50).max() < det.score_samples(X).min()


def test_leave_one_out_offset_holds_on_new_normal_images():
    # 60 images for a 6-dim Gaussian per position: in-sample scores are optimistic.
    data = embeddings(n=1060)
    X, new = data[:60], data[60:]
    flagged = {}
    for rule in ("in-sample", "leave-one-out"):
        det = PaDiMDetector(contamination=0.1, map_size=None, calibration=rule).fit(X)
        flagged[rule] = (det.predict(new) == -1).mean()
    assert 0.04 < flagged["leave-one-out"] < 0.2
    assert flagged["in-sample"] > flagged["leave-one-out"] + 0.05


def test_leave_one_out_scores_match_refits():
    X = embeddings(n=30, dtype=np.float64)
    det = PaDiMDetector(map_size=None, sigma=0, epsilon=0.5).fit(X)
    for i in (0, 7):
        rest = np.delete(X, i, axis=0)
        # the closed form is exact for the refit with ridge epsilon (N-1)/(N-2)
        refit = PaDiMDetector(map_size=None, sigma=0, epsilon=0.5 * 29 / 28,
                              calibration="in-sample").fit(rest)
        np.testing.assert_allclose(det._train_scores[i], -refit.score_samples(X[i:i + 1])[0],
                                   rtol=1e-6)


def test_random_channel_subset_is_seeded():
    X = embeddings()
    a = PaDiMDetector(n_features=3, random_state=0, map_size=None).fit(X)
    b = PaDiMDetector(n_features=3, random_state=0, map_size=None).fit(X)
    np.testing.assert_array_equal(a.feature_indices_, b.feature_indices_)
    np.testing.assert_array_equal(a.score_samples(X), b.score_samples(X))
    assert len(a.feature_indices_) == 3 and a.mean_.shape == (12, 3)
    others = {tuple(PaDiMDetector(n_features=3, random_state=s).fit(X).feature_indices_)
              for s in range(8)}
    assert len(others) > 1


def test_partial_fit_streams_to_the_same_model():
    X = embeddings(n=50)
    full = PaDiMDetector(n_features=4, random_state=0, map_size=None).fit(X)
    stream = PaDiMDetector(n_features=4, random_state=0, map_size=None)
    for start in range(0, 50, 7):
        stream.partial_fit(X[start:start + 7])
    assert stream.n_samples_seen_ == 50
    np.testing.assert_allclose(stream.mean_, full.mean_, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(stream.scatter_, full.scatter_, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(stream.score_samples(X), full.score_samples(X), rtol=1e-4)
    # fit starts over, whatever was streamed before; partial_fit then goes on from it
    stream.fit(X[:20])
    np.testing.assert_array_equal(stream.mean_, clone(full).fit(X[:20]).mean_)
    stream.partial_fit(X[20:])
    np.testing.assert_allclose(stream.scatter_, full.scatter_, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("read_only", [False, True])
def test_running_sums_are_cut_by_working_memory_only_when_copied(monkeypatch, read_only):
    # The sums' chunks of a writeable CPU array are views: a budget that
    # cuts scoring into single images leaves them whole. A read-only array
    # (a memmap) is copied chunk by chunk, within the budget.
    import sklearn

    from skpatch.detectors import _padim

    X = embeddings(n=12)
    expected = PaDiMDetector(n_features=4, random_state=0).fit(X)
    X.setflags(write=not read_only)
    sizes = []
    chunked_moments = _padim._gaussian.chunked_moments

    def recording(chunks, **kwargs):
        return chunked_moments((sizes.append(x.shape[1]) or x for x in chunks), **kwargs)

    monkeypatch.setattr(_padim._gaussian, "chunked_moments", recording)
    with sklearn.config_context(working_memory=1e-4), warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Could not adhere to working_memory")
        detector = PaDiMDetector(n_features=4, random_state=0).fit(X)
    assert sizes == ([1] * 12 if read_only else [12])
    np.testing.assert_allclose(detector.scatter_, expected.scatter_, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("read_only", [False, True])
def test_scoring_chunks_count_only_what_a_cpu_holds(read_only):
    # On a CPU the whitening goes a block of positions at a time: a budget
    # far below 4 P d values per image still scores a writeable array in one
    # chunk. A read-only array (a memmap) is copied chunk by chunk: more
    # chunks under the same budget. The scores are the same either way.
    import sklearn

    X = embeddings(n=12, c=50, h=16, w=16)  # 256 positions: two blocks of 128
    detector = PaDiMDetector(n_features=50, map_size=None, random_state=0).fit(X)
    expected = detector.score_samples(X)
    X.setflags(write=not read_only)
    sizes = []
    image_scores = detector._image_scores
    detector._image_scores = lambda x, *args: sizes.append(len(x)) or image_scores(x, *args)
    # 60 kB per image: a fifth of 4 P d float32 values
    with sklearn.config_context(working_memory=12 * 60_000 / 2**20):
        scores = detector.score_samples(X)
    if read_only:
        assert 1 < len(sizes) and sum(sizes) == 12
    else:
        assert sizes == [12]
    assert_allclose(scores, expected, rtol=1e-6)


def test_partial_fit_one_image_at_a_time():
    X = embeddings(n=6)
    det = PaDiMDetector(map_size=None)
    det.partial_fit(X[:1])
    with pytest.raises(ValueError, match="at least 2 samples"):
        det.score_samples(X)
    for i in range(1, 6):
        det.partial_fit(X[i:i + 1])
    assert det.score_samples(X).shape == (6,)


def test_partial_fit_interrupted_half_way_leaves_no_wrong_model(monkeypatch):
    # The running sums are updated in place, chunk by chunk: a batch that
    # fails after its first chunk must not leave a model with part of it.
    from sklearn.exceptions import NotFittedError

    from skpatch.detectors._padim import _MOMENT_CHUNK

    X = embeddings(n=_MOMENT_CHUNK + 60)
    det = PaDiMDetector(n_features=4, random_state=0, map_size=None).partial_fit(X[:10])
    positions, calls = type(det)._positions, []

    def fail_on_second_chunk(x):
        calls.append(len(x))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return positions(x)

    monkeypatch.setattr(type(det), "_positions", staticmethod(fail_on_second_chunk))
    with pytest.raises(KeyboardInterrupt):
        det.partial_fit(X[10:])  # two chunks
    assert calls == [_MOMENT_CHUNK, 50]
    monkeypatch.undo()
    with pytest.raises(NotFittedError):
        det.score_samples(X)
    # and streaming can start again
    det.partial_fit(X)
    assert det.n_samples_seen_ == len(X)


def test_streamed_float32_after_float64_keeps_float64():
    X = embeddings(n=30, dtype=np.float64)
    stream = PaDiMDetector(map_size=None).partial_fit(X[:15])
    stream.partial_fit(X[15:].astype(np.float32))
    full = PaDiMDetector(map_size=None).fit(X)
    assert stream.scatter_.dtype == np.float64
    np.testing.assert_allclose(stream.scatter_, full.scatter_, rtol=1e-5)


def test_float64_is_kept_and_float32_is_not_promoted():
    assert PaDiMDetector(map_size=None).fit(embeddings()).mean_.dtype == np.float32
    det = PaDiMDetector(map_size=None).fit(embeddings(dtype=np.float64))
    assert det.precision_cholesky_.dtype == np.float64


def test_clear_errors():
    X = embeddings()
    det = PaDiMDetector(map_size=None).fit(X)
    with pytest.raises(ValueError, match="grid of patches but PaDiMDetector was fitted on a 3x4"):
        det.score_samples(embeddings(h=5, w=5))
    with pytest.raises(ValueError, match="X has 5 features, but PaDiMDetector is expecting 6"):
        det.score_samples(embeddings(c=5))
    with pytest.raises(ValueError, match="expected patch embeddings"):
        det.score_samples(X[:, 0])
    with pytest.raises(ValueError, match="NaN"):
        bad = X.copy()
        bad[0, 0, 0, 0] = np.nan
        det.score_samples(bad)
    with pytest.raises(ValueError, match="at least 2 samples"):
        PaDiMDetector().fit(X[:1])
    with pytest.raises(ValueError, match="n_features=10 exceeds the 6 channels"):
        PaDiMDetector(n_features=10).fit(X)
    with pytest.raises(ValueError, match="epsilon"):
        PaDiMDetector(epsilon=-1).fit(X)


def test_pipeline_on_images_with_maps_persistence_and_streaming(images, tmp_path):
    pipe = make_pipeline(
        PatchEmbedder(weights=None, image_size=32, crop_size=None),
        PaDiMDetector(n_features=20, map_size=32, random_state=0),
    )
    pipe.fit(images)
    scores = pipe.score_samples(images)
    assert scores.shape == (10,) and set(pipe.predict(images)) <= {-1, 1}
    maps = anomaly_map(pipe, images[:3])
    assert maps.shape == (3, 32, 32)
    assert_same_embeddings(-scores[:3], maps.reshape(3, -1).max(1), rtol=1e-5)

    path = tmp_path / "model.joblib"
    joblib.dump(pipe, path)
    loaded = joblib.load(path)
    np.testing.assert_array_equal(loaded.score_samples(images), scores)
    np.testing.assert_array_equal(anomaly_map(loaded, images[:3]), maps)
    # the file holds parameters and NumPy statistics, no torch module
    assert not any(
        "torch" in type(v).__module__ for v in vars(loaded[-1]).values()
    )

    streamed = fit_in_batches(
        make_pipeline(
            PatchEmbedder(weights=None, image_size=32, crop_size=None),
            PaDiMDetector(n_features=20, map_size=32, random_state=0),
        ),
        images,
        batch_size=3,
    )
    assert_same_embeddings(streamed.score_samples(images), scores, rtol=1e-4)


@pytest.mark.parametrize("name", ["PaDiMDetector", "PatchCoreDetector"])
def test_fit_in_batches_embeds_every_batch_into_one_array(images, name, monkeypatch):
    import skpatch

    def pipe():
        detector = getattr(skpatch, name)(random_state=0)
        if name == "PaDiMDetector":
            detector.set_params(n_features=4)
        return make_pipeline(PatchEmbedder(weights=None, image_size=32, crop_size=None), detector)

    seen = []  # (address of the input's memory, its content when given)
    kept = []  # inputs a detector keeps, as one that stored a view would
    original = getattr(skpatch, name).partial_fit

    def spy(self, X, y=None):
        seen.append((X.__array_interface__["data"][0], X.copy()))
        return original(self, X, y)

    monkeypatch.setattr(getattr(skpatch, name), "partial_fit", spy)
    reused = fit_in_batches(pipe(), images, batch_size=4)
    # batches of 4, 4 and 2 images, all in the first batch's memory
    assert [len(x) for _, x in seen] == [4, 4, 2]
    assert len({address for address, _ in seen}) == 1
    embeddings = PatchEmbedder(weights=None, image_size=32, crop_size=None).transform(images)
    np.testing.assert_array_equal(np.concatenate([copy for _, copy in seen]), embeddings)

    # a detector that keeps its input (or a view of it) gets new arrays,
    # each left as it was, and the same model
    seen.clear()

    def keeping_spy(self, X, y=None):
        kept.append(X[1:])
        return spy(self, X, y)

    monkeypatch.setattr(getattr(skpatch, name), "partial_fit", keeping_spy)
    fresh = fit_in_batches(pipe(), images, batch_size=4)
    assert len({address for address, _ in seen}) == 3
    for view, (_, copy) in zip(kept, seen):
        np.testing.assert_array_equal(view, copy[1:])
    np.testing.assert_array_equal(np.concatenate([x for _, x in seen]), embeddings)
    np.testing.assert_array_equal(reused.score_samples(images), fresh.score_samples(images))
    assert reused[-1].offset_ == fresh[-1].offset_


def test_fit_in_batches_and_anomaly_map_reject_wrong_estimators(images):
    from sklearn.covariance import EllipticEnvelope

    with pytest.raises(TypeError, match="no anomaly_map"):
        anomaly_map(EllipticEnvelope(), images)
    with pytest.raises(TypeError, match="no partial_fit"):
        fit_in_batches(EllipticEnvelope(), images)


def test_pickling_leaves_the_detector_as_it_was():
    # object.__getstate__ returns the live __dict__ (Python >= 3.11): the
    # keys the saved state drops must not be dropped from the detector,
    # whose stream (running sums, calibration sample) goes on after a save.
    X = embeddings(n=30)
    streamed = PaDiMDetector(n_features=4, map_size=None, random_state=0)
    unsaved = clone(streamed)
    for start in range(0, 30, 10):
        streamed.partial_fit(X[start:start + 10])
        unsaved.partial_fit(X[start:start + 10])
        keys = set(streamed.__dict__)
        pickle.dumps(streamed)  # may cache offset_, computed for the saved state
        assert keys <= set(streamed.__dict__)
    assert streamed.offset_ == unsaved.offset_
    fitted = PaDiMDetector(n_features=4, map_size=None, random_state=0).fit(X)
    fitted.precision_cholesky_
    keys = set(fitted.__dict__)
    pickle.dumps(fitted)
    assert set(fitted.__dict__) == keys


def test_image_size_mismatch_between_fit_and_predict(images):
    pipe = make_pipeline(
        PatchEmbedder(weights=None, image_size=None, crop_size=None),
        PaDiMDetector(n_features=20, random_state=0),
    ).fit(images)
    with pytest.raises(ValueError, match="grid of patches"):
        pipe.score_samples(np.zeros((2, 64, 64), np.uint8))


def test_streamed_offset_matches_fit():
    # offset_ after partial_fit comes from images scored by the final model,
    # not by the small early models (which would inflate the threshold).
    rng = np.random.RandomState(0)
    X = rng.normal(size=(200, 8, 4, 4)).astype(np.float32)
    full = PaDiMDetector(random_state=0, map_size=None).fit(X)
    streamed = PaDiMDetector(random_state=0, map_size=None)
    for start in range(0, len(X), 5):
        streamed.partial_fit(X[start : start + 5])
    assert abs(streamed.offset_ - full.offset_) < 0.05 * abs(full.offset_)
    # The sample is kept once, not pickled; the saved detector keeps offset_.
    restored = pickle.loads(pickle.dumps(streamed))
    assert restored.offset_ == streamed.offset_
    assert not hasattr(restored, "_calibration_sample")
    assert_allclose(restored.decision_function(X[:5]), streamed.decision_function(X[:5]))


def test_epsilon_takes_effect_at_the_next_fit_not_on_load():
    # The precision factor is not saved (it is recomputed on first use after
    # loading or streaming): it must use the ridge of the fit, as a model
    # whose epsilon is changed without a refit keeps its scores.
    X = embeddings(n=30)
    test = embeddings(n=4, seed=1)
    for method in ("fit", "partial_fit"):
        detector = getattr(PaDiMDetector(map_size=None, random_state=0), method)(X[:20])
        expected = PaDiMDetector(map_size=None, random_state=0).fit(X[:20]).score_samples(test)
        detector.set_params(epsilon=10.0)
        assert_allclose(detector.score_samples(test), expected, rtol=1e-6)
        restored = pickle.loads(pickle.dumps(detector))
        assert_allclose(restored.score_samples(test), expected, rtol=1e-6)
        # the next partial_fit uses the new ridge, as fit on all images would
        refit = PaDiMDetector(map_size=None, random_state=0, epsilon=10.0).fit(X)
        for model in (detector, restored):
            model.partial_fit(X[20:])
            assert_allclose(model.score_samples(test), refit.score_samples(test), rtol=1e-4)
