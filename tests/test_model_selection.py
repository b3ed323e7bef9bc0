"""One-class splitter, targets with masks, and the pixel scorers."""

import pickle

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.base import clone
from sklearn.covariance import EllipticEnvelope
from sklearn.model_selection import GridSearchCV, cross_validate
from sklearn.pipeline import make_pipeline

from skpatch import PaDiMDetector, PatchEmbedder
from skpatch.metrics import (
    aupro,
    aupro_scorer,
    image_auroc_scorer,
    make_anomaly_scorer,
    make_targets,
    pixel_auroc,
    pixel_auroc_scorer,
)
from skpatch.model_selection import OneClassKFold


def _check_split(train, test, labels, n_samples):
    assert train.dtype.kind == "i" and test.dtype.kind == "i"
    assert np.all(np.diff(train) > 0) and np.all(np.diff(test) > 0)  # sorted, unique
    assert not set(train) & set(test)
    assert set(train) | set(test) <= set(range(n_samples))
    assert labels[test].min() == 0 and labels[test].max() == 1  # both classes tested


@settings(max_examples=40, deadline=None)
@given(
    n_normal=st.integers(2, 30),
    n_anomalous=st.integers(1, 10),
    n_splits=st.integers(2, 6),
    shuffle=st.booleans(),
    seed=st.integers(0, 3),
)
def test_clean_splits_train_on_every_normal_but_one_fold(
    n_normal, n_anomalous, n_splits, shuffle, seed
):
    if n_splits > n_normal:
        n_splits = n_normal
    rng = np.random.RandomState(seed)
    labels = rng.permutation(np.r_[np.zeros(n_normal, int), np.ones(n_anomalous, int)])
    cv = OneClassKFold(n_splits, shuffle=shuffle, random_state=seed if shuffle else None)
    splits = list(cv.split(np.zeros((len(labels), 2)), labels))
    assert len(splits) == cv.get_n_splits() == n_splits
    tested = []
    for train, test in splits:
        _check_split(train, test, labels, len(labels))
        assert np.all(labels[train] == 0)
        np.testing.assert_array_equal(np.sort(test[labels[test] == 1]), np.flatnonzero(labels))
        tested.extend(test[labels[test] == 0])
    # the normal samples are partitioned among the test folds
    np.testing.assert_array_equal(np.sort(tested), np.flatnonzero(labels == 0))


@settings(max_examples=40, deadline=None)
@given(
    n_normal=st.integers(4, 40),
    contamination=st.sampled_from([0.05, 0.1, 0.2, 0.3]),
    seed=st.integers(0, 5),
)
def test_noisy_splits_hold_the_chosen_share_of_anomalies(n_normal, contamination, seed):
    labels = np.r_[np.zeros(n_normal, int), np.ones(30, int)]
    cv = OneClassKFold(3, contamination=contamination, shuffle=True, random_state=seed)
    splits = list(cv.split(labels, labels))
    for train, test in splits:
        _check_split(train, test, labels, len(labels))
        n_train_normal = np.sum(labels[train] == 0)
        expected = round(contamination * n_train_normal / (1 - contamination))
        assert np.sum(labels[train] == 1) == expected
        # every anomaly not trained on is tested
        trained, tested = train[labels[train] == 1], test[labels[test] == 1]
        assert set(np.flatnonzero(labels)) == set(trained) | set(tested)
    # an int random_state gives the same splits at every call (GridSearchCV calls once)
    again = list(cv.split(labels, labels))
    for (a, b), (c, d) in zip(splits, again):
        np.testing.assert_array_equal(a, c)
        np.testing.assert_array_equal(b, d)


def test_groups_never_straddle_a_split():
    labels = np.r_[np.zeros(12, int), np.ones(6, int)]
    # parts 0..5, two normal images each; parts 0, 1, 6, 7 also have a defective image
    groups = np.r_[np.repeat(np.arange(6), 2), [0, 1, 6, 6, 7, 7]]
    cv = OneClassKFold(3, contamination=0.2, shuffle=True, random_state=0)
    for train, test in cv.split(labels, labels, groups):
        assert not set(groups[train]) & set(groups[test])
        assert labels[test].max() == 1
        # contaminants come in whole groups
        injected = groups[train][labels[train] == 1]
        for group in set(injected):
            assert np.sum(injected == group) == np.sum(groups[labels == 1] == group)


