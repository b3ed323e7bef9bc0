"""PaDiM vs PatchCore vs SPADE on ELPV and synthetic defects, EfficientNet-Lite0.

Data sets (those of ``bench_rpadim.py``, clean training sets):

* ``ELPV mono`` / ``ELPV poly``: the split of ``load_elpv_split`` (70 % of the
  defect-free cells train; the other defect-free cells and the cells of
  defect probability 1 test), image AUROC only; the cells are resized to
  224 x 224 without a crop, as in ``../shared/bench/anomalib_peer.py``.
* ``synthetic``: 300 normal ELPV mono cells train; 100 held-out normal cells
  and 188 with one synthetic defect each test; image AUROC, pixel AUROC,
  AUPRO (FPR <= 0.3) of 224 x 224 maps.

Methods:

* ``PaDiM``: the three default stages (56 x 56 grid, 176 channels),
  ``n_features=100``.
* ``PatchCore``: :func:`skpatch.make_patchcore_pipeline` (stages 2 + 4,
  3 x 3 pooling: 28 x 28, 152 channels, the layers of the anomalib peer),
  defaults (a uniform store of ``max_patches=50_000`` patches, coreset 10 %:
  5,000 items), ``1%`` (500 items) and ``peer`` (the anomalib peer's
  setting: 5 % of a 100,000-patch store, 5,000 items), and ``peer streamed``
  (the same setting fitted with ``partial_fit`` on batches of 64 training
  embeddings read from disk, as :func:`skpatch.fit_in_batches` feeds it:
  its ``peak MB`` is the store, not the training set).
* ``SPADE``: the same embeddings (pixel gallery search on the 56 x 56
  pyramid costs 20x more on a CPU), global feature = average of the
  stage-4 channels (``global_channels=112``), ``K = 50`` and ``K = 10``,
  ``κ = 1``.

Each (data set, embedder) is embedded once in a fresh process and saved to
a temporary ``.npy``; every detector then runs in its own fresh process on
the memory-mapped embeddings, so that ``peak MB`` (the process's peak RSS
minus its RSS before the fit) is the detector's own memory. ``fit s`` is the
embedding of the training images (measured per-image rate) plus the
detector's fit (in parentheses); ``predict ms`` per test image likewise
(``score_samples`` on ELPV, ``anomaly_map`` on the synthetic set).
``state MB`` is the size of the fitted NumPy attributes at the ``N``
training images and at ``4N`` (the training embeddings repeated four times
with 1 % Gaussian noise; ELPV mono only)::

    python benchmarks/bench_patchcore_spade.py                  # full table
    python benchmarks/bench_patchcore_spade.py --quick          # subsampled smoke run
"""

import argparse
import multiprocessing as mp
import os
import resource
import sys
import tempfile
import time

import numpy as np

SEED = 0


def _pipelines():
    from sklearn.pipeline import make_pipeline

    from skpatch import PaDiMDetector, PatchCoreDetector, PatchEmbedder, SPADEDetector
    from skpatch import make_patchcore_pipeline

    embed = {"image_size": 224, "crop_size": None}
    padim = PatchEmbedder(**embed)
    patchcore = make_patchcore_pipeline(embedder_params=embed)[0]
    detectors = {
        "PaDiM": ("padim", PaDiMDetector(n_features=100, random_state=SEED)),
        "PatchCore": ("patchcore", PatchCoreDetector(random_state=SEED)),
        "PatchCore 1%": ("patchcore", PatchCoreDetector(0.01, random_state=SEED)),
        "PatchCore peer": (
            "patchcore",
            PatchCoreDetector(0.05, max_patches=100_000, random_state=SEED),
        ),
        "PatchCore peer streamed": (
            "patchcore",
            PatchCoreDetector(0.05, max_patches=100_000, random_state=SEED),
        ),
        "SPADE K=50": ("patchcore", SPADEDetector(50, global_channels=112)),
        "SPADE K=10": ("patchcore", SPADEDetector(10, global_channels=112)),
    }
    del make_pipeline
    return {"padim": padim, "patchcore": patchcore}, detectors


def _load(dataset, limit):
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench_rpadim import _load as load

    X_train, X_test, y_test, masks = load(dataset, limit)
    if dataset in ("mono", "poly"):
        # 300 -> 224 without a crop, as the anomalib peer
        from PIL import Image

        def resize(images):
            return np.stack(
                [np.asarray(Image.fromarray(im).resize((224, 224), Image.BILINEAR)) for im in images]
            )

        X_train, X_test = resize(X_train), resize(X_test)
    return X_train, X_test, y_test, masks


def embed(dataset, embedder_name, threads, limit, folder):
    import torch

    torch.set_num_threads(threads)
    embedders, _ = _pipelines()
    embedder = embedders[embedder_name]
    X_train, X_test, y_test, masks = _load(dataset, limit)
    embedder.transform(X_train[:2])  # build the network outside the timing
    start = time.perf_counter()
    E_train = embedder.transform(X_train)
    E_test = embedder.transform(X_test)
    per_image = (time.perf_counter() - start) / (len(X_train) + len(X_test))
    paths = {}
    for name, array in (("train", E_train), ("test", E_test), ("y", y_test), ("masks", masks)):
        if array is None:
            continue
        paths[name] = os.path.join(folder, f"{dataset}-{embedder_name}-{name}.npy")
        np.save(paths[name], array)
    return paths, per_image


