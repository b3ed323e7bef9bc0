"""Patch anomaly detectors: scikit-learn outlier estimators on patch embeddings."""

from ._base import BasePatchDetector
from ._padim import PaDiMDetector

__all__ = ["BasePatchDetector", "PaDiMDetector"]
