"""
=============================
Saving and loading a model
=============================

A fitted skpatch pipeline is an ordinary scikit-learn estimator: save it
with :func:`joblib.dump`, load it with :func:`joblib.load` in another
process or on another machine, and it gives the same scores. This example
fits :class:`~skpatch.PaDiMDetector` on good solar cells (ELPV,
``pip install elpv-dataset``), saves it, loads it back, and checks that
the loaded model scores and maps exactly as the original.

It runs offline on a CPU in about half a minute.
"""

# %%
# Fit a model
# -----------
import os
import tempfile
import time

import joblib
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from sklearn.pipeline import make_pipeline

from skpatch import PaDiMDetector, PatchEmbedder, anomaly_map
from skpatch.datasets import load_elpv_split
from skpatch.plotting import plot_anomaly_map

X_train, X_test, y_test = load_elpv_split("mono", random_state=0)
X_new = np.concatenate([X_test[y_test == 0][:10], X_test[y_test == 1][:10]])

pipe = make_pipeline(
    PatchEmbedder(image_size=128, crop_size=None),
    PaDiMDetector(n_features=50, map_size=128, random_state=0),
)
pipe.fit(X_train[:100])
scores = pipe.score_samples(X_new)

# %%
# Save it
# -------
# The file holds the parameters of both steps and the detector's fitted
# statistics, NumPy arrays only. It holds no network: the embedder rebuilds
# EfficientNet-Lite0 from its weights package the first time it runs, so
# the file stays small and does not depend on torch's pickle format. A
# model fitted on a GPU loads on a machine without one (``device="auto"``
# picks the CPU there).
folder = tempfile.mkdtemp()
path = os.path.join(folder, "padim.joblib")
joblib.dump(pipe, path)
print(f"saved {os.path.getsize(path) / 2**20:.1f} MiB to {path}")
detector = pipe[-1]
for name in ("mean_", "precision_cholesky_", "scatter_"):
    array = getattr(detector, name)
    print(f"  {name:<20} {str(array.shape):<18} {array.nbytes / 2**20:6.1f} MiB")

# %%
# ``mean_`` and ``precision_cholesky_`` (one Gaussian per patch position:
# 32 x 32 positions at this image size) are what scoring needs. The file
# holds ``mean_`` and ``scatter_`` only: ``precision_cholesky_`` is computed
# again from ``scatter_`` on first use after loading, and ``scatter_`` lets
# :meth:`~skpatch.PaDiMDetector.partial_fit` continue with more images. The
# size grows with the number of positions times ``n_features`` squared: at
# 224 x 224 pixels (56 x 56 positions) and ``n_features=100``, about
# 127 MB.

# %%
# Load it and score
# -----------------
# In a new process this is all it takes; the scores are bitwise equal.
start = time.perf_counter()
loaded = joblib.load(path)
print(f"loaded in {1000 * (time.perf_counter() - start):.0f} ms")
np.testing.assert_array_equal(loaded.score_samples(X_new), scores)
print("the loaded model gives the same scores:", loaded.predict(X_new))

# %%
# The maps are equal too. The most anomalous of the new cells, as the
# loaded model sees it:
maps = anomaly_map(loaded, X_new)
worst = int(np.argmin(scores))
ax = plot_anomaly_map(
    np.asarray(X_new[worst]), maps[worst], threshold=-loaded[-1].offset_, colorbar=True
)
ax.set_title(f"loaded model: anomaly score {-scores[worst]:.1f}")
plt.show()

# %%
# Safer formats and the command line
# ----------------------------------
# :func:`joblib.load` runs pickle, which can execute code: load only files
# you trust. `skops <https://skops.readthedocs.io>`_ (``pip install skops``,
# or the ``skops`` extra: ``pip install -e '.[skops]'`` in the clone of
# skpatch) saves the same pipeline in a format that is inspected
# before anything is loaded (``skops.io.dump(pipe, "padim.skops")``, then
# ``skops.io.get_untrusted_types`` and ``skops.io.load``); the user guide
# page on model persistence covers it.
#
# The file written here is also what the command line reads and writes:
# ``skpatch fit --normal good/ --out padim.joblib`` saves the same kind of
# pipeline, and ``skpatch score --model padim.joblib new/ --csv scores.csv``
# scores a folder with it (see :ref:`command_line`).
