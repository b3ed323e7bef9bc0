"""
=====================================================
Comparing the six detectors on one data set
=====================================================

skpatch has six detectors: PaDiM, RPaDiM, N-pad, PatchCore, SPADE and PNI.
This example fits each with its recommended pipeline (the ``make_*_pipeline``
builders) on the same good solar cells (ELPV, ``pip install elpv-dataset``),
tests them on held-out cells with synthetic defects whose pixel masks are
exact (:func:`~skpatch.datasets.make_synthetic_defects`), and compares image
AUROC, pixel AUROC, AUPRO, fit time and predict time, the ROC curves, and
the maps each detector draws for the same cell.

The backbone runs once per image: the pipelines share an on-disk feature
cache (``PatchEmbedder(memory=...)``). It runs offline on a CPU with the
pretrained EfficientNet-Lite0 weights. With 40 training cells this is a
quick look, not a benchmark: see :ref:`benchmarks` for the full table.
"""

# %%
# Data: good cells for training, painted cells for testing
# --------------------------------------------------------
# 40 good monocrystalline cells train every detector. Held-out good cells
# make the test set: half stay as they are, half receive a synthetic scratch,
# stain, cut-and-paste patch or intensity change, with its pixel mask.
import shutil
import tempfile
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from sklearn.pipeline import make_pipeline

from skpatch import (
    PaDiMDetector,
    PatchEmbedder,
    anomaly_map,
    make_npad_pipeline,
    make_patchcore_pipeline,
    make_pni_pipeline,
    make_rpadim_pipeline,
    make_spade_pipeline,
)
from skpatch.datasets import load_elpv_split, make_synthetic_defects
from skpatch.metrics import aupro, image_auroc, pixel_auroc
from skpatch.plotting import AnomalyRocDisplay, plot_anomaly_map

