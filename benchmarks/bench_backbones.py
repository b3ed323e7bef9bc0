"""PaDiM's cost over the backbone's forward pass, for each backbone.

The ratios of ``run.py`` are taken with EfficientNet-Lite0, the offline
default, whose forward pass is the cheapest of the shipped backbones (about
a third of ResNet-18's on a CPU): what PaDiM adds weighs most there. This
script takes the same ratios with the papers' backbones, each with the
paper's embedding size (PaDiM, Table 1: Rd 100 for ResNet-18, 550 for
Wide-ResNet-50-2):

* ``forward``: the embedder alone (``iter_tensors``) over the images;
* ``fit``: :func:`skpatch.fit_in_batches` (64 images per batch) on the
  training images, the forward passes included, alternating with forward
  passes over the same images (forward, fit, forward, fit, forward), best
  of each;
* ``predict``: ``score_samples`` of the test images (embedding included),
  alternating with forward passes over them, best of each;
* ``peak MB``: the peak resident memory of the backbone's own process.

A second table says where the fit goes, from three more fits streamed as
:func:`skpatch.fit_in_batches` streams them, each stage timed on its own
(the best of each): ``embed`` (the embedder's passes), ``sums``
(``partial_fit``: the channel gather and the running sums of PaDiM §III-B,
per image), ``factor`` (the covariances of eq. (1) and their inverse
Cholesky factors, computed on first use) and ``calibrate`` (scoring the
reservoir sample for ``offset_``). ``sums / forward`` is ``sums`` over
``embed``: the statistics against the forward passes, image for image. The
two last stages are paid once per fit, whatever the number of images.

ELPV mono, images resized 300 -> 224 without a crop. The ResNets run with
random weights (``weights=None``): the times do not depend on the weights,
and ImageNet weights cannot be downloaded on every machine.

Run: python benchmarks/bench_backbones.py [--train 300] [--test 64] [--threads 2]
"""

import argparse
import multiprocessing as mp
import os
import resource
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

# (backbone, weights, n_features): the papers' Rd, and the default's
SETTINGS = [
    ("efficientnet_lite0", "imagenet", 100),
    ("resnet18", None, 100),
    ("wide_resnet50_2", None, 550),
]
REPEATS = 2  # fits (and predicts); forward passes: one more


def _best_of_alternating(first, second, repeats):
    """Best times of ``first`` and ``second``, run as first, second, ..., first."""
    best_first = best_second = float("inf")
    for _ in range(repeats):
        best_first = min(best_first, first())
        best_second = min(best_second, second())
    return min(best_first, first()), best_second


def _timed(call):
    def run():
        start = time.perf_counter()
        call()
        return time.perf_counter() - start

    return run


def measure(backbone, weights, n_features, n_train, n_test, threads):
    import torch
    from sklearn.pipeline import make_pipeline

    import _data
    from skpatch import PaDiMDetector, PatchEmbedder, fit_in_batches

    torch.set_num_threads(threads)
    X_train, X_test = _data.load("mono")[:2]
    X_train, X_test = X_train[:n_train], X_test[:n_test]
    embedder = PatchEmbedder(backbone, weights=weights, image_size=224, crop_size=None)
    pipe = make_pipeline(embedder, PaDiMDetector(n_features=n_features, random_state=0))
    embedder.transform(X_train[:2])  # builds the network outside the timings

    def forward(X):
        return _timed(lambda: [None for _ in embedder.iter_tensors(X)])

    train_forward, fit = _best_of_alternating(
        forward(X_train), _timed(lambda: fit_in_batches(pipe, X_train, batch_size=64)), REPEATS
    )
    test_forward, predict = _best_of_alternating(
        forward(X_test), _timed(lambda: pipe.score_samples(X_test)), REPEATS
    )
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    stages = _staged_fit(embedder, pipe[-1], X_train, batch_size=64)
    for _ in range(REPEATS):  # the best of each stage
        again = _staged_fit(embedder, pipe[-1], X_train, batch_size=64)
        stages = {stage: min(seconds, again[stage]) for stage, seconds in stages.items()}
    return {
        "stages": stages,
        "sums_ratio": stages["sums"] / stages["embed"],
        "forward": 1000 * train_forward / n_train,
        "fit": fit,
        "fit_ratio": fit / train_forward,
        "predict": 1000 * predict / n_test,
        "predict_ratio": predict / test_forward,
        "peak": peak,
    }


def _staged_fit(embedder, detector, X, batch_size):
    """Seconds of each stage of a streamed fit (see the module docstring)."""
    from sklearn.base import clone

    detector = clone(detector)
    seconds = dict.fromkeys(("embed", "sums", "factor", "calibrate"), 0.0)
    for start in range(0, len(X), batch_size):
        # as fit_in_batches does: every batch embedded into the first one's
        # memory, which the embedder reuses once the batch before is dropped
        embeddings = None
        begin = time.perf_counter()
        embeddings = embedder.transform(X[start : start + batch_size])
        middle = time.perf_counter()
        detector.partial_fit(embeddings)
        seconds["embed"] += middle - begin
        seconds["sums"] += time.perf_counter() - middle
    for stage, attribute in (("factor", "precision_cholesky_"), ("calibrate", "offset_")):
        begin = time.perf_counter()
        getattr(detector, attribute)
        seconds[stage] = time.perf_counter() - begin
    return seconds


def _child(queue, *args):
    queue.put(measure(*args))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=300,
                        help="training images (more than 550 / 2, PaDiM's largest Rd)")
    parser.add_argument("--test", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--backbones", nargs="+", default=[s[0] for s in SETTINGS])
    args = parser.parse_args()

    print(f"PaDiM on ELPV mono, {args.train} training / {args.test} test images, "
          f"224 x 224, {args.threads} threads\n")
    header = ("backbone", "Rd", "forward ms/img", "fit s", "fit / forward",
              "predict ms/img", "predict / forward", "peak MB")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    context = mp.get_context("spawn")  # a fresh process each: its own peak memory
    stages = {}
    for backbone, weights, n_features in SETTINGS:
        if backbone not in args.backbones:
            continue
        queue = context.Queue()
        process = context.Process(
            target=_child,
            args=(queue, backbone, weights, n_features, args.train, args.test, args.threads),
        )
        process.start()
        row = queue.get()
        process.join()
        print(f"| {backbone} | {n_features} | {row['forward']:.1f} | {row['fit']:.1f} | "
              f"{row['fit_ratio']:.2f} | {row['predict']:.1f} | {row['predict_ratio']:.2f} | "
              f"{row['peak']:.0f} |", flush=True)
        stages[backbone] = row["stages"], row["sums_ratio"]

    print(f"\nWhere a streamed fit of {args.train} images goes (seconds; sums also per image)\n")
    header = ("backbone", "embed s", "sums s", "sums ms/img", "sums / forward",
              "factor s", "calibrate s")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for backbone, (seconds, sums_ratio) in stages.items():
        print(f"| {backbone} | {seconds['embed']:.2f} | {seconds['sums']:.2f} | "
              f"{1000 * seconds['sums'] / args.train:.2f} | {sums_ratio:.2f} | "
              f"{seconds['factor']:.2f} | {seconds['calibrate']:.2f} |")


if __name__ == "__main__":
    main()
