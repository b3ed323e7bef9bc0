import pickle

import numpy as np
import pytest
import torch
from sklearn.utils.estimator_checks import parametrize_with_checks

from skpatch import PNIDetector, anomaly_map, make_pni_pipeline
from skpatch._memory_bank import greedy_coreset
from skpatch.detectors._pni import gather_neighborhoods, neighborhood_conv_weight, neighborhood_features

from _common import FAST_PARAMS, expected_failed_checks

FAST = {k: v for k, v in FAST_PARAMS["PNIDetector"].items() if k != "random_state"}


def embeddings(n=30, c=4, h=5, w=6, seed=0, dtype=np.float32):
    rng = np.random.RandomState(seed)
    x = rng.normal(size=(n, c, h, w)) + np.arange(h * w).reshape(1, 1, h, w) / (h * w)
    return x.astype(dtype)


@parametrize_with_checks(
    [
        PNIDetector(map_size=8, **FAST_PARAMS["PNIDetector"]),
        PNIDetector(map_size=8, calibration="in-sample", **FAST),
        PNIDetector(coreset_ratio=0.5, position_window=3, mlp_depth=0, random_state=0,
                    calibration="in-sample", **{**FAST, "n_dist": 4}),
    ],
    expected_failed_checks=expected_failed_checks,
)
def test_sklearn_compatible_on_2d_input(estimator, check):
    check(estimator)


def test_neighbourhood_vectors_exclude_the_centre_and_zero_pad():
    x = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).view(2, 3, 4, 5)
    f = neighborhood_features(x, 3)
    assert f.shape == (2 * 4 * 5, 3 * 8)
    # patch (image 1, row 2, col 3): its 8 neighbours, channels last, row-major
    p = 1 * 20 + 2 * 5 + 3
    window = x[1, :, 1:4, 2:5].permute(1, 2, 0).reshape(9, 3)
    expected = torch.cat([window[:4], window[5:]]).reshape(-1)
    torch.testing.assert_close(f[p], expected)
    # a corner patch has zeros where the window leaves the grid
    assert (f[0].view(8, 3)[:4] == 0).all()
    # the sampled training vectors are the same
    images, rows, cols = torch.tensor([1, 0]), torch.tensor([2, 0]), torch.tensor([3, 0])
    g = gather_neighborhoods(x, images, rows, cols, 3, torch.zeros(3), torch.ones(3))
    torch.testing.assert_close(g, f[[p, 0]])


