"""Scale-out: grid search on a Dask cluster, and PaDiM fitted on shards then merged."""

import pickle

import joblib
import numpy as np
import pytest
from sklearn.model_selection import GridSearchCV

from skpatch import PaDiMDetector, RobustPaDiMDetector, merge_detectors
from skpatch.metrics import image_auroc_scorer
from skpatch.model_selection import OneClassKFold

from _workflows import QUIET, anomaly_dataset, make_pipe, textures, tiny_embedder

pytestmark = QUIET

distributed = pytest.importorskip("dask.distributed")


@pytest.fixture(scope="module")
def client():
    # One in-process worker with two threads: starts in about a second. The
    # same code drives a real cluster: Client("scheduler-address:8786").
    with distributed.LocalCluster(
        n_workers=1, threads_per_worker=2, processes=False, dashboard_address=None
    ) as cluster, distributed.Client(cluster) as client:
        yield client


def test_grid_search_runs_on_a_dask_cluster(client, tmp_path):
    images, y, _ = anomaly_dataset(n_normal=12, n_anomalous=4)
    pipe = make_pipe("PaDiMDetector", embedder_params={"memory": str(tmp_path)}, map_size=None)
    grid = {"padimdetector__n_features": [4, 8], "padimdetector__epsilon": [0.01, 0.1]}
    kwargs = dict(
        scoring=image_auroc_scorer, cv=OneClassKFold(2), refit=False, error_score="raise"
    )
    serial = GridSearchCV(pipe, grid, **kwargs).fit(images, y)
    with distributed.get_task_stream(client) as stream, joblib.parallel_config(backend="dask"):
        on_dask = GridSearchCV(pipe, grid, n_jobs=-1, **kwargs).fit(images, y)
    # the fits and scorings ran as tasks on the cluster
    assert len(stream.data) >= 1
    np.testing.assert_allclose(
        on_dask.cv_results_["mean_test_score"], serial.cv_results_["mean_test_score"], atol=1e-6
    )


def _embeddings(n=24, dtype=np.float64):
    return tiny_embedder().transform(textures(n, seed=5)).astype(dtype)


def _padim(**params):
    return PaDiMDetector(n_features=6, random_state=0, map_size=None, **params)


@pytest.mark.parametrize("dtype, rtol", [(np.float64, 1e-9), (np.float32, 2e-3)])
def test_shards_fitted_in_parallel_merge_into_the_one_fit_model(dtype, rtol):
    X = _embeddings(dtype=dtype)
    test = _embeddings(n=30, dtype=dtype)[24:]
    shards = np.array_split(np.arange(len(X)), 3)
    fitted = joblib.Parallel(n_jobs=2)(joblib.delayed(_padim().fit)(X[part]) for part in shards)
    merged = merge_detectors(fitted)
    one_fit = _padim().fit(X)
    assert merged.n_samples_seen_ == one_fit.n_samples_seen_ == 24
    np.testing.assert_array_equal(merged.feature_indices_, one_fit.feature_indices_)
    np.testing.assert_allclose(merged.mean_, one_fit.mean_, rtol=rtol, atol=rtol * 1e-2)
    np.testing.assert_allclose(merged.scatter_, one_fit.scatter_, rtol=rtol, atol=rtol)
    np.testing.assert_allclose(merged.score_samples(test), one_fit.score_samples(test), rtol=rtol)
    np.testing.assert_allclose(merged.anomaly_map(test), one_fit.anomaly_map(test), rtol=rtol)
    # offset_: the contamination quantile of the shards' own training scores (documented)
    shard_scores = np.concatenate([d._train_scores for d in fitted])
    assert merged.offset_ == pytest.approx(np.percentile(-shard_scores, 10))
    # the inputs are untouched and the merged model keeps streaming
    assert fitted[0].n_samples_seen_ == len(shards[0])
    more = _embeddings(n=34, dtype=dtype)[30:]
    merged.partial_fit(more)
    np.testing.assert_allclose(
        merged.score_samples(test),
        _padim().fit(np.concatenate([X, more])).score_samples(test),
        rtol=rtol,
    )


def test_merging_one_shard_copies_it():
    # merge_moments(None, shard) once returned the shard's own arrays: a
    # partial_fit of the merged model updated the shard in place.
    X = _embeddings(n=14)
    shard = _padim().fit(X[:10])
    mean, scatter = shard.mean_.copy(), shard.scatter_.copy()
    merged = merge_detectors([shard])
    assert not np.shares_memory(merged.mean_, shard.mean_)
    assert not np.shares_memory(merged.scatter_, shard.scatter_)
    merged.partial_fit(X[10:])
    assert merged.n_samples_seen_ == 14 and shard.n_samples_seen_ == 10
    np.testing.assert_array_equal(shard.mean_, mean)
    np.testing.assert_array_equal(shard.scatter_, scatter)


