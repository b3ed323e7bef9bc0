"""Image input: validation, decoding and preprocessing into normalized tensors.

Accepted inputs (DESIGN.md, "The flow"): an array ``(n, H, W)`` (grayscale) or
``(n, H, W, 3)`` (RGB), ``uint8`` in [0, 255] or float in [0, 1]; or a sequence
of file paths, PIL images or per-image arrays (sizes may differ). Grayscale is
replicated to three channels. Every image is resized (``image_size``, bicubic
with antialiasing as PaDiM §IV-B does), center-cropped (``crop_size``) and
normalized with the backbone's mean and standard deviation.
"""

import os
from numbers import Integral

import numpy as np
import torch
import torch.nn.functional as F


def _is_sequence_of_images(X):
    return isinstance(X, (list, tuple))


def check_images(X):
    """Validate the container and return ``(X, n_images)``; raise a clear error if wrong."""
    if isinstance(X, (str, os.PathLike)):
        raise TypeError("X is a single path; pass a list of paths, e.g. [path].")
    if isinstance(X, np.ndarray) and X.ndim == 1 and X.dtype.kind in "OUS":
        # paths (or PIL images) in an array, e.g. from train_test_split
        X = X.tolist()
    if _is_sequence_of_images(X):
        if len(X) == 0:
            raise ValueError("X holds no image (an empty sequence).")
        return X, len(X)
    if torch.is_tensor(X):
        if X.dtype == torch.bfloat16:  # NumPy has no bfloat16
            X = X.float()
        X = X.detach().cpu().numpy()  # a tensor that requires grad refuses np.asarray
    if hasattr(X, "__array__") or isinstance(X, np.ndarray):
        X = np.asarray(X) if not isinstance(X, np.ndarray) else X
        if X.ndim == 3 and X.shape[-1] in (3, 4) and min(X.shape[:2]) > 4:
            raise ValueError(
                f"X of shape {X.shape} looks like a single RGB image; pass X[None] for a "
                "batch of one image, or an array (n, H, W) of grayscale images."
            )
        # (n, H, W, 1) is grayscale; (n, H, W, 4) is RGBA, whose alpha is
        # dropped as PIL's convert("RGB") drops it for files.
        if X.ndim == 4 and X.shape[-1] not in (1, 3, 4):
            hint = (
                " It looks channels-first: use X.transpose(0, 2, 3, 1)."
                if X.shape[1] in (1, 3, 4)
                else ""
            )
            raise ValueError(
                f"X of shape {X.shape}: expected (n, H, W) grayscale or (n, H, W, 3) "
                f"RGB images.{hint}"
            )
        if X.ndim not in (3, 4):
            raise ValueError(
                f"X of shape {X.shape}: expected (n, H, W) grayscale or (n, H, W, 3) "
                "RGB images, or a list of paths / PIL images."
            )
        if X.shape[0] == 0:
            raise ValueError("X holds no image (n = 0).")
        if 0 in X.shape[1:3]:
            raise ValueError(f"X of shape {X.shape} holds empty images (height or width 0).")
        _check_values(X[: min(len(X), 4096)] if X.dtype.kind == "f" else X[:0])
        return X, X.shape[0]
    raise TypeError(
        f"X of type {type(X).__name__} is not an image batch: pass an array (n, H, W[, 3]) "
        "or a list of paths / PIL images."
    )


def _check_values(array):
    """Dtype and range of one array of pixels."""
    if array.dtype == np.uint8:
        return
    if array.dtype.kind == "f":
        if array.size == 0:
            return
        if not np.isfinite(array).all():
            raise ValueError("images contain NaN or infinite pixel values.")
        low, high = float(array.min()), float(array.max())
        if low < 0.0 or high > 1.0:
            raise ValueError(
                f"float images must be in [0, 1]; got values in [{low:g}, {high:g}]. "
                "Divide 8-bit data by 255 or pass it as uint8."
            )
        return
    raise ValueError(
        f"images of dtype {array.dtype} are not supported: pass uint8 in [0, 255] or "
        "float in [0, 1] (e.g. a 16-bit image divided by 65535)."
    )