@pytest.mark.parametrize("size", [1, 3, 5])
def test_first_layer_as_a_convolution_equals_the_unfolded_product(size):
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    coef = torch.randn(3 * (size * size - 1), 7, dtype=torch.float64)
    weight = neighborhood_conv_weight(coef, 3, size)
    conv = torch.nn.functional.conv2d(x, weight, padding=size // 2)
    torch.testing.assert_close(conv.permute(0, 2, 3, 1).reshape(-1, 7), neighborhood_features(x, size) @ coef)


def test_coresets_are_nested_greedy_picks():
    X = embeddings()
    det = PNIDetector(coreset_ratio=0.05, n_dist=10, n_epochs=1, mlp_width=32, map_size=None,
                      random_state=0)
    det.fit(X)
    n_patches = 30 * 5 * 6
    assert len(det.embedding_coreset_) == int(np.ceil(0.05 * n_patches))
    assert det.n_dist_ == 10 and det.tau_ == pytest.approx(1 / (2 * len(det.embedding_coreset_)))
    flat = X.transpose(0, 2, 3, 1).reshape(-1, 4)
    # every element is a training patch; C_dist is C_emb's first picks
    d = np.linalg.norm(det.embedding_coreset_[:, None] - flat[None], axis=2).min(1)
    assert d.max() < 1e-6
    np.testing.assert_array_equal(det.dist_assignment_[:10], np.arange(10))
    # each C_emb element is represented by its nearest C_dist element
    emb = det.embedding_coreset_
    dd = np.linalg.norm(emb[:, None] - emb[None, :10], axis=2)
    np.testing.assert_array_equal(det.dist_assignment_, dd.argmin(1))


def test_position_histogram_is_algorithm_1():
    X = embeddings()
    det = PNIDetector(coreset_ratio=0.05, n_dist=10, n_epochs=1, mlp_width=32, map_size=None,
                      random_state=0)
    det.fit(X)
    flat = X.transpose(0, 2, 3, 1).reshape(30, 30, 4)  # (N, P, C)
    cdist = det.embedding_coreset_[:10]
    nearest = np.linalg.norm(flat[:, :, None] - cdist[None, None], axis=3).argmin(2)  # (N, P)
    hist = np.zeros((30, 10))
    for p in range(30):
        hist[p] = np.bincount(nearest[:, p], minlength=10)
    np.testing.assert_allclose(det.position_prior_, hist / 30, atol=1e-6)
    # spreading over a 3 x 3 window sums the counts of the clipped window
    spread = PNIDetector(coreset_ratio=0.05, n_dist=10, n_epochs=1, mlp_width=32,
                         position_window=3,
                         map_size=None, random_state=0).fit(X)
    grid = hist.reshape(5, 6, 10)
    padded = np.pad(grid, ((1, 1), (1, 1), (0, 0)))
    summed = sum(padded[i:i + 5, j:j + 6] for i in range(3) for j in range(3)).reshape(30, 10)
    np.testing.assert_allclose(spread.position_prior_, summed / summed.sum(1, keepdims=True),
                               atol=1e-6)


def _reference_scores(det, x):
    """Patch scores from the definitions, in NumPy, position by position."""
    state = det._state(torch.device("cpu"), torch.float64)
    with torch.no_grad():
        mlp = det._neighborhood_probs(torch.as_tensor(x), state).numpy()  # (n, P, K)
    prob = 0.5 * (mlp + det.position_prior_[None])
    emb = det.embedding_coreset_.astype(np.float64)
    patches = x.transpose(0, 2, 3, 1).reshape(len(x), -1, x.shape[1])
    out = np.empty(patches.shape[:2])
    for i in range(len(x)):
        for p in range(patches.shape[1]):
            allowed = prob[i, p][det.dist_assignment_] > det.tau_
            d = np.linalg.norm(emb - patches[i, p], axis=1)
            nearest = d[allowed].min() if allowed.any() else d.max()
            out[i, p] = det.lam * nearest - np.log(det.lam)
    return out.reshape(len(x), *x.shape[2:])


@pytest.mark.parametrize("tau", [None, 0.05, 0.999])
def test_patch_scores_follow_the_definition(tau):
    X = embeddings(dtype=np.float64)
    test = embeddings(n=3, seed=1, dtype=np.float64) * 1.5
    det = PNIDetector(coreset_ratio=0.05, n_dist=10, n_epochs=2, mlp_width=32, tau=tau, lam=2.0,
                      map_size=None, sigma=0, random_state=0).fit(X)
    np.testing.assert_allclose(det.anomaly_map(test), _reference_scores(det, test), rtol=1e-6)
    # the image score is the maximum of the (blurred) map
    det.set_params(sigma=1.0, map_size=12)
    maps = det.anomaly_map(test)
    np.testing.assert_allclose(-det.score_samples(test), maps.reshape(3, -1).max(1), rtol=1e-6)


def test_blocks_of_patches_across_images_change_nothing(monkeypatch):
    # blocks of 7 patches straddle the images (30 patches each), in the
    # scoring and in the leave-one-out calibration that masks each image's own elements
    X, test = embeddings(n=40), embeddings(n=3, seed=1) * 1.5
    params = dict(map_size=None, sigma=0, **FAST_PARAMS["PNIDetector"])
    whole = PNIDetector(**params).fit(X)
    monkeypatch.setattr("skpatch.detectors._pni._PATCH_BLOCK", 7)
    blocks = PNIDetector(**params).fit(X)
    assert blocks.offset_ == whole.offset_  # a quantile of the leave-one-out scores
    np.testing.assert_array_equal(blocks.anomaly_map(test), whole.anomaly_map(test))


def test_threshold_one_falls_back_to_the_farthest_element():
    X = embeddings(dtype=np.float64)
    det = PNIDetector(coreset_ratio=0.05, n_dist=10, n_epochs=1, mlp_width=32, tau=0.999,
                      map_size=None, sigma=0, random_state=0).fit(X)
    test = embeddings(n=2, seed=3, dtype=np.float64)
    patches = test.transpose(0, 2, 3, 1).reshape(-1, 4)
    far = np.linalg.norm(patches[:, None] - det.embedding_coreset_[None], axis=2).max(1)
    np.testing.assert_allclose(det.anomaly_map(test).reshape(-1), far, rtol=1e-6)


def test_context_is_used_a_misplaced_patch_scores_higher():
    # Two kinds of patches: "a" on the left half, "b" on the right half. A "b"
    # patch on the left is a normal feature in the wrong place: the nearest-
    # neighbour distance (tau=0) cannot see it, the position and the
    # neighbourhood models can.
    rng = np.random.RandomState(0)
    a, b = np.array([1.0, 0, 0, 0]), np.array([0, 1.0, 0, 0])
    X = np.empty((40, 4, 6, 6))
    X[:, :, :, :3] = a[None, :, None, None]
    X[:, :, :, 3:] = b[None, :, None, None]
    X += 0.05 * rng.normal(size=X.shape)
    test = X[:1].copy()
    test[0, :, 2, 1] = b + 0.05 * rng.normal(size=4)
    common = dict(coreset_ratio=0.05, n_dist=8, n_epochs=20, mlp_width=32, batch_size=128,
                  map_size=None, sigma=0, random_state=0)
    pni = PNIDetector(**common).fit(X[1:])
    plain = PNIDetector(tau=0.0, **common).fit(X[1:])
    maps, plain_maps = pni.anomaly_map(test)[0], plain.anomaly_map(test)[0]
    assert maps[2, 1] > 5 * np.delete(maps.ravel(), 2 * 6 + 1).max()
    assert plain_maps[2, 1] < 2 * np.delete(plain_maps.ravel(), 2 * 6 + 1).max()


def test_leave_one_out_excludes_own_elements_and_counts():
    X = embeddings(n=40)
    loo = PNIDetector(map_size=None, **FAST_PARAMS["PNIDetector"]).fit(X)
    ins = PNIDetector(map_size=None, calibration="in-sample", **FAST_PARAMS["PNIDetector"]).fit(X)
    np.testing.assert_array_equal(loo.embedding_coreset_, ins.embedding_coreset_)
    # leaving an image out can only raise its scores; it raises the offset
    assert loo.offset_ < ins.offset_
    # in-sample, the training images are flagged at the contamination rate
    assert (ins.predict(X) == -1).mean() == pytest.approx(0.1)
    new = embeddings(n=200, seed=7)
    assert (loo.predict(new) == -1).mean() < (ins.predict(new) == -1).mean()


def test_same_seed_same_model_and_pickle_round_trip():
    X = embeddings()
    a = PNIDetector(map_size=None, **FAST_PARAMS["PNIDetector"]).fit(X)
    b = PNIDetector(map_size=None, **FAST_PARAMS["PNIDetector"]).fit(X)
    np.testing.assert_array_equal(a.score_samples(X), b.score_samples(X))
    c = pickle.loads(pickle.dumps(a))
    np.testing.assert_array_equal(a.anomaly_map(X[:3]), c.anomaly_map(X[:3]))
    for name in ("embedding_coreset_", "position_prior_", "dist_assignment_"):
        assert isinstance(getattr(a, name), np.ndarray)
    assert all(isinstance(w, np.ndarray) for w in a.mlp_coefs_ + a.mlp_intercepts_)
    other = PNIDetector(map_size=None, **{**FAST_PARAMS["PNIDetector"], "random_state": 1}).fit(X)
    assert not np.array_equal(a.embedding_coreset_, other.embedding_coreset_)


def test_mlp_learns_and_folded_batch_norm_matches():
    X = embeddings()
    det = PNIDetector(map_size=None, n_dist=10, coreset_ratio=0.05, n_epochs=8, mlp_width=32,
                      batch_size=64, random_state=0).fit(X)
    assert det.mlp_loss_[-1] < det.mlp_loss_[0]
    assert [c.shape for c in det.mlp_coefs_] == [(4 * 8, 32), (32, 32), (32, 10)]
    # the folded network is the eval-mode module
    x = torch.as_tensor(X[:2]).float()
    state = det._state(torch.device("cpu"), torch.float32)
    probs = det._neighborhood_probs(x, state)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 30))
    # the convolutions compute the folded MLP on every unfolded window
    standardized = (x - torch.as_tensor(det.feature_mean_).view(1, -1, 1, 1)) / torch.as_tensor(
        det.feature_scale_
    ).view(1, -1, 1, 1)
    hidden = neighborhood_features(standardized, 3).numpy()
    for i, (coef, intercept) in enumerate(zip(det.mlp_coefs_, det.mlp_intercepts_)):
        hidden = hidden @ coef + intercept
        if i < len(det.mlp_coefs_) - 1:
            hidden = np.maximum(hidden, 0)
    expected = torch.softmax(torch.as_tensor(hidden), dim=1).view(2, 30, 10)
    torch.testing.assert_close(probs, expected, rtol=1e-4, atol=1e-6)


