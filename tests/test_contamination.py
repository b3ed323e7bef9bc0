import numpy as np
import pytest

from skpatch.datasets import make_contaminated_split


def _data(n_train=90, n_normal_test=20, n_anomalous_test=30):
    # every image holds its own id, so that moves can be traced
    X_train = np.arange(n_train)[:, None, None] * np.ones((1, 4, 4))
    n_test = n_normal_test + n_anomalous_test
    X_test = 1000 + np.arange(n_test)[:, None, None] * np.ones((1, 4, 4))
    y_test = np.r_[np.zeros(n_normal_test, int), np.ones(n_anomalous_test, int)]
    y_test = y_test[np.random.RandomState(0).permutation(n_test)]
    masks = X_test.astype(int) % 2 == 0
    return X_train, X_test, y_test, masks


def test_protocol_counts_and_moves():
    X_train, X_test, y_test, _ = _data()
    X_tr, X_te, y_tr, y_te = make_contaminated_split(
        X_train, X_test, y_test, contamination=0.1, random_state=0
    )
    # 10 % of the final training set: 10 anomalous images added to the 90 normal ones
    assert len(X_tr) == 100 and y_tr.sum() == 10 and y_tr.dtype == np.int64
    ids = X_tr[:, 0, 0].astype(int)
    # all normal images kept, in their order; the anomalous ones are test anomalies
    np.testing.assert_array_equal(ids[y_tr == 0], np.arange(90))
    moved = ids[y_tr == 1] - 1000
    assert (y_test[moved] == 1).all()
    # they left the test set, which keeps its order and labels
    assert len(X_te) == 40 and y_te.sum() == 20
    left = X_te[:, 0, 0].astype(int) - 1000
    np.testing.assert_array_equal(left, np.setdiff1d(np.arange(50), moved))
    np.testing.assert_array_equal(y_te, y_test[left])


def test_reproducible_nested_and_masks_follow():
    X_train, X_test, y_test, masks = _data()
    runs = {
        c: make_contaminated_split(
            X_train, X_test, y_test, masks_test=masks, contamination=c, random_state=3
        )
        for c in (0.1, 0.2)
    }
    again = make_contaminated_split(
        X_train, X_test, y_test, masks_test=masks, contamination=0.1, random_state=3
    )
    for a, b in zip(runs[0.1], again):
        np.testing.assert_array_equal(a, b)
    moved = {c: set(r[0][r[2] == 1, 0, 0].astype(int)) for c, r in runs.items()}
    assert len(moved[0.2]) == round(0.2 * 90 / 0.8) and moved[0.1] < moved[0.2]
    X_te, masks_te = runs[0.2][1], runs[0.2][4]
    np.testing.assert_array_equal(masks_te, X_te.astype(int) % 2 == 0)
    other = make_contaminated_split(X_train, X_test, y_test, contamination=0.1, random_state=4)
    assert set(other[0][other[2] == 1, 0, 0].astype(int)) != moved[0.1]


def test_zero_contamination_and_lists():
    X_train, X_test, y_test, _ = _data()
    X_tr, X_te, y_tr, y_te = make_contaminated_split(X_train, X_test, y_test, contamination=0)
    np.testing.assert_array_equal(X_tr, X_train)
    np.testing.assert_array_equal(X_te, X_test)
    assert not y_tr.any()
    paths = [f"test_{i}.png" for i in range(50)]
    train_paths = [f"train_{i}.png" for i in range(90)]
    X_tr, X_te, y_tr, _ = make_contaminated_split(train_paths, paths, y_test, contamination=0.2)
    assert isinstance(X_tr, list) and isinstance(X_te, list)
    assert len(X_tr) == 90 + 22 and len(X_te) == 50 - 22
    assert all(p.startswith("test_") for p, y in zip(X_tr, y_tr) if y == 1)


def test_errors():
    X_train, X_test, y_test, masks = _data()
    with pytest.raises(ValueError, match="test set has 30 and must keep at least one"):
        make_contaminated_split(X_train, X_test, y_test, contamination=0.3)
    with pytest.raises(ValueError, match=r"contamination must be a float in \[0, 1\)"):
        make_contaminated_split(X_train, X_test, y_test, contamination=1.0)
    with pytest.raises(ValueError, match="only 0"):
        make_contaminated_split(X_train, X_test, 2 * y_test - 1)
    with pytest.raises(ValueError, match="one label per test image"):
        make_contaminated_split(X_train, X_test, y_test[:-1])
    with pytest.raises(ValueError, match="masks_test has 49 masks for 50"):
        make_contaminated_split(X_train, X_test, y_test, masks_test=masks[:-1])
