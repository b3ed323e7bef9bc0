"""Fuzzing the public entry points: random shapes, dtypes and values.

Whatever the input, the only exceptions are the documented ones (ValueError,
TypeError; FileNotFoundError for files), never an IndexError, a
ZeroDivisionError or a crash inside torch, and a result is never NaN.
Few examples, no deadline: these run on every test run.
"""

import os
import warnings

import numpy as np
import pytest
from PIL import Image

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.extra import numpy as hnp  # noqa: E402

from skpatch.datasets import load_image_folder, make_synthetic_defects  # noqa: E402
from skpatch.metrics import image_auroc, pixel_auroc  # noqa: E402

from _workflows import detector_names, make_detector, tiny_embedder  # noqa: E402

DOCUMENTED = (ValueError, TypeError)
FUZZ = settings(
    max_examples=int(os.environ.get("SKPATCH_FUZZ_EXAMPLES", 15)),
    deadline=None,
    database=None,  # no .hypothesis folder in the source tree
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

DTYPES = st.sampled_from(
    [np.uint8, np.uint16, np.int32, np.int64, np.bool_, np.float16, np.float32, np.float64,
     np.complex64]
)


def _elements(dtype):
    if np.dtype(dtype).kind == "f":
        # mostly valid pixels, sometimes anything (negative, huge, NaN, inf)
        width = 8 * np.dtype(dtype).itemsize
        return st.one_of(
            st.floats(0, 1, width=width),
            st.floats(allow_nan=True, allow_infinity=True, width=width),
        )
    return None  # hypothesis' default for the dtype


@st.composite
def arrays(draw, min_dims=0, max_dims=5, max_side=6):
    dtype = draw(DTYPES)
    shape = draw(
        hnp.array_shapes(min_dims=min_dims, max_dims=max_dims, min_side=0, max_side=max_side)
    )
    return draw(hnp.arrays(dtype, shape, elements=_elements(dtype)))


@st.composite
def embeddings(draw):
    """Mostly well-formed embeddings (n, C, h, w) or (n, d), with any float values."""
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    shape = draw(
        st.one_of(
            st.tuples(st.integers(1, 6), st.integers(1, 4), st.integers(1, 3), st.integers(1, 3)),
            st.tuples(st.integers(1, 8), st.integers(1, 4)),
        )
    )
    width = 8 * np.dtype(dtype).itemsize
    values = st.one_of(
        st.floats(-3, 3, width=width),
        st.floats(allow_nan=False, allow_infinity=False, width=width),
        st.just(0.0),
    )
    return draw(hnp.arrays(dtype, shape, elements=values))


def _quietly(call, *args):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return call(*args)


@pytest.fixture(scope="module")
def embedder():
    return tiny_embedder(image_size=16)


@FUZZ
@given(X=arrays())
def test_embedder_on_any_array(embedder, X):
    try:
        out = embedder.transform(X)
    except DOCUMENTED:
        return
    assert out.dtype == np.float32 and out.shape[:2] == (len(X), 24)
    assert np.isfinite(out).all()


@FUZZ
@given(items=st.lists(arrays(min_dims=1, max_dims=3, max_side=8), min_size=1, max_size=3))
def test_embedder_on_any_list_of_images(embedder, items):
    try:
        out = embedder.transform(items)
    except DOCUMENTED:
        return
    assert out.shape[0] == len(items) and np.isfinite(out).all()


@pytest.mark.parametrize("name", detector_names())
@FUZZ
@given(X=st.one_of(arrays(min_dims=1, max_dims=5, max_side=5), embeddings()))
def test_detector_fit_and_score_on_any_array(name, X):
    detector = make_detector(name, map_size=None)
    try:
        _quietly(detector.fit, X)
    except DOCUMENTED:
        return
    try:
        scores = _quietly(detector.score_samples, X)
    except DOCUMENTED:
        return
    assert scores.shape == (len(X),) and not np.isnan(scores).any()
    assert not np.isnan(detector.offset_)


@pytest.fixture(scope="module")
def fitted():
    cache = {}
    X = np.random.RandomState(0).normal(size=(12, 3, 2, 2)).astype(np.float32)

    def get(name):
        if name not in cache:
            cache[name] = _quietly(make_detector(name, map_size=None).fit, X)
        return cache[name]

    return get


@pytest.mark.parametrize("name", detector_names())
@FUZZ
@given(X=st.one_of(arrays(min_dims=1, max_dims=5, max_side=4), embeddings()))
def test_fitted_detector_on_any_array(fitted, name, X):
    detector = fitted(name)
    for method in (detector.score_samples, detector.predict, detector.anomaly_map):
        try:
            out = _quietly(method, X)
        except DOCUMENTED:
            continue
        assert len(out) == len(X) and not np.isnan(out).any()


@FUZZ
@given(images=arrays(min_dims=2, max_dims=4, max_side=12), seed=st.integers(0, 3))
def test_synthetic_defects_on_any_array(images, seed):
    try:
        defects, masks = make_synthetic_defects(images, random_state=seed)
    except (*DOCUMENTED, RuntimeError) as exc:
        # RuntimeError: documented for images too flat to hold a visible defect
        assert not isinstance(exc, RuntimeError) or "visible" in str(exc)
        return
    assert defects.shape == images.shape and masks.shape[0] == len(images)


@FUZZ
@given(y=arrays(min_dims=0, max_dims=2), scores=arrays(min_dims=0, max_dims=2))
def test_image_auroc_on_any_arrays(y, scores):
    try:
        value = image_auroc(y, scores)
    except DOCUMENTED:
        return
    assert 0.0 <= value <= 1.0


@FUZZ
@given(masks=arrays(min_dims=1, max_dims=4), maps=arrays(min_dims=1, max_dims=4))
def test_pixel_auroc_on_any_arrays(masks, maps):
    try:
        value = pixel_auroc(masks, maps)
    except DOCUMENTED:
        return
    assert 0.0 <= value <= 1.0


@FUZZ
@given(payload=st.binary(max_size=200), suffix=st.sampled_from([".png", ".jpg", ".bmp", ".tif"]))
def test_folder_loader_on_random_bytes(tmp_path_factory, payload, suffix):
    folder = tmp_path_factory.mktemp("fuzz")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(folder / "good.png")
    (folder / f"random{suffix}").write_bytes(payload)
    try:
        data = load_image_folder(folder)
    except ValueError as exc:
        assert "random" in str(exc)  # the error names the file
        return
    assert data.images.shape[1:] == (8, 8, 3)
