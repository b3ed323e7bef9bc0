"""Patch anomaly detectors: scikit-learn outlier estimators on patch embeddings."""

from ._base import BaseGaussianDetector, BasePatchDetector
from ._npad import NPadDetector, make_npad_pipeline
from ._padim import PaDiMDetector
from ._patchcore import PatchCoreDetector, make_patchcore_pipeline
from ._pni import PNIDetector, make_pni_pipeline
from ._rpadim import RobustPaDiMDetector, make_rpadim_pipeline
from ._spade import SPADEDetector, make_spade_pipeline

__all__ = [
    "BaseGaussianDetector",
    "BasePatchDetector",
    "NPadDetector",
    "PaDiMDetector",
    "PNIDetector",
    "PatchCoreDetector",
    "RobustPaDiMDetector",
    "SPADEDetector",
    "make_npad_pipeline",
    "make_patchcore_pipeline",
    "make_pni_pipeline",
    "make_rpadim_pipeline",
    "make_spade_pipeline",
]
