import threading

import numpy as np
import pytest
import torch

from skpatch import _torch_utils
from skpatch._torch_utils import all_finite, as_tensor, is_view_on, map_on_cores, resolve_device


@pytest.fixture
def two_threads(torch_threads):
    torch_threads(2)


def test_map_on_cores_runs_items_on_single_threaded_workers(two_threads):
    seen = []

    def work(item):
        seen.append((threading.get_ident(), torch.get_num_threads()))
        return item * item

    assert map_on_cores(work, list(range(7)), "cpu") == [i * i for i in range(7)]  # in order
    assert {n for _, n in seen} == {1}  # torch single-threaded in the workers
    assert threading.get_ident() not in {ident for ident, _ in seen}
    assert torch.get_num_threads() == 2  # the caller's setting comes back
    # one item, or another device than the CPU: a plain loop in the caller's thread
    here = threading.get_ident()
    assert map_on_cores(lambda item: threading.get_ident(), [0], "cpu") == [here]
    assert map_on_cores(lambda item: threading.get_ident(), [0, 1], "meta") == [here, here]


@pytest.mark.parametrize("inference", [True, False])
def test_map_on_cores_keeps_the_callers_modes(two_threads, inference):
    with torch.inference_mode(inference):
        x = torch.zeros(4)  # an inference tensor in inference mode

        def work(index):
            x[index] += index + 1  # in place: allowed only in inference mode
            return torch.is_inference_mode_enabled(), torch.is_grad_enabled()

        modes = map_on_cores(work, [0, 1, 2, 3], "cpu")
    assert modes == [(inference, not inference)] * 4
    assert x.tolist() == [1, 2, 3, 4]


def test_map_on_cores_raises_what_an_item_raised(two_threads):
    def work(item):
        if item == 2:
            raise ValueError("item 2 failed")
        return item

    with pytest.raises(ValueError, match="item 2 failed"):
        map_on_cores(work, [0, 1, 2, 3], "cpu")
    assert torch.get_num_threads() == 2


def test_all_finite_checks_entries_not_the_sum():
    x = torch.ones(4, 3)
    assert all_finite(x)
    x[2, 1] = float("nan")
    assert not all_finite(x)
    x[2, 1] = -float("inf")
    assert not all_finite(x)
    # finite entries whose sum overflows float32
    assert all_finite(torch.full((4,), 3e38))


def test_empty_gives_large_cpu_tensors_numpy_memory(monkeypatch):
    allocated = []
    numpy_empty = np.empty

    def recording_empty(shape, dtype):
        allocated.append((tuple(shape), np.dtype(dtype)))
        return numpy_empty(shape, dtype)

    monkeypatch.setattr(_torch_utils.np, "empty", recording_empty)
    large = (2, _torch_utils._HUGE_PAGE_BYTES // 8)  # exactly the threshold in float32
    for dtype, numpy_dtype in ((torch.float32, np.float32), (torch.float64, np.float64)):
        allocated.clear()
        x = _torch_utils.empty(large, dtype, "cpu")
        assert allocated == [(large, np.dtype(numpy_dtype))]
        assert x.shape == large and x.dtype == dtype and x.is_contiguous()
        x.fill_(1.5)  # writable, and a tensor like any other
        assert float(x.sum()) == 1.5 * x.numel()
    allocated.clear()
    small = _torch_utils.empty((2, large[1] - 1), torch.float32, "cpu")
    half = _torch_utils.empty(large, torch.bfloat16, "cpu")  # not a NumPy dtype
    assert allocated == []
    assert small.dtype == torch.float32 and half.dtype == torch.bfloat16


def test_is_view_on_says_when_as_tensor_copies():
    array = np.zeros((3, 4), np.float32)
    read_only = array.copy()
    read_only.setflags(write=False)
    for a, view in ((array, True), (array[::2], True), (array[::-1], False), (read_only, False),
                    (torch.zeros(3), True)):
        assert is_view_on(a, "cpu") is view
        tensor = as_tensor(a, "cpu")
        shares = tensor.data_ptr() == (a.data_ptr() if torch.is_tensor(a)
                                       else a.__array_interface__["data"][0])
        assert shares is view


def test_canonical_device_names_the_current_gpu(monkeypatch):
    # "cuda" at fit and a tensor's "cuda:0" at scoring must key one kept copy
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert _torch_utils.canonical_device("cuda") == torch.device("cuda", 0)
    assert _torch_utils.canonical_device("cuda:1") == torch.device("cuda", 1)
    assert _torch_utils.canonical_device("cpu") == torch.device("cpu")


def test_on_device_keeps_one_copy_per_gpu_however_named(monkeypatch):
    from skpatch import PaDiMDetector

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    detector = PaDiMDetector(random_state=0).fit(np.random.RandomState(0).normal(size=(8, 3, 2, 2)))
    builds = []
    for device in ("cuda", "cuda:0", torch.device("cuda", 0)):
        detector._on_device("x", device, (detector.mean_,), lambda: builds.append(1) or len(builds))
    assert builds == [1]


def test_seeded_leaves_every_gpu_generator_alone(monkeypatch):
    # torch.manual_seed also seeds every GPU, which fork_rng(devices=[]) does not restore
    calls = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: calls.append(seed))
    monkeypatch.setattr(torch.cuda, "manual_seed", lambda seed: calls.append(seed))
    state = torch.random.get_rng_state()
    with _torch_utils.seeded(7):
        first = torch.rand(3)
    with _torch_utils.seeded(7):
        assert torch.equal(torch.rand(3), first)
    assert torch.equal(torch.random.get_rng_state(), state) and calls == []


def test_building_networks_and_fitting_pni_leave_gpu_generators_alone(monkeypatch):
    from skpatch import PatchEmbedder, make_pni_pipeline
    from skpatch._embedder import _cached_extractor

    calls = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: calls.append(seed))
    _cached_extractor.cache_clear()
    images = np.random.RandomState(0).randint(0, 256, (6, 32, 32), dtype=np.uint8)
    PatchEmbedder(weights=None, image_size=32, crop_size=None).transform(images)
    make_pni_pipeline(
        embedder_params={"weights": None, "image_size": 32, "crop_size": None},
        map_size=None, n_dist=8, n_epochs=1, random_state=0,
    ).fit(images)
    assert calls == []


def test_the_meta_device_is_refused_in_one_line():
    with pytest.raises(ValueError, match="device='meta' holds no data"):
        resolve_device("meta")
