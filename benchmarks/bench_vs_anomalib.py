"""skpatch against anomalib: PaDiM and PatchCore side by side on ELPV.

Both sides read the same arrays (``../shared/bench/data.py``: the ELPV split,
cells resized 300 -> 224 bilinear, no crop), use the same EfficientNet-Lite0
ImageNet weights, the same layers, batches of 32 images (anomalib's
``--batch-size``, skpatch's ``fit_in_batches``; skpatch scores 64 at a
time), 2 threads, and run in fresh processes so that "peak MB" is each run's
own peak resident memory. Each side runs its network as it does by default:
anomalib on the whole batch, skpatch's ``PatchEmbedder(batch_size="auto")``
in passes of 5 images on a CPU (the user guide's "The network" says why);
``--anomalib-batch-size 5`` gives anomalib passes of 5 as well.


* PaDiM: layers stage1/2/4 (anomalib: blocks.1/2/4), 100 random channels,
  bicubic/bilinear upsample + sigma=4 blur, image score = max.
* PatchCore: layers stage2/4 (anomalib: blocks.2/4), 3x3 average pooling,
  coreset + nearest neighbour, 9-neighbour re-weighted image score. anomalib
  runs with its harness defaults (a 100k-patch random store, 5 % coreset:
  5,000 centres); skpatch with the same setting (``max_patches=100_000,
  coreset_ratio=0.05``) of :func:`skpatch.make_patchcore_pipeline`.

anomalib runs in its own virtual environment (``../shared/bench/README.md``)::

    VENV_ANOMALIB=/path/to/venv bash ../shared/bench/setup_anomalib_venv.sh
    python benchmarks/bench_vs_anomalib.py --anomalib-python /path/to/venv/bin/python

``--skpatch-only`` skips anomalib (its numbers from an earlier run can be
given with ``--anomalib-results DIR``, the folder of its JSON files).
Both PaDiMs draw their channels at random; ``--padim-seeds 5`` also prints
skpatch's PaDiM AUROC for ``random_state`` 0-4 (on the same embeddings), the
spread a difference between the two libraries should be read against.
"""

import argparse
import glob
import json
import multiprocessing as mp
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
BENCH = os.path.join(HERE, "..", "..", "shared", "bench")


def _peak_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _pipeline(model, memory_bank_params):
    from sklearn.pipeline import make_pipeline

    from skpatch import PaDiMDetector, PatchEmbedder

    if model == "padim":
        return make_pipeline(
            PatchEmbedder(image_size=None, crop_size=None),
            PaDiMDetector(n_features=100, random_state=0),
        )
    from skpatch import make_patchcore_pipeline

    return make_patchcore_pipeline(
        "efficientnet_lite0",
        embedder_params={"image_size": None, "crop_size": None},
        random_state=0,
        **memory_bank_params,
    )


def run_skpatch(model, dataset, threads, limit, memory_bank_params):
    """Fit and score one skpatch pipeline (in a fresh process)."""
    import torch

    sys.path.insert(0, BENCH)
    import data  # the harness' loader: the very same arrays anomalib gets

    from sklearn.utils import gen_batches

    from skpatch import fit_in_batches
    from skpatch.metrics import image_auroc

    torch.set_num_threads(threads)
    X_train, X_test, y_test, _ = data.load(dataset, limit, limit)
    pipe = _pipeline(model, memory_bank_params)
    embedder = pipe[0]
    embedder.transform(X_train[:2])  # build the network outside the timings

    start = time.perf_counter()
    # Streamed: PaDiM's memory is independent of N; PatchCore's is bounded by
    # its store of max_patches patches.
    fit_in_batches(pipe, X_train, batch_size=32)
    fit = time.perf_counter() - start

    # Scored 64 images at a time, as anomalib's loop feeds batches: a single
    # pipe.score_samples(X_test) would hold every test embedding at once.
    start = time.perf_counter()
    scores = np.concatenate([pipe.score_samples(X_test[s]) for s in gen_batches(len(X_test), 64)])
    predict = time.perf_counter() - start
    peak = _peak_mb()

    start = time.perf_counter()
    for _ in embedder.iter_tensors(X_test):
        pass
    forward = time.perf_counter() - start
    detector = pipe[-1]
    bank = getattr(detector, "memory_bank_", None)
    return {
        "auroc": image_auroc(y_test, -scores),
        "fit_s": fit,
        "predict_ms": 1000 * predict / len(X_test),
        "forward_ms": 1000 * forward / len(X_test),
        "peak_mb": peak,
        "bank": "" if bank is None else f"{len(bank):,}",
        "n_train": len(X_train),
        "n_test": len(X_test),
    }


def padim_seed_aurocs(dataset, threads, limit, n_seeds):
    """Image AUROC of skpatch's PaDiM for ``random_state`` 0 .. n_seeds - 1."""
    import torch

    sys.path.insert(0, BENCH)
    import data

    from skpatch.metrics import image_auroc

    torch.set_num_threads(threads)
    X_train, X_test, y_test, _ = data.load(dataset, limit, limit)
    pipe = _pipeline("padim", None)
    embedder, detector = pipe[0], pipe[-1]
    E_train, E_test = embedder.transform(X_train), embedder.transform(X_test)
    aurocs = []
    for seed in range(n_seeds):
        detector.set_params(random_state=seed).fit(E_train)
        aurocs.append(image_auroc(y_test, -detector.score_samples(E_test)))
    return aurocs


