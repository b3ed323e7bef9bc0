"""Tiny data and pipelines for the scikit-learn workflow tests (tuning, persistence, scale-out).

Every detector registered in ``_common.FAST_PARAMS`` is covered: its class is
looked up in :mod:`skpatch` (or :mod:`skpatch.detectors`) by name.
"""

import numpy as np
import pytest
from sklearn.pipeline import make_pipeline

import skpatch
import skpatch.detectors
from skpatch import PatchEmbedder
from skpatch.datasets import make_synthetic_defects
from skpatch.metrics import make_targets

from _common import FAST_PARAMS

IMAGE_SIZE = 32

# Tiny embeddings (24 channels, 8 x 8 grid) leave Gaussians under-determined:
# the detectors say so, which is not what these tests are about.
QUIET = pytest.mark.filterwarnings("ignore:.*fewer training samples")


def detector_class(name):
    cls = getattr(skpatch, name, None) or getattr(skpatch.detectors, name, None)
    if cls is None:
        pytest.skip(f"{name} is in FAST_PARAMS but not exported by skpatch")
    return cls


def detector_names():
    return sorted(FAST_PARAMS)


def make_detector(name, **params):
    cls = detector_class(name)
    detector = cls(**{**FAST_PARAMS[name], **params})
    if "map_size" in detector.get_params() and "map_size" not in params:
        detector.set_params(map_size=IMAGE_SIZE)
    return detector


def tiny_embedder(**params):
    defaults = dict(weights=None, image_size=IMAGE_SIZE, crop_size=None, layers=("stage1",))
    return PatchEmbedder(**{**defaults, **params})


def make_pipe(name, *, embedder_params=None, memory=None, **detector_params):
    return make_pipeline(
        tiny_embedder(**(embedder_params or {})),
        make_detector(name, **detector_params),
        memory=memory,
    )


def textures(n, seed=0):
    """``n`` smooth textured grayscale images with noise (uint8, 32 x 32)."""
    rng = np.random.RandomState(seed)
    yy, xx = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE]
    base = 127 + 60 * np.sin(xx / 3.0) * np.cos(yy / 4.0)
    noise = rng.normal(0, 8, size=(n, IMAGE_SIZE, IMAGE_SIZE))
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def anomaly_dataset(n_normal=16, n_anomalous=6, seed=0):
    """Images, ``y = make_targets(labels, masks)``, labels: normal first, then defects."""
    normal = textures(n_normal + n_anomalous, seed)
    defects, masks = make_synthetic_defects(
        normal[n_normal:], kinds=("blob", "scratch"), random_state=seed
    )
    images = np.concatenate([normal[:n_normal], defects])
    all_masks = np.concatenate([np.zeros((n_normal, IMAGE_SIZE, IMAGE_SIZE), bool), masks])
    labels = np.r_[np.zeros(n_normal, int), np.ones(n_anomalous, int)]
    return images, make_targets(labels, all_masks), labels
