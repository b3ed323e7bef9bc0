"""Patch anomaly detectors: scikit-learn outlier estimators on patch embeddings."""

from ._base import BaseGaussianDetector, BasePatchDetector
from ._padim import PaDiMDetector

__all__ = ["BaseGaussianDetector", "BasePatchDetector", "PaDiMDetector"]
