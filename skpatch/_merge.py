"""Merge detectors fitted on disjoint shards of a training set into one model.

PaDiM's statistics are sufficient statistics: the count, mean and scatter of
the patches at every position. Shards fitted separately (on several cores,
or several machines of a cluster) combine exactly with the pairwise update
of Chan, Golub & LeVeque (:func:`skpatch._gaussian.merge_moments`), so the
merged model is the one-fit model up to float rounding.
"""

import copy

import numpy as np
import torch
from sklearn.base import clone
from sklearn.pipeline import Pipeline
from sklearn.utils.validation import check_is_fitted

from . import _gaussian
from ._torch_utils import as_tensor, to_numpy
from .detectors import PaDiMDetector

__all__ = ["merge_detectors"]

# Why a detector cannot be merged, for the error message.
_NOT_MERGEABLE = {
    "RobustPaDiMDetector": (
        "its statistics are not mergeable: the LOF that denoises a position compares "
        "every training patch with its nearest neighbours among all training patches "
        "at that position, across shards, and the geometric median (and the covariance "
        "about it) has no sufficient statistics that shards could sum. Fit it on the "
        "whole training set (it needs every embedding at once), or use PaDiMDetector, "
        "whose mean and scatter merge exactly"
    ),
}


def _merge_padim(detectors):
    """One PaDiMDetector with the summed moments of fitted ones (same parameters)."""
    first = detectors[0]
    for other in detectors[1:]:
        if not np.array_equal(other.feature_indices_, first.feature_indices_):
            raise ValueError(
                "the detectors selected different random channels (feature_indices_); fit "
                "every shard with the same n_features and the same integer random_state."
            )
    for i, detector in enumerate(detectors):
        if detector.n_samples_seen_ < 2:
            raise ValueError(
                f"estimator {i} has seen {detector.n_samples_seen_} image: a shard needs at "
                "least 2, as its training images are scored by its own model for offset_. "
                "Give it more images, or add its images to another shard."
            )
    dtype = np.result_type(*[d.mean_.dtype for d in detectors])
    device = torch.device("cpu")
    moments = None
    for detector in detectors:
        moments = _gaussian.merge_moments(
            moments,
            (
                detector.n_samples_seen_,
                as_tensor(detector.mean_, device, dtype),
                as_tensor(detector.scatter_, device, dtype),
            ),
        )
    merged = clone(first)
    for attribute in ("n_features_in_", "grid_shape_", "feature_indices_"):
        setattr(merged, attribute, copy.deepcopy(getattr(first, attribute)))
    if hasattr(first, "feature_names_in_"):
        merged.feature_names_in_ = first.feature_names_in_.copy()
    merged.n_samples_seen_ = int(moments[0])
    merged.mean_ = to_numpy(moments[1])
    merged.scatter_ = to_numpy(moments[2])
    # the merge fits the merged model: its ridge is the current epsilon
    merged._fit_epsilon = merged.epsilon
    if merged.n_samples_seen_ >= 2:
        with torch.inference_mode():
            whitening = merged._whitening(moments, merged._fit_epsilon)
            merged.precision_cholesky_ = to_numpy(whitening[1])
    # Each shard's training scores came from its own model (leave-one-out
    # when calibration says so): their quantile approximates the one-fit offset.
    merged._train_scores = np.concatenate([d._train_scores for d in detectors])
    if len(merged._train_scores):
        merged._set_offset(merged._train_scores)
    return merged


_MERGERS = {PaDiMDetector: _merge_padim}


def _check_same_params(estimators, what):
    # Settings of how, not what: device, and an embedder's batching, cache,
    # progress and output type, change no feature. random_state matters
    # through the channels it selects, which _merge_padim compares.
    ignored = ("device", "random_state", "batch_size", "memory", "verbose", "output")
    reference = estimators[0].get_params(deep=False)
    for key in ignored:
        reference.pop(key, None)
    for other in estimators[1:]:
        params = other.get_params(deep=False)
        for key in ignored:
            params.pop(key, None)
        differ = sorted(
            key
            for key in set(reference) | set(params)
            if repr(reference.get(key)) != repr(params.get(key))
        )
        if differ:
            raise ValueError(
                f"{what} must have the same parameters to be merged; {differ} differ."
            )


