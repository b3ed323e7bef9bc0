import numpy as np
import pytest
import torch

from skpatch import _gaussian


def batch_moments(x):
    """Reference: count, mean and scatter of one batch (P, n, d)."""
    mean = x.mean(dim=1)
    centered = x - mean.unsqueeze(1)
    return x.shape[1], mean, centered.transpose(1, 2) @ centered


def _x(seed=0, positions=5, n=30, d=4):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(positions, n, d, generator=g, dtype=torch.float64) * 3 + 1


def test_reference_moments_match_numpy_cov():
    x = _x()
    count, mean, scatter = batch_moments(x)
    assert count == 30
    for p in range(x.shape[0]):
        np.testing.assert_allclose(mean[p], x[p].mean(0))
        np.testing.assert_allclose(scatter[p] / (count - 1), np.cov(x[p].T.numpy()))


@pytest.mark.parametrize("merge", [_gaussian.merge_moments, _gaussian.merge_moments_])
def test_merge_equals_one_shot(merge):
    x = _x()
    merged = None
    for part in (x[:, :1], x[:, 1:7], x[:, 7:]):
        merged = merge(merged, batch_moments(part))
    whole = batch_moments(x)
    assert merged[0] == whole[0]
    np.testing.assert_allclose(merged[1], whole[1])
    np.testing.assert_allclose(merged[2], whole[2])


def test_in_place_merge_updates_the_first_moments_only():
    first, second = batch_moments(_x(0)), batch_moments(_x(1))
    second_copy = [t.clone() if torch.is_tensor(t) else t for t in second]
    expected = _gaussian.merge_moments(first, second)
    merged = _gaussian.merge_moments_(first, second)
    assert merged[1] is first[1] and merged[2] is first[2]
    np.testing.assert_allclose(merged[2], expected[2])
    for a, b in zip(second, second_copy):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("held", [slice(0, 1), slice(3, 10), slice(1, 29)])
def test_downdate_removes_a_subset(held):
    x = _x()
    kept = torch.ones(x.shape[1], dtype=torch.bool)
    kept[held] = False
    total = batch_moments(x)
    total_copy = [t.clone() if torch.is_tensor(t) else t for t in total]
    part = batch_moments(x[:, held])
    count, mean, scatter = _gaussian.downdate_moments_(total, part)
    expected = batch_moments(x[:, kept])
    assert count == expected[0]
    np.testing.assert_allclose(mean, expected[1])
    np.testing.assert_allclose(scatter, expected[2], atol=1e-10)
    assert scatter is part[2]  # in the part's memory; the total is unchanged
    for a, b in zip(total, total_copy):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="cannot remove 30 samples from 30"):
        _gaussian.downdate_moments_(total, batch_moments(x))


def test_downdate_declines_where_the_part_holds_nearly_all_the_scatter():
    x = _x(positions=3)
    x[1, 0] *= 1e3  # one sample dwarfs the others at one position
    total, part = batch_moments(x), batch_moments(x[:, :1])
    part_scatter = part[2].clone()
    assert _gaussian.downdate_moments_(total, part) is None
    np.testing.assert_array_equal(part[2], part_scatter)  # nothing written
    assert _gaussian.downdate_moments_(total, part, min_share=0) is not None


def test_regularized_covariance_is_eq1():
    x = _x()
    count, _, scatter = batch_moments(x)
    cov = _gaussian.regularized_covariance(scatter, count, 0.01)
    np.testing.assert_allclose(cov[2], np.cov(x[2].T.numpy()) + 0.01 * np.eye(4))


def test_precision_cholesky_and_mahalanobis():
    x = _x()
    count, mean, scatter = batch_moments(x)
    cov = _gaussian.regularized_covariance(scatter, count, 0.01)
    prec_chol = _gaussian.precision_cholesky(cov)
    assert torch.allclose(prec_chol, prec_chol.triu())
    for p in range(x.shape[0]):
        precision = np.linalg.inv(cov[p].numpy())
        np.testing.assert_allclose(prec_chol[p] @ prec_chol[p].T, precision, rtol=1e-8)
    test = _x(seed=1, n=3)
    dist = _gaussian.mahalanobis(test, mean, prec_chol)
    for p in range(x.shape[0]):
        precision = np.linalg.inv(cov[p].numpy())
        for i in range(3):
            diff = (test[p, i] - mean[p]).numpy()
            assert np.isclose(dist[p, i].item(), np.sqrt(diff @ precision @ diff))


def test_singular_covariance_error_names_epsilon():
    cov = torch.zeros(2, 3, 3, dtype=torch.float64)
    try:
        _gaussian.precision_cholesky(cov)
    except ValueError as exc:
        assert "epsilon" in str(exc)
    else:  # pragma: no cover
        raise AssertionError("no error")


@pytest.mark.parametrize("d", [26, 61, 100])
def test_blocked_precision_cholesky_equals_lapack(d):
    # Above _LAPACK_BLOCK the factor is built from halves (odd sizes too).
    assert d > _gaussian._LAPACK_BLOCK
    x = _x(positions=3, n=2 * d, d=d)
    count, _, scatter = batch_moments(x)
    cov = _gaussian.regularized_covariance(scatter, count, 0.01)
    prec_chol = _gaussian.precision_cholesky(cov)
    expected = torch.linalg.inv(torch.linalg.cholesky(cov)).mT
    assert torch.equal(prec_chol, prec_chol.triu())
    np.testing.assert_allclose(prec_chol, expected, atol=1e-10)


