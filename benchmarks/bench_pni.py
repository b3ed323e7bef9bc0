"""PaDiM vs PNI, without and with the refinement network, EfficientNet-Lite0.

Data sets (as in ``bench_rpadim.py``):

* ``ELPV mono`` / ``ELPV poly``: the split of ``load_elpv_split`` (70 % of the
  defect-free cells train; the other defect-free cells and all cells of
  defect probability 1 test). Image AUROC only (ELPV has no masks).
* ``synthetic``: pixel-level set on ELPV mono normal cells resized to
  224 x 224: 300 normal cells train; 100 held-out normal cells and 188
  held-out cells with one synthetic defect each (the four *default* kinds of
  :func:`~skpatch.datasets.make_synthetic_defects`: scratch, blob, cutpaste,
  intensity) test. Image AUROC, pixel AUROC and AUPRO (FPR <= 0.3) of
  224 x 224 maps. The refinement network trains on other kinds (cutpaste,
  cutpaste_scar, draem) made from the *training* cells.

Methods (``image_size=224, crop_size=None``):

* ``PaDiM``: the three default stages, ``n_features=100``.
* ``PNI``: :func:`skpatch.make_pni_pipeline` with its defaults (stages 2 + 4,
  3 x 3 pooling; 1 % embedding coreset, ``|C_dist| = 512``, 3 x 3
  neighbourhood, 2 x 512 MLP, 5 epochs on 100k patches).
* ``PNI + refinement``: the same pipeline wrapped in
  :class:`skpatch.AnomalyMapRefiner` (defaults: 200 defective training images,
  10 epochs). Its image score is PNI's (``image_score="coarse"``); the
  column ``image AUROC (refined max)`` scores images by the maximum of the
  refined map instead.

``fit s`` includes the embedding of the training images; ``predict ms/img``
includes the CNN. ``state`` is the size of the pickled fitted detector (the
refiner: the pickled wrapper, pipeline included) when fitted on ``N`` and on
``4N`` training images (``N`` = a quarter of the training set)::

    python benchmarks/bench_pni.py            # full table
    python benchmarks/bench_pni.py --quick    # subsampled smoke run
"""

import argparse
import multiprocessing as mp
import pickle
import time

import numpy as np

SEED = 0