def run_anomalib(python, model, dataset, threads, limit, results, batch_size):
    command = [python, os.path.join(BENCH, "anomalib_peer.py"), "--model", model,
               "--dataset", dataset, "--threads", str(threads), "--tag", "vs_skpatch",
               "--batch-size", str(batch_size)]
    if limit:
        command += ["--limit", str(limit), "--train-limit", str(limit)]
    env = dict(os.environ, BENCH_RESULTS=results)
    subprocess.run(command, check=True, env=env, cwd=BENCH, stdout=subprocess.DEVNULL)
    return read_anomalib(results, model, dataset)


def read_anomalib(results, model, dataset):
    pattern = os.path.join(results, f"anomalib_{model}_{dataset}*.json")
    paths = sorted(glob.glob(pattern), key=os.path.getmtime)
    if not paths:
        return None
    with open(paths[-1]) as f:
        r = json.load(f)
    return {
        "auroc": r["image_auroc"],
        "fit_s": r["fit_s"],
        "predict_ms": 1000 * r["predict_s_per_image"],
        "forward_ms": 1000 * r["feature_extraction_s_per_image"],
        "peak_mb": r["peak_rss_mb"],
        "bank": f"{r['memory_bank_size']:,}" if "memory_bank_size" in r else "",
        "n_train": r["n_train"],
        "n_test": r["n_test"],
    }


def _in_fresh_process(function, *args):
    with mp.get_context("spawn").Pool(1) as pool:
        return pool.apply(function, args)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=["elpv_mono", "elpv_poly"])
    parser.add_argument("--models", nargs="+", default=["padim", "patchcore"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--limit", type=int, default=None,
                        help="subsample train and test to this many images (smoke runs)")
    parser.add_argument("--anomalib-python",
                        default=os.path.join(os.environ.get("VENV_ANOMALIB", ""), "bin", "python"))
    parser.add_argument("--anomalib-results", default=None,
                        help="reuse anomalib's JSON results from this folder instead of running it")
    parser.add_argument("--skpatch-only", action="store_true")
    parser.add_argument("--anomalib-batch-size", type=int, default=32,
                        help="anomalib's images per batch (and forward pass)")
    parser.add_argument("--padim-seeds", type=int, default=0,
                        help="also print skpatch's PaDiM AUROC for this many random_state values")
    args = parser.parse_args(argv)
    results = args.anomalib_results or tempfile.mkdtemp(prefix="anomalib_results_")

    rows = []
    for dataset in args.datasets:
        for model in args.models:
            ours = _in_fresh_process(run_skpatch, model, dataset, args.threads, args.limit,
                                     {"max_patches": 100_000, "coreset_ratio": 0.05})
            if args.anomalib_results:
                peer = read_anomalib(results, model, dataset)
            elif args.skpatch_only:
                peer = None
            else:
                peer = run_anomalib(args.anomalib_python, model, dataset, args.threads,
                                    args.limit, results, args.anomalib_batch_size)
            rows.append((dataset, model, ours, peer))

    print(f"\nskpatch vs anomalib, EfficientNet-Lite0, {args.threads} threads; anomalib "
          f"batch {args.anomalib_batch_size}, skpatch batch_size='auto'\n")
    header = ("| data | model | system | train / test | image AUROC | fit s | predict ms/img "
              "| forward ms/img | predict / forward | peak MB | bank |")
    print(header)
    print("|---" * (header.count("|") - 1) + "|")
    for dataset, model, ours, peer in rows:
        for system, r in (("skpatch", ours), ("anomalib", peer)):
            if r is None:
                continue
            print(f"| {dataset} | {model} | {system} | {r['n_train']} / {r['n_test']} | "
                  f"{r['auroc']:.3f} | {r['fit_s']:.1f} | {r['predict_ms']:.1f} | "
                  f"{r['forward_ms']:.1f} | {r['predict_ms'] / r['forward_ms']:.2f} | "
                  f"{r['peak_mb']:.0f} | {r['bank']} |")
        if peer is not None:
            print(f"| {dataset} | {model} | skpatch / anomalib | | "
                  f"{ours['auroc'] - peer['auroc']:+.3f} | {ours['fit_s'] / peer['fit_s']:.2f} | "
                  f"{ours['predict_ms'] / peer['predict_ms']:.2f} | | | "
                  f"{ours['peak_mb'] / peer['peak_mb']:.2f} | |")

    if args.padim_seeds and "padim" in args.models:
        print(f"\nskpatch PaDiM image AUROC, random_state 0-{args.padim_seeds - 1}:")
        for dataset in args.datasets:
            aurocs = _in_fresh_process(padim_seed_aurocs, dataset, args.threads, args.limit,
                                       args.padim_seeds)
            print(f"{dataset}: " + " ".join(f"{a:.3f}" for a in aurocs)
                  + f" (mean {np.mean(aurocs):.3f}, sd {np.std(aurocs):.3f})")


if __name__ == "__main__":
    main()
