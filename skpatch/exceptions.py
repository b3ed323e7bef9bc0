"""Warnings and errors specific to skpatch (as :mod:`sklearn.exceptions` is to scikit-learn).

Errors on bad input are the built-in ``ValueError`` / ``TypeError`` /
``FileNotFoundError`` that scikit-learn raises too; this module holds what
has no built-in equivalent.
"""

__all__ = ["DegenerateTrainingSetWarning"]


class DegenerateTrainingSetWarning(UserWarning):
    """The training set is too small or too uniform to estimate the model from data.

    Raised as a warning by ``fit`` when the fitted model would be decided by
    regularization rather than by the training images, for example when a
    Gaussian detector (:class:`~skpatch.PaDiMDetector`,
    :class:`~skpatch.RobustPaDiMDetector`) sees far fewer training images
    than embedding dimensions, so that most directions of every covariance
    are ``epsilon`` alone, or when all training images are identical. The
    detector is still fitted; its scores are valid but say little. Silence
    it with :func:`warnings.filterwarnings` when this is intended.

    Examples
    --------
    >>> import warnings
    >>> import numpy as np
    >>> from skpatch import PaDiMDetector
    >>> from skpatch.exceptions import DegenerateTrainingSetWarning
    >>> X = np.ones((5, 8, 2, 2))  # five identical training images
    >>> with warnings.catch_warnings(record=True) as caught:
    ...     warnings.simplefilter("always")
    ...     _ = PaDiMDetector(map_size=None).fit(X)
    >>> caught[0].category.__name__
    'DegenerateTrainingSetWarning'
    """