def test_targets_carry_labels_and_masks_through_the_splits():
    masks = np.zeros((8, 5, 5), bool)
    masks[6:, 2, 2] = True
    y = make_targets(np.r_[np.zeros(6), 1, 1], masks)
    assert y.shape == (8,) and y.dtype.names == ("label", "mask")
    for train, test in OneClassKFold(2).split(np.zeros(8), y):
        np.testing.assert_array_equal(y[test]["mask"], masks[test])
        assert np.all(y[train]["label"] == 0)
    np.testing.assert_array_equal(make_targets(masks=masks)["label"], y["label"])
    labels_only = make_targets([0, 1, 0])
    assert labels_only.dtype.names == ("label",)
    # pickles and indexes like any array (what joblib and GridSearchCV do with it)
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(y))[[1, 7]], y[[1, 7]])


def test_targets_and_splitter_errors():
    with pytest.raises(ValueError, match="labelled normal"):
        make_targets([0, 0], np.ones((2, 3, 3), bool))
    with pytest.raises(ValueError, match="same length"):
        make_targets([0, 1, 1], np.ones((2, 3, 3), bool))
    with pytest.raises(ValueError, match=r"\(y == -1\)"):
        make_targets([1, -1])
    with pytest.raises(ValueError, match="needs labels, masks"):
        make_targets()
    y = np.r_[np.zeros(4, int), 1]
    with pytest.raises(ValueError, match=r"\(y == -1\)"):
        next(OneClassKFold(2).split(y, np.where(y == 1, -1, 1)))
    with pytest.raises(ValueError, match="no anomalous"):
        next(OneClassKFold(2).split(y, np.zeros(5)))
    with pytest.raises(ValueError, match="needs labels y"):
        next(OneClassKFold(2).split(y, None))
    with pytest.raises(ValueError, match="more than the 4 normal"):
        next(OneClassKFold(5).split(y, y))
    with pytest.raises(ValueError, match="at least one must stay"):
        next(OneClassKFold(2, contamination=0.4, random_state=0).split(y, y))
    with pytest.raises(ValueError, match="at least 2"):
        OneClassKFold(1)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        OneClassKFold(contamination=1.0)
    with pytest.raises(ValueError, match="no effect"):
        OneClassKFold(random_state=0)
    assert repr(OneClassKFold(3)) == (
        "OneClassKFold(contamination=0.0, n_splits=3, random_state=None, shuffle=False)"
    )


def _gaussian_problem(seed=0):
    rng = np.random.RandomState(seed)
    X = np.vstack([rng.normal(size=(40, 3)), rng.normal(4, 1, size=(10, 3))])
    return X, np.r_[np.zeros(40, int), np.ones(10, int)]


def test_grid_search_with_the_splitter_and_groups():
    X, y = _gaussian_problem()
    groups = np.arange(len(y)) // 2
    search = GridSearchCV(
        EllipticEnvelope(random_state=0),
        {"support_fraction": [0.7, 1.0]},
        scoring=image_auroc_scorer,
        cv=OneClassKFold(4, shuffle=True, random_state=0),
        refit=False,
        error_score="raise",
    ).fit(X, y, groups=groups)
    assert search.n_splits_ == 4
    assert search.cv_results_["mean_test_score"].min() > 0.95
    # the documented refit on the normal samples
    best = clone(search.estimator).set_params(**search.best_params_).fit(X[y == 0])
    assert image_auroc_scorer(best, X, y) > 0.95


