"""Determinism: same data + same random_state -> the same scores, in any process.

Bitwise equality for refits, fresh processes and a joblib round trip into a
fresh process (same machine and thread count); float-rounding agreement
(1e-5 relative) when only the batching changes: the embedder's ``batch_size``
and scikit-learn's ``working_memory`` (the detectors' chunk size), which
reorder float32 sums. The same-process joblib round trip is in
tests/test_persistence.py.
"""

import json
import os
import subprocess
import sys
import textwrap
import warnings

import joblib
import numpy as np
import pytest
import sklearn
import torch
from sklearn.base import clone

from skpatch import anomaly_map

from _common import assert_same_embeddings
from _workflows import QUIET, detector_names, make_detector, make_pipe, textures

pytestmark = QUIET

TESTS = os.path.dirname(os.path.abspath(__file__))
RNG = np.random.RandomState(0)
X = RNG.normal(size=(30, 8, 4, 4)).astype(np.float32)
IMAGES = textures(16, seed=5)
TRAIN, TEST = IMAGES[:12], IMAGES[12:]


@pytest.mark.parametrize("name", detector_names())
def test_refits_with_the_same_random_state_are_identical(name):
    first = make_detector(name, map_size=16).fit(X)
    second = clone(first).fit(X)
    np.testing.assert_array_equal(first.score_samples(X), second.score_samples(X))
    np.testing.assert_array_equal(first.anomaly_map(X[:3]), second.anomaly_map(X[:3]))
    assert first.offset_ == second.offset_


@pytest.mark.parametrize("name", detector_names())
def test_a_refit_on_other_data_scores_as_a_fresh_fit(name):
    # What scoring keeps between calls (e.g. the Gaussians' -μU) follows a refit.
    other = RNG.normal(loc=0.5, size=X.shape).astype(np.float32)
    refitted = make_detector(name, map_size=16).fit(X)
    refitted.score_samples(X[:4])
    refitted.fit(other)
    fresh = make_detector(name, map_size=16).fit(other)
    np.testing.assert_array_equal(refitted.score_samples(X), fresh.score_samples(X))
    np.testing.assert_array_equal(refitted.anomaly_map(X[:3]), fresh.anomaly_map(X[:3]))


@pytest.mark.parametrize("name", detector_names())
def test_chunking_by_working_memory_changes_only_rounding(name):
    detector = make_detector(name, map_size=16).fit(X)
    with warnings.catch_warnings(), sklearn.config_context(working_memory=1e-4):
        warnings.filterwarnings("ignore", "Could not adhere to working_memory")
        one_at_a_time = make_detector(name, map_size=16).fit(X)  # chunks of one image
        scores = one_at_a_time.score_samples(X)
        maps = one_at_a_time.anomaly_map(X[:3])
    np.testing.assert_allclose(scores, detector.score_samples(X), rtol=1e-5)
    np.testing.assert_allclose(maps, detector.anomaly_map(X[:3]), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(one_at_a_time.offset_, detector.offset_, rtol=1e-5)


def test_embedder_batch_size_changes_only_rounding():
    # A detector is a function of the embeddings: checking one is enough.
    pipes = [
        make_pipe("PaDiMDetector", embedder_params={"batch_size": b})
        for b in (1, 5, 64)  # 64: larger than the data
    ]
    scores = [pipe.fit(TRAIN).score_samples(TEST) for pipe in pipes]
    assert_same_embeddings(scores[0], scores[1], rtol=1e-5)
    assert_same_embeddings(scores[0], scores[2], rtol=1e-5)


_CHILD = textwrap.dedent(
    """
    import json, sys, warnings
    import joblib, numpy as np, torch
    warnings.simplefilter("ignore")
    torch.set_num_threads({threads})
    sys.path.insert(0, {tests!r})
    from skpatch import anomaly_map
    from _workflows import make_pipe, textures
    images = textures(16, seed=5)
    result = {{}}
    for name in {names!r}:
        loaded = joblib.load({folder!r} + "/" + name + ".joblib")
        refit = make_pipe(name).fit(images[:12])
        for key, pipe in (("loaded", loaded), ("refit", refit)):
            result[name + "/" + key] = [
                pipe.score_samples(images[12:]).tolist(),
                anomaly_map(pipe, images[12:14]).ravel().tolist(),
            ]
    print(json.dumps(result))
    """
)


def test_same_scores_in_a_fresh_process_and_after_joblib(tmp_path):
    torch.set_num_threads(1)  # both processes alike, and fast on a loaded machine
    names = detector_names()
    expected = {}
    for name in names:
        pipe = make_pipe(name).fit(TRAIN)
        joblib.dump(pipe, tmp_path / f"{name}.joblib")
        expected[name] = [
            pipe.score_samples(TEST).tolist(),
            anomaly_map(pipe, TEST[:2]).ravel().tolist(),
        ]
    code = _CHILD.format(
        threads=torch.get_num_threads(), tests=TESTS, names=names, folder=str(tmp_path)
    )
    run = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=600
    )
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    for name in names:
        for key in ("loaded", "refit"):
            # JSON round-trips float32 values exactly (through float64).
            assert result[f"{name}/{key}"] == expected[name], f"{name} ({key}) differs"
