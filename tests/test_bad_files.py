"""Bad files: corrupt, truncated or non-image files, missing and mis-sized masks.

Every error names the file. ``load_image_folder(on_error="skip")`` leaves
unreadable files out with a warning that lists them. Covered elsewhere:
missing folders / masks and masks without image (tests/test_datasets.py),
masks and maps of different shapes in the metrics (tests/test_metrics.py).
"""

import io

import numpy as np
import pytest
from PIL import Image

from skpatch.datasets import load_image_folder, load_mvtec

from _workflows import tiny_embedder


def _save(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def _rgb(seed, size=(16, 16)):
    return np.random.default_rng(seed).integers(0, 256, size=(*size, 3), dtype=np.uint8)


def _mask(size=(16, 16)):
    mask = np.zeros(size, np.uint8)
    mask[4:9, 3:9] = 255
    return mask


def _truncated_png(path, array):
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])


BAD_FILES = {
    "garbage.png": lambda path: path.write_bytes(b"\x00\x01 not an image at all" * 10),
    "text.jpg": lambda path: path.write_text("just some notes\n"),
    "truncated.png": lambda path: _truncated_png(path, _rgb(9)),
    "empty.bmp": lambda path: path.write_bytes(b""),
}


@pytest.fixture
def folders(tmp_path):
    normal, anomalous, masks = tmp_path / "ok", tmp_path / "ko", tmp_path / "gt"
    for i in range(3):
        _save(normal / f"n{i}.png", _rgb(i))
    for i in range(2):
        _save(anomalous / f"a{i}.png", _rgb(10 + i))
        _save(masks / f"a{i}_mask.png", _mask())
    (normal / "README.txt").write_text("files without an image extension are ignored")
    return normal, anomalous, masks


@pytest.mark.parametrize("bad", sorted(BAD_FILES))
def test_unreadable_image_is_named_or_skipped(folders, bad):
    normal, anomalous, masks = folders
    BAD_FILES[bad](normal / bad)
    with pytest.raises(ValueError, match=f"could not read image file .*{bad}"):
        load_image_folder(normal, anomalous, masks)
    with pytest.warns(UserWarning, match=f"skipped 1 unreadable file.*{bad}"):
        data = load_image_folder(normal, anomalous, masks, on_error="skip")
    assert data.images.shape == (5, 16, 16, 3)
    assert not any(bad in path for path in data.paths)
    np.testing.assert_array_equal(data.labels, [0, 0, 0, 1, 1])
    np.testing.assert_array_equal(data.images[0], _rgb(0))


def test_skipped_anomalous_image_takes_its_mask_along(folders):
    normal, anomalous, masks = folders
    BAD_FILES["garbage.png"](anomalous / "a0.png")
    with pytest.warns(UserWarning, match="a0.png"):
        data = load_image_folder(normal, anomalous, masks, on_error="skip")
    np.testing.assert_array_equal(data.labels, [0, 0, 0, 1])
    assert data.masks.shape == (4, 16, 16) and data.masks[3].any()


def test_unreadable_mask_is_named_or_skipped_with_its_image(folders):
    normal, anomalous, masks = folders
    _truncated_png(masks / "a1_mask.png", _mask())
    with pytest.raises(ValueError, match="could not read image file .*a1_mask.png"):
        load_image_folder(normal, anomalous, masks)
    with pytest.warns(UserWarning, match="a1_mask.png"):
        data = load_image_folder(normal, anomalous, masks, on_error="skip")
    assert [p.rsplit("/", 1)[-1] for p in data.paths] == ["n0.png", "n1.png", "n2.png", "a0.png"]


def test_skip_does_not_hide_missing_masks_or_wrong_sizes(folders):
    normal, anomalous, masks = folders
    (masks / "a1_mask.png").unlink()
    with pytest.raises(FileNotFoundError, match="image without mask.*a1.png"):
        load_image_folder(normal, anomalous, masks, on_error="skip")
    _save(masks / "a1_mask.png", _mask(size=(8, 8)))
    wrong_size = "mask .*a1_mask.png is 8x8 but its image .*a1.png is 16x16"
    with pytest.raises(ValueError, match=wrong_size):
        load_image_folder(normal, anomalous, masks, on_error="skip")


def test_nothing_readable_and_bad_on_error(folders, tmp_path):
    only_bad = tmp_path / "bad"
    only_bad.mkdir()
    BAD_FILES["garbage.png"](only_bad / "x.png")
    with pytest.warns(UserWarning, match="x.png"):
        with pytest.raises(ValueError, match="no readable image"):
            load_image_folder(only_bad, on_error="skip")
    with pytest.raises(ValueError, match="on_error must be 'raise' or 'skip'"):
        load_image_folder(folders[0], on_error="ignore")


def test_mvtec_names_the_unreadable_file(tmp_path):
    root = tmp_path / "mvtec"
    for i in range(2):
        _save(root / "widget/train/good" / f"{i:03d}.png", _rgb(i))
        _save(root / "widget/test/good" / f"{i:03d}.png", _rgb(10 + i))
        _save(root / "widget/test/crack" / f"{i:03d}.png", _rgb(20 + i))
        _save(root / "widget/ground_truth/crack" / f"{i:03d}_mask.png", _mask())
    assert load_mvtec(root, "widget").test_masks.shape == (4, 16, 16)
    _truncated_png(root / "widget/ground_truth/crack/001_mask.png", _mask())
    with pytest.raises(ValueError, match="could not read image file .*crack/001_mask.png"):
        load_mvtec(root, "widget")
    BAD_FILES["text.jpg"](root / "widget/train/good/002.jpg")
    with pytest.raises(ValueError, match="could not read image file .*good/002.jpg"):
        load_mvtec(root, "widget")


def test_float_tiff_is_scaled_not_clipped(tmp_path):
    ramp = np.linspace(0, 1, 16 * 16, dtype=np.float32).reshape(16, 16)
    _save(tmp_path / "f" / "ramp.tif", ramp)
    image = load_image_folder(tmp_path / "f").images[0, ..., 0]
    np.testing.assert_array_equal(image, np.rint(ramp * 255).astype(np.uint8))
    _save(tmp_path / "g" / "bright.tif", ramp * 4)
    with pytest.raises(ValueError, match=r"bright.tif.*\[0, 1\]"):
        load_image_folder(tmp_path / "g")


@pytest.mark.parametrize("bad", sorted(BAD_FILES))
def test_embedder_names_the_unreadable_file(tmp_path, bad):
    good = tmp_path / "good.png"
    _save(good, _rgb(0, size=(32, 32)))
    BAD_FILES[bad](tmp_path / bad)
    with pytest.raises(ValueError, match=f"could not read image file .*{bad}"):
        tiny_embedder().transform([str(good), str(tmp_path / bad)])