def test_pixel_scorers_read_the_fold_masks():
    rng = np.random.RandomState(0)
    X = rng.normal(size=(30, 4, 3, 3))
    defects = rng.normal(size=(6, 4, 3, 3))
    masks = np.zeros((36, 3, 3), bool)
    for i in range(6):
        r, c = divmod(i, 3)
        defects[i, :, r, c] += 8
        masks[30 + i, r, c] = True
    data = np.concatenate([X, defects])
    y = make_targets(masks=masks)
    detector = PaDiMDetector(map_size=None, sigma=0).fit(X[:20])
    maps = detector.anomaly_map(data[20:])
    assert pixel_auroc_scorer(detector, data[20:], y[20:]) == pixel_auroc(masks[20:], maps)
    assert aupro_scorer(detector, data[20:], y[20:]) == aupro(masks[20:], maps)
    assert image_auroc_scorer(detector, data[20:], y[20:]) == 1.0
    # one scorer for the three metrics, the maps computed once
    both = make_anomaly_scorer(["image_auroc", "pixel_auroc", "aupro"])
    assert both(detector, data[20:], y[20:]) == {
        "image_auroc": 1.0,
        "pixel_auroc": pixel_auroc(masks[20:], maps),
        "aupro": aupro(masks[20:], maps),
    }
    results = cross_validate(
        PaDiMDetector(map_size=None, sigma=0),
        data,
        y,
        cv=OneClassKFold(3),
        scoring={"pixel": pixel_auroc_scorer, "aupro": aupro_scorer},
        error_score="raise",
    )
    assert results["test_pixel"].min() > 0.9 and results["test_aupro"].min() > 0.5
    results = cross_validate(
        PaDiMDetector(map_size=None, sigma=0), data, y, cv=OneClassKFold(3), scoring=both
    )
    assert {"test_image_auroc", "test_pixel_auroc", "test_aupro"} <= set(results)


def test_one_scorer_for_several_metrics_embeds_once(monkeypatch):
    images = np.random.RandomState(0).randint(0, 256, (10, 32, 32), dtype=np.uint8)
    masks = np.zeros((4, 32, 32), bool)
    masks[2:, 3:6, 3:6] = True
    pipe = make_pipeline(
        PatchEmbedder(weights=None, image_size=32, crop_size=None),
        PaDiMDetector(n_features=10, map_size=32, random_state=0),
    ).fit(images[:6])
    expected = {
        "image_auroc": image_auroc_scorer(pipe, images[6:], make_targets(masks=masks)),
        "aupro": aupro_scorer(pipe, images[6:], make_targets(masks=masks)),
    }
    passes = []
    transform = PatchEmbedder.transform
    monkeypatch.setattr(PatchEmbedder, "transform", lambda self, X: passes.append(len(X))
                        or transform(self, X))
    both = make_anomaly_scorer(["image_auroc", "aupro"])
    assert both(pipe, images[6:], make_targets(masks=masks)) == expected
    assert passes == [4]


def test_pixel_scorer_errors():
    rng = np.random.RandomState(0)
    X = rng.normal(size=(10, 2, 3, 3))
    detector = PaDiMDetector(map_size=None).fit(X)
    with pytest.raises(ValueError, match="make_targets"):
        pixel_auroc_scorer(detector, X, np.zeros(10, int))
    masks = np.zeros((10, 4, 4), bool)
    masks[0, 0, 0] = True
    with pytest.raises(ValueError, match="map_size"):
        aupro_scorer(detector, X, make_targets(masks=masks))
    with pytest.raises(ValueError, match="distinct names"):
        make_anomaly_scorer(["aupro", "aupro"])
    with pytest.raises(ValueError, match="'aupro'"):
        make_anomaly_scorer("roc_auc")


def test_public_docstrings():
    numpydoc_validate = pytest.importorskip("numpydoc.validate")
    ignored = {"SA01", "EX01", "ES01", "GL08", "SA04", "RT02", "RT05", "PR02", "GL02", "YD01"}
    names = [
        "skpatch.model_selection.OneClassKFold",
        "skpatch.model_selection.OneClassKFold.split",
        "skpatch.model_selection.OneClassKFold.get_n_splits",
        "skpatch.metrics.make_targets",
        "skpatch.metrics.pixel_auroc_scorer",
        "skpatch.metrics.aupro_scorer",
        "skpatch.metrics.make_anomaly_scorer",
        "skpatch.merge_detectors",
    ]
    for name in names:
        errors = [
            f"{name} {code}: {message}"
            for code, message in numpydoc_validate.validate(name)["errors"]
            if code not in ignored
        ]
        assert not errors, "\n".join(errors)
