"""Scoring with other embeddings than the detector was fitted on: a named error, never a score.

What cannot be detected from arrays alone: two backbones (or two sets of
weights) whose embeddings have the same channel count and grid; keep the
embedder and the detector together in one saved Pipeline (see
doc/modules/reliability.rst).
"""

import numpy as np
import pandas as pd
import pytest
from sklearn.exceptions import NotFittedError

from _workflows import QUIET, detector_names, make_detector, make_pipe, textures

pytestmark = QUIET

RNG = np.random.RandomState(0)
X = RNG.normal(size=(20, 8, 4, 4)).astype(np.float32)


@pytest.fixture(scope="module")
def fitted():
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = make_detector(name, map_size=None).fit(X)
        return cache[name]

    return get


def scoring_methods(detector):
    return [
        detector.score_samples,
        detector.decision_function,
        detector.predict,
        detector.anomaly_map,
    ]


@pytest.mark.parametrize("name", detector_names())
def test_other_channel_count_is_named(fitted, name):
    detector = fitted(name)
    other = RNG.normal(size=(3, 6, 4, 4)).astype(np.float32)
    for method in scoring_methods(detector):
        with pytest.raises(ValueError, match=f"X has 6 features, but {name} is expecting 8"):
            method(other)


@pytest.mark.parametrize("name", detector_names())
def test_other_grid_is_named_with_the_fix(fitted, name):
    detector = fitted(name)
    other = RNG.normal(size=(3, 8, 5, 4)).astype(np.float32)
    for method in scoring_methods(detector):
        with pytest.raises(ValueError, match="5x4 grid.*fitted on a 4x4 grid.*image_size"):
            method(other)
    # one patch per sample (n, d) is a 1x1 grid, not the fitted 4x4 one
    with pytest.raises(ValueError, match="1x1 grid"):
        detector.score_samples(X[:3, :, 0, 0])


@pytest.mark.parametrize("name", detector_names())
def test_two_d_and_one_patch_grids_are_the_same_input(name):
    flat = X[:, :, 0, 0]
    detector = make_detector(name, map_size=None).fit(flat)
    grid = detector.score_samples(flat[:4, :, None, None])
    np.testing.assert_allclose(grid, detector.score_samples(flat[:4]), rtol=1e-6)


@pytest.mark.parametrize("name", detector_names())
def test_refit_on_embeddings_forgets_the_column_names(name):
    flat = X[:, :, 0, 0]
    columns = pd.DataFrame(flat, columns=[f"c{i}" for i in range(flat.shape[1])])
    detector = make_detector(name, map_size=None).fit(columns)
    assert len(detector.feature_names_in_) == flat.shape[1]
    detector.fit(X[:, :5])
    assert detector.n_features_in_ == 5 and not hasattr(detector, "feature_names_in_")


@pytest.mark.parametrize("name", detector_names())
def test_unfitted_detector_says_fit_first(name):
    detector = make_detector(name, map_size=None)
    for method in scoring_methods(detector):
        with pytest.raises(NotFittedError, match="not fitted yet"):
            method(X[:2])


@pytest.mark.parametrize("name", detector_names())
def test_detector_behind_another_backbone_or_layers_is_refused(name):
    images = textures(12, seed=2)
    pipe = make_pipe(name).fit(images)  # efficientnet_lite0, stage1: 24 channels
    pipe.set_params(patchembedder__backbone="resnet18", patchembedder__layers=("layer1",))
    with pytest.raises(ValueError, match=f"X has 64 features, but {name} is expecting 24"):
        pipe.score_samples(images[:2])
    pipe.set_params(patchembedder__backbone="efficientnet_lite0", patchembedder__layers=None)
    with pytest.raises(ValueError, match=f"X has 176 features, but {name} is expecting 24"):
        pipe.predict(images[:2])
    pipe.set_params(patchembedder__layers=("stage1",), patchembedder__image_size=48)
    with pytest.raises(ValueError, match="12x12 grid.*fitted on a 8x8 grid"):
        pipe.decision_function(images[:2])
