"""Helpers shared by several test modules (importable: setup.cfg puts tests/ on the path)."""

import numpy as np
import torch

# On CUDA, cuDNN's convolutions (TF32 by default) and the kernels chosen
# depend on the batch, and training uses atomic adds: results that are
# exact on the CPU (where CI runs) agree there to rounding only.
ON_GPU = torch.cuda.is_available()


def assert_same_embeddings(actual, desired, rtol=0.0):
    """Equal on the CPU (to ``rtol``); on a GPU, to the rounding of its convolutions."""
    actual, desired = np.asarray(actual), np.asarray(desired)
    if ON_GPU:
        scale = float(np.abs(desired).max()) if desired.size else 0.0
        np.testing.assert_allclose(actual, desired, rtol=max(rtol, 1e-3), atol=1e-3 * scale)
    elif rtol:
        np.testing.assert_allclose(actual, desired, rtol=rtol)
    else:
        np.testing.assert_array_equal(actual, desired)


def expected_failed_checks(estimator):
    """scikit-learn common checks a Gaussian detector is expected to fail, with the reason."""
    if estimator.calibration == "in-sample":
        return {}
    # offset_ is the contamination quantile of leave-one-out (N-pad:
    # cross-fitted) training scores, so predict on the training set itself
    # flags fewer than contamination (by design; see the calibration
    # docstring).
    reason = "offset_ from out-of-sample scores, not in-sample ones"
    return {"check_outliers_train": reason, "check_outliers_fit_predict": reason}


# Parameters that make each detector fast on tiny test data (tests that
# cover every detector, e.g. persistence and bad input, iterate over this).
FAST_PARAMS = {
    "PaDiMDetector": {"random_state": 0},
    "RobustPaDiMDetector": {"random_state": 0},
    "PatchCoreDetector": {"random_state": 0},
    "SPADEDetector": {"n_neighbors": 5},
    "NPadDetector": {"n_features": None, "kmeans_max_samples": 500, "random_state": 0},
    "PNIDetector": {"n_dist": 16, "mlp_width": 32, "n_epochs": 2, "random_state": 0},
}