X_train, X_test, y_test = load_elpv_split("mono", random_state=0)
X_train = X_train[:40]
good = X_test[y_test == 0]
n = min(15, len(good) // 2)
painted, painted_masks = make_synthetic_defects(good[n:2 * n], random_state=0)
X = np.concatenate([good[:n], painted])
masks = np.concatenate([np.zeros_like(painted_masks), painted_masks])
y = np.r_[np.zeros(n, int), np.ones(n, int)]
print(f"train: {len(X_train)} good cells; test: {n} good + {n} painted cells")

# %%
# Six pipelines, one feature cache
# --------------------------------
# Each builder makes the pipeline the detector's paper recommends, and they
# do not all embed the same way:
#
# * PaDiM, SPADE and N-pad concatenate the backbone's three default stages
#   (strides 4, 8 and 16): a 56 x 56 grid of 176-dimensional patches at
#   224 x 224 pixels.
# * RPaDiM, PatchCore and PNI take the last two of those stages, each
#   averaged over 3 x 3 neighbourhoods ("locally aware" features): a
#   28 x 28 grid of 152-dimensional patches.
#
# So the embeddings differ, but the network's feature maps do not: both
# settings use the same backbone, weights and image size, and differ only in
# which stages they keep and how they pool them. ``PatchEmbedder(memory=...)``
# caches the feature maps of every stage per image, keyed by the image's
# content, so we pass one cache folder to all six pipelines: the network runs
# once per image, and the pooling and concatenation are redone per pipeline
# from the cache.
#
# N-pad runs *without* image shifting (``max_shift=0``). Shifting (its
# module D) scores each test image at every shift of up to 2 pixels, 25
# forward passes instead of one (predict 28 to 31 times slower per image in
# :ref:`benchmarks`). Its rows there are scored on 100 test images, easier
# than the full split, so they do not compare with the rows without
# shifting; :ref:`npad` compares both on the same images. Keep it when the
# parts are not aligned, and when predict time allows. Each map is upsampled
# to 300 x 300 (``map_size=300``), the size of the images and masks. PaDiM
# and RPaDiM keep 40 random channels (``n_features``; 100 is the usual
# choice), so that 40 training cells, fewer after RPaDiM's denoising, are
# enough to estimate each covariance. SPADE compares each test patch with
# every patch of its ``K`` nearest training images: its maps cost
# ``O(K P² C)`` per image (``P`` positions, ``C`` channels), so we take
# ``K = 5`` (the paper's 50 costs ten times more: minutes here).
#
# Two more cuts keep the example short, at some cost in accuracy: N-pad
# keeps 50 channels (``n_features``, default 100; its fit grows with the
# square of it), and PNI trains its MLP for one epoch on 10,000 patches
# (``n_epochs=1, max_train_patches=10_000``; defaults 5 and 50,000). The
# numbers below are therefore not those of :ref:`benchmarks`, which runs
# every detector with its defaults.
cache = tempfile.mkdtemp()
embedding = {"image_size": 224, "crop_size": None, "memory": cache}
pipelines = {
    "PaDiM": make_pipeline(
        PatchEmbedder(**embedding), PaDiMDetector(n_features=40, map_size=300, random_state=0)
    ),
    "RPaDiM": make_rpadim_pipeline(
        embedder_params=embedding, n_features=40, map_size=300, random_state=0
    ),
    "N-pad": make_npad_pipeline(
        max_shift=0, embedder_params=embedding, n_features=50, map_size=300, random_state=0
    ),
    "PatchCore": make_patchcore_pipeline(
        embedder_params=embedding, map_size=300, random_state=0
    ),
    "SPADE": make_spade_pipeline(embedder_params=embedding, n_neighbors=5, map_size=300),
    "PNI": make_pni_pipeline(
        embedder_params=embedding, n_epochs=1, max_train_patches=10_000, map_size=300,
        random_state=0,
    ),
}

# Fill the cache: one forward pass per image, training and test images.
start = time.perf_counter()
PatchEmbedder(**embedding).transform(np.concatenate([X_train, X]))
backbone_ms = 1000 * (time.perf_counter() - start) / (len(X_train) + len(X))
print(f"backbone: {backbone_ms:.0f} ms per image, once")

# %%
# Fit, score and map
# ------------------
# The times below exclude the network (the cache has every image): they
# are each detector's own cost, plus reading the cache and pooling. The
# image score is ``-score_samples``; the pixel metrics use the maps.
results, maps = {}, {}
for name, pipe in pipelines.items():
    start = time.perf_counter()
    pipe.fit(X_train)
    fit_s = time.perf_counter() - start
    start = time.perf_counter()
    scores = -pipe.score_samples(X)
    predict_ms = 1000 * (time.perf_counter() - start) / len(X)
    maps[name] = anomaly_map(pipe, X)
    results[name] = {
        "scores": scores,
        "image AUROC": image_auroc(y, scores),
        "pixel AUROC": pixel_auroc(masks, maps[name]),
        "AUPRO": aupro(masks, maps[name]),
        "fit s": fit_s,
        "predict ms": predict_ms,
    }
shutil.rmtree(cache)

columns = ["image AUROC", "pixel AUROC", "AUPRO", "fit s", "predict ms"]
print(f"{'':<10}" + "".join(f"{c:>13}" for c in columns))
for name, row in results.items():
    print(f"{name:<10}" + "".join(
        f"{row[c]:>13.3f}" if "AU" in c else f"{row[c]:>13.1f}" for c in columns
    ))

# %%
# How to read the table: with 15 painted cells, one image more or less
# ranked correctly moves image AUROC by up to 0.07, so differences of that
# size are noise, and 40 training cells favour the detectors that need few
# (the ranking can change with more; see :ref:`benchmarks`). SPADE ranks
# images by the distance of a global feature (the average of the deepest
# stage) to its nearest training images. A small painted defect barely
# moves that average, so its image AUROC says more about how the held-out
# cells differ overall than about the defects (it can fall below 0.5),
# while its maps, which compare patches, localize as well as any. The
# Gaussian detectors (PaDiM, RPaDiM) are the cheapest to fit and to run;
# N-pad (a clustering of the patches, and five fold fits for its
# threshold), PatchCore (a coreset) and PNI (a coreset and an MLP trained
# on the patches) pay at fit time. The times
# were measured on whatever machine built this page: compare them with each
# other, not with another machine's.

# %%
# ROC curves
# ----------
# Left, images ranked by their score; right, all pixels of all maps ranked
# by their value (dominated by the larger defects).
fig, axes = plt.subplots(1, 2, figsize=(11, 4.6))
for i, name in enumerate(pipelines):
    AnomalyRocDisplay.from_predictions(
        y, results[name]["scores"], name=name, ax=axes[0], chance_level=i == 0
    )
    AnomalyRocDisplay.from_maps(masks, maps[name], name=name, ax=axes[1], chance_level=i == 0)
axes[0].set_title("image ROC")
axes[1].set_title("pixel ROC")
fig.tight_layout()
plt.show()

# %%
# One cell, six maps
# ------------------
# The painted cell whose defect has the median size, with its ground truth
# outlined in white. Each map has its own color scale: the detectors' scores
# are in different units (Mahalanobis distances, nearest-neighbour
# distances, negative log-likelihoods).
painted_index = np.flatnonzero(y == 1)
areas = masks[painted_index].sum(axis=(1, 2))
index = painted_index[np.argsort(areas)[len(areas) // 2]]
fig, axes = plt.subplots(1, len(pipelines), figsize=(2.6 * len(pipelines), 3.0))
for ax, name in zip(axes, pipelines):
    plot_anomaly_map(X[index], maps[name][index], mask=masks[index], ax=ax)
    ax.set_title(f"{name}\nscore {results[name]['scores'][index]:.3g}", fontsize=9)
fig.tight_layout()
plt.show()
