"""Every skpatch detector on ELPV mono / poly and the synthetic-defect pixel set.

One table: image AUROC, pixel AUROC and AUPRO (synthetic set only: ELPV has
no masks), fit seconds, predict milliseconds per image, the ratios of fit
and predict time to the backbone's forward passes over the same images, and
peak resident memory. Each (detector, data set) runs in a fresh process, so
that "peak MB" is that run's own peak (torch and the network included)::

    python benchmarks/run.py                       # full table, writes doc/benchmarks.rst
    python benchmarks/run.py --quick               # 40 training images per data set
    python benchmarks/run.py --detectors padim patchcore --datasets mono

Every detector uses its recommended pipeline (``make_*_pipeline``) on
EfficientNet-Lite0 ImageNet weights with ``image_size=224, crop_size=None``
(the cell fills the picture). "forward" is the embedder alone
(preprocessing, backbone, layer concatenation) over the same images with the
same batch size; a detector that embeds each image several times (N-pad's
image shifting) is compared with as many forward passes, counted by a hook
on the backbone. "predict / forward" pairs the two on the same test images,
alternating passes and keeping the best of each (see ``RATIO_REPEATS``).
Data sets: see ``benchmarks/_data.py``.

Detectors with ``partial_fit`` (PaDiM, PatchCore) are fitted streamed
(:func:`skpatch.fit_in_batches`, 64 images at a time) and every detector
scores 64 images per call, as a user with a stream of parts would: "peak
MB" then shows the memory a deployment needs, not that of holding every
embedding of the data set at once.
"""

import argparse
import datetime
import json
import multiprocessing as mp
import os
import platform
import resource
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

EMBEDDER = {"image_size": 224, "crop_size": None}
SEED = 0
BATCH = 64  # images per fit / score call
FORWARD_IMAGES = 64  # test images the forward pass alone is timed on
RATIO_REPEATS = 3  # paired passes (forward, score_samples) for predict / forward
FIT_REPEATS = 2  # fits for fit / forward, each followed by a forward pass over the training set
RATIO_IMAGES = {"npad": 8}  # fewer for N-pad with shifting: 25 passes per image
ROWS_FILE = os.path.join(HERE, "run_rows.json")  # the rows of the docs' page


def _padim():
    from sklearn.pipeline import make_pipeline

    from skpatch import PaDiMDetector, PatchEmbedder

    return make_pipeline(
        PatchEmbedder(**EMBEDDER), PaDiMDetector(n_features=100, random_state=SEED)
    )


def _rpadim():
    from skpatch import make_rpadim_pipeline

    return make_rpadim_pipeline(embedder_params=EMBEDDER, n_features=100, random_state=SEED)


def _npad():
    from skpatch import make_npad_pipeline

    return make_npad_pipeline(embedder_params=EMBEDDER, random_state=SEED)


def _npad_unshifted():
    from skpatch import make_npad_pipeline

    return make_npad_pipeline(max_shift=0, embedder_params=EMBEDDER, random_state=SEED)


def _patchcore():
    from skpatch import make_patchcore_pipeline

    return make_patchcore_pipeline(embedder_params=EMBEDDER, random_state=SEED)


def _spade():
    from skpatch import make_spade_pipeline

    return make_spade_pipeline(embedder_params=EMBEDDER)


def _pni():
    from skpatch import make_pni_pipeline

    return make_pni_pipeline(embedder_params=EMBEDDER, random_state=SEED)


# N-pad's image shifting embeds every test image 25 times (and again for its
# maps): on the full data sets it is scored on this many test images (half
# normal, half anomalous; the table's "train / test" column says so).
SHIFTED_TEST_IMAGES = 100

# name -> (label, pipeline factory); the order of the table.
DETECTORS = {
    "padim": ("PaDiM", _padim),
    "rpadim": ("RPaDiM", _rpadim),
    "npad": ("N-pad (r=4)", _npad),
    "npad0": ("N-pad, no shifting", _npad_unshifted),
    "patchcore": ("PatchCore", _patchcore),
    "spade": ("SPADE", _spade),
    "pni": ("PNI", _pni),
}


def _peak_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class _ForwardCounter:
    """Counts the images that go through the backbone (a forward pre-hook)."""

    def __init__(self):
        self.n_images = 0

    def __call__(self, module, args):
        self.n_images += len(args[0])


