"""Anomaly-map post-processing: upsampling and separable Gaussian blur.

PaDiM (§IV-B) and its descendants resize the patch-score grid to the image
resolution and smooth it with a Gaussian filter of ``sigma = 4``. The blur here
is separable (two 1-D passes, ``O(k)`` per pixel instead of ``O(k^2)``) and
reflects at the border like :func:`scipy.ndimage.gaussian_filter` (its default
``mode="reflect"``, ``truncate=4.0``), which the papers' reference code calls.
"""


import numpy as np
import torch
import torch.nn.functional as F


def gaussian_kernel1d(sigma, truncate=4.0, *, dtype=torch.float32, device="cpu"):
    """Normalized 1-D Gaussian kernel of radius ``int(truncate * sigma + 0.5)``."""
    radius = int(truncate * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    return (kernel / kernel.sum()).to(dtype=dtype, device=device)


def _reflect_index(n, radius, device):
    """Indices of a length-``n`` axis padded by ``radius`` in scipy's 'reflect' mode.

    Unlike ``F.pad(mode="reflect")`` this works for any ``radius``, also when
    the axis is shorter than the kernel (tiny maps in tests).
    """
    idx = np.arange(-radius, n + radius) % (2 * n)
    idx = np.where(idx >= n, 2 * n - 1 - idx, idx)
    return torch.from_numpy(idx).to(device)


def gaussian_blur(maps, sigma, truncate=4.0):
    """Blur a batch of maps ``(n, H, W)`` with an isotropic Gaussian.

    ``sigma <= 0`` returns the maps unchanged.
    """
    if sigma <= 0:
        return maps
    kernel = gaussian_kernel1d(sigma, truncate, dtype=maps.dtype, device=maps.device)
    radius = (len(kernel) - 1) // 2
    n, height, width = maps.shape
    out = maps.unsqueeze(1)
    out = out.index_select(3, _reflect_index(width, radius, maps.device))
    out = F.conv2d(out, kernel.view(1, 1, 1, -1))
    out = out.index_select(2, _reflect_index(height, radius, maps.device))
    out = F.conv2d(out, kernel.view(1, 1, -1, 1))
    return out.squeeze(1)


def upsample(maps, size, mode="bicubic"):
    """Resize maps ``(n, h, w)`` to ``size = (H, W)``; a no-op when already there."""
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    kwargs = {} if mode == "nearest" else {"align_corners": False}
    return F.interpolate(maps.unsqueeze(1), size=tuple(size), mode=mode, **kwargs).squeeze(1)


def postprocess(patch_scores, size, sigma, mode="bicubic"):
    """Patch-score grid ``(n, h, w)`` -> anomaly maps ``(n, H, W)``: upsample, then blur.

    ``size=None`` keeps the grid resolution.
    """
    if size is not None:
        patch_scores = upsample(patch_scores, size, mode)
    return gaussian_blur(patch_scores, sigma)


def map_size_tuple(map_size):
    """``int`` or ``(H, W)`` or ``None`` -> ``(H, W)`` or ``None``."""
    if map_size is None:
        return None
    if isinstance(map_size, (int, np.integer)):
        return (int(map_size), int(map_size))
    return tuple(int(s) for s in map_size)


__all__ = ["gaussian_blur", "gaussian_kernel1d", "postprocess", "upsample", "map_size_tuple"]