def _rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _state_mb(detector):
    return sum(v.nbytes for k, v in vars(detector).items() if k.endswith("_") and isinstance(v, np.ndarray)) / 2**20


def _read_rows(path, batch):
    """Rows ``batch`` of a saved array, read from the file (not mapped: no RSS for the rest)."""
    mapped = np.load(path, mmap_mode="r")
    row_items = int(np.prod(mapped.shape[1:]))
    count = len(range(*batch.indices(len(mapped))))
    with open(path, "rb") as f:
        f.seek(mapped.offset + batch.start * row_items * mapped.dtype.itemsize)
        rows = np.fromfile(f, dtype=mapped.dtype, count=count * row_items)
    return rows.reshape(count, *mapped.shape[1:])


def evaluate(method, paths, threads, scale4):
    import torch

    from skpatch.metrics import aupro, image_auroc, pixel_auroc

    torch.set_num_threads(threads)
    _, detectors = _pipelines()
    detector = detectors[method][1]
    E_train = np.load(paths["train"], mmap_mode="r")
    E_test = np.load(paths["test"], mmap_mode="r")
    y = np.load(paths["y"])
    before = _rss_mb()
    start = time.perf_counter()
    if method.endswith("streamed"):
        from sklearn.utils import gen_batches

        for batch in gen_batches(len(E_train), 64):
            detector.partial_fit(_read_rows(paths["train"], batch))
        detector.offset_  # the coreset and offset_ are computed on first use
    else:
        detector.fit(E_train)
    fit = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before
    row = {"fit": fit, "peak": peak, "state": _state_mb(detector)}
    start = time.perf_counter()
    if "masks" in paths:
        masks = np.load(paths["masks"])
        maps = detector.anomaly_map(E_test)
        row["predict"] = (time.perf_counter() - start) / len(E_test)
        scores = -detector.score_samples(E_test)
        row["pixel_auroc"] = pixel_auroc(masks, maps)
        row["aupro"] = aupro(masks, maps)
    else:
        scores = -detector.score_samples(E_test)
        row["predict"] = (time.perf_counter() - start) / len(E_test)
    row["image_auroc"] = image_auroc(y, scores)
    row["flagged_good"] = float((-scores[y == 0] < detector.offset_).mean())
    if scale4:
        rng = np.random.default_rng(SEED)
        big = np.concatenate([E_train] * 4)
        big += 0.01 * big.std() * rng.standard_normal(big.shape, dtype=np.float32)
        row["state4"] = _state_mb(detector.fit(big))
    return row


def _fresh(function, *args):
    with mp.get_context("spawn").Pool(1) as pool:
        return pool.apply(function, args)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=["mono", "poly", "synthetic"],
                        choices=["mono", "poly", "synthetic"])
    parser.add_argument("--methods", nargs="+", default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="60 training images per data set")
    parser.add_argument("--no-4n", action="store_true", help="skip the state size at 4N")
    args = parser.parse_args(argv)
    limit = 60 if args.quick else None
    _, detectors = _pipelines()
    methods = args.methods or list(detectors)
    start = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for dataset in args.datasets:
            embedded = {}
            for method in methods:
                embedder_name = detectors[method][0]
                if embedder_name not in embedded:
                    embedded[embedder_name] = _fresh(embed, dataset, embedder_name, args.threads, limit, folder)
                paths, per_image = embedded[embedder_name]
                n_train = len(np.load(paths["train"], mmap_mode="r"))
                scale4 = dataset == "mono" and not args.no_4n and "peer" not in method
                row = _fresh(evaluate, method, paths, args.threads, scale4)
                row.update(data=dataset, method=method, n_train=n_train, embed=per_image)
                rows.append(row)
                print(row, flush=True)
    print(f"\nPaDiM vs PatchCore vs SPADE, EfficientNet-Lite0, {args.threads} threads"
          f"{' (--quick)' if args.quick else ''}\n")
    header = ("| data | method | image AUROC | pixel AUROC | AUPRO | fit s (detector) "
              "| predict ms/img (detector) | peak MB (fit) | state MB at N | state MB at 4N | flagged good |")
    print(header)
    print("|---" * (header.count("|") - 1) + "|")
    names = {"mono": "ELPV mono", "poly": "ELPV poly", "synthetic": "synthetic"}

    def fmt(value, spec=".3f"):
        return "-" if value is None else format(value, spec)

    for r in rows:
        fit_total = r["fit"] + r["embed"] * r["n_train"]
        pred_total = 1e3 * (r["predict"] + r["embed"])
        print(f"| {names[r['data']]} | {r['method']} | {r['image_auroc']:.3f} | "
              f"{fmt(r.get('pixel_auroc'))} | {fmt(r.get('aupro'))} | {fit_total:.1f} ({r['fit']:.1f}) | "
              f"{pred_total:.0f} ({1e3 * r['predict']:.0f}) | {r['peak']:.0f} | {r['state']:.1f} | "
              f"{fmt(r.get('state4'), '.1f')} | {r['flagged_good']:.0%} |")
    print(f"\nTotal run time {time.perf_counter() - start:.0f} s.")


if __name__ == "__main__":
    main()
