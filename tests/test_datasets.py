"""Tests of skpatch.datasets: folder / MVTec loaders, ELPV, synthetic defects."""

import importlib.util
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from skpatch import datasets
from skpatch.datasets import (
    load_elpv,
    load_elpv_split,
    load_image_folder,
    load_mvtec,
    make_synthetic_defects,
)

KINDS = ("scratch", "blob", "cutpaste", "intensity")


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------
def _save(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def _rgb(seed, size=(16, 16)):
    return np.random.default_rng(seed).integers(0, 256, size=(*size, 3), dtype=np.uint8)


def _gray(seed, size=(16, 16)):
    return np.random.default_rng(seed).integers(0, 256, size=size, dtype=np.uint8)


def _mask(seed, size=(16, 16)):
    m = np.zeros(size, dtype=np.uint8)
    r = seed % 8
    m[r : r + 5, 3:9] = 255
    return m


@pytest.fixture
def mvtec_root(tmp_path):
    """Two categories: 'widget' (RGB, defect type 'crack') and 'plain' (grayscale)."""
    root = tmp_path / "mvtec"
    for i in range(3):
        _save(root / "widget/train/good" / f"{i:03d}.png", _rgb(i))
    for i in range(2):
        _save(root / "widget/test/good" / f"{i:03d}.png", _rgb(10 + i))
        _save(root / "widget/test/crack" / f"{i:03d}.png", _rgb(20 + i))
        _save(root / "widget/ground_truth/crack" / f"{i:03d}_mask.png", _mask(i))
    for i in range(2):
        _save(root / "plain/train/good" / f"{i:03d}.png", _gray(30 + i))
        _save(root / "plain/test/good" / f"{i:03d}.png", _gray(40 + i))
        _save(root / "plain/test/hole" / f"{i:03d}.png", _gray(50 + i))
        _save(root / "plain/ground_truth/hole" / f"{i:03d}_mask.png", _mask(i + 1))
    return root


# --------------------------------------------------------------------------
# load_mvtec
# --------------------------------------------------------------------------
def test_load_mvtec_shapes_labels_masks(mvtec_root):
    data = load_mvtec(mvtec_root, "widget")
    assert data.train_images.shape == (3, 16, 16, 3)
    assert data.train_images.dtype == np.uint8
    np.testing.assert_array_equal(data.train_images[1], _rgb(1))
    assert data.test_images.shape == (4, 16, 16, 3)
    # Defect types sorted: 'crack' before 'good'.
    np.testing.assert_array_equal(data.test_defect_types, ["crack", "crack", "good", "good"])
    np.testing.assert_array_equal(data.test_labels, [1, 1, 0, 0])
    assert data.test_labels.dtype.kind == "i"
    assert data.test_masks.shape == (4, 16, 16) and data.test_masks.dtype == bool
    np.testing.assert_array_equal(data.test_masks[0], _mask(0) > 0)
    np.testing.assert_array_equal(data.test_masks[1], _mask(1) > 0)
    assert not data.test_masks[2:].any()
    np.testing.assert_array_equal(data.test_images[0], _rgb(20))
    assert data.test_paths[0].endswith(os.path.join("crack", "000.png"))
    assert len(data.train_paths) == 3 and data.category == "widget"


def test_load_mvtec_grayscale_becomes_rgb(mvtec_root):
    data = load_mvtec(str(mvtec_root), "plain")
    assert data.train_images.shape == (2, 16, 16, 3)
    np.testing.assert_array_equal(data.train_images[0, ..., 0], _gray(30))
    np.testing.assert_array_equal(data.train_images[..., 0], data.train_images[..., 2])
    np.testing.assert_array_equal(data.test_labels, [0, 0, 1, 1])  # 'good' < 'hole'
    assert data.test_masks[2:].any(axis=(1, 2)).all()


def test_load_mvtec_image_size_resizes_images_and_masks(mvtec_root):
    data = load_mvtec(mvtec_root, "widget", image_size=8)
    assert data.train_images.shape == (3, 8, 8, 3)
    assert data.test_images.shape == (4, 8, 8, 3)
    assert data.test_masks.shape == (4, 8, 8) and data.test_masks.dtype == bool
    expected = np.asarray(
        Image.fromarray(_mask(0)).resize((8, 8), Image.Resampling.NEAREST)
    ) > 0
    np.testing.assert_array_equal(data.test_masks[0], expected)


def test_load_mvtec_mixed_sizes_need_image_size(mvtec_root):
    _save(mvtec_root / "widget/train/good/big.png", _rgb(99, size=(20, 24)))
    with pytest.raises(ValueError, match="image_size"):
        load_mvtec(mvtec_root, "widget")
    data = load_mvtec(mvtec_root, "widget", image_size=12)
    assert data.train_images.shape == (4, 12, 12, 3)


def test_load_mvtec_missing_folders(mvtec_root, tmp_path):
    with pytest.raises(FileNotFoundError, match="root folder not found"):
        load_mvtec(tmp_path / "nowhere", "widget")
    with pytest.raises(FileNotFoundError, match=r"unknown category 'bolt'.*plain.*widget"):
        load_mvtec(mvtec_root, "bolt")
    for p in (mvtec_root / "widget/train/good").iterdir():
        p.unlink()
    with pytest.raises(FileNotFoundError, match="no images found"):
        load_mvtec(mvtec_root, "widget")


def test_load_mvtec_image_without_mask(mvtec_root):
    (mvtec_root / "widget/ground_truth/crack/001_mask.png").unlink()
    with pytest.raises(FileNotFoundError, match="image without mask.*001.png"):
        load_mvtec(mvtec_root, "widget")


def test_load_mvtec_missing_ground_truth_folder(mvtec_root):
    for p in (mvtec_root / "plain/ground_truth/hole").iterdir():
        p.unlink()
    (mvtec_root / "plain/ground_truth/hole").rmdir()
    with pytest.raises(FileNotFoundError, match="no ground-truth folder.*'hole'"):
        load_mvtec(mvtec_root, "plain")


def test_load_mvtec_mask_without_image(mvtec_root):
    _save(mvtec_root / "widget/ground_truth/crack/007_mask.png", _mask(7))
    with pytest.raises(ValueError, match="mask without image.*007_mask.png"):
        load_mvtec(mvtec_root, "widget")


def test_load_mvtec_mask_size_mismatch(mvtec_root):
    _save(mvtec_root / "widget/ground_truth/crack/000_mask.png", _mask(0, size=(8, 8)))
    with pytest.raises(ValueError, match="mask .* is 8x8 but its image"):
        load_mvtec(mvtec_root, "widget")


@pytest.mark.parametrize("image_size", [0, -3, 2.5, True, "64"])
def test_load_mvtec_bad_image_size(mvtec_root, image_size):
    with pytest.raises(ValueError, match="image_size"):
        load_mvtec(mvtec_root, "widget", image_size=image_size)


# --------------------------------------------------------------------------
# load_image_folder
# --------------------------------------------------------------------------
@pytest.fixture
def folders(tmp_path):
    normal, anomalous, masks = tmp_path / "ok", tmp_path / "ko", tmp_path / "gt"
    _save(normal / "b.png", _rgb(1))
    _save(normal / "a.BMP", _rgb(0))
    _save(normal / "c.tif", _gray(2))
    (normal / "notes.txt").write_text("not an image")
    _save(normal / ".hidden.png", _rgb(5))
    _save(anomalous / "x.png", _rgb(3))
    _save(anomalous / "y.png", _rgb(4))
    _save(masks / "x_mask.png", _mask(0))
    _save(masks / "y_mask.bmp", _mask(1))
    return normal, anomalous, masks


def test_load_image_folder_normal_only(folders):
    normal, _, _ = folders
    data = load_image_folder(normal)
    assert data.images.shape == (3, 16, 16, 3) and data.images.dtype == np.uint8
    np.testing.assert_array_equal(data.labels, [0, 0, 0])
    assert data.masks is None
    assert [Path(p).name for p in data.paths] == ["a.BMP", "b.png", "c.tif"]
    np.testing.assert_array_equal(data.images[0], _rgb(0))
    np.testing.assert_array_equal(data.images[2, ..., 1], _gray(2))


def test_load_image_folder_with_masks(folders):
    normal, anomalous, masks = folders
    data = load_image_folder(normal, anomalous, masks)
    np.testing.assert_array_equal(data.labels, [0, 0, 0, 1, 1])
    assert data.masks.shape == (5, 16, 16) and data.masks.dtype == bool
    assert not data.masks[:3].any()
    np.testing.assert_array_equal(data.masks[3], _mask(0) > 0)
    np.testing.assert_array_equal(data.masks[4], _mask(1) > 0)
    data = load_image_folder(normal, anomalous, image_size=8)
    assert data.images.shape == (5, 8, 8, 3) and data.masks is None


def test_load_image_folder_mask_suffix(folders, tmp_path):
    normal, anomalous, _ = folders
    gt = tmp_path / "gt2"
    _save(gt / "x.png", _mask(0))
    _save(gt / "y.png", _mask(1))
    data = load_image_folder(normal, anomalous, gt, mask_suffix="")
    np.testing.assert_array_equal(data.masks[3], _mask(0) > 0)


def test_load_image_folder_errors(folders, tmp_path):
    normal, anomalous, masks = folders
    with pytest.raises(ValueError, match="mask_dir was given without anomalous_dir"):
        load_image_folder(normal, mask_dir=masks)
    with pytest.raises(FileNotFoundError, match="anomalous folder not found"):
        load_image_folder(normal, tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no images found"):
        load_image_folder(tmp_path / "empty")
    _save(anomalous / "z.png", _rgb(6))
    with pytest.raises(FileNotFoundError, match="image without mask.*z.png"):
        load_image_folder(normal, anomalous, masks)
    (anomalous / "z.png").unlink()
    _save(masks / "w_mask.png", _mask(2))
    with pytest.raises(ValueError, match="mask without image.*w_mask.png"):
        load_image_folder(normal, anomalous, masks)
    (masks / "w_mask.png").unlink()
    _save(masks / "x_mask.jpg", _mask(0))
    with pytest.raises(ValueError, match="two masks for the image"):
        load_image_folder(normal, anomalous, masks)
    _save(normal / "d.png", _rgb(7, size=(16, 20)))
    with pytest.raises(ValueError, match="image_size"):
        load_image_folder(normal)


# --------------------------------------------------------------------------
# ELPV
# --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def elpv_raw():
    pytest.importorskip("elpv_dataset")
    return datasets._load_elpv_raw()


@pytest.fixture
def cached_elpv(elpv_raw, monkeypatch):
    """Serve the module's ELPV arrays to the loaders (read the files once)."""
    monkeypatch.setattr(datasets, "_load_elpv_raw", lambda: elpv_raw)
    return elpv_raw


def _bench_data_module():
    candidates = [os.environ.get("SKPATCH_BENCH_DATA", "")]
    candidates.append(Path(__file__).resolve().parents[2] / "shared" / "bench" / "data.py")
    for path in candidates:
        if path and Path(path).is_file():
            spec = importlib.util.spec_from_file_location("_skpatch_bench_data", path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            return module
    pytest.skip("benchmark data.py (shared/bench/data.py) not found")


def test_load_elpv(elpv_raw, cached_elpv):
    images, probs, types = elpv_raw
    assert images.shape == (2624, 300, 300) and images.dtype == np.uint8
    data = load_elpv()
    assert data.images.shape == (2624, 300, 300) and data.images.dtype == np.uint8
    assert data.defect_probability.shape == (2624,)
    assert set(np.unique(data.cell_type)) == {"mono", "poly"}
    np.testing.assert_allclose(np.unique(data.defect_probability), [0, 1 / 3, 2 / 3, 1])
    assert "CC BY-NC-SA 4.0" in data.DESCR and "10.4229" in data.DESCR
    mono = load_elpv("mono")
    assert mono.images.shape == (1074, 300, 300)
    assert (mono.cell_type == "mono").all()
    assert load_elpv("poly").images.shape[0] == 1550


def test_load_elpv_split_mono(cached_elpv):
    X_train, X_test, y_test = load_elpv_split("mono")
    assert X_train.shape == (411, 300, 300) and X_train.dtype == np.uint8
    assert X_test.shape == (490, 300, 300) and X_test.dtype == np.uint8
    assert y_test.dtype.kind == "i"
    assert (y_test == 0).sum() == 177 and (y_test == 1).sum() == 313
    assert (np.diff(y_test) >= 0).all()  # normal first, then anomalous
    X_train2, _, _ = load_elpv_split("mono", random_state=1)
    assert X_train2.shape == X_train.shape and not np.array_equal(X_train2, X_train)
    X_small, X_test_small, _ = load_elpv_split("mono", train_size=0.5)
    assert X_small.shape[0] == 294 and X_test_small.shape[0] == 294 + 313


def test_elpv_split_names_an_empty_training_set():
    probs, types = np.zeros(12), np.array(["mono"] * 10 + ["poly"] * 2)
    with pytest.raises(ValueError, match="train_size=0.05 leaves none of the 10 .* mono"):
        datasets._elpv_split_indices(probs, types, "mono", train_size=0.05)
    train, test, _ = datasets._elpv_split_indices(probs, types, "mono", train_size=0.99)
    assert len(train) == 9 and len(test) == 1


@pytest.mark.parametrize("cell_type", ["mono", "poly", "all"])
def test_load_elpv_split_matches_benchmark(cell_type, cached_elpv):
    bench = _bench_data_module()
    images, probs, types = cached_elpv
    expected = bench._elpv_split_indices(probs, types, cell_type)
    got = datasets._elpv_split_indices(probs, types, cell_type)
    for e, g in zip(expected, got):
        np.testing.assert_array_equal(e, g)
    if cell_type != "mono":  # the images themselves: once is enough
        return
    X_train, X_test, y_test = load_elpv_split(cell_type)
    train, test_normal, test_anomalous = expected
    assert np.array_equal(X_train, images[train])
    assert np.array_equal(X_test, images[np.r_[test_normal, test_anomalous]])
    np.testing.assert_array_equal(y_test, [0] * len(test_normal) + [1] * len(test_anomalous))


def test_elpv_missing_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "elpv_dataset", None)
    monkeypatch.setitem(sys.modules, "elpv_dataset.utils", None)
    with pytest.raises(ImportError, match="pip install elpv-dataset"):
        load_elpv()
    with pytest.raises(ImportError, match=r"skpatch\[examples\]"):
        load_elpv_split()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"cell_type": "amorphous"}, "cell_type"),
        ({"train_size": 0.0}, "train_size"),
        ({"train_size": 1.0}, "train_size"),
        ({"train_size": "0.7"}, "train_size"),
        ({"random_state": -1}, "random_state"),
        ({"random_state": 1.5}, "random_state"),
    ],
)
def test_load_elpv_split_bad_parameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        load_elpv_split(**kwargs)
    if "cell_type" in kwargs:
        with pytest.raises(ValueError, match=match):
            load_elpv(**kwargs)


