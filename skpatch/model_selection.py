"""Cross-validation for anomaly detectors, which learn from normal images.

scikit-learn's splitters put every sample in a training fold once: for a
detector that would train on the anomalous images it must detect. The
one-class splitter here trains on normal images only (or on normal images
plus a chosen share of anomalous ones, for the noisy-training protocol of
SoftPatch and RPaDiM §5.1) and tests on held-out normal images plus the
anomalous images, so that
``GridSearchCV(pipeline, grid, cv=OneClassKFold(), scoring=...)`` tunes a
detector the way it is evaluated.
"""

import numbers

import numpy as np
from sklearn.model_selection import GroupKFold, KFold
from sklearn.model_selection._split import BaseCrossValidator
from sklearn.utils import check_random_state, indexable

from .metrics import _check_labels, _target_labels

__all__ = ["OneClassKFold"]


class OneClassKFold(BaseCrossValidator):
    """K-fold cross-validation that trains on normal samples only.

    The normal samples (label ``0``) are split into ``n_splits`` folds as
    :class:`~sklearn.model_selection.KFold` does (or
    :class:`~sklearn.model_selection.GroupKFold` when ``groups`` are given).
    Split ``k`` trains on the normal samples outside fold ``k`` and tests on
    fold ``k`` plus the anomalous samples (label ``1``). Every normal sample
    is tested once; the anomalous samples, never trained on, are tested in
    every split. With ``contamination > 0`` (the noisy-training protocol of
    SoftPatch and RPaDiM §5.1), each split moves a random subset of the
    anomalous samples into its training fold, so that they make up
    ``contamination`` of it, and out of its test fold.

    Parameters
    ----------
    n_splits : int, default=5
        Number of folds of the normal samples; at least 2.
    contamination : float in [0, 1), default=0.0
        Share of anomalous samples in each training fold:
        ``round(contamination * n_normal_train / (1 - contamination))``
        anomalous samples join the ``n_normal_train`` normal ones (the rule
        of :func:`skpatch.datasets.make_contaminated_split`). 0 trains on
        normal samples only.
    shuffle : bool, default=False
        Shuffle the normal samples (or their groups) before splitting them
        into folds, as in :class:`~sklearn.model_selection.KFold`.
    random_state : int, RandomState instance or None, default=None
        Seeds the shuffling and the choice of the anomalous training samples.
        Use an int for splits that are the same at every call of
        :meth:`split`.

    See Also
    --------
    skpatch.metrics.make_targets : Labels and masks in one ``y``.
    skpatch.metrics.image_auroc_scorer : A scorer for these splits.
    sklearn.model_selection.KFold : The fold rule for the normal samples.

    Notes
    -----
    **Labels.** ``y`` holds skpatch's labels, ``0`` = normal and ``1`` =
    anomalous (``bool`` accepted), or is the structured array of
    :func:`skpatch.metrics.make_targets` (labels and masks). scikit-learn's
    ``+1`` / ``-1`` outlier labels are refused: convert them with
    ``y = (y == -1).astype(int)``. The detectors ignore ``y``.

    **Groups.** With ``groups`` (e.g. the part or the production batch of
    each image), the normal samples of a group all fall in the same fold,
    the contaminating anomalous samples are drawn by whole groups among the
    groups without a tested normal sample, and an anomalous sample whose
    group has a sample in the training fold is left out of the test fold, so
    that no group is on both sides.

    **Refit.** ``GridSearchCV(refit=True)`` refits the best candidate on all
    of ``X``, anomalous samples included. Pass ``refit=False`` and fit the
    best parameters on the normal samples yourself::

        search = GridSearchCV(pipe, grid, cv=OneClassKFold(), refit=False, ...)
        search.fit(X, y)
        best = clone(pipe).set_params(**search.best_params_).fit(X[y == 0])

    Examples
    --------
    >>> import numpy as np
    >>> from skpatch.model_selection import OneClassKFold
    >>> y = np.array([0, 0, 0, 0, 1, 1])
    >>> for train, test in OneClassKFold(n_splits=2).split(np.zeros(6), y):
    ...     print(train, test)
    [2 3] [0 1 4 5]
    [0 1] [2 3 4 5]
    >>> cv = OneClassKFold(n_splits=2, contamination=0.3, random_state=0)
    >>> for train, test in cv.split(np.zeros(6), y):
    ...     print(train, test)
    [2 3 5] [0 1 4]
    [0 1 4] [2 3 5]
    """

    # Routed like GroupKFold's when metadata routing is enabled.
    __metadata_request__split = {"groups": True}

    def __init__(self, n_splits=5, *, contamination=0.0, shuffle=False, random_state=None):
        if not isinstance(n_splits, numbers.Integral) or isinstance(n_splits, bool):
            raise ValueError(f"n_splits must be an int, got {n_splits!r}.")
        if n_splits < 2:
            raise ValueError(f"n_splits must be at least 2, got {n_splits}.")
        if not isinstance(contamination, numbers.Real) or not 0 <= contamination < 1:
            raise ValueError(f"contamination must be a float in [0, 1), got {contamination!r}.")
        if not isinstance(shuffle, bool):
            raise TypeError(f"shuffle must be True or False, got {shuffle!r}.")
        if not shuffle and random_state is not None and not contamination:
            raise ValueError(
                "random_state has no effect with shuffle=False and contamination=0; "
                "leave it None or set shuffle=True."
            )
        self.n_splits = int(n_splits)
        self.contamination = contamination
        self.shuffle = shuffle
        self.random_state = random_state

    def get_n_splits(self, X=None, y=None, groups=None):
        """Return the number of splits.

        Parameters
        ----------
        X : object
            Ignored.
        y : object
            Ignored.
        groups : object
            Ignored.

        Returns
        -------
        n_splits : int
            ``n_splits``.
        """
        return self.n_splits

    def _iter_test_indices(self, X=None, y=None, groups=None):
        # BaseCrossValidator's abstract method: the test folds are not a
        # partition here (anomalies are in every one), so split() is overridden.
        raise NotImplementedError

    def split(self, X, y, groups=None):
        """Generate indices of the training and test samples of each split.

        Parameters
        ----------
        X : array-like or sequence of length n_samples
            Samples (images, paths or embeddings); only their number is used.
        y : array-like of shape (n_samples,)
            ``0`` = normal, ``1`` = anomalous, or the output of
            :func:`skpatch.metrics.make_targets`.
        groups : array-like of shape (n_samples,), default=None
            Group of each sample; a group is never on both sides of a split.

        Yields
        ------
        train : ndarray of int
            Training indices, sorted: normal samples (plus the contaminating
            anomalous ones).
        test : ndarray of int
            Test indices, sorted: held-out normal samples and anomalous ones.
        """
        if y is None:
            raise ValueError(
                "OneClassKFold needs labels y (0 = normal, 1 = anomalous) to split normal "
                "from anomalous samples: pass y to split() / GridSearchCV.fit."
            )
        X, y, groups = indexable(X, y, groups)
        labels = _check_labels(_target_labels(y), name="y", require_both=False)
        normal = np.flatnonzero(labels == 0)
        anomalous = np.flatnonzero(labels == 1)
        if len(anomalous) == 0:
            raise ValueError("y has no anomalous sample (label 1): the test folds need some.")
        if groups is not None:
            groups = np.asarray(groups)
            n_units, unit = len(np.unique(groups[normal])), "groups of normal samples"
        else:
            n_units, unit = len(normal), "normal samples"
        if self.n_splits > n_units:
            raise ValueError(
                f"n_splits={self.n_splits} is more than the {n_units} {unit}: each fold needs one."
            )
        rng = check_random_state(self.random_state)
        fold_rng = rng if self.shuffle else None
        if groups is None:
            folds = KFold(self.n_splits, shuffle=self.shuffle, random_state=fold_rng).split(normal)
        else:
            folds = GroupKFold(self.n_splits, shuffle=self.shuffle, random_state=fold_rng).split(
                normal, groups=groups[normal]
            )
        for train_pos, test_pos in folds:
            train_normal, test_normal = normal[train_pos], normal[test_pos]
            candidates = anomalous
            if groups is not None:
                # a contaminant must not share a group with a tested normal sample
                candidates = anomalous[~np.isin(groups[anomalous], groups[test_normal])]
            injected = self._contaminants(len(train_normal), candidates, groups, rng)
            train = np.sort(np.concatenate([train_normal, injected]))
            test_anomalous = np.setdiff1d(anomalous, injected)
            if groups is not None:
                test_anomalous = test_anomalous[~np.isin(groups[test_anomalous], groups[train])]
            if len(test_anomalous) == 0:
                raise ValueError(
                    "a test fold would hold no anomalous sample: lower contamination, or "
                    "use groups that do not put every anomalous sample with training ones."
                )
            yield train, np.sort(np.concatenate([test_normal, test_anomalous]))

    def _contaminants(self, n_train_normal, anomalous, groups, rng):
        """Anomalous samples (among ``anomalous``) moved into a training fold (noisy protocol)."""
        n_wanted = int(round(self.contamination * n_train_normal / (1 - self.contamination)))
        if n_wanted == 0:
            return np.empty(0, dtype=anomalous.dtype)
        if n_wanted >= len(anomalous):
            raise ValueError(
                f"contamination={self.contamination} needs {n_wanted} anomalous training "
                f"samples per split but only {len(anomalous)} can be drawn (outside the "
                "groups of the tested normal samples), and at least one must stay in the "
                "test fold."
            )
        if groups is None:
            return np.sort(rng.choice(anomalous, n_wanted, replace=False))
        # Whole groups, in a random order, until there are enough samples.
        chosen = []
        for group in rng.permutation(np.unique(groups[anomalous])):
            chosen.extend(anomalous[groups[anomalous] == group])
            if len(chosen) >= n_wanted:
                break
        return np.sort(np.asarray(chosen, dtype=anomalous.dtype))
