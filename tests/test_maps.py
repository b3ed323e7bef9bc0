import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from skpatch._maps import gaussian_blur, gaussian_kernel1d, postprocess, upsample


@pytest.mark.parametrize("shape", [(2, 224, 224), (1, 5, 7), (3, 1, 1), (1, 40, 9)])
@pytest.mark.parametrize("sigma", [1.0, 4.0])
def test_blur_matches_scipy_reflect(shape, sigma):
    maps = np.random.RandomState(0).rand(*shape)
    expected = np.stack([gaussian_filter(m, sigma) for m in maps])
    got = gaussian_blur(torch.from_numpy(maps), sigma).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-12)


def test_blur_sigma_zero_is_identity():
    maps = torch.rand(2, 6, 6)
    assert gaussian_blur(maps, 0) is maps


def test_kernel_is_normalized_with_scipy_radius():
    kernel = gaussian_kernel1d(4.0, dtype=torch.float64)
    assert len(kernel) == 33  # radius int(4 * 4 + 0.5) = 16
    assert kernel.sum().item() == pytest.approx(1.0)


def test_upsample_and_postprocess_shapes():
    grid = torch.rand(3, 4, 5)
    assert upsample(grid, (4, 5)) is grid
    assert upsample(grid, (8, 10)).shape == (3, 8, 10)
    assert postprocess(grid, None, 0) is grid
    assert postprocess(grid, (16, 20), 2.0).shape == (3, 16, 20)


def test_constant_grid_stays_constant():
    grid = torch.full((2, 3, 3), 7.0, dtype=torch.float64)
    out = postprocess(grid, (12, 12), 4.0)
    np.testing.assert_allclose(out.numpy(), 7.0)


@pytest.mark.parametrize("size", [None, (224, 224), (12, 20), (3, 3)])
@pytest.mark.parametrize("sigma", [0, 1.0, 4.0])
def test_fused_operator_equals_upsample_then_blur(size, sigma):
    grid = torch.from_numpy(np.random.RandomState(1).rand(3, 7, 9) * 10)
    expected = grid if size is None else upsample(grid, size)
    expected = gaussian_blur(expected, sigma)
    np.testing.assert_allclose(postprocess(grid, size, sigma).numpy(), expected.numpy(),
                               atol=1e-10)