def _tensor(array):
    """Zero-copy tensor of an array, copying only read-only or strided input."""
    # NumPy calls a single image of X[::-1] C-contiguous, but its negative
    # stride is refused by torch
    if (
        not array.flags.writeable
        or not array.flags.c_contiguous
        or any(stride < 0 for stride in array.strides)
    ):
        array = np.array(array, order="C")
    return torch.from_numpy(array)


def _to_float_chw(array):
    """One image array (H, W[, C]) -> float tensor (3, H, W) in [0, 1]."""
    _check_values(array)
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] not in (1, 3, 4):
        raise ValueError(f"an image of shape {array.shape} is neither (H, W) nor (H, W, 3).")
    if 0 in array.shape[:2]:
        raise ValueError(f"an image of shape {array.shape} is empty (height or width 0).")
    array = array[:, :, :3]
    tensor = _tensor(array).permute(2, 0, 1)
    tensor = tensor.float().div_(255.0) if array.dtype == np.uint8 else tensor.float()
    return tensor.expand(3, -1, -1) if tensor.shape[0] == 1 else tensor


def _pil_array(image):
    """A PIL image -> uint8 RGB array, or float array in [0, 1] for 16-bit modes.

    PIL's ``convert("RGB")`` clips 16-bit values at 255 instead of scaling
    them (a 16-bit PNG would come out almost white), so 16-bit and 32-bit
    integer images are divided by 65535 and float ("F") images are taken
    as they are (they must be in [0, 1]).
    """
    if image.mode.startswith("I;16") or image.mode == "I":
        array = np.asarray(image).astype(np.float32)
        if array.size and (array.min() < 0 or array.max() > 65535):
            raise ValueError(
                f"a {image.mode} image with values in [{array.min():g}, {array.max():g}]: "
                "integer images must be 8-bit or 16-bit (0 to 65535)."
            )
        return array / 65535.0
    if image.mode == "F":
        return np.asarray(image, dtype=np.float32)
    return np.asarray(image.convert("RGB"))


def stack_images(X, name):
    """Images as one array ``(n, H, W[, 3])``, for estimators that edit pixels.

    A list of images of one size (paths, PIL images or arrays) is decoded
    as :class:`~skpatch.PatchEmbedder` decodes it (palette, CMYK,
    16-bit...) and stacked; ``name`` is the estimator, for the errors.
    """
    if isinstance(X, (list, tuple)):
        images = [image_array(x) for x in X]
        sizes = {image.shape[:2] for image in images}
        if len(sizes) > 1:
            raise ValueError(
                f"{name} takes images of one size; the images of X have {len(sizes)} "
                f"different sizes {sorted(sizes)[:3]}. Resize them first."
            )
        if len({(image.shape, image.dtype) for image in images}) > 1:
            # one size, several kinds (gray and RGB, 8- and 16-bit): all as
            # the embedder reads them, RGB floats in [0, 1]
            images = [_to_float_chw(image).permute(1, 2, 0).numpy() for image in images]
        X = np.stack(images) if images else np.empty((0, 0, 0))
    X = np.asarray(X)
    if X.ndim not in (3, 4):
        raise ValueError(
            f"X of shape {X.shape}: {name} needs images (n, H, W) or (n, H, W, 3), "
            "the input of a pipeline that starts with PatchEmbedder."
        )
    if len(X) == 0:
        raise ValueError(f"X of shape {X.shape} holds no image; {name} needs at least 1.")
    return X


def image_array(item):
    """A path, PIL image or array -> the image array ``(H, W[, C])`` the embedder reads.

    PIL images (opened from a path or given) are decoded by
    :func:`_pil_array`: 8-bit modes (palette, CMYK, grayscale...) as RGB,
    16-bit ones scaled to [0, 1].
    """
    if isinstance(item, (str, os.PathLike)):
        from PIL import Image

        try:
            with Image.open(item) as image:
                return _pil_array(image)
        except (OSError, ValueError) as exc:
            raise ValueError(f"could not read image file {os.fspath(item)!r}: {exc}") from exc
    if hasattr(item, "convert") and hasattr(item, "size"):  # a PIL image
        return _pil_array(item)
    if not isinstance(item, (np.ndarray, list, tuple)) and not hasattr(item, "__array__"):
        raise TypeError(
            f"an item of X of type {type(item).__name__} is not an image: a sequence X "
            "must hold file paths, PIL images or arrays (H, W[, 3])."
        )
    return np.asarray(item)


