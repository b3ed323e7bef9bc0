"""PaDiM vs RobustPaDiM (RPaDiM) on contaminated training sets, EfficientNet-Lite0.

The noisy-training protocol of RPaDiM §5.1 (and SoftPatch), built with
:func:`skpatch.datasets.make_contaminated_split`: anomalous test images are
moved into the training set so that they make up 0 %, 10 % or 20 % of it,
all normal training images are kept, and the moved images leave the test set.
The same seed is used for every level, so the images injected at 10 % are a
subset of those at 20 %, and *every level is evaluated on the test set of the
20 % level*: the rows of one data set differ only by their training sets.

Data sets:

* ``ELPV mono`` / ``ELPV poly``: the split of ``load_elpv_split`` (70 % of the
  defect-free cells train; the other defect-free cells and all cells of
  defect probability 1 test). Image AUROC only (ELPV has no masks).
* ``synthetic``: pixel-level set on ELPV mono normal cells resized to
  224 x 224. 300 normal cells train; 288 held-out normal cells are the test
  pool, 188 of them with one synthetic defect each
  (:func:`~skpatch.datasets.make_synthetic_defects`, all four kinds, exact
  masks) and 100 left normal. Image AUROC, pixel AUROC and AUPRO (FPR <= 0.3)
  of 224 x 224 maps.

Methods, each with its recommended embedder (``image_size=224,
crop_size=None``: the cell fills the picture):

* ``PaDiM``: the three default stages (strides 4, 8, 16; 176 channels, a
  56 x 56 grid), no pooling, ``n_features=100``.
* ``RPaDiM``: :func:`skpatch.make_rpadim_pipeline`, stages 2 + 4 (strides 8,
  16; 152 channels, a 28 x 28 grid), 3 x 3 pooling, paper defaults
  ``n_neighbors=1``, ``tau=0.85``, and ``n_features=100`` (the same
  dimension as PaDiM, so that the models differ by their features and
  statistics only; it is also cheaper than all 152 channels and scored as
  well on ELPV mono).
* ``PaDiM @ RPaDiM features`` (ablation): PaDiM's mean and sample covariance
  on RPaDiM's embeddings. RPaDiM minus this row is the effect of the LOF
  denoising and the geometric median; this row minus PaDiM is the effect of
  the locally aware features.

Every (data set, embedder) runs in a fresh process that embeds the images
once; ``fit s`` is the embedding of the training images (the measured
per-image rate times their number) plus the detector's ``fit``. ``flagged
good`` is the share of the normal test images that ``predict`` calls
anomalous (``contamination=0.1``, leave-one-out calibration)::

    python benchmarks/bench_rpadim.py            # full table (8 to 12 min on 2 cores)
    python benchmarks/bench_rpadim.py --quick    # subsampled smoke run (~3 min)
"""

import argparse
import multiprocessing as mp
import time

import numpy as np

LEVELS = (0.0, 0.1, 0.2)
SEED = 0


def _padim_pipeline():
    from sklearn.pipeline import make_pipeline

    from skpatch import PaDiMDetector, PatchEmbedder

    return make_pipeline(
        PatchEmbedder(image_size=224, crop_size=None),
        PaDiMDetector(n_features=100, random_state=SEED),
    )


def _rpadim_pipeline():
    from skpatch import make_rpadim_pipeline

    return make_rpadim_pipeline(
        embedder_params={"image_size": 224, "crop_size": None},
        n_features=100,
        random_state=SEED,
    )


def _subsample(indices, n, seed):
    if n is None or n >= len(indices):
        return indices
    return np.sort(np.random.default_rng(seed).permutation(indices)[:n])


def _load(dataset, limit):
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


