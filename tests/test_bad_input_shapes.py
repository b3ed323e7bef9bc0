"""Bad input, shapes and types: the right result or a ValueError / TypeError that names the fix.

Cases already covered elsewhere (not repeated here): 5-channel, channels-first,
single image, ``(n, d)`` given to the embedder, float > 1, NaN, uint16 and empty
input (tests/test_embedder.py::test_bad_images_are_named); channel count and
grid of the embeddings (tests/test_fit_predict_mismatch.py).
"""

import numpy as np
import pytest
import torch
from PIL import Image

from _common import assert_same_embeddings
from _workflows import QUIET, detector_names, make_detector, tiny_embedder

pytestmark = QUIET

RNG = np.random.RandomState(0)
IMAGES = RNG.randint(0, 256, (3, 32, 32, 3), dtype=np.uint8)
X_TRAIN = RNG.normal(size=(20, 8, 4, 4)).astype(np.float32)


@pytest.fixture(scope="module")
def embedder():
    return tiny_embedder()


@pytest.fixture(scope="module")
def fitted():
    """One fitted detector per name, shared by the tests of this module."""
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = make_detector(name, map_size=None).fit(X_TRAIN)
        return cache[name]

    return get


# ---------------------------------------------------------------- images: the right thing
def test_rgba_drops_alpha_like_pil(embedder):
    rgba = np.concatenate([IMAGES, RNG.randint(0, 256, (3, 32, 32, 1), dtype=np.uint8)], -1)
    expected = embedder.transform(IMAGES)
    np.testing.assert_array_equal(embedder.transform(rgba), expected)
    assert_same_embeddings(embedder.transform(list(rgba)), expected)
    pil = [Image.fromarray(image, "RGBA") for image in rgba]
    assert_same_embeddings(embedder.transform(pil), expected)


def test_single_channel_last_axis_is_grayscale(embedder):
    gray = IMAGES[..., 0]
    np.testing.assert_array_equal(embedder.transform(gray[..., None]), embedder.transform(gray))


def test_float16_and_float64_images_match_uint8(embedder):
    expected = embedder.transform(IMAGES)
    np.testing.assert_allclose(embedder.transform(IMAGES / 255.0), expected, atol=1e-5)
    half = (IMAGES / 255.0).astype(np.float16)
    np.testing.assert_allclose(
        embedder.transform(half), embedder.transform(half.astype(np.float32)), atol=1e-6
    )


def test_a_tensor_of_images_that_requires_grad_is_read(embedder):
    images = torch.tensor(IMAGES / 255.0, dtype=torch.float32, requires_grad=True)
    np.testing.assert_allclose(embedder.transform(images), embedder.transform(IMAGES), atol=1e-5)


def test_a_bfloat16_tensor_of_images_is_read(embedder):
    images = torch.tensor(IMAGES / 255.0, dtype=torch.bfloat16)
    np.testing.assert_array_equal(embedder.transform(images), embedder.transform(images.float()))


def test_16_bit_files_are_scaled_not_clipped(embedder, tmp_path):
    # PIL's convert("RGB") clips 16-bit values at 255 (a nearly white image).
    gradient = (np.arange(32 * 32).reshape(32, 32) * 64).astype(np.uint16)
    path = tmp_path / "sixteen.png"
    Image.fromarray(gradient).save(path)
    expected = embedder.transform((gradient / 65535.0)[None])
    np.testing.assert_allclose(embedder.transform([str(path)]), expected, atol=1e-5)
    pil = [Image.fromarray(gradient)]
    np.testing.assert_allclose(embedder.transform(pil), expected, atol=1e-5)


def test_float_tiff_is_taken_as_is_and_checked(embedder, tmp_path):
    ramp = np.linspace(0, 1, 32 * 32, dtype=np.float32).reshape(32, 32)
    path = tmp_path / "float.tif"
    Image.fromarray(ramp).save(path)
    np.testing.assert_allclose(
        embedder.transform([str(path)]), embedder.transform(ramp[None]), atol=1e-6
    )
    Image.fromarray(ramp * 5).save(tmp_path / "bright.tif")
    with pytest.raises(ValueError, match=r"bright.tif.*\[0, 1\]"):
        embedder.transform([str(tmp_path / "bright.tif")])


def test_list_of_mixed_sizes_is_resized_or_refused(embedder):
    mixed = [IMAGES[0], IMAGES[1][:20]]
    # a crop makes every image the same size ...
    assert tiny_embedder(crop_size=32).transform(mixed).shape[0] == 2
    # ... without one, the aspect ratios differ and so would the grids
    with pytest.raises(ValueError, match="different sizes.*crop_size"):
        embedder.transform(mixed)


def test_mixed_sizes_are_refused_with_a_feature_cache(tmp_path):
    # Cached feature maps skip the image loader's size check: checked anew.
    mixed = [IMAGES[0], IMAGES[1][:20]]
    embedder = tiny_embedder(memory=str(tmp_path))
    embedder.fit_transform(mixed[:1])
    for X in (mixed, mixed[::-1]):
        with pytest.raises(ValueError, match="different sizes.*crop_size"):
            embedder.transform(X)