def _embedders(estimator):
    """Every PatchEmbedder inside a (meta-)estimator."""
    from skpatch import PatchEmbedder

    found = []

    def visit(obj):
        if isinstance(obj, PatchEmbedder):
            found.append(obj)
        elif hasattr(obj, "get_params"):
            for value in obj.get_params(deep=False).values():
                visit(value)
        elif isinstance(obj, (list, tuple)):
            for value in obj:
                visit(value)

    visit(estimator)
    return found


def _synchronize():
    """Wait for queued CUDA work: GPU timings must include it."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _forward_seconds(embedder, X, repeats=2, passes=1):
    """The embedder alone over ``X``: the best of ``repeats`` timings of ``passes`` passes each."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(passes):
            for _ in embedder.iter_tensors(X):
                pass
        _synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def run(detector, dataset, threads, limit, output="numpy"):
    """Fit and score one detector on one data set (in a fresh process)."""
    import torch

    import _data
    from sklearn.base import clone
    from sklearn.utils import gen_batches

    from skpatch import anomaly_map, fit_in_batches
    from skpatch.metrics import aupro, image_auroc, pixel_auroc

    torch.set_num_threads(threads)
    EMBEDDER["output"] = output  # this process's copy of the settings
    X_train, X_test, y_test, masks = _data.load(dataset, limit)
    label, factory = DETECTORS[detector]
    if detector == "npad":
        X_test, y_test, masks = _data.subsample_test(X_test, y_test, masks, SHIFTED_TEST_IMAGES)
    pipe = factory()
    embedder = _embedders(pipe)[0]
    embedder.transform(X_train[:2])  # build the network outside the timings
    counter = _ForwardCounter()
    hook = embedder._extractor()[0].register_forward_pre_hook(counter)

    # Per-image cost is the same for every image of a set (one size), so the
    # forward pass is timed on at most FORWARD_IMAGES of them.
    X_forward = X_test[:FORWARD_IMAGES]
    _forward_seconds(embedder, X_forward)  # warm-up: the first passes run slower

    streamed = hasattr(pipe, "steps") and hasattr(pipe[-1], "partial_fit")
    if torch.cuda.is_available():
        # CUDA loads its libraries and kernels, and its allocator grows, on
        # first use of each: seconds per process, more than the whole job
        # takes afterwards. Time the steady state: one untimed run first.
        warm = clone(pipe)
        (fit_in_batches(warm, X_train, batch_size=BATCH) if streamed else warm.fit(X_train))
        for s in gen_batches(len(X_test), BATCH):
            warm.score_samples(X_test[s])
        del warm
    def fit_seconds():
        counter.n_images = 0
        start = time.perf_counter()
        if streamed:
            fit_in_batches(pipe, X_train, batch_size=BATCH)  # streamed, as a user would
        else:
            pipe.fit(X_train)
        _synchronize()
        return time.perf_counter() - start

    # fit / forward: passes of the embedder alone over the training images
    # and fits, alternating (forward, fit, forward, ..., fit, forward), the
    # best of each, so that both sides see the same machine (one fit against
    # the passes right before and after it read 1.14-1.40 for PaDiM over
    # runs, on a host whose speed drifts by 10-20 %). "fit s" is the first
    # fit; the others run after the peak memory is read, which stays that
    # of one fit (a refit holds the previous model until it replaces it).
    train_forward = _forward_seconds(embedder, X_train, repeats=1)
    fit = fit_seconds()
    fit_forwards = counter.n_images
    train_forward = min(train_forward, _forward_seconds(embedder, X_train, repeats=1))

    counter.n_images = 0
    start = time.perf_counter()
    # BATCH images at a time, as a user scoring a stream (and anomalib's
    # loop) would: one call on every test image would hold all their embeddings.
    scores = -np.concatenate([pipe.score_samples(X_test[s]) for s in gen_batches(len(X_test), BATCH)])
    _synchronize()
    predict = time.perf_counter() - start
    predict_forwards = counter.n_images

    # The ratio to the backbone is taken on paired passes: the embedder alone
    # and score_samples on the same images, alternating, the best of each.
    # (A single pass over the test set against the best of two forward
    # passes read 10-20 % high on a host whose speed drifts by as much.)
    # A detector that embeds each image several times is paired with as
    # many passes of the embedder (N-pad: 25 over 8 images), so that both
    # timings span as long a stretch of the host's drift.
    X_ratio = X_forward[:RATIO_IMAGES.get(detector, FORWARD_IMAGES)]
    passes = max(1, round(predict_forwards / len(X_test)))
    forward_best = predict_best = float("inf")
    for _ in range(RATIO_REPEATS):
        forward_best = min(
            forward_best, _forward_seconds(embedder, X_ratio, repeats=1, passes=passes)
        )
        counter.n_images = 0
        start = time.perf_counter()
        for s in gen_batches(len(X_ratio), BATCH):
            pipe.score_samples(X_ratio[s])
        _synchronize()
        predict_best = min(predict_best, time.perf_counter() - start)
    ratio_forwards = counter.n_images
    row = {
        "detector": label,
        "data": _data.NAMES[dataset],
        "n_train": len(X_train),
        "n_test": len(X_test),
        "sizes": f"{len(X_train)} / {len(X_test)}",
        "image_auroc": image_auroc(y_test, scores),
        "fit_s": fit,
        "predict_ms": 1000 * predict / len(X_test),
        "predict_ratio": predict_best / (ratio_forwards * forward_best / (passes * len(X_ratio))),
        "forwards_per_image": predict_forwards / len(X_test),
    }
    if masks is not None:
        maps = np.concatenate([anomaly_map(pipe, X_test[s]) for s in gen_batches(len(X_test), BATCH)])
        row["pixel_auroc"] = pixel_auroc(masks, maps)
        row["aupro"] = aupro(masks, maps)
    row["peak_mb"] = _peak_mb()
    if torch.cuda.is_available():
        row["gpu_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    best_fit = fit
    for _ in range(FIT_REPEATS - 1):
        best_fit = min(best_fit, fit_seconds())
        train_forward = min(train_forward, _forward_seconds(embedder, X_train, repeats=1))
    row["fit_ratio"] = best_fit / (fit_forwards / len(X_train) * train_forward)
    hook.remove()
    return row


def _in_fresh_process(function, *args):
    with mp.get_context("spawn").Pool(1) as pool:
        return pool.apply(function, args)


def _fmt(row, key, spec):
    return format(row[key], spec) if key in row else "-"


COLUMNS = [
    ("detector", "detector", "s"),
    ("data", "data", "s"),
    ("train / test", "sizes", "s"),
    ("image AUROC", "image_auroc", ".3f"),
    ("pixel AUROC", "pixel_auroc", ".3f"),
    ("AUPRO", "aupro", ".3f"),
    ("fit s", "fit_s", ".1f"),
    ("fit / forward", "fit_ratio", ".2f"),
    ("predict ms/img", "predict_ms", ".1f"),
    ("predict / forward", "predict_ratio", ".2f"),
    ("peak MB", "peak_mb", ".0f"),
    ("GPU peak MB", "gpu_peak_mb", ".0f"),
]


def _columns(rows):
    """The columns some row has a value for (no GPU column on a CPU run)."""
    return [column for column in COLUMNS if any(column[1] in row for row in rows)]


def markdown_table(rows):
    columns = _columns(rows)
    lines = ["| " + " | ".join(title for title, _, _ in columns) + " |",
             "|---" * len(columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row, key, spec) for _, key, spec in columns) + " |")
    return "\n".join(lines)


