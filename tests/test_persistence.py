"""Saving fitted pipelines: joblib round trips, CUDA -> CPU, no torch in the file, skops."""

import io
import pickle
import sys

import joblib
import numpy as np
import pytest
import torch

import skpatch
import skpatch._torch_utils
from skpatch import anomaly_map

from _workflows import QUIET, detector_class, detector_names, make_pipe, textures

pytestmark = QUIET


@pytest.fixture(scope="module")
def data():
    images = textures(18, seed=3)
    return images[:14], images[14:]


# Meta-estimators that wrap a pipeline, saved and loaded as the pipelines are.
_WRAPPERS = {
    "AnomalyMapRefiner": lambda: skpatch.AnomalyMapRefiner(
        make_pipe("PNIDetector"), n_epochs=1, random_state=0
    ),
    "ImageShiftDetector": lambda: skpatch.ImageShiftDetector(
        make_pipe("NPadDetector"), max_shift=1
    ),
}


def _devices(model):
    """The ``device`` parameters of a model and of the estimators it holds."""
    params = model.get_params()
    return {key: value for key, value in params.items() if key.split("__")[-1] == "device"}


def _fit(name, data, device="auto"):
    train, _ = data
    model = _WRAPPERS[name]() if name in _WRAPPERS else make_pipe(name)
    model.set_params(**{key: device for key in _devices(model)})
    return model.fit(train)


_FITTED = {}


def _fitted(name, data):
    """The CPU-fitted pipeline of a detector and its predictions (fitted once per module)."""
    if name not in _FITTED:
        pipe = _fit(name, data, device="cpu")
        _FITTED[name] = pipe, _predictions(pipe, data[1])
    return _FITTED[name]


def _predictions(pipe, test):
    return {
        "score_samples": pipe.score_samples(test),
        "decision_function": pipe.decision_function(test),
        "anomaly_map": anomaly_map(pipe, test),
    }


def _assert_same_predictions(expected, pipe, test):
    for key, value in _predictions(pipe, test).items():
        np.testing.assert_array_equal(value, expected[key], err_msg=key)


class _ModuleRecorder(pickle.Unpickler):
    """Unpickler that records the module of every global (class, function) the file names."""

    def __init__(self, file):
        super().__init__(file)
        self.modules = set()

    def find_class(self, module, name):
        self.modules.add(module)
        return super().find_class(module, name)


def _pickled_modules(obj):
    recorder = _ModuleRecorder(io.BytesIO(pickle.dumps(obj)))
    recorder.load()
    return recorder.modules


@pytest.mark.parametrize("name", detector_names())
def test_joblib_round_trip_gives_identical_scores_and_maps(name, data, tmp_path):
    pipe, expected = _fitted(name, data)
    path = tmp_path / "pipe.joblib"
    joblib.dump(pipe, path, compress=name == "PaDiMDetector")  # compressed files too
    loaded = joblib.load(path)
    _assert_same_predictions(expected, loaded, data[1])
    np.testing.assert_array_equal(loaded.predict(data[1]), pipe.predict(data[1]))


@pytest.mark.parametrize("name", detector_names())
def test_saved_pipeline_holds_no_torch_object(name, data):
    pipe, _ = _fitted(name, data)
    modules = _pickled_modules(pipe)
    assert not {m for m in modules if m == "torch" or m.startswith("torch.")}, modules
    # the estimators' state is parameters and NumPy arrays
    for step in pipe:
        for key, value in vars(step).items():
            assert not isinstance(value, (torch.Tensor, torch.nn.Module)), (name, key)


def _simulate_cuda(monkeypatch):
    """Make skpatch believe CUDA is present while computing on the CPU.

    Every skpatch module's ``resolve_device`` (bound by name at import) is
    replaced by one that resolves the request as on a CUDA machine (the real
    function under ``torch.cuda.is_available() == True``), records the
    answer, and hands back the CPU. ``torch.cuda.is_available`` is patched
    only inside that call: torch itself (e.g. its optimizers) must keep
    seeing the real, CPU-only machine.
    """
    resolved = []
    original = skpatch._torch_utils.resolve_device

    def fake_resolve_device(device):
        with pytest.MonkeyPatch.context() as inner:
            inner.setattr(torch.cuda, "is_available", lambda: True)
            resolved.append(original(device))
        return torch.device("cpu")

    for module in list(sys.modules.values()):
        if getattr(module, "__name__", "").startswith("skpatch") and (
            getattr(module, "resolve_device", None) is original
        ):
            monkeypatch.setattr(module, "resolve_device", fake_resolve_device)
    return resolved


