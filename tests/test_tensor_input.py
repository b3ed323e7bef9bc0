"""Embeddings as torch tensors: PatchEmbedder(output="torch") into every detector.

On a GPU this keeps the embeddings on the device from the network through
the detector's scoring; the tests run on the CPU (CI has no GPU), where the
results must equal the NumPy path exactly.
"""

import pickle
import warnings

import numpy as np
import pytest
import torch

from skpatch import PaDiMDetector, anomaly_map, fit_in_batches
from skpatch._npad_kernels import _cluster_sums, kmeans
from skpatch.detectors._base import _DEVICE_COPIES

from _workflows import QUIET, detector_names, make_pipe, textures

pytestmark = QUIET

TRAIN, TEST = textures(10, seed=3), textures(4, seed=4)


def test_embedder_output_torch_is_the_same_embedding_as_a_tensor():
    numpy_pipe = make_pipe("PaDiMDetector")
    tensor_pipe = make_pipe("PaDiMDetector", embedder_params={"output": "torch"})
    expected = numpy_pipe[0].transform(TEST)
    embeddings = tensor_pipe[0].transform(TEST)
    assert torch.is_tensor(embeddings) and embeddings.dtype == torch.float32
    np.testing.assert_array_equal(embeddings.cpu().numpy(), expected)


@pytest.mark.parametrize("name", detector_names())
def test_every_detector_scores_tensors_as_arrays(name):
    numpy_pipe = make_pipe(name).fit(TRAIN)
    tensor_pipe = make_pipe(name, embedder_params={"output": "torch"}).fit(TRAIN)
    for method in ("score_samples", "decision_function", "predict"):
        np.testing.assert_array_equal(
            getattr(tensor_pipe, method)(TEST), getattr(numpy_pipe, method)(TEST)
        )
    scores = tensor_pipe.score_samples(TEST)
    assert isinstance(scores, np.ndarray)  # scikit-learn's convention: NumPy out
    np.testing.assert_array_equal(anomaly_map(tensor_pipe, TEST), anomaly_map(numpy_pipe, TEST))


def test_streamed_fit_takes_tensors():
    numpy_pipe = fit_in_batches(make_pipe("PaDiMDetector"), TRAIN, batch_size=4)
    tensor_pipe = make_pipe("PaDiMDetector", embedder_params={"output": "torch"})
    fit_in_batches(tensor_pipe, TRAIN, batch_size=4)
    np.testing.assert_array_equal(tensor_pipe[-1].mean_, numpy_pipe[-1].mean_)
    np.testing.assert_array_equal(tensor_pipe.score_samples(TEST), numpy_pipe.score_samples(TEST))


def test_bad_tensors_get_the_same_clear_errors():
    X = np.random.RandomState(0).normal(size=(12, 6, 4, 4)).astype(np.float32)
    detector = PaDiMDetector(random_state=0).fit(X)
    with pytest.raises(ValueError, match="3x4 grid of patches but .* 4x4 grid"):
        detector.score_samples(torch.from_numpy(X[:, :, :3]))
    with pytest.raises(ValueError, match="5 features, but PaDiMDetector is expecting 6"):
        detector.score_samples(torch.from_numpy(X[:, :5]))
    for bad, what in ((float("nan"), "NaN"), (float("inf"), "infinity")):
        read_only = np.full((1, 6, 4, 4), bad, np.float32)
        read_only.setflags(write=False)  # a memory map: checked without torch's warning
        arrays = (torch.full((1, 6, 4, 4), bad), np.full((1, 6, 4, 4), bad, np.float32), read_only)
        for array in arrays:
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                with pytest.raises(ValueError, match=f"Input X contains {what}"):
                    detector.score_samples(array)
    # finite values whose sum overflows are not mistaken for infinity
    big = torch.full((1, 6, 4, 4), 3e38)
    assert detector._validate_tensor(big, reset=False) is not None
    assert detector._validate_embeddings(big.numpy(), reset=False) is not None
    with pytest.raises(ValueError, match="dtype torch.int64: patch embeddings are floats"):
        detector.score_samples(torch.zeros((1, 6, 4, 4), dtype=torch.int64))
    with pytest.raises(ValueError, match=r"shape \(6, 4, 4\)"):
        detector.score_samples(torch.from_numpy(X[0]))
    # half precision is scored in float32
    np.testing.assert_allclose(
        detector.score_samples(torch.from_numpy(X[:2]).half()),
        detector.score_samples(X[:2].astype(np.float16).astype(np.float32)),
        rtol=1e-6,
    )


def test_fitted_statistics_are_copied_to_a_device_once():
    # "meta" stands in for a GPU: any device but the CPU keeps its copies.
    X = np.random.RandomState(0).normal(size=(12, 6, 4, 4)).astype(np.float32)
    detector = PaDiMDetector(random_state=0).fit(X)
    first = detector._fitted_tensor("precision_cholesky_", "meta")
    assert first.device.type == "meta" and first.shape == detector.precision_cholesky_.shape
    assert detector._fitted_tensor("precision_cholesky_", "meta") is first
    # On the CPU the tensor shares the array's memory: nothing is kept.
    cpu = detector._fitted_tensor("mean_", "cpu")
    assert np.shares_memory(cpu.numpy(), detector.mean_)
    assert ("mean_", "cpu") not in _DEVICE_COPIES[detector]
    # kept outside the estimator (not saved; scoring leaves it unchanged)
    state = pickle.dumps(detector)
    assert pickle.loads(state) not in _DEVICE_COPIES
    detector._fitted_tensor("mean_", "meta")
    assert pickle.dumps(detector) == state
    # a refit makes new copies
    detector.fit(X[::-1].copy() + 1)
    assert detector._fitted_tensor("precision_cholesky_", "meta") is not first


def test_kmeans_cluster_sums_are_index_add_in_a_fixed_order():
    generator = torch.Generator().manual_seed(0)
    points = torch.randn(500, 4, generator=generator) + 100
    labels = torch.randint(0, 7, (500,), generator=generator)
    labels[labels == 3] = 2  # an empty cluster
    sums, counts = _cluster_sums(points, labels, 7)
    np.testing.assert_array_equal(counts.numpy(), np.bincount(labels.numpy(), minlength=7))
    expected = torch.zeros(7, 4, dtype=torch.float64).index_add_(0, labels, points.double())
    np.testing.assert_allclose(sums.numpy(), expected.numpy(), rtol=1e-6)
    assert sums[3].abs().max() == 0
    a = kmeans(points, 5, torch.Generator().manual_seed(1))[0]
    b = kmeans(points, 5, torch.Generator().manual_seed(1))[0]
    np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_embedder_saved_before_output_existed_returns_numpy():
    embedder = make_pipe("PaDiMDetector")[0]
    state = embedder.__getstate__()
    del state["output"]  # a file written by skpatch before the parameter
    old = type(embedder).__new__(type(embedder))
    old.__setstate__(state)
    assert old.output == "numpy" and isinstance(old.transform(TEST[:1]), np.ndarray)
