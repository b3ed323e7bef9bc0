"""End-to-end runs on real data with the real (offline) EfficientNet-Lite0 weights."""

import numpy as np
import pytest
from sklearn.pipeline import make_pipeline

from skpatch import PaDiMDetector, PatchEmbedder, anomaly_map
from skpatch.datasets import load_elpv_split, make_synthetic_defects
from skpatch.metrics import aupro, image_auroc, pixel_auroc

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def elpv_mono():
    pytest.importorskip("elpv_dataset")
    return load_elpv_split("mono", random_state=0)


def _pipe(size=128):
    return make_pipeline(
        PatchEmbedder(image_size=size, crop_size=None),
        PaDiMDetector(n_features=100, map_size=size, random_state=0),
    )


def test_padim_detects_real_defects(elpv_mono):
    X_train, X_test, y_test = elpv_mono
    rng = np.random.default_rng(0)
    test = np.r_[rng.choice(np.flatnonzero(y_test == 0), 30, replace=False),
                 rng.choice(np.flatnonzero(y_test == 1), 30, replace=False)]
    pipe = _pipe().fit(X_train[:120])
    scores = pipe.score_samples(X_test[test])
    assert image_auroc(y_test[test], -scores) > 0.8


def test_padim_localizes_synthetic_defects(elpv_mono):
    X_train, X_test, y_test = elpv_mono
    normal_test = X_test[y_test == 0][:40]
    defective, masks = make_synthetic_defects(
        normal_test[20:], kinds=("scratch", "blob", "intensity"), random_state=0
    )
    images = np.concatenate([normal_test[:20], defective])
    masks = np.concatenate([np.zeros_like(masks), masks])
    labels = np.r_[np.zeros(20, int), np.ones(20, int)]
    pipe = _pipe().fit(X_train[:120])
    maps = anomaly_map(pipe, images)
    # masks are 300x300; compare at the map resolution (nearest resize of the masks)
    idx = (np.arange(128) * 300 / 128).astype(int)
    small = masks[:, idx][:, :, idx]
    # measured: image 0.95, pixel 0.97, AUPRO 0.88
    assert image_auroc(labels, maps.reshape(40, -1).max(1)) > 0.85
    assert pixel_auroc(small, maps) > 0.9
    assert aupro(small, maps) > 0.75
