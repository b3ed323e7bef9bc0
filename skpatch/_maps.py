"""Anomaly-map post-processing: upsampling and Gaussian blur.

PaDiM (§IV-B) and its descendants resize the patch-score grid to the image
resolution (bicubic; bilinear in PatchCore §3.3) and smooth it with a
Gaussian filter of ``sigma = 4``.
The blur reflects at the border like :func:`scipy.ndimage.gaussian_filter`
(its default ``mode="reflect"``, ``truncate=4.0``), which the papers'
reference code calls.

Both steps are linear and separable, so each axis is one small matrix
``A = blur @ upsample`` of shape ``(H, h)``, and a whole batch of maps is
``A_H @ grid @ A_Wᵀ``: two matrix products on the ``h x w`` grid, instead of
a 33-tap convolution over every pixel of the ``H x W`` map.
"""

import functools
from numbers import Integral

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


def _blur_last_axis(x, sigma, truncate=4.0):
    """Gaussian blur of ``x (..., n)`` along its last axis."""
    kernel = gaussian_kernel1d(sigma, truncate, dtype=x.dtype, device=x.device)
    radius = (len(kernel) - 1) // 2
    shape = x.shape
    padded = x.reshape(-1, 1, shape[-1]).index_select(
        2, _reflect_index(shape[-1], radius, x.device)
    )
    return F.conv1d(padded, kernel.view(1, 1, -1)).reshape(shape)


def gaussian_blur(maps, sigma, truncate=4.0):
    """Blur a batch of maps ``(n, H, W)`` with an isotropic Gaussian (direct form).

    ``sigma <= 0`` returns the maps unchanged.
    """
    if sigma <= 0:
        return maps
    out = _blur_last_axis(maps, sigma, truncate)
    return _blur_last_axis(out.transpose(1, 2), sigma, truncate).transpose(1, 2)


def upsample(maps, size, mode="bicubic"):
    """Resize maps ``(n, h, w)`` to ``size = (H, W)`` (direct form); a no-op when already there."""
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    kwargs = {} if mode == "nearest" else {"align_corners": False}
    return F.interpolate(maps.unsqueeze(1), size=tuple(size), mode=mode, **kwargs).squeeze(1)


@functools.lru_cache(maxsize=32)
def _axis_operator(n_in, n_out, sigma, mode, dtype, device):
    """Matrix ``(n_out, n_in)`` that upsamples then blurs one axis."""
    eye = torch.eye(n_in, dtype=torch.float64)
    # Row i of the upsampled identity is the image of the i-th basis vector.
    up = upsample(eye.view(n_in, 1, n_in), (1, n_out), mode).reshape(n_in, n_out).T
    if sigma > 0:
        up = _blur_last_axis(up.T.contiguous(), sigma).T
    return up.to(dtype=dtype, device=device).contiguous()


def postprocess(patch_scores, size, sigma, mode="bicubic"):
    """Patch-score grid ``(n, h, w)`` -> anomaly maps ``(n, H, W)``: upsample, then blur.

    ``size=None`` keeps the grid resolution. Equal to ``gaussian_blur(upsample(...))``.
    """
    h, w = patch_scores.shape[-2:]
    height, width = (h, w) if size is None else size
    if (height, width) == (h, w) and sigma <= 0:
        return patch_scores
    key = (sigma, mode, patch_scores.dtype, patch_scores.device)
    rows = _axis_operator(h, height, *key)
    cols = _axis_operator(w, width, *key)
    return rows @ patch_scores @ cols.T


def check_size(value, name):
    """Raise unless ``value`` is None, an int >= 1 or a pair of ints >= 1 (a size ``(H, W)``).

    The parameter constraints accept any tuple or list for the pairs; this
    checks what they hold, so that a bad size fails at ``fit`` with its name
    rather than inside torch.
    """
    if not isinstance(value, (tuple, list)):
        return
    if len(value) != 2 or not all(
        isinstance(v, Integral) and not isinstance(v, bool) and v >= 1 for v in value
    ):
        raise ValueError(
            f"{name} must be an int >= 1 or a pair (height, width) of ints >= 1; got {value!r}."
        )


def map_size_tuple(map_size):
    """``int`` or ``(H, W)`` or ``None`` -> ``(H, W)`` or ``None``."""
    if map_size is None:
        return None
    if isinstance(map_size, (int, np.integer)):
        return (int(map_size), int(map_size))
    return tuple(int(s) for s in map_size)
