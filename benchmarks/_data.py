"""The benchmark data sets, shared by the scripts of this folder.

* ``mono`` / ``poly``: the ELPV split of :func:`skpatch.datasets.load_elpv_split`
  (70 % of the defect-free cells train; the other defect-free cells and all
  cells of defect probability 1 test), the same split as
  ``../shared/bench``'s anomalib harness. Image labels only.
* ``synthetic``: a pixel-level set on ELPV mono normal cells resized to
  224 x 224. 300 normal cells train; 288 held-out normal cells are the test
  pool, 188 of them with one synthetic defect each
  (:func:`skpatch.datasets.make_synthetic_defects`, exact masks) and 100
  left normal.
"""

import numpy as np

SEED = 0
DATASETS = ("mono", "poly", "synthetic")
NAMES = {"mono": "ELPV mono", "poly": "ELPV poly", "synthetic": "synthetic"}


def _subsample(indices, n, seed):
    if n is None or n >= len(indices):
        return indices
    return np.sort(np.random.default_rng(seed).permutation(indices)[:n])


def load(dataset, limit=None):
    """``(X_train, X_test, y_test, masks_test or None)``, subsampled by ``limit``."""
    from skpatch.datasets import load_elpv_split, make_synthetic_defects

    if dataset in ("mono", "poly"):
        X_train, X_test, y_test = load_elpv_split(dataset, random_state=SEED)
        if limit:
            X_train = X_train[_subsample(np.arange(len(X_train)), limit, 1)]
            keep = np.r_[
                _subsample(np.flatnonzero(y_test == 0), limit // 2, 2),
                _subsample(np.flatnonzero(y_test == 1), limit, 3),
            ]
            X_test, y_test = X_test[keep], y_test[keep]
        return X_train, X_test, y_test, None
    if dataset != "synthetic":
        raise ValueError(f"unknown dataset {dataset!r}; choose from {DATASETS}")

    from PIL import Image

    X_train, X_test, y_test = load_elpv_split("mono", random_state=SEED)
    normal = np.concatenate([X_train, X_test[y_test == 0]])  # 588 cells, shuffled
    n_train, n_normal_test, n_defective = (limit, limit // 2, limit) if limit else (300, 100, 188)
    normal = normal[: n_train + n_normal_test + n_defective]
    normal = np.stack(
        [np.asarray(Image.fromarray(im).resize((224, 224), Image.BICUBIC)) for im in normal]
    )
    held = normal[n_train:]
    defective, masks = make_synthetic_defects(held[n_normal_test:], random_state=SEED)
    X_test = np.concatenate([held[:n_normal_test], defective])
    y_test = np.r_[np.zeros(n_normal_test, np.int64), np.ones(len(defective), np.int64)]
    masks = np.concatenate([np.zeros((n_normal_test, 224, 224), bool), masks])
    return normal[:n_train], X_test, y_test, masks


def subsample_test(X_test, y_test, masks, n):
    """At most ``n`` test images, half normal and half anomalous (seeded), in order."""
    if n is None or n >= len(X_test):
        return X_test, y_test, masks
    keep = np.r_[
        _subsample(np.flatnonzero(y_test == 0), n // 2, 4),
        _subsample(np.flatnonzero(y_test == 1), n - n // 2, 5),
    ]
    keep = np.sort(keep)
    return X_test[keep], y_test[keep], None if masks is None else masks[keep]
