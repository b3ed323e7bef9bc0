"""N-pad ablation (Table 2 of the paper) and PaDiM, EfficientNet-Lite0.

Rows, all on the same embeddings (the three default stages of
EfficientNet-Lite0, strides 4/8/16, 176 channels on a 56 x 56 grid;
``image_size=224, crop_size=None``), computed once per data set:

* ``PaDiM``: ``PaDiMDetector(n_features=100)``.
* ``A``: weighted-similarity distributions, each patch scored by its own
  position (``distributions="weighted", q=1``).
* ``B``: aggregated-feature distributions only (``distributions="aggregated"``).
* ``A+B``: ``sqrt(D1 D2)`` with ``q=1``.
* ``A+C``: weighted distributions, minimum over the 3 x 3 neighbour
  distributions (``q=2``).
* ``A+B+C``: all of ``NPadDetector``'s defaults, no shifting.
* ``N-pad``: ``A+B+C`` inside :class:`~skpatch.ImageShiftDetector`
  (``max_shift=4``: 25 shifted copies of every test image through the CNN).

Every N-pad row uses ``n_features=100`` (least-nonzero selection, which on
EfficientNet-Lite0 is a seeded random subset: its stage outputs have no
zeros) and the top-k image score of eq. (12)-(14) with ``top_k=10``. The
image AUROC of the map maximum is reported for every row but the shifted
one on ELPV: the top-k score of rows A and A+C multiplies by distances to
the k-means centroids of the aggregated features, that is, by part of
module B, and the map maximum separates the distributions from the score.
``--sweep`` adds ``n_features`` in {50, 176} and ``top_k`` in {1, 100} for
``A+B+C``; ``--methods`` runs some rows only (``--methods A+B+C
--max-shift 4``: the shifted row alone).

Embeddings are cached in ``--cache-dir`` (default ``/tmp``, files
``npad_<data>_<size>_*.npy``, several GB for the full data) and reused by
later runs.

Data sets (as in ``bench_rpadim.py``): ELPV mono / poly (``load_elpv_split``;
image AUROC), and the synthetic-defect pixel set on ELPV mono cells (image
AUROC, pixel AUROC, AUPRO at FPR <= 0.3 of 224 x 224 maps).

Times: ``fit s`` is the detector's fit on the embeddings; ``predict ms/img``
is the detector's scoring per test image (``score_samples`` plus
``anomaly_map``) without the CNN, whose time per image is
printed separately; for ``N-pad`` it includes the 25 CNN passes::

    python benchmarks/bench_npad.py            # full data (hours on 2 cores)
    python benchmarks/bench_npad.py --shifted-test 100   # shifted row on 100 test images
    python benchmarks/bench_npad.py --quick    # 60 training images, 30 + 30 test images

N-pad with shifting runs the CNN 25 times per test image and scores every
copy (about 2.6 s per image on 2 cores): ``--shifted-test 100`` scores it
on the 100 test images of ``run.py``'s N-pad (r=4) rows and adds the row
"A+B+C (100 test)", the unshifted detector on the same images, so that the
two compare on one test set.
"""

import argparse
import os
import time

import numpy as np

SEED = 0


def _subsample(indices, n, seed):
    if n is None or n >= len(indices):
        return indices
    return np.sort(np.random.default_rng(seed).permutation(indices)[:n])