def _load(dataset, limit):
    """``(X_train, X_test, y_test, masks_test or None)``, subsampled by ``limit``."""
    from skpatch.datasets import load_elpv_split, make_synthetic_defects

    rng = np.random.default_rng(SEED)
    if dataset in ("mono", "poly"):
        X_train, X_test, y_test = load_elpv_split(dataset, random_state=SEED)
        if limit:
            X_train = X_train[np.sort(rng.permutation(len(X_train))[:limit])]
            keep = np.r_[
                np.sort(rng.permutation(np.flatnonzero(y_test == 0))[: limit // 2]),
                np.sort(rng.permutation(np.flatnonzero(y_test == 1))[:limit]),
            ]
            X_test, y_test = X_test[keep], y_test[keep]
        return X_train, X_test, y_test, None

    from PIL import Image

    X_train, X_test, y_test = load_elpv_split("mono", random_state=SEED)
    normal = np.concatenate([X_train, X_test[y_test == 0]])
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


def _estimator(method, refiner_params):
    from sklearn.pipeline import make_pipeline

    from skpatch import PaDiMDetector, PatchEmbedder, make_pni_pipeline

    embedder = {"image_size": 224, "crop_size": None}
    if method == "PaDiM":
        return make_pipeline(
            PatchEmbedder(**embedder), PaDiMDetector(n_features=100, random_state=SEED)
        )
    refine = method == "PNI + refinement"
    return make_pni_pipeline(
        embedder_params=embedder,
        random_state=SEED,
        refine=refine,
        refiner_params={"random_state": SEED, **refiner_params} if refine else None,
    )


def _state_bytes(estimator):
    """Bytes of the pickled fitted detector (the last step of the pipeline)."""
    return len(pickle.dumps(estimator.steps[-1][1]))


def run(dataset, method, threads, limit, refiner_params):
    import torch

    from skpatch import anomaly_map
    from skpatch.metrics import aupro, image_auroc, pixel_auroc

    torch.set_num_threads(threads)
    X_train, X_test, y_test, masks = _load(dataset, limit)
    estimator = _estimator(method, refiner_params)
    start = time.perf_counter()
    estimator.fit(X_train)
    fit = time.perf_counter() - start
    start = time.perf_counter()
    maps = anomaly_map(estimator, X_test)
    predict = (time.perf_counter() - start) / len(X_test)
    row = {
        "data": {"mono": "ELPV mono", "poly": "ELPV poly"}.get(dataset, "synthetic"),
        "method": method,
        "n_train": len(X_train),
        "n_test": f"{(y_test == 0).sum()}+{(y_test == 1).sum()}",
        "fit_s": fit,
        "predict_ms": 1000 * predict,
    }
    if method == "PNI + refinement":
        row["image_auroc"] = image_auroc(y_test, -estimator.score_samples(X_test))
        row["image_auroc_refined"] = image_auroc(y_test, maps.reshape(len(maps), -1).max(1))
    else:
        row["image_auroc"] = image_auroc(y_test, maps.reshape(len(maps), -1).max(1))
    if masks is not None:
        row["pixel_auroc"] = pixel_auroc(masks, maps)
        row["aupro"] = aupro(masks, maps)
    # Fitted state at N and 4N training images. The refiner's is PNI's plus
    # the network's weights (added in main, from the PNI row).
    n = len(X_train) // 4
    if method == "PNI + refinement":
        row["network_bytes"] = len(pickle.dumps(estimator.network_state_))
        return row
    sizes = []
    for count in (n, 4 * n):
        if count == len(X_train):
            sizes.append(_state_bytes(estimator))
            continue
        model = _estimator(method, refiner_params)
        model.fit(X_train[:count])
        sizes.append(_state_bytes(model))
    row["state"] = (n, sizes[0], sizes[1])
    return row


def _in_fresh_process(function, *args):
    with mp.get_context("spawn").Pool(1) as pool:
        return pool.apply(function, args)


def _fmt(value, spec=".3f"):
    return "-" if value is None else format(value, spec)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=["mono", "poly", "synthetic"],
                        choices=["mono", "poly", "synthetic"])
    parser.add_argument("--methods", nargs="+",
                        default=["PaDiM", "PNI", "PNI + refinement"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true",
                        help="subsample: 60 normal training images per data set")
    parser.add_argument("--limit", type=int, default=None,
                        help="training images per data set (overrides --quick)")
    parser.add_argument("--map-folds", type=int, default=None,
                        help="the refiner's map_folds (out-of-fold coarse maps)")
    args = parser.parse_args(argv)
    limit = args.limit or (60 if args.quick else None)
    refiner_params = {} if args.map_folds is None else {"map_folds": args.map_folds}

    start = time.perf_counter()
    rows = []
    for dataset in args.datasets:
        for method in args.methods:
            rows.append(_in_fresh_process(run, dataset, method, args.threads, limit,
                                          refiner_params))
            r = rows[-1]
            print(f"# {r['data']} {r['method']}: {r}", flush=True)

    print(f"\nPaDiM vs PNI (with / without refinement), EfficientNet-Lite0, {args.threads} "
          f"threads{f' (training images limited to {limit})' if limit else ''}\n")
    header = ("| data | method | train | test normal + anomalous | image AUROC "
              "| image AUROC (refined max) | pixel AUROC | AUPRO | fit s | predict ms/img "
              "| state at N | state at 4N |")
    print(header)
    print("|---" * (header.count("|") - 1) + "|")
    for r in rows:
        if "network_bytes" in r:
            pni = next((q for q in rows if q["data"] == r["data"] and q["method"] == "PNI"), None)
            if pni is None:
                r["state"] = (len(r["n_train"] and [0]), 0, 0)
            else:
                n, small, large = pni["state"]
                r["state"] = (n, small + r["network_bytes"], large + r["network_bytes"])
        n, small, large = r["state"]
        print(f"| {r['data']} | {r['method']} | {r['n_train']} | {r['n_test']} | "
              f"{r['image_auroc']:.3f} | {_fmt(r.get('image_auroc_refined'))} | "
              f"{_fmt(r.get('pixel_auroc'))} | {_fmt(r.get('aupro'))} | {r['fit_s']:.1f} | "
              f"{r['predict_ms']:.0f} | {small / 2**20:.2f} MiB (N={n}) | "
              f"{large / 2**20:.2f} MiB (4N={4 * n}) |")
    print(f"\nTotal run time {time.perf_counter() - start:.0f} s.")


if __name__ == "__main__":
    main()