# --------------------------------------------------------------------------
# make_synthetic_defects
# --------------------------------------------------------------------------
def _textured(shape, seed=0):
    """Smooth random 'surfaces' in [0.2, 0.8] (float64)."""
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal(shape)
    sigma = (0, 2, 2) + ((0,) if len(shape) == 4 else ())
    smooth = ndimage.gaussian_filter(noise, sigma)
    smooth = (smooth - smooth.min()) / (smooth.max() - smooth.min())
    return 0.2 + 0.6 * smooth


def _case(name):
    if name == "uint8 gray":
        return np.rint(_textured((3, 32, 32)) * 255).astype(np.uint8)
    if name == "uint8 rgb":
        return np.rint(_textured((3, 40, 48, 3)) * 255).astype(np.uint8)
    if name == "uint8 one channel":
        return np.rint(_textured((2, 32, 32, 1)) * 255).astype(np.uint8)
    if name == "float32 gray":
        return _textured((3, 32, 32)).astype(np.float32)
    if name == "float64 rgb":
        return _textured((2, 64, 64, 3))
    raise ValueError(name)


CASES = ["uint8 gray", "uint8 rgb", "uint8 one channel", "float32 gray", "float64 rgb"]


@pytest.mark.parametrize("case", CASES)
def test_synthetic_defects_contract(case):
    images = _case(case)
    before = images.copy()
    out, masks = make_synthetic_defects(images, n_defects=2, random_state=0)
    np.testing.assert_array_equal(images, before)  # input not mutated
    assert out.shape == images.shape and out.dtype == images.dtype
    assert masks.shape == images.shape[:3] and masks.dtype == bool
    assert masks.reshape(len(masks), -1).any(axis=1).all()
    # Outside the mask: exactly the input. Inside: a change of >= 5/255.
    np.testing.assert_array_equal(out[~masks], images[~masks])
    scale = 255.0 if images.dtype == np.uint8 else 1.0
    delta = np.abs(out.astype(np.float64) - images.astype(np.float64)) / scale
    if delta.ndim == 4:
        delta = delta.max(axis=-1)
    assert (delta[masks] >= 5 / 255 - 1e-6).all()
    if images.dtype != np.uint8:
        assert out.min() >= 0 and out.max() <= 1


