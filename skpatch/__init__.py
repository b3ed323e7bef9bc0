"""skpatch: patch-based image anomaly detectors as scikit-learn estimators.

``PatchEmbedder`` turns images into patch embeddings with a pretrained CNN;
each detector is an outlier estimator on those embeddings, so that
``make_pipeline(PatchEmbedder(), PaDiMDetector())`` fits on images of good
parts and scores new ones.
"""

from ._compose import anomaly_map, fit_in_batches
from ._embedder import PatchEmbedder
from ._merge import merge_detectors
from ._refine import AnomalyMapRefiner
from ._shift import ImageShiftDetector
from .detectors import PaDiMDetector, RobustPaDiMDetector, make_rpadim_pipeline
from .detectors import NPadDetector, make_npad_pipeline
from .detectors import PatchCoreDetector, SPADEDetector, make_patchcore_pipeline, make_spade_pipeline
from .detectors import PNIDetector, make_pni_pipeline

__version__ = "0.1.0.dev0"

__all__ = [
    "AnomalyMapRefiner",
    "ImageShiftDetector",
    "NPadDetector",
    "PNIDetector",
    "PaDiMDetector",
    "PatchCoreDetector",
    "PatchEmbedder",
    "RobustPaDiMDetector",
    "SPADEDetector",
    "anomaly_map",
    "fit_in_batches",
    "make_npad_pipeline",
    "make_patchcore_pipeline",
    "make_pni_pipeline",
    "make_rpadim_pipeline",
    "make_spade_pipeline",
    "merge_detectors",
]
