"""Where the scoring time goes: network, copy to the host, detector (GPU or CPU).

For PaDiM and PatchCore on ELPV mono (``image_size=224, crop_size=None``),
fitted streamed on the training cells, every test cell is scored 64 at a
time, as ``benchmarks/run.py`` does, with the embeddings handed over as a
NumPy array (``PatchEmbedder(output="numpy")``, the default) and as a torch
tensor that stays on the device (``output="torch"``). Columns, in
milliseconds per image (best of three passes, the device synchronized):

* ``forward``: the embedder alone, tensors left on the device;
* ``transform``: ``PatchEmbedder.transform`` (``output="numpy"``: with
  the copy to host memory);
* ``detector``: the detector's ``score_samples`` on embeddings computed
  before (``output="numpy"``: with the copy back to the device);
* ``pipeline``: ``Pipeline.score_samples`` on images, and its images per
  second and ratio to ``forward``.

On a CPU both hand-overs cost the same (a tensor and an array share memory
there); on a GPU the NumPy hand-over copies every embedding to the host and
back::

    python benchmarks/bench_handoff.py
"""

import argparse
import time

import torch
from sklearn.pipeline import make_pipeline
from sklearn.utils import gen_batches

from skpatch import PaDiMDetector, PatchEmbedder, fit_in_batches, make_patchcore_pipeline
from skpatch.datasets import load_elpv_split

BATCH = 64
EMBEDDER = {"image_size": 224, "crop_size": None}


def _pipelines(output):
    embedder = {**EMBEDDER, "output": output}
    return {
        "PaDiM": make_pipeline(
            PatchEmbedder(**embedder), PaDiMDetector(n_features=100, random_state=0)
        ),
        "PatchCore": make_patchcore_pipeline(embedder_params=embedder, random_state=0),
    }


def _synchronize():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _best_seconds(function, repeats=3):
    best = float("inf")
    for _ in range(repeats):
        _synchronize()
        start = time.perf_counter()
        function()
        _synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=None,
                        help="at most this many training and test images (a quick check)")
    args = parser.parse_args(argv)
    X_train, X_test, _ = load_elpv_split("mono", random_state=0)
    X_train, X_test = X_train[: args.limit], X_test[: args.limit]
    n = len(X_test)
    batches = list(gen_batches(n, BATCH))
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(f"{device}, torch {torch.__version__}, {len(X_train)} training / {n} test images\n")
    print("| detector | output | forward | transform | detector | pipeline | images/s "
          "| pipeline / forward |")
    print("|---|---|---|---|---|---|---|---|")
    for output in ("numpy", "torch"):
        for name, pipe in _pipelines(output).items():
            fit_in_batches(pipe, X_train, batch_size=BATCH)
            embedder, detector = pipe[0], pipe[-1]
            forward = _best_seconds(lambda: [None for _ in embedder.iter_tensors(X_test)])
            transform = _best_seconds(lambda: [embedder.transform(X_test[s]) for s in batches])
            embedded = [embedder.transform(X_test[s]) for s in batches]
            scoring = _best_seconds(lambda: [detector.score_samples(Z) for Z in embedded])
            embedded.clear()  # free before the pipeline timing
            full = _best_seconds(lambda: [pipe.score_samples(X_test[s]) for s in batches])
            ms = [1e3 * t / n for t in (forward, transform, scoring, full)]
            print(f"| {name} | {output} | " + " | ".join(f"{m:.3f}" for m in ms)
                  + f" | {n / full:.0f} | {full / forward:.2f} |", flush=True)


if __name__ == "__main__":
    main()
