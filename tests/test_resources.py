"""Resources: bounded memory when scoring many images, odd batch sizes, out-of-memory advice."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from sklearn.pipeline import make_pipeline

from skpatch import fit_in_batches

from _common import assert_same_embeddings
from _workflows import (
    QUIET,
    detector_class,
    detector_names,
    make_detector,
    textures,
    tiny_embedder,
)

pytestmark = QUIET

TESTS = os.path.dirname(os.path.abspath(__file__))
RNG = np.random.RandomState(0)
X = RNG.normal(size=(20, 8, 4, 4)).astype(np.float32)

# ---------------------------------------------------------------- memory budget
# 10,000 images of 8 x 8 x 8 embeddings (20 MB) scored into 64 x 64 maps: the
# maps of all images at once would take 164 MB. Scored in chunks bounded by
# working_memory, the peak resident memory grows by a few MB. Peak RSS is
# reset with /proc/self/clear_refs (Linux) in a fresh single-threaded process.
N_IMAGES, MAP_SIZE, BUDGET_MB = 10_000, 64, 48

_CHILD = textwrap.dedent(
    """
    import json, sys, warnings
    import numpy as np, sklearn, torch
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    sys.path.insert(0, {tests!r})
    from _workflows import make_detector

    def status(field):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field):
                    return int(line.split()[1]) * 1024

    X = np.random.RandomState(0).normal(size=({n}, 8, 8, 8)).astype(np.float32)
    peaks = {{}}
    for name in {names!r}:
        detector = make_detector(name, map_size={map_size}).fit(X[:50])
        detector.score_samples(X[:64])  # warm up: lazy initialisations are not scoring
        with sklearn.config_context(working_memory=8):
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset the peak RSS to the current RSS
            before = status("VmRSS:")
            scores = detector.score_samples(X)
            peaks[name] = (status("VmHWM:") - before) / 2**20
        assert scores.shape == ({n},) and not np.isnan(scores).any()
    print(json.dumps(peaks))
    """
)


@pytest.fixture(scope="module")
def scoring_peaks():
    if not os.access("/proc/self/clear_refs", os.W_OK):
        pytest.skip("needs Linux's /proc/self/clear_refs to measure peak memory")
    code = _CHILD.format(tests=TESTS, n=N_IMAGES, names=detector_names(), map_size=MAP_SIZE)
    run = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=600
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", detector_names())
def test_scoring_10000_images_stays_within_a_fixed_memory_budget(scoring_peaks, name):
    detector_class(name)
    unchunked_mb = N_IMAGES * MAP_SIZE**2 * 4 / 2**20
    assert scoring_peaks[name] < BUDGET_MB < unchunked_mb


# ---------------------------------------------------------------- batch sizes
def test_batch_size_larger_than_the_data():
    images = textures(5, seed=1)
    big = tiny_embedder(batch_size=1000).transform(images)
    assert_same_embeddings(big, tiny_embedder(batch_size=2).transform(images))
    pipe = make_pipeline(tiny_embedder(batch_size=1000), make_detector("PaDiMDetector"))
    streamed = fit_in_batches(pipe, images, batch_size=1000)
    reference = make_pipeline(tiny_embedder(), make_detector("PaDiMDetector")).fit(images)
    np.testing.assert_allclose(
        streamed.score_samples(images), reference.score_samples(images), rtol=1e-5
    )


# ---------------------------------------------------------------- out of memory
CUDA_OOM = "CUDA out of memory. Tried to allocate 20.00 GiB (GPU 0; 7.79 GiB total capacity)"


def _raise(error):
    def validate(self, X, **kwargs):
        raise error

    return validate


@pytest.mark.parametrize("name", detector_names())
def test_cuda_out_of_memory_gives_advice(monkeypatch, name):
    fitted = make_detector(name, map_size=None).fit(X)
    # Simulated: the error is raised where a detector first touches the data.
    oom = torch.OutOfMemoryError(CUDA_OOM)
    monkeypatch.setattr(type(fitted), "_validate_embeddings", _raise(oom))
    calls = {
        "fit": lambda: make_detector(name, map_size=None).fit(X),
        "score_samples": lambda: fitted.score_samples(X),
        "score_samples ": lambda: fitted.predict(X),  # through decision_function
        "anomaly_map": lambda: fitted.anomaly_map(X),
    }
    for method, call in calls.items():
        with pytest.raises(torch.OutOfMemoryError) as info:  # same type: except clauses still work
            call()
        message = str(info.value)
        assert message.startswith(CUDA_OOM)
        assert f"{name}.{method.strip()} ran out of memory" in message
        assert "working_memory" in message and "batch_size" in message
        assert "device='cpu'" in message
        assert message.count("ran out of memory") == 1


def test_cpu_allocator_failure_gets_advice_and_other_errors_do_not(monkeypatch):
    detector = make_detector("PaDiMDetector", map_size=None).fit(X)
    cpu = RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 9 GB")
    monkeypatch.setattr(type(detector), "_validate_embeddings", _raise(cpu))
    with pytest.raises(RuntimeError, match="(?s)can't allocate memory.*working_memory"):
        detector.score_samples(X)
    other = RuntimeError("a bug, not a lack of memory")
    monkeypatch.setattr(type(detector), "_validate_embeddings", _raise(other))
    with pytest.raises(RuntimeError) as info:
        detector.score_samples(X)
    assert info.value is other


def test_embedder_out_of_memory_names_batch_size(monkeypatch):
    from skpatch import PatchEmbedder

    def forward_oom(self, features):
        raise torch.OutOfMemoryError(CUDA_OOM)

    monkeypatch.setattr(PatchEmbedder, "_aligned", forward_oom)
    with pytest.raises(torch.OutOfMemoryError, match="(?s)CUDA out of memory.*batch_size"):
        tiny_embedder().transform(textures(2))
