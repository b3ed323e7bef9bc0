"""
=======================================================
Tuning a detector with GridSearchCV and cached features
=======================================================

A skpatch pipeline is a scikit-learn estimator, so
:class:`~sklearn.model_selection.GridSearchCV` tunes it. Three pieces make
that work for anomaly detection:

* :class:`~skpatch.model_selection.OneClassKFold` trains every split on
  normal images only and tests it on held-out normal images plus the
  anomalous ones;
* the scorers of :mod:`skpatch.metrics` measure detection (image AUROC) and
  localization (AUPRO), with the ground-truth masks packed into ``y`` by
  :func:`~skpatch.metrics.make_targets`;
* ``PatchEmbedder(memory=...)`` caches the network's feature maps per image,
  so that the search runs the network once per image instead of once per
  candidate, fold and image.

This example tunes :class:`~skpatch.RobustPaDiMDetector` (RPaDiM) over the
parameters its paper studies, ``tau`` (the share of training patches kept),
``n_neighbors`` (``K`` of the LOF denoising) and ``n_features`` (the size
of the embedding), on good solar cells (ELPV, ``pip install elpv-dataset``)
and cells with synthetic defects. It runs offline on a CPU with the
pretrained EfficientNet-Lite0 weights.
"""

# %%
# Data: normal cells and painted cells, with masks
# ------------------------------------------------
# 60 good monocrystalline cells and 16 held-out good cells that receive a
# synthetic defect. ``make_targets`` packs the labels (0 = normal, 1 =
# anomalous) and the masks into one structured ``y``: ``GridSearchCV``
# indexes it with each fold's indices like any array, so the masks of a
# test fold reach the scorer with its labels.
import os
import shutil
import tempfile
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from sklearn.base import clone
from sklearn.model_selection import GridSearchCV

from skpatch import make_rpadim_pipeline
from skpatch.datasets import load_elpv_split, make_synthetic_defects
from skpatch.metrics import make_anomaly_scorer, make_targets
from skpatch.model_selection import OneClassKFold

X_train, X_test, y_test = load_elpv_split("mono", random_state=0)
normal = X_train[:60]
painted, painted_masks = make_synthetic_defects(X_test[y_test == 0][:16], random_state=0)
X = np.concatenate([normal, painted])
labels = np.r_[np.zeros(len(normal), int), np.ones(len(painted), int)]
masks = np.concatenate([np.zeros((len(normal), *painted_masks.shape[1:]), bool), painted_masks])
y = make_targets(labels, masks)
print(f"{len(normal)} normal + {len(painted)} painted cells; y fields: {y.dtype.names}")

# %%
# The pipeline, the splitter and the scorer
# -----------------------------------------
# The embedder caches the feature maps in a temporary folder (``memory``).
# Maps are upsampled to 300 x 300, the size of the masks. With three folds,
# each split trains on 40 normal cells and tests on the other 20 plus the
# 16 painted ones. One scorer computes both metrics from a single pass over
# each test fold (``make_anomaly_scorer`` with a list of names).
cache = tempfile.mkdtemp()
pipe = make_rpadim_pipeline(
    embedder_params={"image_size": 224, "crop_size": None, "memory": cache},
    map_size=300,
    random_state=0,
)
cv = OneClassKFold(n_splits=3, shuffle=True, random_state=0)
scoring = make_anomaly_scorer(["image_auroc", "aupro"])


def cached_images():
    """Images whose feature maps are in the cache (one file per image and stage)."""
    files = [name for _, _, names in os.walk(cache) for name in names if name.endswith(".npy")]
    return len(files) // len(pipe[0].layers)


# %%
# Search over tau, K and the embedding size
# -----------------------------------------
# The grid has 8 candidates, 24 fits over the three splits. ``refit=False``:
# ``refit=True`` would refit the best candidate on all of ``X``, the painted
# cells included; we fit it on the normal cells ourselves below.
grid = {
    "robustpadimdetector__tau": [0.75, 0.9],
    "robustpadimdetector__n_neighbors": [1, 5],
    "robustpadimdetector__n_features": [16, 32],
}
search = GridSearchCV(pipe, grid, scoring=scoring, cv=cv, refit=False, error_score="raise")
start = time.perf_counter()
search.fit(X, y)
first_s = time.perf_counter() - start
n_fits = len(search.cv_results_["params"]) * cv.get_n_splits()
print(f"search 1: {n_fits} fits in {first_s:.1f} s; the network ran on "
      f"{cached_images()} images (all of X, once each)")