def test_synthetic_defects_seed():
    images = _case("uint8 rgb")
    a = make_synthetic_defects(images, random_state=3, return_kinds=True)
    b = make_synthetic_defects(images, random_state=3, return_kinds=True)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert a[2] == b[2]
    c = make_synthetic_defects(images, random_state=4)
    assert not np.array_equal(a[1], c[1])
    rs = np.random.RandomState(3)
    d = make_synthetic_defects(images, random_state=rs)
    np.testing.assert_array_equal(a[0], d[0])


@pytest.mark.parametrize("kind", KINDS)
def test_synthetic_defects_each_kind(kind):
    images = _case("uint8 gray")
    out, masks, kinds = make_synthetic_defects(
        images, kinds=kind, n_defects=2, random_state=0, return_kinds=True
    )
    assert kinds == [[kind, kind]] * len(images)
    assert masks.reshape(len(masks), -1).any(axis=1).all()
    np.testing.assert_array_equal(out[~masks], images[~masks])
    # Defects cover a small part of the image, not all of it.
    assert masks.mean() < 0.5


def test_synthetic_defects_scratch_is_thin():
    images = _case("float64 rgb")
    _, masks = make_synthetic_defects(images, kinds=["scratch"], random_state=1)
    for m in masks:
        # An eroded mask of a 1-3 px wide line is (nearly) empty.
        assert ndimage.binary_erosion(m, iterations=2).sum() <= 0.1 * m.sum()


