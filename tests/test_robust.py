import warnings

import numpy as np
import pytest
import torch
from scipy.optimize import minimize
from sklearn.neighbors import LocalOutlierFactor

from skpatch import _robust


def _x(seed=0, positions=4, n=40, d=5, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(positions, n, d, generator=g, dtype=torch.float64) * 2 + 3
    return x.to(dtype)


def _sklearn_lof(points, k):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # its duplicate warning
        return -LocalOutlierFactor(n_neighbors=k).fit(points).negative_outlier_factor_


@pytest.mark.parametrize("k", [1, 3, 5])
def test_lof_matches_sklearn_per_position(k):
    x = _x()
    x[1, :3] = x[1, 3]  # duplicates: zero distances
    x[2, 0] += 15  # an isolated patch
    lof = _robust.local_outlier_factor(x, k)
    assert lof.shape == (4, 40)
    for p in range(4):
        np.testing.assert_allclose(lof[p].numpy(), _sklearn_lof(x[p].numpy(), k), rtol=1e-9)
    assert lof[2, 0] == lof[2].max()


def test_lof_float32_and_clipped_k():
    x = _x()
    lof32 = _robust.local_outlier_factor(x.float(), 3)
    np.testing.assert_allclose(lof32.numpy(), _robust.local_outlier_factor(x, 3).numpy(), rtol=1e-4)
    # k >= n is clipped to n - 1, as scikit-learn does
    small = x[:, :6]
    np.testing.assert_allclose(
        _robust.local_outlier_factor(small, 10)[0].numpy(), _sklearn_lof(small[0].numpy(), 5)
    )
    with pytest.raises(ValueError, match="at least 2 samples"):
        _robust.local_outlier_factor(x[:, :1], 1)


def test_distances_exact_zero_for_duplicates():
    x = _x(dtype=torch.float32) * 100  # large norms: Gram-form rounding is large
    x[:, 1] = x[:, 0]
    dist = _robust.pairwise_distances(x)
    assert (dist[:, 0, 1] == 0).all() and (dist.diagonal(dim1=1, dim2=2) == 0).all()
    ref = torch.cdist(x.double(), x.double())
    torch.testing.assert_close(dist.double(), ref, rtol=1e-4, atol=1e-2)
    knn_dist, knn = _robust.nearest_neighbors(x, 3)
    assert (knn_dist[:, 0, 0] == 0).all() and (knn[:, 0, 0] == 1).all()
    assert (knn_dist[:, 1, 0] == 0).all() and (knn[:, 1, 0] == 0).all()


def test_nearest_neighbors_match_brute_force():
    x = _x()
    knn_dist, knn = _robust.nearest_neighbors(x, 4)
    ref = torch.cdist(x, x)
    ref.diagonal(dim1=1, dim2=2).fill_(float("inf"))
    ref_dist, ref_idx = ref.topk(4, dim=2, largest=False)
    torch.testing.assert_close(knn_dist, ref_dist)
    assert torch.equal(knn, ref_idx)


def test_quantile_threshold_and_trim_mask():
    scores = _x(d=1)[..., 0].abs()
    assert float(_robust.quantile_threshold(scores, 0.85)) == pytest.approx(
        np.quantile(scores.numpy(), 0.85)
    )
    keep = _robust.trim_mask(scores, _robust.quantile_threshold(scores, 0.85), min_keep=0)
    assert keep.float().mean() == pytest.approx(0.85, abs=0.01)
    # the floor keeps the min_keep lowest scores of every position
    scores[0] += 100
    keep = _robust.trim_mask(scores, _robust.quantile_threshold(scores, 0.5), min_keep=20)
    assert keep.sum(1).min() >= 20
    assert keep[0].sum() == 20
    assert scores[0][keep[0]].max() <= scores[0][~keep[0]].min()


def test_geometric_median_minimizes_sum_of_distances():
    x = _x()
    median, n_iter = _robust.geometric_median(x, max_iter=500, tol=1e-10)
    assert 1 < n_iter < 500
    for p in range(x.shape[0]):
        points = x[p].numpy()

        def objective(z, points=points):
            return np.linalg.norm(points - z, axis=1).sum()

        ref = minimize(objective, points.mean(0), method="BFGS", options={"gtol": 1e-10})
        assert objective(median[p].numpy()) <= ref.fun + 1e-9
        np.testing.assert_allclose(median[p].numpy(), ref.x, atol=1e-4)


def test_geometric_median_weights_select_patches_and_resist_outliers():
    x = _x()
    keep = torch.ones(x.shape[:2], dtype=torch.bool)
    keep[:, :10] = False
    masked, _ = _robust.geometric_median(x, keep, tol=1e-9)
    subset, _ = _robust.geometric_median(x[:, 10:], tol=1e-9)
    torch.testing.assert_close(masked, subset)
    # 20 % far outliers move the mean by ~20, the median by little
    x[:, :8] += 100
    median, _ = _robust.geometric_median(x)
    clean_center = torch.full((5,), 3.0, dtype=x.dtype)
    assert (median - clean_center).norm(dim=1).max() < 2
    assert (x.mean(1) - clean_center).norm(dim=1).min() > 15


def test_geometric_median_at_a_data_point_vardi_zhang():
    # Half the weight on one point: the median is that point, which plain
    # Weiszfeld reaches only by dividing by a zero distance.
    x = _x(n=12, d=3)
    x[:, :6] = torch.tensor([1.0, -2.0, 0.5], dtype=x.dtype)
    median, _ = _robust.geometric_median(x, max_iter=200, tol=1e-12)
    assert torch.isfinite(median).all()
    torch.testing.assert_close(median, x[:, 0], atol=1e-6, rtol=0)
    # every point identical: the median is the point, in one step
    same = x[:, :1].expand(-1, 5, -1).contiguous()
    median, n_iter = _robust.geometric_median(same)
    torch.testing.assert_close(median, x[:, 0])
    assert n_iter == 1


def test_geometric_median_one_dimension_is_the_median():
    x = _x(n=41, d=1)
    median, _ = _robust.geometric_median(x, max_iter=1000, tol=1e-12)
    expected = np.median(x[..., 0].numpy(), axis=1)
    np.testing.assert_allclose(median[:, 0].numpy(), expected, atol=1e-6)


def test_scatter_about_center():
    x = _x()
    center = torch.randn(4, 5, dtype=x.dtype)
    weights = (torch.arange(40) % 3 != 0).expand(4, 40)
    count, scatter = _robust.scatter_about(x, center, weights)
    for p in range(4):
        diff = (x[p] - center[p])[weights[p]].numpy()
        np.testing.assert_allclose(scatter[p].numpy(), diff.T @ diff)
        assert count[p] == weights[p].sum()