def test_greedy_order_matches_memory_bank():
    X = embeddings()
    det = PNIDetector(map_size=None, coreset_ratio=0.05, n_dist=10, n_epochs=1, mlp_width=32,
                      random_state=0)
    det.fit(X)
    flat = X.transpose(0, 2, 3, 1).reshape(-1, 4)
    rng = np.random.RandomState(0)
    picks = greedy_coreset(flat, len(det.embedding_coreset_), random_state=rng.randint(2**31 - 1))
    np.testing.assert_array_equal(det.embedding_coreset_, flat[picks.numpy()])


def test_bad_parameters():
    X = embeddings()
    with pytest.raises(ValueError, match="odd"):
        PNIDetector(neighborhood_size=2).fit(X)
    with pytest.raises(ValueError, match="at least 2 samples"):
        PNIDetector().fit(X[:1])


def test_pipeline_refine_must_be_a_boolean():
    # A string such as "false" is a true value: it must not switch refinement on.
    with pytest.raises(TypeError, match="refine must be True or False, got 'false'"):
        make_pni_pipeline(refine="false", embedder_params={"weights": None})


def test_pipeline_on_images(images):
    pipe = make_pni_pipeline(
        embedder_params={"weights": None, "image_size": 32, "crop_size": None},
        map_size=32, **FAST_PARAMS["PNIDetector"],
    )
    assert pipe[0].layers == ("stage2", "stage4") and pipe[0].pool_size == 3
    pipe.fit(images)
    maps = anomaly_map(pipe, images[:2])
    assert maps.shape == (2, 32, 32)
    np.testing.assert_allclose(-pipe.score_samples(images[:2]), maps.reshape(2, -1).max(1),
                               rtol=1e-5)