def merge_detectors(estimators):
    """Merge detectors (or pipelines) fitted on disjoint shards into one.

    Fitting a :class:`PaDiMDetector` on shards of the training set (in
    parallel processes, or on the machines of a cluster) and merging the
    shards gives the model fitted on all of it, up to float rounding: the
    per-position counts, means and scatter matrices (PaDiM §III-B) combine
    exactly (Chan, Golub & LeVeque's pairwise update), and the precision
    factors are recomputed from the merged covariances. Only the statistics
    travel: ``O(h w d²)`` floats per shard, whatever its number of images.

    Parameters
    ----------
    estimators : list of fitted detectors or fitted Pipelines
        Of the same class and parameters (``device`` may differ), fitted
        with the same integer ``random_state`` so that they use the same
        random channels, on embeddings of the same grid. Pipelines must end
        in such detectors and have the same other steps.

    Returns
    -------
    merged : detector or Pipeline
        A new fitted estimator (the inputs are not modified); for pipelines,
        the first pipeline's other steps with the merged detector. The
        detector can be updated further with ``partial_fit`` on embeddings
        (``merged[-1].partial_fit(merged[:-1].transform(images))`` for a
        pipeline, which has no ``partial_fit`` of its own).

    Raises
    ------
    TypeError
        If a detector's statistics cannot be merged. :class:`RobustPaDiMDetector`
        cannot: its LOF denoising needs all patches of a position at once and
        its geometric median has no sufficient statistics.
    ValueError
        If the estimators differ in class, parameters, channels or grid, are
        not fitted, or one has seen fewer than 2 images.

    See Also
    --------
    PaDiMDetector.partial_fit : The same update, one batch at a time.
    fit_in_batches : Stream a dataset through one process instead.

    Notes
    -----
    ``offset_`` is the ``contamination`` quantile of the training scores of
    all shards, each image scored by the model of its shard (leave-one-out
    when ``calibration`` says so), as :meth:`PaDiMDetector.partial_fit`
    does: close to the one-fit offset for shards of a few dozen images or
    more, not equal to it. The scores, maps and statistics are equal.

    Examples
    --------
    >>> import numpy as np
    >>> from skpatch import PaDiMDetector, merge_detectors
    >>> X = np.random.RandomState(0).normal(size=(60, 6, 2, 2))
    >>> shards = [PaDiMDetector(n_features=4, random_state=0, map_size=None).fit(part)
    ...           for part in np.array_split(X, 3)]
    >>> merged = merge_detectors(shards)
    >>> one_fit = PaDiMDetector(n_features=4, random_state=0, map_size=None).fit(X)
    >>> bool(np.allclose(merged.score_samples(X), one_fit.score_samples(X)))
    True
    """
    estimators = list(estimators)
    if not estimators:
        raise ValueError("merge_detectors needs at least one fitted estimator.")
    if all(isinstance(e, Pipeline) for e in estimators):
        for pipe in estimators[1:]:
            if len(pipe.steps) != len(estimators[0].steps):
                raise ValueError("the pipelines must have the same steps to be merged.")
            for (name, step), (other_name, other) in zip(
                estimators[0].steps[:-1], pipe.steps[:-1]
            ):
                if name != other_name or type(step) is not type(other):
                    raise ValueError("the pipelines must have the same steps to be merged.")
                if hasattr(step, "get_params"):
                    _check_same_params([step, other], f"the pipelines' {name!r} steps")
        detector = merge_detectors([pipe.steps[-1][1] for pipe in estimators])
        first = estimators[0]
        merged = clone(first)
        merged.steps = [(name, copy.deepcopy(step)) for name, step in first.steps[:-1]]
        merged.steps.append((first.steps[-1][0], detector))
        return merged
    if any(isinstance(e, Pipeline) for e in estimators):
        raise ValueError("merge_detectors takes detectors or pipelines, not a mix of both.")
    cls = type(estimators[0])
    if any(type(e) is not cls for e in estimators):
        names = sorted({type(e).__name__ for e in estimators})
        raise ValueError(f"merge_detectors needs detectors of one class, got {names}.")
    merger = next((m for klass, m in _MERGERS.items() if cls is klass), None)
    if merger is None:
        merger = getattr(cls, "_merge_fitted", None)  # a detector may implement its own
    if merger is None:
        reason = _NOT_MERGEABLE.get(
            cls.__name__, "merging is implemented for PaDiMDetector (Gaussian statistics)"
        )
        raise TypeError(f"{cls.__name__} fitted on shards cannot be merged: {reason}.")
    for estimator in estimators:
        check_is_fitted(estimator)
    _check_same_params(estimators, "the detectors")
    grids = {(e.n_features_in_, tuple(e.grid_shape_)) for e in estimators}
    if len(grids) > 1:
        raise ValueError(
            f"the detectors were fitted on embeddings of different shapes (channels, grid): "
            f"{sorted(grids)}; embed every shard with the same PatchEmbedder settings."
        )
    names = {
        None if getattr(e, "feature_names_in_", None) is None else tuple(e.feature_names_in_)
        for e in estimators
    }
    if len(names) > 1:
        # the statistics would add up different columns
        raise ValueError(
            "the detectors were fitted on data with different feature names (columns of "
            "a DataFrame, or none): give every shard the same columns in the same order."
        )
    return merger(estimators)