@pytest.mark.skipif(torch.cuda.is_available(), reason="simulates CUDA on a CPU-only machine")
@pytest.mark.parametrize("name", detector_names() + sorted(_WRAPPERS))
def test_pipeline_fitted_on_cuda_loads_and_predicts_on_cpu(name, data, tmp_path):
    _, expected = _fitted(name, data)
    with pytest.MonkeyPatch.context() as monkeypatch:
        resolved = _simulate_cuda(monkeypatch)
        pipe = _fit(name, data, device="cuda")
        # the fit asked for the GPU, and only for it
        assert resolved and {d.type for d in resolved} == {"cuda"}
        joblib.dump(pipe, tmp_path / "cuda.joblib")
    assert not torch.cuda.is_available()
    with pytest.warns(UserWarning, match="CUDA is not available"):
        loaded = joblib.load(tmp_path / "cuda.joblib")
    devices = _devices(loaded)
    assert devices and set(devices.values()) == {"cpu"}, devices
    _assert_same_predictions(expected, loaded, data[1])


def test_cpu_and_auto_devices_load_without_warning(data, recwarn):
    pipe, _ = _fitted("PaDiMDetector", data)
    pickle.loads(pickle.dumps(pipe))
    pickle.loads(pickle.dumps(pipe.set_params(patchembedder__device="auto")))
    pipe.set_params(patchembedder__device="cpu")
    assert not [w for w in recwarn if "CUDA" in str(w.message)]


# skops: the types a user must trust to load a skpatch pipeline (doc/modules/persistence.rst).
def _trusted_types(name):
    cls = detector_class(name)
    return sorted(["skpatch._embedder.PatchEmbedder", f"{cls.__module__}.{cls.__name__}"])


@pytest.mark.parametrize("name", detector_names())
def test_skops_round_trip_with_the_documented_trusted_types(name, data, tmp_path):
    sio = pytest.importorskip("skops.io")
    pipe, expected = _fitted(name, data)
    path = tmp_path / "pipe.skops"
    sio.dump(pipe, path)
    # everything else in the file (Pipeline, NumPy arrays, builtins) is trusted by default
    assert sorted(sio.get_untrusted_types(file=path)) == _trusted_types(name)
    with pytest.raises(Exception, match="[Uu]ntrusted"):
        sio.load(path)
    loaded = sio.load(path, trusted=_trusted_types(name))
    _assert_same_predictions(expected, loaded, data[1])


def test_skops_documented_list_matches_the_doc():
    # The page lists the module paths of the classes; a move of a class must update it.
    import pathlib

    page = pathlib.Path(__file__).parents[1] / "doc" / "modules" / "persistence.rst"
    text = page.read_text()
    for name in detector_names():
        for type_name in _trusted_types(name):
            assert type_name in text, f"{type_name} is not listed in {page.name}"


@pytest.mark.parametrize("Detector", [skpatch.PaDiMDetector, skpatch.PatchCoreDetector])
def test_a_one_image_stream_is_saved_and_goes_on(Detector):
    # One image makes no model yet: offset_ is absent (not an error), scoring
    # says why, and neither that nor saving loses the stream.
    X = np.random.RandomState(0).normal(size=(5, 8, 4, 4)).astype(np.float32)
    expected = Detector(map_size=None, random_state=0).partial_fit(X[:1]).partial_fit(X[1:])
    detector = Detector(map_size=None, random_state=0).partial_fit(X[:1])
    assert not hasattr(detector, "offset_")
    with pytest.raises(ValueError, match="at least 2 samples"):
        detector.score_samples(X)
    detector = pickle.loads(pickle.dumps(detector)).partial_fit(X[1:])
    np.testing.assert_array_equal(detector.score_samples(X), expected.score_samples(X))
    assert detector.offset_ == expected.offset_
