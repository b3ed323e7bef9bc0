"""skpatch: patch-based image anomaly detectors as scikit-learn estimators.

``PatchEmbedder`` turns images into patch embeddings with a pretrained CNN;
each detector is an outlier estimator on those embeddings, so that
``make_pipeline(PatchEmbedder(), PaDiMDetector())`` fits on images of good
parts and scores new ones.
"""

from ._compose import anomaly_map, fit_in_batches
from ._embedder import PatchEmbedder
from .detectors import PaDiMDetector, RobustPaDiMDetector, make_rpadim_pipeline

__version__ = "0.1.0.dev0"

__all__ = [
    "PaDiMDetector",
    "PatchEmbedder",
    "RobustPaDiMDetector",
    "anomaly_map",
    "fit_in_batches",
    "make_rpadim_pipeline",
]
