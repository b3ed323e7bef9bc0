"""
=========================================================
Training on a contaminated set: RPaDiM vs PaDiM (ELPV)
=========================================================

A set of "good" images collected on a production line often holds a few
defective parts. PaDiM (:class:`~skpatch.PaDiMDetector`) fits its Gaussians
to them as if they were normal; RPaDiM (:class:`~skpatch.RobustPaDiMDetector`)
first drops the patches that are isolated among the training patches at
the same position (local outlier factor), then centers each Gaussian on the
geometric median of the patches it kept.

We build a training set of solar cells (ELPV, ``pip install elpv-dataset``)
in which 20 % of the images are defective with
:func:`~skpatch.datasets.make_contaminated_split`, the noisy-training
protocol of the RPaDiM paper, and compare both detectors with their clean
versions. Everything runs offline on a CPU in about a minute.
"""

# %%
# A contaminated training set
# ---------------------------
# 200 good cells, plus defective cells moved from the test set so that they
# make up 20 % of the training set (50 cells). The moved cells leave the
# test set; ``y_noisy`` tells which training cells are defective (the
# detectors never see it).
import shutil
import tempfile

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from PIL import Image

from skpatch import PaDiMDetector, PatchEmbedder, make_rpadim_pipeline
from skpatch.datasets import load_elpv_split, make_contaminated_split
from skpatch.metrics import image_auroc

X_train, X_test, y_test = load_elpv_split("mono", random_state=0)
rng = np.random.default_rng(0)
test = np.r_[rng.permutation(np.flatnonzero(y_test == 0))[:100],
             rng.permutation(np.flatnonzero(y_test == 1))[:150]]
X_clean, X_test, y_test = X_train[:200], X_test[test], y_test[test]
X_noisy, X_eval, y_noisy, y_eval = make_contaminated_split(
    X_clean, X_test, y_test, contamination=0.2, random_state=0
)
print(f"noisy training set: {(y_noisy == 0).sum()} good + {y_noisy.sum()} defective cells; "
      f"test set: {(y_eval == 0).sum()} good + {y_eval.sum()} defective cells")

# %%
# Embed once, fit four detectors
# ------------------------------
# Each detector has its recommended embedder: PaDiM the three default stages
# of EfficientNet-Lite0, RPaDiM the last two, each averaged over 3 x 3
# neighbourhoods (:func:`~skpatch.make_rpadim_pipeline` builds that
# pipeline; here we take its embedder and fit the detectors on the
# embeddings, so that each detector is fitted twice on one embedding).
# Both embedders share a feature cache (``memory``): RPaDiM's two stages are
# among PaDiM's three, so the network runs once per image, not twice. The
# cell fills the picture, so the images are resized to 224 x 224 without a
# crop.
cache = tempfile.mkdtemp()
embedding = {"image_size": 224, "crop_size": None, "memory": cache}
rpadim_pipe = make_rpadim_pipeline(embedder_params=embedding, n_features=100, random_state=0)
embedders = {
    "PaDiM": PatchEmbedder(**embedding),
    "RPaDiM": rpadim_pipe[0],
}
detectors = {
    "PaDiM": PaDiMDetector(n_features=100, random_state=0),
    "RPaDiM": rpadim_pipe[-1],
}
results, fitted = {}, {}
for name, embedder in embedders.items():
    E_noisy, E_eval = embedder.transform(X_noisy), embedder.transform(X_eval)
    E_clean = E_noisy[y_noisy == 0]
    for training, E in (("clean", E_clean), ("20 % defective", E_noisy)):
        detector = detectors[name].__class__(**detectors[name].get_params()).fit(E)
        results[name, training] = image_auroc(y_eval, -detector.score_samples(E_eval))
        fitted[name, training] = (detector, E_noisy, E_eval)
shutil.rmtree(cache)

print(f"{'image AUROC':<12}{'clean':>10}{'20 % defective':>17}")
for name in embedders:
    print(f"{name:<12}{results[name, 'clean']:>10.3f}{results[name, '20 % defective']:>17.3f}")

# %%
# What the denoising dropped
# --------------------------
# ``support_`` marks the training patches RPaDiM kept. On defective
# training cells the dropped patches (red) gather on the defects; on good
# cells they are scattered (``tau=0.85`` drops 15 % of all patches).
detector, E_noisy, E_eval = fitted["RPaDiM", "20 % defective"]
dropped = ~detector.support_.reshape(len(E_noisy), *detector.grid_shape_)
print(f"patches dropped: {dropped[y_noisy == 1].mean():.0%} of those of defective cells, "
      f"{dropped[y_noisy == 0].mean():.0%} of those of good cells")
shown = np.r_[np.flatnonzero(y_noisy == 1)[:4], np.flatnonzero(y_noisy == 0)[:2]]
fig, axes = plt.subplots(1, len(shown), figsize=(2.4 * len(shown), 2.8))
for ax, index in zip(axes, shown):
    image = np.asarray(Image.fromarray(X_noisy[index]).resize((224, 224)))
    mask = np.kron(dropped[index], np.ones((8, 8)))  # 28 x 28 grid -> 224 x 224
    ax.imshow(image, cmap="gray")
    ax.imshow(np.ma.masked_where(mask == 0, mask), cmap="autumn", alpha=0.5)
    ax.set_title("defective" if y_noisy[index] else "good", fontsize=9)
    ax.set_axis_off()
fig.suptitle("Training patches dropped by the LOF denoising (red)")
fig.tight_layout()

# %%
# Anomaly maps after training on the noisy set
# --------------------------------------------
# The most anomalous test cells according to RPaDiM, with both detectors'
# maps (each on its own color scale).
scores = detector.score_samples(E_eval)
chosen = np.argsort(scores)[:4]
padim, P_noisy, P_eval = fitted["PaDiM", "20 % defective"]
fig, axes = plt.subplots(2, len(chosen), figsize=(2.4 * len(chosen), 5.2))
for row, (name, det, E) in enumerate([("PaDiM", padim, P_eval), ("RPaDiM", detector, E_eval)]):
    maps = det.anomaly_map(E[chosen])
    for col, (index, heat) in enumerate(zip(chosen, maps)):
        image = np.asarray(Image.fromarray(X_eval[index]).resize((224, 224)))
        axes[row, col].imshow(image, cmap="gray")
        axes[row, col].imshow(heat, cmap="jet", alpha=0.45)
        axes[row, col].set_title(f"{name}, {'defective' if y_eval[index] else 'good'}", fontsize=9)
        axes[row, col].set_axis_off()
fig.tight_layout()
plt.show()
