"""How well ``offset_`` is calibrated: the share of test images ``predict`` flags.

``contamination`` asks for the share of *normal* images that ``predict``
flags (``offset_`` is that quantile of the training images' scores). Each
detector's pipeline of ``run.py`` is fitted on the good training cells of
ELPV mono or poly, with its default calibration and with
``calibration="in-sample"`` (scikit-learn's rule: each training image scored
by the model that learnt it), and the table gives the shares of the good
and of the defective test cells it flags::

    python benchmarks/bench_calibration.py   # mono, every detector, both rules
    python benchmarks/bench_calibration.py --detectors npad0 --datasets poly

A calibrated threshold flags about ``contamination`` (10 %) of the good
cells. N-pad with image shifting (``npad``) keeps the wrapped detector's
``offset_``; it scores each image 25 times, so it is left out by default.
"""

import argparse
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

DEFAULT_DETECTORS = ["padim", "rpadim", "patchcore", "spade", "pni", "npad0"]


def _detector(pipeline):
    """The detector of a pipeline (or of the pipeline an ImageShiftDetector wraps)."""
    pipeline = getattr(pipeline, "estimator", pipeline)
    return pipeline.steps[-1][0]


def main():
    import torch

    import _data
    import run

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--detectors", nargs="+", default=DEFAULT_DETECTORS,
                        choices=sorted(run.DETECTORS))
    parser.add_argument("--datasets", nargs="+", default=["mono"], choices=["mono", "poly"])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    print("| detector | data | calibration | good flagged | defective flagged |")
    print("|---|---|---|---|---|")
    for dataset in args.datasets:
        X_train, X_test, y_test = _data.load(dataset)[:3]
        good, defective = X_test[y_test == 0], X_test[y_test == 1]
        for name in args.detectors:
            label, factory = run.DETECTORS[name]
            for in_sample in (False, True):
                pipeline = factory()
                prefix = "estimator__" if hasattr(pipeline, "max_shift") else ""
                key = f"{prefix}{_detector(pipeline)}__calibration"
                if in_sample:
                    pipeline.set_params(**{key: "in-sample"})
                pipeline.fit(X_train)
                rule = pipeline.get_params()[key]
                print(f"| {label} | {dataset} | {rule} | "
                      f"{100 * np.mean(pipeline.predict(good) < 0):.1f} % | "
                      f"{100 * np.mean(pipeline.predict(defective) < 0):.1f} % |", flush=True)


if __name__ == "__main__":
    main()
