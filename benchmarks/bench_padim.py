"""PaDiM + EfficientNet-Lite0 on ELPV: accuracy, speed and memory in one table.

Protocol (the same split as ``../shared/bench``'s anomalib harness): per cell
type, 70 % of the defect-free cells (seed 0) train; the other defect-free
cells and every cell with defect probability 1 are the test set. Images are
resized 300 -> 224 without a crop (the cell fills the frame).

Each measurement runs in a fresh process, so that "peak MB" is that run's
own peak resident memory (torch and the network included)::

    python benchmarks/bench_padim.py                 # full table (~10 min on 2 cores)
    python benchmarks/bench_padim.py --quick         # subsampled smoke run

Columns: image AUROC; fit s (embedding + statistics, ``pipe.fit``); forward s
(the backbone alone over the same training images, for the ratio); predict
ms/img (``score_samples``, embedding included); flagged good / defective (the
share of held-out cells ``predict`` calls anomalous); peak MB. The streaming
rows fit with :func:`skpatch.fit_in_batches` on N and 4N training cells.
"""

import argparse
import gc
import multiprocessing as mp
import resource
import time

import numpy as np


def _peak_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _reset_peak():
    """Start a new peak (Linux: ``clear_refs`` 5 resets ``VmHWM``); False where it cannot."""
    try:
        with open("/proc/self/clear_refs", "w") as file:
            file.write("5")
        return True
    except OSError:
        return False


def _peak_since_reset_mb():
    """The resident peak since :func:`_reset_peak` (``VmHWM``), else the process's."""
    try:
        with open("/proc/self/status") as file:
            for line in file:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return _peak_mb()


def _pipeline(n_features, calibration="leave-one-out"):
    from sklearn.pipeline import make_pipeline

    from skpatch import PaDiMDetector, PatchEmbedder

    return make_pipeline(
        PatchEmbedder(image_size=224, crop_size=None),
        PaDiMDetector(n_features=n_features, random_state=0, calibration=calibration),
    )


def _subsample(X, n, seed=0):
    if n is None or n >= len(X):
        return X
    return X[np.sort(np.random.default_rng(seed).permutation(len(X))[:n])]


def run_detection(cell_type, n_features, threads, limit, calibration):
    import torch

    from skpatch.datasets import load_elpv_split
    from skpatch.metrics import image_auroc

    torch.set_num_threads(threads)
    X_train, X_test, y_test = load_elpv_split(cell_type, random_state=0)
    if limit:
        X_train = _subsample(X_train, limit)
        keep = np.sort(np.random.default_rng(1).permutation(len(X_test))[:limit])
        X_test, y_test = X_test[keep], y_test[keep]
    pipe = _pipeline(n_features, calibration)
    embedder = pipe[0]
    embedder.transform(X_train[:2])  # build the network once, outside the timings

    start = time.perf_counter()
    for _ in embedder.iter_tensors(X_train):
        pass
    forward = time.perf_counter() - start

    start = time.perf_counter()
    pipe.fit(X_train)
    fit = time.perf_counter() - start

    start = time.perf_counter()
    scores = pipe.score_samples(X_test)
    predict = time.perf_counter() - start
    flagged = pipe.predict(X_test) == -1
    return {
        "run": f"ELPV {cell_type}",
        "n_train": len(X_train),
        "n_test": len(X_test),
        "auroc": image_auroc(y_test, -scores),
        "fit_s": fit,
        "forward_s": forward,
        "predict_ms": 1000 * predict / len(X_test),
        "flagged_good": flagged[y_test == 0].mean(),
        "flagged_defective": flagged[y_test == 1].mean(),
        "peak_mb": _peak_mb(),
    }


def run_streaming(n_images, n_features, threads):
    import torch

    from skpatch import fit_in_batches
    from skpatch.datasets import load_elpv

    torch.set_num_threads(threads)
    data = load_elpv("all")
    normal = data.images[data.defect_probability == 0]
    X = _subsample(normal, n_images)
    del data, normal
    gc.collect()
    # The data set's loading peaks above the fit (all 2,624 cells): the fit's
    # own peak (its images included) is taken from here on, where Linux allows.
    baseline = _peak_mb()
    reset = _reset_peak()
    pipe = _pipeline(n_features)
    start = time.perf_counter()
    fit_in_batches(pipe, X, batch_size=32)
    return {
        "run": f"stream {len(X)} img",
        "n_train": len(X),
        "fit_s": time.perf_counter() - start,
        "peak_mb": _peak_since_reset_mb() if reset else _peak_mb(),
        "data_mb": X.nbytes / 2**20,
        "baseline_mb": baseline,
    }


def _in_fresh_process(function, *args):
    with mp.get_context("spawn").Pool(1) as pool:
        return pool.apply(function, args)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cell-types", nargs="+", default=["mono", "poly"])
    parser.add_argument("--n-features", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--stream-n", type=int, default=200,
                        help="N for the streaming rows (N and 4N cells)")
    parser.add_argument("--calibration", default="leave-one-out",
                        choices=["leave-one-out", "in-sample"])
    parser.add_argument("--quick", action="store_true", help="60 train / 60 test images")
    args = parser.parse_args(argv)
    limit = 60 if args.quick else None
    stream_n = 30 if args.quick else args.stream_n

    rows = [
        _in_fresh_process(run_detection, cell_type, args.n_features, args.threads, limit,
                          args.calibration)
        for cell_type in args.cell_types
    ]
    streams = [
        _in_fresh_process(run_streaming, n, args.n_features, args.threads)
        for n in (stream_n, 4 * stream_n)
    ]

    print(f"\nPaDiM-EfficientNet-Lite0-Rd{args.n_features}, {args.threads} threads, "
          f"calibration={args.calibration}\n")
    header = ("| run | train / test | image AUROC | fit s | forward s | fit / forward "
              "| predict ms/img | flagged good / defective | peak MB |")
    print(header)
    print("|---" * (header.count("|") - 1) + "|")
    for r in rows:
        print(f"| {r['run']} | {r['n_train']} / {r['n_test']} | {r['auroc']:.3f} | "
              f"{r['fit_s']:.1f} | {r['forward_s']:.1f} | {r['fit_s'] / r['forward_s']:.2f} | "
              f"{r['predict_ms']:.1f} | {r['flagged_good']:.0%} / {r['flagged_defective']:.0%} | "
              f"{r['peak_mb']:.0f} |")
    print("\nStreaming fit (fit_in_batches, batch_size=32): peak memory at N and 4N images "
          "(resident peak from the fit's start, the images and the network included)\n")
    print("| run | fit s | peak MB | images in RAM (MB) | ratio 4N / N |")
    print("|---|---|---|---|---|")
    for s in streams:
        ratio = s["peak_mb"] / streams[0]["peak_mb"]
        print(f"| {s['run']} | {s['fit_s']:.1f} | {s['peak_mb']:.0f} | {s['data_mb']:.0f} | "
              f"{ratio:.2f} |")


if __name__ == "__main__":
    main()
