"""
=====================================================
Localizing synthetic defects: heat maps and masks
=====================================================

Where is the defect? Besides one score per image, every skpatch detector
gives an *anomaly map*: one score per pixel. This example fits
:class:`~skpatch.PaDiMDetector` on good solar cells (ELPV,
``pip install elpv-dataset``), paints synthetic defects with exact pixel
masks on held-out good cells (:func:`~skpatch.datasets.make_synthetic_defects`),
and shows the maps with :mod:`skpatch.plotting`: overlays on the images,
thresholded masks, and the ROC and PRO curves that measure localization.

It runs offline on a CPU in about a minute, with the pretrained
EfficientNet-Lite0 backbone.
"""

# %%
# Good cells for training, painted ones for testing
# -------------------------------------------------
# 100 good monocrystalline cells train the model. 40 other good cells make
# the test set: 20 stay as they are, 20 receive a scratch, a stain, a
# cut-and-paste patch or an intensity change. The masks are exact: a pixel
# is in the mask when the painting changed it visibly.
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from sklearn.pipeline import make_pipeline

from skpatch import PaDiMDetector, PatchEmbedder, anomaly_map
from skpatch.datasets import load_elpv_split, make_synthetic_defects
from skpatch.metrics import aupro, image_auroc, pixel_auroc
from skpatch.plotting import AnomalyRocDisplay, ProCurveDisplay, plot_anomaly_grid

X_train, X_test, y_test = load_elpv_split("mono", random_state=0)
good = X_test[y_test == 0]
X_train = X_train[:100]
n = min(20, len(good) // 2)
painted, painted_masks = make_synthetic_defects(good[n:2 * n], random_state=0)
X = np.concatenate([good[:n], painted])
masks = np.concatenate([np.zeros_like(painted_masks), painted_masks])
y = np.r_[np.zeros(n, int), np.ones(n, int)]
print(f"train: {len(X_train)} good cells; test: {len(X)} cells of {X.shape[1:]} pixels, "
      f"{y.sum()} with a synthetic defect")

# %%
# Fit, then map every test image
# ------------------------------
# The cells fill the picture and the defects can touch the border, so the
# embedder resizes to 224 x 224 without cropping. ``map_size=300`` makes
# the detector upsample its maps to the size of the original images, so
# that maps, images and masks line up pixel for pixel.
pipe = make_pipeline(
    PatchEmbedder(image_size=224, crop_size=None),
    PaDiMDetector(n_features=50, map_size=300, random_state=0),
)
start = time.perf_counter()
pipe.fit(X_train)
print(f"fit: {time.perf_counter() - start:.1f} s")

start = time.perf_counter()
maps = anomaly_map(pipe, X)  # (40, 300, 300), higher = more anomalous
scores = maps.reshape(len(X), -1).max(axis=1)  # PaDiM's image score
print(f"maps: {time.perf_counter() - start:.1f} s")
np.testing.assert_allclose(scores[:2], -pipe.score_samples(X[:2]), rtol=1e-4)

print(f"image AUROC {image_auroc(y, scores):.3f}, pixel AUROC "
      f"{pixel_auroc(masks, maps):.3f}, AUPRO {aupro(masks, maps):.3f}")

# %%
# From a map to a mask
# --------------------
# A mask needs a pixel threshold. The model already has one: an image is
# called anomalous when its score, the maximum of its map, is above
# ``-offset_`` (set from the training images by ``contamination``). Using
# the same value for pixels makes the two decisions agree: an image is
# flagged exactly when its predicted mask is not empty.
threshold = -pipe[-1].offset_
predicted = maps > threshold
flagged = scores > threshold  # pipe.predict(X) == -1, without embedding X again
assert (predicted.any(axis=(1, 2)) == flagged).all()
print(f"threshold {threshold:.2f}: {flagged[y == 1].mean():.0%} of the painted cells and "
      f"{flagged[y == 0].mean():.0%} of the good cells flagged")

# %%
# Heat maps and masks
# -------------------
# :func:`~skpatch.plotting.plot_anomaly_grid` draws, for each image, the
# image, its ground truth, the map over the image (the black line is the
# threshold) and the predicted mask. All maps share one color scale, so a
# red patch means the same score in every row. Here: the four painted cells
# with the highest scores, the painted cell with the lowest, and the most
# suspicious good cell.
painted_order = np.flatnonzero(y == 1)[np.argsort(-scores[y == 1])]
good_order = np.flatnonzero(y == 0)[np.argsort(-scores[y == 0])]
rows = np.r_[painted_order[:4], painted_order[-1], good_order[0]]
titles = [f"{'painted' if y[i] else 'good'}, score {scores[i]:.1f}" for i in rows]
fig, axes = plot_anomaly_grid(
    X[rows], maps[rows], masks=masks[rows], threshold=threshold, titles=titles,
    vmin=np.percentile(maps, 1), vmax=np.percentile(maps, 99.9),
)
fig.suptitle("PaDiM on synthetic defects (ELPV cells)", y=1.0)
plt.show()

# %%
# Detection and localization curves
# ----------------------------------
# The image ROC curve ranks images by score. The pixel ROC curve ranks all
# pixels; it is dominated by large defects. The per-region overlap (PRO)
# curve gives each defect the same weight whatever its size, and is read
# at low false positive rates (up to 30 % of the normal pixels, as MVTec AD
# does): a thin scratch counts as much as a large stain.
fig, axes = plt.subplots(1, 3, figsize=(13, 4.2))
AnomalyRocDisplay.from_predictions(y, scores, name="images", ax=axes[0])
AnomalyRocDisplay.from_maps(masks, maps, name="pixels", ax=axes[1])
ProCurveDisplay.from_maps(masks, maps, name="regions", ax=axes[2])
axes[0].set_title("image ROC")
axes[1].set_title("pixel ROC")
axes[2].set_title("per-region overlap")
fig.tight_layout()
plt.show()