def _load(dataset, limit, n_test=None):
    """``(X_train, X_test, y_test, masks_test or None)``, subsampled by ``limit``."""
    from skpatch.datasets import load_elpv_split, make_synthetic_defects

    if dataset in ("mono", "poly"):
        X_train, X_test, y_test = load_elpv_split(dataset, random_state=SEED)
        if limit:
            X_train = X_train[_subsample(np.arange(len(X_train)), limit, 1)]
            keep = np.r_[
                _subsample(np.flatnonzero(y_test == 0), n_test or limit // 2, 2),
                _subsample(np.flatnonzero(y_test == 1), n_test or limit // 2, 3),
            ]
            X_test, y_test = X_test[keep], y_test[keep]
        return X_train, X_test, y_test, None

    from PIL import Image

    X_train, X_test, y_test = load_elpv_split("mono", random_state=SEED)
    normal = np.concatenate([X_train, X_test[y_test == 0]])
    n_train, n_normal_test, n_defective = (
        (limit, n_test or limit // 2, n_test or limit // 2) if limit else (300, 100, 188)
    )
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


def _variants(sweep):
    from skpatch import NPadDetector, PaDiMDetector

    npad = {"n_features": 100, "random_state": SEED}
    rows = {
        "PaDiM": PaDiMDetector(n_features=100, random_state=SEED),
        "A": NPadDetector(distributions="weighted", q=1, **npad),
        "B": NPadDetector(distributions="aggregated", **npad),
        "A+B": NPadDetector(q=1, **npad),
        "A+C": NPadDetector(distributions="weighted", q=2, **npad),
        "A+B+C": NPadDetector(**npad),
    }
    if sweep:
        rows["A+B+C d=50"] = NPadDetector(**{**npad, "n_features": 50})
        rows["A+B+C d=176"] = NPadDetector(**{**npad, "n_features": None})
        rows["A+B+C top_k=1"] = NPadDetector(top_k=1, **npad)
        rows["A+B+C top_k=100"] = NPadDetector(top_k=100, **npad)
    return rows


def _take(masks, keep):
    return None if masks is None else masks[keep]


def _scored(detector, X, y, masks):
    """Image AUROC (score and map maximum), pixel metrics with masks, predict ms/img."""
    from skpatch import ImageShiftDetector
    from skpatch.metrics import aupro, image_auroc, pixel_auroc

    start = time.perf_counter()
    if isinstance(detector, ImageShiftDetector):
        # Scores and maps from the same 25 CNN passes per image; on ELPV the
        # maps are not needed.
        if masks is None:
            scores, maps = detector.score_samples(X), None
        else:
            scores, maps = detector._scores_and_maps(X)
    else:
        scores, maps = detector.score_samples(X), detector.anomaly_map(X)
    row = {"image_auroc": image_auroc(y, -scores)}
    if maps is not None:
        row["max_auroc"] = image_auroc(y, maps.reshape(len(maps), -1).max(1))
    if masks is not None:
        row["pixel_auroc"] = pixel_auroc(masks, maps)
        row["aupro"] = aupro(masks, maps)
    row["predict_ms"] = 1000 * (time.perf_counter() - start) / len(X)
    return row


def run(dataset, limit, max_shift, sweep, n_test=None, cache_dir=None, methods=None,
        shifted_test=None):
    from sklearn.pipeline import make_pipeline

    from skpatch import ImageShiftDetector, PatchEmbedder

    X_train, X_test, y_test, masks = _load(dataset, limit, n_test)
    embedder = PatchEmbedder(image_size=224, crop_size=None)
    embedder.transform(X_train[:2])  # build the network outside the timing
    # Embeddings are cached on disk (--cache-dir): the CNN pass is the same
    # for every row and every run, and the 2 shared cores are scarce.
    tag = f"{dataset}_{limit or 'full'}_{n_test or 'all'}"
    paths = {key: None if cache_dir is None else os.path.join(cache_dir, f"npad_{tag}_{key}.npy")
             for key in ("train", "test", "cnn_ms")}
    if cache_dir is not None and all(os.path.exists(path) for path in paths.values()):
        E_train, E_test = np.load(paths["train"]), np.load(paths["test"])
        cnn_ms = float(np.load(paths["cnn_ms"]))
    else:
        start = time.perf_counter()
        E_train = embedder.transform(X_train)
        E_test = embedder.transform(X_test)
        cnn_ms = 1000 * (time.perf_counter() - start) / (len(X_train) + len(X_test))
        if cache_dir is not None:
            np.save(paths["train"], E_train)
            np.save(paths["test"], E_test)
            np.save(paths["cnn_ms"], np.float64(cnn_ms))
    name = {"mono": "ELPV mono", "poly": "ELPV poly"}.get(dataset, "synthetic")
    rows = []
    fitted = None
    variants = _variants(sweep)
    if methods:
        keep = set(methods) | ({"A+B+C"} if max_shift else set())
        variants = {label: det for label, det in variants.items() if label in keep}
    for label, detector in variants.items():
        start = time.perf_counter()
        detector.fit(E_train)
        fit_s = time.perf_counter() - start
        rows.append({"data": name, "method": label, "fit_s": fit_s,
                     **_scored(detector, E_test, y_test, masks)})
        print(f"  done: {name} {label} image AUROC {rows[-1]['image_auroc']:.3f}", flush=True)
        if label == "A+B+C":
            fitted, fit_s_abc = detector, fit_s
    if max_shift:
        keep = np.arange(len(X_test))
        if shifted_test and shifted_test < len(X_test):
            # As benchmarks/_data.subsample_test (same seeds): the images of
            # run.py's N-pad (r=4) rows, and A+B+C unshifted on the same ones.
            keep = np.sort(np.r_[
                _subsample(np.flatnonzero(y_test == 0), shifted_test // 2, 4),
                _subsample(np.flatnonzero(y_test == 1), shifted_test - shifted_test // 2, 5),
            ])
            rows.append({"data": name, "method": f"A+B+C ({len(keep)} test)", "fit_s": fit_s_abc,
                         **_scored(fitted, E_test[keep], y_test[keep], _take(masks, keep))})
        # Module D around the A+B+C detector fitted above: fitting the wrapper
        # would only fit the same detector on the same embeddings again.
        model = ImageShiftDetector(make_pipeline(embedder, fitted), max_shift=max_shift)
        model.estimator_ = model.estimator
        radius = max_shift // 2
        model.shifts_ = [(a, b) for a in range(-radius, radius + 1)
                         for b in range(-radius, radius + 1)]
        model.offset_ = fitted.offset_
        label = f"N-pad (r={max_shift})" + (f" ({len(keep)} test)" if len(keep) < len(X_test) else "")
        rows.append({"data": name, "method": label, "fit_s": fit_s_abc,
                     **_scored(model, X_test[keep], y_test[keep], _take(masks, keep))})
    sizes = f"{len(X_train)} train, {(y_test == 0).sum()}+{(y_test == 1).sum()} test"
    return rows, cnn_ms, sizes


def _fmt(value):
    return "-" if value is None else f"{value:.3f}"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=["mono", "poly", "synthetic"],
                        choices=["mono", "poly", "synthetic"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-shift", type=int, default=4)
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--methods", nargs="+", default=None,
                        help="rows to run (default all; A+B+C is added when --max-shift > 0)")
    parser.add_argument("--cache-dir", default="/tmp",
                        help="cache the embeddings here as npad_*.npy ('none': no cache)")
    parser.add_argument("--n-test", type=int, default=None,
                        help="with --quick: normal and anomalous test images each (default 30)")
    parser.add_argument("--quick", action="store_true",
                        help="60 training images, 30 normal + 30 anomalous test images")
    parser.add_argument("--shifted-test", type=int, default=None,
                        help="score the shifted N-pad row on this many test images (half "
                             "normal; those of run.py), and A+B+C unshifted on the same")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    limit = 60 if args.quick else None
    print(f"N-pad ablation, EfficientNet-Lite0, {args.threads} threads"
          f"{' (--quick)' if args.quick else ''}\n")
    header = ("| data | method | image AUROC | image AUROC (map max) | pixel AUROC | AUPRO "
              "| fit s | predict ms/img |")
    lines = [header, "|---" * (header.count("|") - 1) + "|"]
    notes = []
    for dataset in args.datasets:
        cache_dir = None if args.cache_dir.lower() == "none" else args.cache_dir
        rows, cnn_ms, sizes = run(dataset, limit, args.max_shift, args.sweep, args.n_test,
                                  cache_dir, args.methods, args.shifted_test)
        notes.append(f"{rows[0]['data']}: {sizes}; CNN {cnn_ms:.0f} ms/img")
        for r in rows:
            lines.append(
                f"| {r['data']} | {r['method']} | {r['image_auroc']:.3f} | "
                f"{_fmt(r.get('max_auroc'))} | {_fmt(r.get('pixel_auroc'))} | "
                f"{_fmt(r.get('aupro'))} | {r['fit_s']:.1f} | {r['predict_ms']:.0f} |"
            )
        print("\n".join(lines[-len(rows):]), flush=True)
    print("\n" + "\n".join(lines))
    print("\n" + "\n".join(notes))


if __name__ == "__main__":
    main()