# ---------------------------------------------------------------- images: clear errors
@pytest.mark.parametrize(
    "X, error, match",
    [
        (IMAGES.astype(np.int64), ValueError, "int64.*uint8"),
        (IMAGES > 100, ValueError, "bool.*uint8"),
        (IMAGES.astype(np.complex64), ValueError, "complex64"),
        (IMAGES / 255.0 - 0.5, ValueError, r"\[0, 1\].*255"),
        (np.full((2, 8, 8), np.inf), ValueError, "infinite"),
        (np.zeros((2, 0, 8), np.uint8), ValueError, "empty images"),
        (np.zeros((1, 2, 8, 8, 3), np.uint8), ValueError, r"expected \(n, H, W\)"),
        (np.zeros((2, 1, 8, 8), np.uint8), ValueError, "channels-first"),
        (np.uint8(3), ValueError, r"expected \(n, H, W\)"),
        # a 1-D object array is a list: of two sizes, refused without a crop
        (np.array([IMAGES[0], IMAGES[1][:20]], dtype=object), ValueError, "different sizes"),
        ([IMAGES[0], None], TypeError, "NoneType is not an image"),
        ([np.zeros((0, 8), np.uint8)], ValueError, "empty"),
        ([np.zeros(10, np.uint8)], ValueError, r"neither \(H, W\)"),
        ([np.full((8, 8), 3.0)], ValueError, r"\[0, 1\]"),
        ([Image.fromarray(np.full((8, 8), 70000, np.int32))], ValueError, "16-bit"),
        (None, TypeError, "not an image batch"),
        ({"image": IMAGES}, TypeError, "not an image batch"),
        ((image for image in IMAGES), TypeError, "not an image batch"),
    ],
    ids=[
        "int64", "bool", "complex", "float-below-0", "inf", "zero-width", "5-d",
        "channels-first-gray", "scalar", "ragged-object-array", "None-item",
        "empty-item", "1-d-item", "float-item-out-of-range", "32-bit-beyond-16-bit",
        "None", "dict", "generator",
    ],
)
def test_bad_images_raise_a_named_error(embedder, X, error, match):
    with pytest.raises(error, match=match):
        embedder.transform(X)


# ---------------------------------------------------------------- embeddings
BAD_EMBEDDINGS = {
    "images-given-to-a-detector": (
        RNG.randint(0, 256, (4, 32, 32, 3), dtype=np.uint8),
        "looks like images.*PatchEmbedder",
    ),
    "3-d": (np.zeros((4, 8, 4), np.float32), "expected patch embeddings"),
    "5-d": (np.zeros((4, 8, 4, 4, 1), np.float32), "expected patch embeddings"),
    "1-d": (np.zeros(8, np.float32), "2D|2-dimensional"),
    "no-sample": (np.zeros((0, 8, 4, 4), np.float32), "0 sample"),
    "no-channel": (np.zeros((4, 0, 4, 4), np.float32), "at least one channel"),
    "empty-grid": (np.zeros((4, 8, 0, 4), np.float32), "non-empty grid"),
    "nan": (np.where(X_TRAIN[:4] > 2, np.nan, X_TRAIN[:4]), "NaN"),
    "inf": (np.where(X_TRAIN[:4] > 2, np.inf, X_TRAIN[:4]), "infinity"),
    "complex": (X_TRAIN[:4].astype(np.complex64), "Complex"),
    "strings": (np.full((4, 8, 4, 4), "a"), "string"),
}


@pytest.mark.parametrize("case", sorted(BAD_EMBEDDINGS))
@pytest.mark.parametrize("name", detector_names())
def test_bad_embeddings_in_fit(name, case):
    X, match = BAD_EMBEDDINGS[case]
    with pytest.raises(ValueError, match=match):
        make_detector(name, map_size=None).fit(X)


@pytest.mark.parametrize("case", sorted(BAD_EMBEDDINGS))
@pytest.mark.parametrize("name", detector_names())
def test_bad_embeddings_in_scoring(fitted, name, case):
    X, match = BAD_EMBEDDINGS[case]
    detector = fitted(name)
    for method in (detector.score_samples, detector.anomaly_map):
        with pytest.raises(ValueError, match=match):
            method(X)


@pytest.mark.parametrize("name", detector_names())
def test_nested_lists_and_float64_are_embeddings_too(fitted, name):
    detector = fitted(name)
    expected = detector.score_samples(X_TRAIN[:3])
    np.testing.assert_allclose(detector.score_samples(X_TRAIN[:3].tolist()), expected, rtol=1e-5)
    np.testing.assert_allclose(
        detector.score_samples(X_TRAIN[:3].astype(np.float64)), expected, rtol=1e-4
    )