def test_blocked_precision_cholesky_names_a_failure_in_the_second_half():
    # Singular only through the Schur complement of the trailing block.
    cov = torch.eye(60, dtype=torch.float64).repeat(3, 1, 1)
    cov[1, 0, 40] = cov[1, 40, 0] = 1
    with pytest.raises(ValueError, match="position 1 is not positive definite"):
        _gaussian.precision_cholesky(cov, overwrite=True)
    # the message reports the variance read before the matrices were overwritten
    cov = 5 * torch.eye(60, dtype=torch.float64).repeat(3, 1, 1)
    cov[2, 0, 40] = cov[2, 40, 0] = 5
    with pytest.raises(ValueError, match="position 2 .* largest variance is 5"):
        _gaussian.precision_cholesky(cov, overwrite=True)


@pytest.mark.parametrize("n_threads", [1, 2])
def test_precision_cholesky_in_chunks_of_positions(monkeypatch, torch_threads, n_threads):
    torch_threads(n_threads)  # 2: the chunks go to two single-threaded workers
    d = 30
    x = _x(positions=5, n=2 * d, d=d)
    count, _, scatter = batch_moments(x)
    cov = _gaussian.regularized_covariance(scatter, count, 0.01)
    whole = _gaussian.precision_cholesky(cov)  # one chunk: 5 x 7 kB < 8 MB
    # chunks of two matrices: positions 0-1, 2-3, then 4; in inference mode,
    # as detectors factor (the workers must be in it too, to write in place)
    monkeypatch.setattr(_gaussian, "_FACTOR_CHUNK_BYTES", 2 * d * d * cov.element_size())
    with torch.inference_mode():
        chunked = _gaussian.precision_cholesky(cov.clone(), overwrite=True)
    torch.testing.assert_close(chunked, whole, rtol=0, atol=0)
    assert torch.get_num_threads() == n_threads  # restored after the workers
    # a failure in a later chunk names its own position
    cov[3, 0, 20] = cov[3, 20, 0] = 1e3
    with pytest.raises(ValueError, match="position 3 is not positive definite"):
        _gaussian.precision_cholesky(cov)


@pytest.mark.parametrize("d", [3, 61])
def test_precision_cholesky_overwrite_reuses_the_covariance(d):
    x = _x(positions=3, n=2 * d, d=d)
    count, _, scatter = batch_moments(x)
    cov = _gaussian.regularized_covariance(scatter, count, 0.01)
    original = cov.clone()
    copied = _gaussian.precision_cholesky(cov)
    assert torch.equal(cov, original)  # by default the input is kept
    in_place = _gaussian.precision_cholesky(cov, overwrite=True)
    assert in_place.data_ptr() == cov.data_ptr() and in_place.is_contiguous()
    torch.testing.assert_close(in_place, copied, rtol=0, atol=0)


def test_chunked_moments_continue_from_start_in_place():
    x = _x() + 100
    first = batch_moments(x[:, :7])
    mean, scatter = first[1].clone(), first[2].clone()
    original = x.clone()
    count, mean_out, scatter_out = _gaussian.chunked_moments(
        [x[:, 7:20], x[:, 20:]], start=(7, mean, scatter)
    )
    assert torch.equal(x, original)  # the chunks are not modified
    whole = batch_moments(x)
    assert count == whole[0] and scatter_out is scatter
    np.testing.assert_array_equal(mean_out, mean)  # updated in place
    np.testing.assert_allclose(mean, whole[1])
    np.testing.assert_allclose(scatter, whole[2], rtol=1e-9)


def test_moments_and_distances_in_position_blocks_with_channel_index():
    # More positions than one block (the last one partial), and a channel
    # subset gathered from a transposed view of (n, P, C) embeddings.
    n_positions = 2 * _gaussian._POSITION_BLOCK + 7
    g = torch.Generator().manual_seed(0)
    embeddings = torch.randn(12, n_positions, 9, generator=g, dtype=torch.float64) + 5
    x = embeddings.transpose(0, 1)  # (P, n, C), not contiguous
    index = torch.tensor([0, 3, 4, 8])
    count, mean, scatter = _gaussian.chunked_moments([x[:, :5], x[:, 5:]], index=index)
    expected = batch_moments(x[:, :, index])
    assert count == 12
    np.testing.assert_allclose(mean, expected[1])
    np.testing.assert_allclose(scatter, expected[2], rtol=1e-9, atol=1e-10)
    cov = _gaussian.regularized_covariance(scatter, count, 0.01)
    prec_chol = _gaussian.precision_cholesky(cov)
    distances = _gaussian.mahalanobis(x, mean, prec_chol, index)
    reference = torch.linalg.vector_norm(
        (x[:, :, index] - mean.unsqueeze(1)) @ prec_chol, dim=2
    )
    assert distances.shape == (n_positions, 12)
    np.testing.assert_allclose(distances, reference, rtol=1e-10)


def test_chunked_moments_equal_one_shot():
    x = _x() + 100  # a large offset: shifted sums must stay accurate
    count, mean, scatter = _gaussian.chunked_moments([x[:, :4], x[:, 4:5], x[:, 5:]])
    whole = batch_moments(x)
    assert count == whole[0]
    np.testing.assert_allclose(mean, whole[1])
    np.testing.assert_allclose(scatter, whole[2], rtol=1e-9)
