"""Size of a saved detector, per detector, at the default embedding size.

Fits every detector (default parameters, a fixed random_state where it has
one) on random embeddings shaped like the default PatchEmbedder's output
(EfficientNet-Lite0, 224 x 224 crop: 176 channels on a 56 x 56 grid), saves
it with joblib and skops, and prints the file sizes and the largest fitted
arrays. The numbers depend on the number of training images only where the
table says so.

Run: python benchmarks/bench_persistence.py [n_images] [detector ...]
"""

import io
import sys
import time

import joblib
import numpy as np

import skpatch

DETECTORS = [
    "PaDiMDetector",
    "RobustPaDiMDetector",
    "NPadDetector",
    "PatchCoreDetector",
    "SPADEDetector",
    "PNIDetector",
]


def main():
    n_images = int(sys.argv[1]) if len(sys.argv) > 1 else 50
    names = sys.argv[2:] or DETECTORS
    rng = np.random.RandomState(0)
    X = rng.normal(size=(n_images, 176, 56, 56)).astype(np.float32)
    print(f"{n_images} training images, embeddings (176, 56, 56) float32")
    print(f"{'detector':<22}{'fit s':>8}{'joblib MB':>11}{'skops MB':>10}  largest arrays")
    for name in names:
        cls = getattr(skpatch, name, None)
        if cls is None:
            print(f"{name:<22} not available")
            continue
        detector = cls()
        if "random_state" in detector.get_params():
            detector.set_params(random_state=0)
        start = time.perf_counter()
        detector.fit(X)
        fit_time = time.perf_counter() - start
        buffer = io.BytesIO()
        joblib.dump(detector, buffer)
        try:
            import skops.io as sio

            skops_mb = f"{len(sio.dumps(detector)) / 1e6:10.1f}"
        except Exception as exc:  # noqa: BLE001 - report, do not stop
            skops_mb = f"{type(exc).__name__:>10}"
        arrays = sorted(
            ((value.nbytes, key, value.shape) for key, value in vars(detector).items()
             if isinstance(value, np.ndarray)),
            reverse=True,
        )[:3]
        largest = ", ".join(f"{key} {shape} {nbytes / 1e6:.1f} MB" for nbytes, key, shape in arrays)
        print(f"{name:<22}{fit_time:8.1f}{len(buffer.getvalue()) / 1e6:11.1f}{skops_mb}  {largest}")


if __name__ == "__main__":
    main()