@pytest.mark.parametrize("size", [16, 300, 1024])
def test_synthetic_defects_image_sizes(size):
    images = np.rint(_textured((1, size, size), seed=size) * 255).astype(np.uint8)
    out, masks, kinds = make_synthetic_defects(
        images, n_defects=4, random_state=0, return_kinds=True
    )
    assert out.shape == images.shape and masks.any()
    assert len(kinds[0]) == 4 and set(kinds[0]) <= set(KINDS)
    assert masks.mean() < 0.5


def test_synthetic_defects_flat_images():
    # No texture to copy, no headroom on one side: still a visible defect.
    for value in (0.0, 0.5, 1.0):
        images = np.full((3, 24, 24), value)
        out, masks = make_synthetic_defects(images, random_state=0)
        assert masks.reshape(3, -1).any(axis=1).all()
        np.testing.assert_array_equal(out[~masks], images[~masks])


@pytest.mark.parametrize(
    "images, kwargs, match",
    [
        (np.zeros((2, 8, 8), np.uint8), {"kinds": ("scratch", "dent")}, "unknown.*'dent'"),
        (np.zeros((2, 8, 8), np.uint8), {"kinds": ()}, "at least one"),
        (np.zeros((2, 8, 8), np.uint8), {"n_defects": 0}, "n_defects"),
        (np.zeros((2, 8, 8), np.uint8), {"n_defects": 1.5}, "n_defects"),
        (np.zeros((8, 8), np.uint8), {}, r"images\[None\]"),
        (np.zeros((16, 16, 3), np.uint8), {}, r"single RGB image.*images\[None\]"),
        ([np.zeros((8, 8)), np.zeros((8, 9))], {}, "2 different shapes"),
        (np.zeros((2, 8, 8, 2), np.uint8), {}, "shape"),
        (np.zeros((2, 8, 8), np.int32), {}, "uint8 or float"),
        (np.full((2, 8, 8), 2.0), {}, r"\[0, 1\]"),
        (np.full((2, 8, 8), np.nan), {}, "finite"),
    ],
)
def test_synthetic_defects_bad_input(images, kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_synthetic_defects(images, **kwargs)
