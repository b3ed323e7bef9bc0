"""GridSearchCV over skpatch pipelines: every detector, caching of the CNN, n_jobs."""

import joblib
import numpy as np
import pytest
from sklearn.base import clone
from sklearn.model_selection import GridSearchCV

from skpatch.backbones import FeatureExtractor
from skpatch.metrics import image_auroc_scorer, make_anomaly_scorer
from skpatch.model_selection import OneClassKFold

from _workflows import QUIET, anomaly_dataset, detector_names, make_detector, make_pipe

pytestmark = QUIET

SCORING = make_anomaly_scorer(["image_auroc", "pixel_auroc", "aupro"])


@pytest.fixture(scope="module")
def dataset():
    return anomaly_dataset(n_normal=16, n_anomalous=6)


def tunable_grid(name, step):
    """Values of tau, n_neighbors and n_features (those the detector has): at most 4 points."""
    detector = make_detector(name)
    params = detector.get_params()
    pools = {"tau": [params.get("tau"), 0.5, 0.9], "n_neighbors": [1, 3], "n_features": [4, 8]}
    grid = {}
    for param, pool in pools.items():
        if param not in params:
            continue
        values = []
        for value in pool:
            try:
                clone(detector).set_params(**{param: value})._validate_params()
            except ValueError:
                continue
            if value not in values:
                values.append(value)
        # two values for the first two parameters, one for the third
        grid[f"{step}__{param}"] = values[: 2 if len(grid) < 2 else 1]
    return grid


@pytest.fixture
def count_forward(monkeypatch):
    """Number of images that went through the backbone (all FeatureExtractors)."""
    seen = []
    forward = FeatureExtractor.forward

    def counting_forward(self, x):
        seen.append(x.shape[0])
        return forward(self, x)

    monkeypatch.setattr(FeatureExtractor, "forward", counting_forward)
    return lambda: sum(seen)


@pytest.mark.parametrize("name", detector_names())
def test_grid_search_tunes_every_detector(name, dataset, tmp_path):
    images, y, labels = dataset
    pipe = make_pipe(name, embedder_params={"memory": str(tmp_path)})
    step = pipe.steps[-1][0]
    grid = tunable_grid(name, step)
    assert grid, f"{name} has none of tau, n_neighbors, n_features"
    cv = OneClassKFold(2)
    search = GridSearchCV(pipe, grid, scoring=SCORING, cv=cv, refit=False, error_score="raise")
    search.fit(images, y)
    n_candidates = int(np.prod([len(v) for v in grid.values()]))
    assert len(search.cv_results_["params"]) == n_candidates
    for metric in ("image_auroc", "pixel_auroc", "aupro"):
        scores = search.cv_results_[f"mean_test_{metric}"]
        assert np.all((scores >= 0) & (scores <= 1)), (metric, scores)
    # a cell of the table is the score of that candidate fitted on that fold's normals
    index = len(search.cv_results_["params"]) - 1
    train, test = next(cv.split(images, y))
    assert np.all(labels[train] == 0)
    model = clone(pipe).set_params(**search.cv_results_["params"][index]).fit(images[train])
    expected = image_auroc_scorer(model, images[test], y[test])
    assert search.cv_results_["split0_test_image_auroc"][index] == pytest.approx(expected)


def _search(memory_kind, cache_dir, dataset, cv):
    images, y, _ = dataset
    embedder_params = {"memory": str(cache_dir)} if memory_kind == "embedder" else {}
    pipe = make_pipe(
        "PaDiMDetector",
        embedder_params=embedder_params,
        memory=str(cache_dir) if memory_kind == "pipeline" else None,
        map_size=None,  # image scores only: skip the blur, this test counts CNN runs
        sigma=0,
    )
    grid = {
        "patchembedder__image_size": [32, 48],
        "patchembedder__pool_size": [1, 3],
        "padimdetector__n_features": [4, 8],
    }
    search = GridSearchCV(pipe, grid, scoring=image_auroc_scorer, cv=cv, refit=False)
    return search.fit(images, y)


def test_embedder_memory_runs_the_cnn_once_per_image_and_backbone_setting(
    dataset, tmp_path, count_forward
):
    images, y, _ = dataset
    cv = OneClassKFold(2)
    search = _search("embedder", tmp_path, dataset, cv)
    # 8 grid points x 2 folds, training and test folds; 2 distinct backbone
    # settings (image_size): every image runs through the CNN once per setting,
    # pool_size and the detector's parameters reuse the cached feature maps.
    # (Without a cache: 8 x 2 x 22 = 352 images.)
    assert len(search.cv_results_["params"]) == 8
    assert count_forward() == 2 * len(images)
    # a second search (another process, a later day) computes nothing
    _search("embedder", tmp_path, dataset, cv)
    assert count_forward() == 2 * len(images)


def test_pipeline_memory_caches_the_training_folds_only(dataset, tmp_path, count_forward):
    images, y, _ = dataset
    cv = OneClassKFold(2)
    splits = list(cv.split(images, y))
    search = _search("pipeline", tmp_path, dataset, cv)
    train_total = sum(len(train) for train, _ in splits)
    test_total = sum(len(test) for _, test in splits)
    # Pipeline(memory=...) caches fit_transform of each training fold per
    # embedder setting (4 of them), but the test folds are transformed again
    # at every grid point (8): what is and is not cached, exactly.
    assert count_forward() == 4 * train_total + 8 * test_total
    # same results as with the embedder's cache (which also caches test folds)
    reference = _search("embedder", tmp_path / "features", dataset, cv)
    np.testing.assert_allclose(
        search.cv_results_["mean_test_score"], reference.cv_results_["mean_test_score"], atol=1e-6
    )


def _threads_scorer():
    # a closure: loky pickles it by value, so the workers need not import this module
    def torch_threads(estimator, X, y):
        import torch

        return float(torch.get_num_threads())

    return torch_threads


def test_parallel_grid_search_without_oversubscription(dataset, tmp_path):
    images, y, _ = dataset
    pipe = make_pipe("PaDiMDetector", embedder_params={"memory": str(tmp_path)})
    grid = {"padimdetector__n_features": [4, 8]}
    scoring = {"auroc": image_auroc_scorer, "threads": _threads_scorer()}
    kwargs = dict(scoring=scoring, cv=OneClassKFold(2), refit=False, error_score="raise")
    serial = GridSearchCV(pipe, grid, n_jobs=1, **kwargs).fit(images, y)
    parallel = GridSearchCV(pipe, grid, n_jobs=2, **kwargs).fit(images, y)
    np.testing.assert_allclose(
        parallel.cv_results_["mean_test_auroc"], serial.cv_results_["mean_test_auroc"], atol=1e-6
    )
    # loky limits the native thread pools of each of its n_jobs workers to
    # cpu_count // n_jobs (OMP_NUM_THREADS), which torch honours
    per_worker = max(1, joblib.cpu_count() // 2)
    threads = np.r_[[parallel.cv_results_[f"split{k}_test_threads"] for k in range(2)]]
    assert threads.max() <= per_worker, threads