@pytest.mark.parametrize("name", detector_names())
def test_overflowing_embeddings_never_score_nan(fitted, name):
    # float32 arithmetic overflows: a NaN score would be called normal by predict.
    detector = fitted(name)
    huge = X_TRAIN[:2] * np.float32(1e37)
    try:
        scores = detector.score_samples(huge)
    except ValueError as exc:
        assert "overflow" in str(exc)
    else:
        assert not np.isnan(scores).any()
        assert (detector.predict(huge) == -1).all()


@pytest.mark.parametrize(
    "params, match",
    [
        ({"image_size": (32,)}, r"image_size must be .* got \(32,\)"),
        ({"image_size": (0, 32)}, r"image_size must be .* got \(0, 32\)"),
        ({"image_size": ("a", "b")}, "image_size must be"),
        ({"crop_size": (0, 0)}, "crop_size must be"),
        ({"crop_size": (24, 24, 3)}, "crop_size must be"),
        ({"device": "gpu"}, "device='gpu' is not a torch device"),
        ({"device": "xpu"}, "device='xpu' was requested but this torch cannot use it"),
        ({"layers": ("stage1", "stage1")}, "names a stage twice"),
    ],
)
def test_bad_embedder_parameters_fail_at_fit_with_their_name(params, match):
    with pytest.raises(ValueError, match=match):
        tiny_embedder(**params).fit(IMAGES)


@pytest.mark.parametrize("name", detector_names())
@pytest.mark.parametrize(
    "params, match",
    [
        ({"map_size": (0, 4)}, r"map_size must be .* got \(0, 4\)"),
        ({"map_size": [4, 4, 4]}, "map_size must be"),
        ({"map_size": (4.5, 4)}, "map_size must be"),  # was truncated to 4
        ({"device": "gpu"}, "device='gpu' is not a torch device"),
    ],
)
def test_bad_detector_parameters_fail_at_fit_with_their_name(name, params, match):
    with pytest.raises(ValueError, match=match):
        make_detector(name, **params).fit(X_TRAIN)


@pytest.mark.parametrize(
    "X, batch_size, match",
    [
        (X_TRAIN[:0], 4, "got no training images"),
        ([], 4, "got no training images"),
        (X_TRAIN, 2.5, "batch_size must be an int >= 1, got 2.5"),
        (X_TRAIN, None, "batch_size must be an int >= 1, got None"),
        (X_TRAIN, 0, "batch_size must be an int >= 1, got 0"),
    ],
)
def test_fit_in_batches_names_its_own_bad_arguments(X, batch_size, match):
    from skpatch import fit_in_batches

    with pytest.raises(ValueError, match=f"fit_in_batches.*{match}"):
        fit_in_batches(make_detector("PaDiMDetector"), X, batch_size=batch_size)


@pytest.mark.parametrize("name", ["PaDiMDetector", "PatchCoreDetector"])
def test_fit_in_batches_that_fails_leaves_the_detector_unfitted(name):
    from sklearn.exceptions import NotFittedError

    from skpatch import fit_in_batches

    X = X_TRAIN[:12].copy()
    X[9] = np.nan  # the third batch of 4
    detector = make_detector(name).fit(X_TRAIN[:6])
    with pytest.raises(ValueError, match="NaN"):
        fit_in_batches(detector, X, batch_size=4)
    with pytest.raises(NotFittedError):
        detector.predict(X_TRAIN[:2])


@pytest.mark.parametrize("name", ["PaDiMDetector", "PatchCoreDetector"])
def test_fit_in_batches_of_one_image_fails_as_fit_does(name):
    from sklearn.exceptions import NotFittedError

    from skpatch import fit_in_batches

    with pytest.raises(ValueError, match="at least 2 samples") as fit_error:
        make_detector(name).fit(X_TRAIN[:1])
    detector = make_detector(name).fit(X_TRAIN[:6])
    with pytest.raises(ValueError, match="at least 2 samples") as error:
        fit_in_batches(detector, X_TRAIN[:1], batch_size=4)
    assert str(error.value) == str(fit_error.value)
    with pytest.raises(NotFittedError):  # not a stream of one image either
        detector.predict(X_TRAIN[:2])


def test_a_batch_of_another_grid_names_the_earlier_batches():
    from skpatch import fit_in_batches

    X = np.concatenate([X_TRAIN[:4], np.zeros((4, 8, 4, 4), np.float32)])
    ragged = [*X_TRAIN[:4], *np.zeros((4, 8, 3, 3), np.float32)]
    with pytest.raises(ValueError, match="earlier batches of partial_fit"):
        fit_in_batches(make_detector("PaDiMDetector"), ragged, batch_size=4)
    fit_in_batches(make_detector("PaDiMDetector"), X, batch_size=4)  # one grid: fine


@pytest.mark.parametrize(
    "make", ["make_rpadim_pipeline", "make_npad_pipeline", "make_patchcore_pipeline",
             "make_spade_pipeline", "make_pni_pipeline"],
)
def test_pipeline_helpers_refuse_an_unknown_backbone_when_built(make):
    import skpatch

    with pytest.raises(ValueError, match="unknown backbone 'resnet99'"):
        getattr(skpatch, make)("resnet99")