def test_merged_model_keeps_its_ridge_when_saved():
    # epsilon changed after the merge takes effect at the next (partial) fit,
    # not when the saved model recomputes its precision factors
    X = _embeddings(n=14)
    merged = merge_detectors([_padim().fit(X[:7]), _padim().fit(X[7:])])
    expected = merged.score_samples(X)
    merged.set_params(epsilon=10.0)
    restored = pickle.loads(pickle.dumps(merged))
    np.testing.assert_allclose(restored.score_samples(X), expected, rtol=1e-9)


def test_pipelines_fitted_on_image_shards_on_dask_merge(client):
    images = textures(24, seed=7)
    test = textures(4, seed=8)
    shards = np.array_split(images, 3)

    def pipe():
        return make_pipe("PaDiMDetector", n_features=6, map_size=None)

    with joblib.parallel_config(backend="dask"):
        fitted = joblib.Parallel()(joblib.delayed(pipe().fit)(part) for part in shards)
    merged = merge_detectors(fitted)
    one_fit = pipe().fit(images)
    assert [name for name, _ in merged.steps] == [name for name, _ in one_fit.steps]
    np.testing.assert_allclose(merged.score_samples(test), one_fit.score_samples(test), rtol=2e-3)


def test_merge_refuses_what_it_cannot_merge():
    X = _embeddings(n=12)
    with pytest.raises(TypeError, match="RobustPaDiMDetector .* cannot be merged.*LOF"):
        merge_detectors([RobustPaDiMDetector(random_state=0).fit(X[:6]) for _ in range(2)])
    with pytest.raises(ValueError, match="random channels"):
        merge_detectors([_padim().fit(X[:6]), PaDiMDetector(n_features=6, random_state=1,
                                                            map_size=None).fit(X[6:])])
    with pytest.raises(ValueError, match=r"\['epsilon'\] differ"):
        merge_detectors([_padim().fit(X[:6]), _padim(epsilon=1.0).fit(X[6:])])
    with pytest.raises(ValueError, match="one class"):
        merge_detectors([_padim().fit(X[:6]), RobustPaDiMDetector().fit(X[6:])])
    with pytest.raises(ValueError, match="different shapes"):
        merge_detectors([_padim().fit(X[:6]), _padim().fit(X[6:, :, :4])])
    with pytest.raises(ValueError, match="not a mix"):
        merge_detectors([_padim().fit(X[:6]), make_pipe("PaDiMDetector")])
    with pytest.raises(ValueError, match="at least one"):
        merge_detectors([])
    streamed = [_padim().partial_fit(X[:1]), _padim().partial_fit(X[1:6])]
    with pytest.raises(ValueError, match="estimator 0 has seen 1 image: a shard needs at least 2"):
        merge_detectors(streamed)


def test_pipelines_whose_embedders_batch_differently_merge(tmp_path):
    # batch_size, memory, verbose and output change no feature
    images = textures(12, seed=7)
    settings = [{"batch_size": 2}, {"batch_size": 5, "memory": str(tmp_path), "verbose": 0}]
    fitted = [
        make_pipe("PaDiMDetector", embedder_params=params, n_features=6, map_size=None).fit(part)
        for params, part in zip(settings, np.array_split(images, 2))
    ]
    merged = merge_detectors(fitted)
    assert merged[-1].n_samples_seen_ == 12
    with pytest.raises(ValueError, match=r"\['image_size'\] differ"):
        other = make_pipe("PaDiMDetector", embedder_params={"image_size": 40},
                          n_features=6, map_size=None)
        merge_detectors([fitted[0], other.fit(images[:6])])


def test_merge_refuses_shards_of_other_columns():
    pd = pytest.importorskip("pandas")
    X = np.random.RandomState(0).normal(size=(40, 3)) * [1, 10, 100]
    names = ["a", "b", "c"]
    first = pd.DataFrame(X[:20], columns=names)
    params = dict(n_features=None, map_size=None, random_state=0)
    for other in (pd.DataFrame(X[20:, ::-1], columns=names[::-1]),
                  pd.DataFrame(X[20:], columns=["x", "y", "z"]), X[20:]):
        shards = [PaDiMDetector(**params).fit(first), PaDiMDetector(**params).fit(other)]
        with pytest.raises(ValueError, match="different feature names"):
            merge_detectors(shards)
    # the same columns merge, and keep their names
    shards = [PaDiMDetector(**params).fit(first),
              PaDiMDetector(**params).fit(pd.DataFrame(X[20:], columns=names))]
    assert list(merge_detectors(shards).feature_names_in_) == names
