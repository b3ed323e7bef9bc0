"""PatchEmbedder against scikit-learn's data-free estimator checks.

The embedder takes images, not the 2-D arrays the other common checks feed
estimators, so only the checks that need no data run here; the detectors
pass ``parametrize_with_checks`` on 2-D input in their own test modules.
"""

import pickle

import joblib
import numpy as np
import pytest
from sklearn.base import clone
from sklearn.pipeline import make_pipeline
from sklearn.utils import estimator_checks

from skpatch import PaDiMDetector, PatchEmbedder

DATA_FREE_CHECKS = [
    "check_estimator_cloneable",
    "check_estimator_repr",
    "check_no_attributes_set_in_init",
    "check_get_params_invariance",
    "check_set_params",
    "check_do_not_raise_errors_in_init_or_set_params",
    "check_estimator_tags_renamed",
    "check_valid_tag_types",
]


def _instances():
    return [
        PatchEmbedder(),
        PatchEmbedder("resnet18", weights=None, layers=("layer2", "layer3"), pool_size=3,
                      image_size=(64, 48), crop_size=None, device="cpu", memory="/tmp/x"),
    ]


@pytest.mark.parametrize("check_name", DATA_FREE_CHECKS)
@pytest.mark.parametrize("embedder", _instances(), ids=["default", "custom"])
def test_data_free_checks(check_name, embedder):
    check = getattr(estimator_checks, check_name, None)
    if check is None:
        pytest.skip(f"{check_name} is not in this scikit-learn")
    check(type(embedder).__name__, embedder)


def test_parameters_default_constructible():
    estimator_checks.check_parameters_default_constructible("PatchEmbedder", PatchEmbedder())


def test_clone_get_set_params_and_repr():
    embedder = PatchEmbedder(weights=None, image_size=32, crop_size=None, memory="cache")
    cloned = clone(embedder)
    assert cloned is not embedder and cloned.get_params() == embedder.get_params()
    assert repr(embedder) == (
        "PatchEmbedder(crop_size=None, image_size=32, memory='cache', weights=None)"
    )
    assert cloned.set_params(pool_size=3, memory=None) is cloned
    assert embedder.pool_size == 1
    # nested parameters through a pipeline, as GridSearchCV sets them
    pipe = make_pipeline(embedder, PaDiMDetector())
    pipe.set_params(patchembedder__image_size=64, padimdetector__n_features=10)
    assert pipe.get_params()["patchembedder__image_size"] == 64
    # a fitted embedder clones to an unfitted one and pickles without a network
    fitted = PatchEmbedder(weights=None).fit()
    assert hasattr(fitted, "layers_") and not hasattr(clone(fitted), "layers_")
    assert b"torch" not in pickle.dumps(fitted)


def test_invalid_parameters_are_reported_at_fit_not_init():
    embedder = PatchEmbedder(pool_size=0)  # no error here
    with pytest.raises(ValueError, match="pool_size"):
        embedder.fit()
    with pytest.raises(ValueError, match="memory"):
        PatchEmbedder(memory=3).fit()


def test_memory_accepts_a_path_or_a_joblib_memory(tmp_path, images):
    plain = PatchEmbedder(weights=None, image_size=32, crop_size=None).transform(images[:3])
    for memory in (str(tmp_path / "a"), tmp_path / "b", joblib.Memory(tmp_path / "c", verbose=0),
                   joblib.Memory(None)):
        embedder = PatchEmbedder(weights=None, image_size=32, crop_size=None, memory=memory)
        np.testing.assert_allclose(embedder.transform(images[:3]), plain, atol=1e-5)
        np.testing.assert_allclose(embedder.transform(images[:3]), plain, atol=1e-5)
    assert (tmp_path / "c" / "skpatch_features").is_dir()


def test_memory_keys_on_content_and_setting(tmp_path, images):
    kwargs = dict(weights=None, image_size=32, crop_size=None, memory=tmp_path)
    first = PatchEmbedder(**kwargs).transform(images[:2])
    # another image with the same position in the batch is not served from the cache
    changed = images[:2].copy()
    changed[1, :4, :4] = 255
    again = PatchEmbedder(**kwargs).transform(changed)
    np.testing.assert_array_equal(again[0], first[0])
    assert not np.allclose(again[1], first[1])
    # another resize is another setting
    other = PatchEmbedder(**{**kwargs, "image_size": 40}).transform(images[:2])
    assert other.shape[-1] == 10
    # paths and PIL images are cached by content too
    from PIL import Image

    paths = []
    for i in range(2):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(images[i]).save(paths[-1])
    from_files = PatchEmbedder(**kwargs).transform(paths)
    np.testing.assert_allclose(from_files, PatchEmbedder(**kwargs).transform(paths), atol=0)
    np.testing.assert_allclose(from_files, first, atol=1e-5)
