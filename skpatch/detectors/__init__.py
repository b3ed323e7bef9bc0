"""Patch anomaly detectors: scikit-learn outlier estimators on patch embeddings."""

from ._base import BaseGaussianDetector, BasePatchDetector
from ._padim import PaDiMDetector
from ._rpadim import RobustPaDiMDetector, make_rpadim_pipeline

__all__ = [
    "BaseGaussianDetector",
    "BasePatchDetector",
    "PaDiMDetector",
    "RobustPaDiMDetector",
    "make_rpadim_pipeline",
]