def _ordered(rows):
    """Rows in the table's order: data set, then detector."""
    import _data

    datasets = list(_data.NAMES.values())
    labels = [label for label, _ in DETECTORS.values()]

    def key(row):
        data = datasets.index(row["data"]) if row["data"] in datasets else len(datasets)
        return data, labels.index(row["detector"]) if row["detector"] in labels else len(labels)

    return sorted(rows, key=key)


def rst_page(rows, threads):
    """The docs' benchmark page (doc/benchmarks.rst)."""
    import torch

    rows = _ordered(rows)
    runs = []  # (date, command) of the runs the rows come from, first seen first
    for row in rows:
        run = (row.get("date", "?"), row.get("command", "?"))
        if run not in runs:
            runs.append(run)
    runs.sort()
    measured = "\n".join(f"    {command}   # {date}" for date, command in runs)
    columns = _columns(rows)
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    header = "   * - " + "\n     - ".join(title for title, _, _ in columns)
    body = "\n".join(
        "   * - " + "\n     - ".join(_fmt(row, key, spec) for _, key, spec in columns)
        for row in rows
    )
    size_lines = (
        'The "train / test" column gives the images of each run. N-pad with image '
        f"shifting embeds each test image 25 times, so it is scored on {SHIFTED_TEST_IMAGES} "
        "test images of each set (half normal, half anomalous). These are easier than the "
        "full split: compare that row with N-pad without shifting on the same images, in "
        ":ref:`the N-pad ablation <npad>`."
    )
    return f""".. _benchmarks:

==========
Benchmarks
==========

.. This page is written by benchmarks/run.py: edit that script, not this file.

Every detector with its recommended pipeline on EfficientNet-Lite0 ImageNet
weights (``image_size=224, crop_size=None``), measured with (a run with
``--append`` adds or replaces its rows and keeps the others; the rows are
kept in ``benchmarks/run_rows.json``)::

{measured}

on {platform.processor() or platform.machine()}, {os.cpu_count()} cores,
{threads} torch threads, torch {torch.__version__}, {gpu}. Each row runs in a
fresh process (on a GPU after an untimed fit and scoring of the same data,
as CUDA loads its libraries and kernels on first use); "peak MB" is that
process's peak resident memory. "forward"
is the embedder alone over the same images and batch size: "fit / forward"
pairs {FIT_REPEATS} fits with passes of the embedder alone over the training
images, alternating (forward, fit, forward, ...), the best of each ("fit s"
is the first fit; the others run after "peak MB" is read); "predict /
forward" is the cost of ``score_samples`` relative to the backbone's forward
passes (the floor of the job), per forward pass for a detector that embeds
each image several times. It is taken on paired passes over the same
{FORWARD_IMAGES} test images ({RATIO_IMAGES["npad"]} for N-pad with shifting, whose embedder
passes are repeated as many times as it embeds each image), the embedder
alone and ``score_samples`` alternating, the best of {RATIO_REPEATS} each, so that
both see the same machine; "predict ms/img" is one pass over the whole
test set.

{size_lines}

Pixel AUROC and AUPRO (integrated up to a false-positive rate of 0.3) need
masks, which only the synthetic set has. The data sets are defined in
``benchmarks/_data.py``; per-detector studies (ablations, contamination,
side by side with anomalib) are the other scripts of ``benchmarks/``.

.. list-table::
   :header-rows: 1

{header}
{body}
"""


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--detectors", nargs="+", default=list(DETECTORS), choices=list(DETECTORS))
    parser.add_argument("--datasets", nargs="+", default=["mono", "poly", "synthetic"],
                        choices=["mono", "poly", "synthetic"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", choices=["numpy", "torch"], default="numpy",
                        help="PatchEmbedder(output=...): 'torch' keeps embeddings on the GPU")
    parser.add_argument("--quick", action="store_true",
                        help="40 training images per data set (the doc page says so)")
    parser.add_argument("--doc", default=os.path.join(HERE, "..", "doc", "benchmarks.rst"),
                        help="where to write the docs' page ('' for none); its rows are kept "
                             "in run_rows.json beside this script")
    parser.add_argument("--append", action="store_true",
                        help="keep the page's other rows: add this run's, replacing those of "
                             "the same detector and data set")
    args = parser.parse_args(argv)
    limit = 40 if args.quick else None

    command = "python benchmarks/run.py " + " ".join(argv if argv is not None else sys.argv[1:])
    stamp = {"command": command.strip(), "date": datetime.date.today().isoformat()}
    kept = []
    if args.append and os.path.exists(ROWS_FILE):
        with open(ROWS_FILE) as f:
            kept = json.load(f)
    rows = []
    for dataset in args.datasets:
        for detector in args.detectors:
            row = _in_fresh_process(run, detector, dataset, args.threads, limit, args.output)
            rows.append({**row, **stamp})
            print(markdown_table(rows[-1:]).splitlines()[-1], flush=True)
            if args.doc:  # after every row, so that an interrupted run leaves its rows
                new = {(r["detector"], r["data"]) for r in rows}
                page_rows = [r for r in kept if (r["detector"], r["data"]) not in new] + rows
                with open(ROWS_FILE, "w") as f:
                    json.dump(_ordered(page_rows), f, indent=1)
                with open(args.doc, "w") as f:
                    f.write(rst_page(page_rows, args.threads))
    print()
    print(markdown_table(rows))
    if args.doc:
        print(f"\nwrote {os.path.normpath(args.doc)} and {os.path.normpath(ROWS_FILE)}")


if __name__ == "__main__":
    main()
