"""Bad training sets: too few images, identical images, constant channels, overflow.

A detector either fits a model whose scores mean something, warns
(:class:`skpatch.exceptions.DegenerateTrainingSetWarning`) when the data
cannot determine it, or raises an error that says what to change.
"""

import warnings

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.pipeline import make_pipeline

from skpatch.detectors import BaseGaussianDetector
from skpatch.exceptions import DegenerateTrainingSetWarning

from _workflows import detector_class, detector_names, make_detector, textures, tiny_embedder

RNG = np.random.RandomState(0)
X = RNG.normal(size=(40, 8, 4, 4)).astype(np.float32)


def gaussian_names():
    return [n for n in detector_names() if issubclass(detector_class(n), BaseGaussianDetector)]


def quiet_fit(detector, X):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DegenerateTrainingSetWarning)
        return detector.fit(X)


@pytest.mark.parametrize("name", detector_names())
def test_one_training_image_is_refused_with_the_minimum(name):
    with pytest.raises(ValueError, match=r"needs at least \d+ samples \(training images\), got 1"):
        make_detector(name, map_size=None).fit(X[:1])


@pytest.mark.parametrize("name", gaussian_names())
def test_few_images_for_many_dimensions_warn(name):
    # 5 images, 8 dimensions: the covariance has rank 4 < 8 / 2 + 1.
    with pytest.warns(DegenerateTrainingSetWarning, match="fewer training samples.*n_features"):
        make_detector(name, map_size=None).fit(X[:4])
    # 40 images for 8 dimensions: the data determines the covariance.
    with warnings.catch_warnings():
        warnings.simplefilter("error", DegenerateTrainingSetWarning)
        make_detector(name, map_size=None).fit(X)


@pytest.mark.parametrize("name", ["PaDiMDetector", "NPadDetector"])
def test_two_images_calibrate_in_sample_with_a_warning(name):
    # A model without one of 2 images would be fitted on one image.
    detector = make_detector(name, map_size=None)
    with pytest.warns(DegenerateTrainingSetWarning, match="needs at least 3, so offset_ is"):
        detector.fit(X[:2])
    in_sample = quiet_fit(clone(detector).set_params(calibration="in-sample"), X[:2])
    assert detector.offset_ == pytest.approx(in_sample.offset_, rel=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DegenerateTrainingSetWarning)
        with_three = clone(detector).fit(X[:3])
    assert with_three.offset_ != pytest.approx(
        quiet_fit(clone(with_three).set_params(calibration="in-sample"), X[:3]).offset_, rel=1e-3
    )


def test_the_warning_counts_the_selected_channels_not_all():
    detector = make_detector("PaDiMDetector", map_size=None, n_features=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DegenerateTrainingSetWarning)
        detector.fit(RNG.normal(size=(6, 64, 4, 4)))  # 6 images: plenty for 4 of 64 channels


def test_streaming_warns_when_the_model_is_used_with_too_few_images():
    # partial_fit only adds to the running sums; the covariances are formed
    # (and judged) when the model is first used.
    detector = make_detector("PaDiMDetector", map_size=None)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DegenerateTrainingSetWarning)
        detector.partial_fit(X[:2])
    with pytest.warns(DegenerateTrainingSetWarning, match=r"samples per position \(2\)"):
        detector.score_samples(X[:1])
    with warnings.catch_warnings():
        warnings.simplefilter("error", DegenerateTrainingSetWarning)
        detector.partial_fit(X[2:12])
        detector.score_samples(X[:1])


@pytest.mark.parametrize("name", detector_names())
def test_identical_images_fit_and_flag_any_change(name):
    same = np.repeat(X[:1], 10, axis=0)
    detector = make_detector(name, map_size=None)
    if name in gaussian_names():
        with pytest.warns(DegenerateTrainingSetWarning, match="identical training embeddings"):
            detector.fit(same)
    else:
        quiet_fit(detector, same)
    scores = detector.score_samples(np.concatenate([same[:1], same[:1] + 0.5]))
    assert np.isfinite(scores).all() and np.isfinite(detector.offset_)
    assert scores[1] < scores[0]
    assert detector.predict(same[:1] + 5.0)[0] == -1


@pytest.mark.parametrize("name", gaussian_names())
def test_singular_covariance_without_ridge_names_epsilon(name):
    with pytest.raises(ValueError, match="not positive definite.*epsilon"):
        quiet_fit(make_detector(name, map_size=None, epsilon=0), np.repeat(X[:1], 10, axis=0))
    constant_channel = X.copy()
    constant_channel[:, 3] = 1.0
    with pytest.raises(ValueError, match="not positive definite.*epsilon"):
        make_detector(name, map_size=None, epsilon=0).fit(constant_channel)


@pytest.mark.parametrize("name", detector_names())
def test_constant_embedding_channel_is_fine(name):
    # Dead (always-zero) channels are common in ReLU features.
    constant = X.copy()
    constant[:, 3] = 0.0
    detector = quiet_fit(make_detector(name, map_size=None), constant)
    test = np.concatenate([constant[:1], constant[:1]])
    test[1, 3, 1, 1] = 5.0  # a change in the dead channel is anomalous
    scores = detector.score_samples(test)
    assert np.isfinite(scores).all()
    assert scores[1] < scores[0]


@pytest.mark.parametrize("name", detector_names())
def test_constant_image_channel_and_black_images_through_the_pipeline(name):
    images = np.repeat(textures(12, seed=1)[..., None], 3, axis=-1)
    images[..., 2] = 0  # no blue at all
    pipe = make_pipeline(tiny_embedder(), make_detector(name))
    quiet_fit(pipe, images)
    black = np.zeros((1, *images.shape[1:]), np.uint8)
    scores = pipe.score_samples(np.concatenate([images[:2], black]))
    assert np.isfinite(scores).all()
    assert scores[2] < scores[:2].min()


@pytest.mark.parametrize("name", detector_names())
def test_overflowing_training_embeddings_never_give_a_nan_threshold(name):
    # float32 squares overflow from about 1e19 on.
    detector = make_detector(name, map_size=None)
    try:
        quiet_fit(detector, X * np.float32(1e30))
    except ValueError as exc:
        assert "overflow" in str(exc) and "cast them to float64" in str(exc)
    else:
        assert not np.isnan(detector.offset_)
    # float64 overflows too (squares beyond about 1e308): casting is no advice then
    try:
        quiet_fit(clone(detector), X.astype(np.float64) * 1e200)
    except ValueError as exc:
        assert "overflow" in str(exc) and "float64" in str(exc)
        assert "cast them to float64" not in str(exc)
    else:
        assert not np.isnan(detector.offset_)