def run(dataset, embedder_name, threads, limit):
    """Embed once, then fit and score every detector of this embedder at every level."""
    import torch
    from sklearn.base import clone

    from skpatch import PaDiMDetector
    from skpatch.datasets import make_contaminated_split
    from skpatch.metrics import aupro, image_auroc, pixel_auroc

    torch.set_num_threads(threads)
    X_train, X_test, y_test, masks = _load(dataset, limit)
    n_train = len(X_train)
    train_ids, test_ids = np.arange(n_train), n_train + np.arange(len(X_test))
    # The test set of the highest level, the same for every level.
    _, eval_ids, _, y_eval = make_contaminated_split(
        train_ids, test_ids, y_test, contamination=max(LEVELS), random_state=SEED
    )
    masks_eval = None if masks is None else masks[eval_ids - n_train]

    pipe = _padim_pipeline() if embedder_name == "padim" else _rpadim_pipeline()
    embedder = pipe[0]
    images = np.concatenate([X_train, X_test])
    embedder.transform(images[:2])  # build the network outside the timing
    start = time.perf_counter()
    E = embedder.transform(images)
    embed_per_image = (time.perf_counter() - start) / len(images)
    E_eval = E[eval_ids]

    if embedder_name == "padim":
        detectors = {"PaDiM": pipe[-1]}
    else:
        detectors = {
            "RPaDiM": pipe[-1],
            "PaDiM @ RPaDiM features": PaDiMDetector(n_features=100, random_state=SEED),
        }
    rows = []
    for name, template in detectors.items():
        for level in LEVELS:
            train, _, y_train, _ = make_contaminated_split(
                train_ids, test_ids, y_test, contamination=level, random_state=SEED
            )
            detector = clone(template)
            start = time.perf_counter()
            detector.fit(E[train])
            fit = time.perf_counter() - start
            row = {
                "data": {"mono": "ELPV mono", "poly": "ELPV poly"}.get(dataset, "synthetic"),
                "method": name,
                "level": level,
                "n_normal": int((y_train == 0).sum()),
                "n_anomalous": int(y_train.sum()),
                "n_test": f"{(y_eval == 0).sum()}+{(y_eval == 1).sum()}",
                "detector_s": fit,
                "fit_s": fit + embed_per_image * len(train),
            }
            if masks is None:
                normality = detector.score_samples(E_eval)
            else:
                maps = detector.anomaly_map(E_eval)
                normality = -maps.reshape(len(maps), -1).max(axis=1)
                row["pixel_auroc"] = pixel_auroc(masks_eval, maps)
                row["aupro"] = aupro(masks_eval, maps)
            row["image_auroc"] = image_auroc(y_eval, -normality)
            row["flagged_good"] = float((normality[y_eval == 0] < detector.offset_).mean())
            if hasattr(detector, "support_") and level > 0:
                kept = detector.support_
                row["dropped"] = (1 - kept[y_train == 1].mean(), 1 - kept[y_train == 0].mean())
            rows.append(row)
    return rows


def _in_fresh_process(function, *args):
    with mp.get_context("spawn").Pool(1) as pool:
        return pool.apply(function, args)


def _fmt(value, spec=".3f"):
    return "-" if value is None else format(value, spec)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=["mono", "poly", "synthetic"],
                        choices=["mono", "poly", "synthetic"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true",
                        help="subsample: 60 normal training images per data set")
    args = parser.parse_args(argv)
    limit = 60 if args.quick else None

    start = time.perf_counter()
    rows = []
    for dataset in args.datasets:
        for embedder_name in ("padim", "rpadim"):
            rows += _in_fresh_process(run, dataset, embedder_name, args.threads, limit)

    print(f"\nPaDiM vs RPaDiM, EfficientNet-Lite0, n_features=100, {args.threads} threads"
          f"{' (--quick)' if args.quick else ''}; contamination = share of anomalous "
          "training images; every level scored on the test set of the 20 % level\n")
    header = ("| data | method | contamination | train normal + anomalous "
              "| test normal + anomalous | image AUROC | Δ vs 0 % | pixel AUROC | AUPRO "
              "| fit s | flagged good | patches dropped (anomalous / normal images) |")
    print(header)
    print("|---" * (header.count("|") - 1) + "|")
    clean = {(r["data"], r["method"]): r["image_auroc"] for r in rows if r["level"] == 0}
    order = {"PaDiM": 0, "RPaDiM": 1, "PaDiM @ RPaDiM features": 2}
    for r in sorted(rows, key=lambda r: (args.datasets.index(
            {"ELPV mono": "mono", "ELPV poly": "poly"}.get(r["data"], "synthetic")),
            order[r["method"]], r["level"])):
        delta = r["image_auroc"] - clean[(r["data"], r["method"])]
        dropped = r.get("dropped")
        print(f"| {r['data']} | {r['method']} | {r['level']:.0%} | {r['n_normal']} + "
              f"{r['n_anomalous']} | {r['n_test']} | {r['image_auroc']:.3f} | {delta:+.3f} | "
              f"{_fmt(r.get('pixel_auroc'))} | {_fmt(r.get('aupro'))} | "
              f"{r['fit_s']:.1f} ({r['detector_s']:.1f}) | {r['flagged_good']:.0%} | "
              f"{'-' if dropped is None else f'{dropped[0]:.0%} / {dropped[1]:.0%}'} |")
    print("\nfit s: embedding of the training images + detector fit (in parentheses). "
          f"Total run time {time.perf_counter() - start:.0f} s.")


if __name__ == "__main__":
    main()
