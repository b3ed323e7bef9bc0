"""
=====================================================
Fitting on a folder larger than memory, in batches
=====================================================

A production line produces more images of good parts than fit in memory,
and their embeddings are far larger still: at 224 x 224 pixels,
EfficientNet-Lite0 gives 176 x 56 x 56 floats, 2.2 MB per image, so
10,000 images would need 22 GB before the detector even starts.

:class:`~skpatch.PaDiMDetector` keeps running sums instead (count, mean and
scatter per patch position), so :meth:`~skpatch.PaDiMDetector.partial_fit`
adds a batch of images at a time and the model is the same as with
``fit`` on all of them. :func:`skpatch.fit_in_batches` streams a list of
file paths through a pipeline that way: each batch of files is decoded,
embedded and added, then dropped. This example writes 192 good solar cells
(ELPV, ``pip install elpv-dataset``) to a folder of PNG files, fits on the
folder in batches and follows the memory as it goes.

It runs offline on a CPU in about a minute.
"""

# %%
# A folder of image files
# -----------------------
import os
import tempfile
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from PIL import Image
from sklearn.pipeline import make_pipeline

from skpatch import PaDiMDetector, PatchEmbedder, fit_in_batches
from skpatch.datasets import load_elpv

elpv = load_elpv("all")
good = elpv.images[elpv.defect_probability == 0][:192]
folder = tempfile.mkdtemp()
for i, image in enumerate(good):
    Image.fromarray(image).save(os.path.join(folder, f"cell_{i:04d}.png"))
paths = sorted(os.path.join(folder, name) for name in os.listdir(folder))
del elpv, good  # only the files remain
print(f"{len(paths)} PNG files in {folder}")

# %%
# Fit in batches, and watch the memory
# ------------------------------------
# A list of paths is read batch by batch, never all at once.
# ``fit_in_batches`` needs a detector with ``partial_fit``: PaDiM and
# PatchCore have one (PatchCore without ``denoising="lof"``); the
# detectors that must see every training image together (RPaDiM's LOF,
# for instance) do not. While it runs, a background thread samples
# the memory held by NumPy arrays and Python objects (:mod:`tracemalloc`):
# the decoded images and their embeddings, what would grow if the data
# were kept. (The model's statistics live in arrays of a fixed size, made
# by torch, which tracemalloc does not see.)
import threading
import tracemalloc

samples, done = [], threading.Event()


def sample(start):
    while not done.wait(0.1):
        samples.append((time.perf_counter() - start, tracemalloc.get_traced_memory()[0]))


pipe = make_pipeline(
    PatchEmbedder(image_size=128, crop_size=None),
    PaDiMDetector(n_features=50, map_size=128, random_state=0),
)
tracemalloc.start()
start = time.perf_counter()
sampler = threading.Thread(target=sample, args=(start,))
sampler.start()
fit_in_batches(pipe, paths, batch_size=32)
done.set()
sampler.join()
elapsed = time.perf_counter() - start
peak = tracemalloc.get_traced_memory()[1] / 2**20
tracemalloc.stop()
detector = pipe[-1]
print(f"fit_in_batches on {detector.n_samples_seen_} files: {elapsed:.1f} s; "
      f"at most {peak:.0f} MiB of arrays held at once")

# %%
# For comparison: what holding every embedding at once would cost, and the
# size of the model's statistics, which do not depend on the number of
# images.
embedding_mib = pipe[0].transform(paths[:1]).nbytes / 2**20
print(f"one image's embedding: {embedding_mib:.2f} MiB; all {len(paths)} at once: "
      f"{embedding_mib * len(paths):.0f} MiB")
print(f"model statistics: {(detector.mean_.nbytes + detector.scatter_.nbytes) / 2**20:.0f} MiB")

times, held = np.array(samples).T
fig, ax = plt.subplots(figsize=(6, 3.6))
ax.plot(times, held / 2**20, label="arrays held (sampled)")
ax.plot(times, embedding_mib * len(paths) * times / elapsed, "--", color="gray",
        label="if the embeddings were kept")
ax.set(xlabel="time (s)", ylabel="memory (MiB)", ylim=(0, None),
       title="Streaming fit: memory stays flat")
ax.legend(loc="lower right")
fig.tight_layout()
plt.show()

# %%
# The memory rises and falls with each batch (its images and embeddings)
# and does not grow from one batch to the next; ``batch_size`` sets its
# height. The gray line assumes the images arrive at a constant rate.
#
# The streamed model is the fitted model: the statistics are exact running
# sums (a batched update of the mean and scatter), so ``partial_fit`` over
# the batches gives the same Gaussians as ``fit`` on every image at once,
# up to float rounding. Only ``offset_`` can differ: it is the
# ``contamination`` quantile of the scores of a uniform sample of at most
# 32 of the images, scored by the final model once all batches are in,
# instead of the scores of every image (see
# :class:`~skpatch.PaDiMDetector`). The command line streams the same way
# when the embeddings of all images would take more than 2 GiB, or always
# with ``skpatch fit --normal FOLDER --out model.joblib --stream always``
# (see :ref:`command_line`).