results = search.cv_results_
short = {"robustpadimdetector__tau": "tau", "robustpadimdetector__n_neighbors": "K",
         "robustpadimdetector__n_features": "n_features"}
print(f"{'tau':>5}{'K':>4}{'n_features':>12}{'image AUROC':>14}{'AUPRO':>14}")
for i in np.argsort(results["rank_test_aupro"]):
    params = results["params"][i]
    print(f"{params['robustpadimdetector__tau']:>5}{params['robustpadimdetector__n_neighbors']:>4}"
          f"{params['robustpadimdetector__n_features']:>12}"
          f"{results['mean_test_image_auroc'][i]:>8.3f} ± {results['std_test_image_auroc'][i]:.3f}"
          f"{results['mean_test_aupro'][i]:>8.3f} ± {results['std_test_aupro'][i]:.3f}")

best = results["params"][int(np.argmin(results["rank_test_aupro"]))]
print("best by AUPRO:", {short[k]: v for k, v in best.items()})

# %%
# The standard deviations are over the three splits. With 16 painted cells
# the differences between neighbouring candidates are often within them:
# a grid search on a small validation set picks a reasonable setting, not a
# certain best one.
#
# A second search, on a warm cache
# --------------------------------
# The cache holds the feature maps *before* pooling, so it serves any
# search on the same backbone, weights and image size, including a search
# over the embedder's own ``pool_size``. Here the best detector parameters
# are kept and the pooling is tuned: the network does not run again.
before = cached_images()
search_pool = GridSearchCV(
    clone(pipe).set_params(**best),
    {"patchembedder__pool_size": [1, 3]},
    scoring=scoring, cv=cv, refit=False, error_score="raise",
)
start = time.perf_counter()
search_pool.fit(X, y)
second_s = time.perf_counter() - start
print(f"search 2: {2 * cv.get_n_splits()} fits in {second_s:.1f} s; the network ran on "
      f"{cached_images() - before} new images")
for params, auroc, pro in zip(search_pool.cv_results_["params"],
                              search_pool.cv_results_["mean_test_image_auroc"],
                              search_pool.cv_results_["mean_test_aupro"]):
    print(f"pool_size={params['patchembedder__pool_size']}: image AUROC {auroc:.3f}, "
          f"AUPRO {pro:.3f}")

# %%
# Without the cache, every fit would embed its training fold and every
# score its test fold:
per_candidate = sum(len(train) + len(test) for train, test in cv.split(X, y))
n_candidates = len(results["params"])
print(f"without the cache the network would run on {n_candidates * per_candidate} images "
      f"in search 1 and {2 * per_candidate} in search 2, instead of {len(X)} and 0")

# %%
# The chosen model
# ----------------
# Fit the best candidate on the normal cells only, and look at how AUPRO
# varies over the grid.
model = clone(pipe).set_params(**best).fit(normal)
print(f"final model: RPaDiM with tau={model[-1].tau}, K={model[-1].n_neighbors}, "
      f"n_features={model[-1].n_features}, fitted on {len(normal)} normal cells")
shutil.rmtree(cache)

fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), sharey=True)
for ax, n_features in zip(axes, grid["robustpadimdetector__n_features"]):
    for k in grid["robustpadimdetector__n_neighbors"]:
        rows = [i for i, p in enumerate(results["params"])
                if p["robustpadimdetector__n_features"] == n_features
                and p["robustpadimdetector__n_neighbors"] == k]
        taus = [results["params"][i]["robustpadimdetector__tau"] for i in rows]
        ax.errorbar(taus, results["mean_test_aupro"][rows], yerr=results["std_test_aupro"][rows],
                    marker="o", capsize=3, label=f"K = {k}")
    ax.set(title=f"n_features = {n_features}", xlabel="tau (share of patches kept)")
    ax.legend()
axes[0].set_ylabel("AUPRO (mean ± std over 3 splits)")
fig.tight_layout()
plt.show()