def _decode(item):
    """A path, PIL image or array -> float tensor (3, H, W)."""
    array = image_array(item)
    try:
        return _to_float_chw(array)
    except ValueError as exc:
        if not isinstance(item, (str, os.PathLike)):
            raise
        raise ValueError(f"could not read image file {os.fspath(item)!r}: {exc}") from exc


def _resize_size(height, width, image_size):
    """torchvision's rule: an int sets the shorter side, a pair sets (H, W).

    The longer side is truncated, as ``torchvision.transforms.Resize`` does
    (300 x 451 at 256: 256 x 384), so that the papers' preprocessing is
    reproduced to the pixel.
    """
    if isinstance(image_size, Integral):
        if height <= width:
            return int(image_size), max(1, int(image_size * width / height))
        return max(1, int(image_size * height / width)), int(image_size)
    return tuple(int(s) for s in image_size)


def _center_crop(batch, crop_size):
    crop_h, crop_w = (crop_size, crop_size) if isinstance(crop_size, Integral) else crop_size
    height, width = batch.shape[-2:]
    if crop_h > height or crop_w > width:
        raise ValueError(
            f"crop_size {crop_size} is larger than the resized image ({height}x{width}); "
            "make image_size at least crop_size."
        )
    top, left = (height - crop_h) // 2, (width - crop_w) // 2
    return batch[..., top : top + crop_h, left : left + crop_w]


def preprocess(images, image_size, crop_size, mean, std, device):
    """Float tensor batch (b, 3, H, W) in [0, 1] -> resized, cropped, normalized on ``device``."""
    images = images.to(device)
    if image_size is not None:
        size = _resize_size(*images.shape[-2:], image_size)
        if tuple(images.shape[-2:]) != size:
            images = F.interpolate(
                images, size=size, mode="bicubic", align_corners=False, antialias=True
            ).clamp_(0.0, 1.0)
    if crop_size is not None:
        images = _center_crop(images, crop_size)
    mean = torch.tensor(mean, dtype=images.dtype, device=device).view(1, 3, 1, 1)
    std = torch.tensor(std, dtype=images.dtype, device=device).view(1, 3, 1, 1)
    return (images - mean) / std


def load_batch(X, batch, image_size, crop_size, mean, std, device):
    """Images ``X[batch]`` -> normalized tensor (b, 3, h, w) on ``device``."""
    if isinstance(X, np.ndarray):
        chunk = X[batch]
        _check_values(chunk)
        if chunk.ndim == 4 and chunk.shape[-1] == 4:
            chunk = chunk[..., :3]  # RGBA: drop alpha (a strided view, copied by _tensor)
        tensor = _tensor(chunk)
        if chunk.ndim == 3:
            tensor = tensor.unsqueeze(-1)
        tensor = tensor.to(device).permute(0, 3, 1, 2)
        tensor = tensor.float().div_(255.0) if chunk.dtype == np.uint8 else tensor.float()
        if tensor.shape[1] == 1:
            tensor = tensor.expand(-1, 3, -1, -1)
        return preprocess(tensor, image_size, crop_size, mean, std, device)
    # Sequence: images may differ in size, so each is resized before stacking.
    items = [
        preprocess(_decode(item).unsqueeze(0), image_size, crop_size, mean, std, device)
        for item in X[batch]
    ]
    check_one_size({tuple(item.shape[-2:]) for item in items})
    return torch.cat(items)


def check_one_size(sizes):
    """Raise if the images of one batch ended their preprocessing in several ``sizes``."""
    if len(sizes) > 1:
        raise ValueError(
            f"images of different sizes after preprocessing {sorted(sizes)}; set "
            "crop_size (or a pair image_size=(H, W)) so that every image ends the same size."
        )
