"""SPADE: nearest training images, then nearest patches among theirs (Cohen & Hoshen, 2020)."""

from numbers import Integral

import numpy as np
import torch
from sklearn.base import _fit_context
from sklearn.pipeline import make_pipeline
from sklearn.utils._param_validation import Interval, StrOptions

from .. import _memory_bank
from .._embedder import PatchEmbedder
from .._torch_utils import as_tensor, resolve_device, to_numpy
from ..backbones import get_backbone
from ._base import BasePatchDetector


class SPADEDetector(BasePatchDetector):
    """SPADE: k-nearest-neighbour image scores and a patch gallery of the nearest images.

    Implements Semantic Pyramid Anomaly Detection (Cohen & Hoshen, 2020):

    1. **Image level** (§3.2.1, eq. 1): every image is described by a
       global feature, the spatial average of its deepest feature map; the
       image anomaly score is the mean *squared* Euclidean distance to its
       ``K = n_neighbors`` nearest training images in that space.
    2. **Pixel level** (§3.3.1, eq. 2): the patch features of every position
       of those ``K`` images form a gallery; the score of a test patch is
       the mean squared distance to its ``κ = n_gallery_neighbors`` nearest
       gallery features; the map is upsampled and blurred (``sigma = 4``).

    **The global feature.** The detector takes it from the embeddings it is
    given: the spatial mean of the *last* ``global_channels`` channels,
    which :class:`~skpatch.PatchEmbedder` fills with its last (deepest)
    layer; ``None`` averages every channel. :func:`make_spade_pipeline`
    sets ``global_channels`` to the channels of the embedder's deepest
    layer, so that images are compared by that layer's average, as in the
    paper, and pixels by all the layers (its feature pyramid).

    Parameters
    ----------
    n_neighbors : int, default=50
        ``K``, the nearest training images (report §4.2: 50; it also uses
        10 and 20). Clipped to the number of training images (minus one for
        the leave-one-out calibration).
    n_gallery_neighbors : int, default=1
        ``κ``, the nearest gallery features per test patch (report §4.2: 1).
    global_channels : int or None, default=None
        Number of trailing embedding channels averaged into the global
        feature; None uses every channel.
    sigma : float, default=4
        Standard deviation, in map pixels, of the Gaussian blur of the anomaly
        maps (report §4.2); 0 disables it.
    map_size : int, pair of int or None, default=224
        Size ``(H, W)`` of the anomaly maps; None keeps the patch grid.
    contamination : float in (0, 0.5], default=0.1
        Expected fraction of anomalies: ``offset_`` is this quantile of the
        training images' ``score_samples``, computed as ``calibration`` says.
    calibration : {"leave-one-out", "in-sample"}, default="leave-one-out"
        Which training scores set ``offset_``. In-sample, a training image
        is its own nearest neighbour at distance 0, so its score is
        optimistic and the threshold flags far more than ``contamination``
        of new normal images. ``"leave-one-out"`` scores each training image
        against the other training images, which is exact for a
        nearest-neighbour model (nothing else is fitted).
    device : str, default="auto"
        Torch device for scoring; "auto" uses CUDA when available. The fitted
        state is NumPy whatever the device.

    Attributes
    ----------
    global_features_ : ndarray of shape (n_samples, n_global)
        Global feature of every training image.
    patches_ : ndarray of shape (n_samples, h * w, n_channels)
        Every patch feature of every training image (row-major grid): the
        galleries are drawn from them. SPADE keeps the whole training set:
        ``N x h x w x C`` floats (see Notes).
    offset_ : float
        Threshold on ``score_samples``; ``decision_function = score_samples - offset_``.
    grid_shape_ : tuple of int
        Patch grid ``(h, w)`` seen in fit (``(1, 1)`` for 2-D input).
    n_features_in_ : int
        Number of embedding channels ``C`` seen in fit.

    See Also
    --------
    make_spade_pipeline : The recommended embedder and this detector in a pipeline.
    PatchCoreDetector : One coreset of all training patches instead.
    sklearn.neighbors.NearestNeighbors : The same search on tabular data.

    Notes
    -----
    **Scores.** ``score_samples`` is minus the image-level kNN score (§3.2.1),
    not the maximum of the anomaly map: the paper scores images and pixels
    separately. With 2-D input ``(n, d)`` the detector is the kNN outlier
    detector of the paper's image level (with ``global_channels=None``).

    **Cost.** For ``N`` training images, ``P = h x w`` positions and ``C``
    channels the fitted state is ``N P C`` floats (e.g. 761 ELPV cells at
    28 x 28 x 152: 363 MB; 56 x 56 x 176: 1.7 GB): it grows linearly with
    the training set by nature: the pixel score searches the patches of
    the ``K`` nearest training images, which can be any of them, so no
    bounded sample of the patches (as PatchCore's ``max_patches``) serves
    without changing the method. The fit's peak is the input embeddings
    plus this state (one copy, transposed to ``(N, P, C)``), and there is
    no ``partial_fit`` (streaming would save the input's copy, not the
    state). Scoring an image costs ``O(N g)`` for the
    image kNN and ``O(K P² C)`` for its gallery search, run in chunks
    bounded by scikit-learn's ``working_memory``.

    References
    ----------
    .. [1] N. Cohen, Y. Hoshen, "Sub-Image Anomaly Detection with Deep
       Pyramid Correspondences", arXiv:2005.02357, 2020.

    Examples
    --------
    >>> import numpy as np
    >>> from skpatch import SPADEDetector
    >>> rng = np.random.RandomState(0)
    >>> X = rng.normal(size=(30, 8, 4, 4)).astype(np.float32)
    >>> detector = SPADEDetector(n_neighbors=5, map_size=None).fit(X)
    >>> detector.anomaly_map(X[:2]).shape
    (2, 4, 4)
    >>> detector.predict(X[:3] + 10)
    array([-1, -1, -1])
    """

    _parameter_constraints = {
        **BasePatchDetector._parameter_constraints,
        "n_neighbors": [Interval(Integral, 1, None, closed="left")],
        "n_gallery_neighbors": [Interval(Integral, 1, None, closed="left")],
        "global_channels": [Interval(Integral, 1, None, closed="left"), None],
        "calibration": [StrOptions({"leave-one-out", "in-sample"})],
    }

    def __init__(
        self,
        n_neighbors=50,
        *,
        n_gallery_neighbors=1,
        global_channels=None,
        sigma=4.0,
        map_size=224,
        contamination=0.1,
        calibration="leave-one-out",
        device="auto",
    ):
        self.n_neighbors = n_neighbors
        self.n_gallery_neighbors = n_gallery_neighbors
        self.global_channels = global_channels
        self.sigma = sigma
        self.map_size = map_size
        self.contamination = contamination
        self.calibration = calibration
        self.device = device

    def _global(self, x):
        """Global features ``(b, g)``: spatial mean of the trailing ``global_channels``."""
        if self.global_channels is not None:
            x = x[:, -self.global_channels :]
        return x.mean(dim=(2, 3))

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y=None):
        """Store the training images' global and patch features.

        Parameters
        ----------
        X : ndarray of shape (n, C, h, w) or (n, d)
            Patch embeddings of normal training images.
        y : None
            Ignored.

        Returns
        -------
        self : SPADEDetector
            The fitted detector.
        """
        X = self._validate_embeddings(X, reset=True)
        n_images, n_channels = X.shape[:2]
        self._check_n_samples(n_images, 2, type(self).__name__)
        if self.global_channels is not None and self.global_channels > n_channels:
            raise ValueError(
                f"global_channels={self.global_channels} exceeds the {n_channels} channels of "
                "the embeddings."
            )
        self.patches_ = np.ascontiguousarray(
            X.reshape(n_images, n_channels, -1).transpose(0, 2, 1), dtype=np.float32
        )
        with torch.inference_mode():
            self.global_features_ = to_numpy(self._global(as_tensor(X, "cpu", np.float32)))
            loo = self.calibration == "leave-one-out"
            train_scores = self._anomaly_scores(X, leave_one_out=loo)
        self._set_offset(train_scores)
        return self

    # ------------------------------------------------------------------ scoring
    def _image_knn(self, x, first=None):
        """``(distances, indices)`` of the ``K`` nearest training images of a chunk.

        ``first`` (the index of the chunk's first image in the training set)
        leaves every training image out of its own neighbours.
        """
        bank = self._fitted_tensor("global_features_", x.device)
        queries = self._global(x.to(bank.dtype))
        n_train = len(bank)
        groups = {}
        if first is not None:
            groups = {
                "query_groups": torch.arange(first, first + len(x), device=x.device),
                "bank_groups": torch.arange(n_train, device=x.device),
            }
            n_train -= 1
        k = min(self.n_neighbors, n_train)
        return _memory_bank.nearest_neighbors(queries, bank, k, **groups)

    def _image_scores(self, x, patch_scores=None, first=None):
        # eq. (1): the mean *squared* distance to the K nearest images
        return self._image_knn(x, first)[0].square().mean(dim=1)

    def _patch_scores(self, x):
        _, neighbours = self._image_knn(x)
        patches = self._fitted_tensor("patches_", x.device)
        n_images, n_channels = x.shape[:2]
        queries = x.to(patches.dtype).permute(0, 2, 3, 1).reshape(n_images, -1, n_channels)
        scores = []
        for i in range(n_images):  # one gallery per image: a Python loop per image, not per patch
            gallery = patches[neighbours[i]].reshape(-1, n_channels)
            kappa = min(self.n_gallery_neighbors, len(gallery))
            dist, _ = _memory_bank.nearest_neighbors(queries[i], gallery, kappa)
            scores.append(dist.square().mean(dim=1))  # squared, as the image score
        return torch.stack(scores).view(n_images, *x.shape[2:])

    def _anomaly_scores(self, X, patch_scores=None, leave_one_out=False):
        """Image-level kNN scores of validated embeddings (``leave_one_out`` for training images)."""
        device = resolve_device(self.device)
        scores = self._empty_scores(X)
        with torch.inference_mode():
            for batch, x in self._iter_chunks(X, device):
                first = batch.start if leave_one_out else None
                scores[batch] = to_numpy(self._image_scores(x, first=first))
        return scores


def _layer_channels(backbone, layer):
    """Output channels of a backbone stage, from a forward pass of the random-weight network."""
    spec = get_backbone(backbone)
    with torch.random.fork_rng(devices=[]), torch.inference_mode():
        module = spec.build().eval()
        x = torch.zeros(1, 3, 64, 64)
        for name, stage in spec.stages(module):
            x = stage(x)
            if name == layer:
                return int(x.shape[1])
    raise ValueError(f"{backbone!r} has no stage named {layer!r}.")


def make_spade_pipeline(
    backbone="efficientnet_lite0", *, embedder_params=None, memory=None, **detector_params
):
    """The SPADE pipeline: a feature pyramid, and a global feature from its deepest layer.

    Builds ``make_pipeline(PatchEmbedder(...), SPADEDetector(...))``: the
    embedder concatenates the backbone's default ``layers`` (the paper's
    pyramid, §3.3.1) unless ``embedder_params`` says otherwise, and the
    detector's ``global_channels`` is set to the channels of the last of
    them, so that images are compared by the average of the deepest layer
    (§3.2.1) and pixels by every layer.

    Parameters
    ----------
    backbone : str, default="efficientnet_lite0"
        Registered backbone name (see :func:`skpatch.backbones.available_backbones`).
    embedder_params : dict or None, default=None
        Other :class:`~skpatch.PatchEmbedder` parameters (``weights``,
        ``image_size``, ``crop_size``, ``layers``, ...).
    memory : str, joblib.Memory or None, default=None
        Passed to :func:`~sklearn.pipeline.make_pipeline`: caches the
        embeddings of the training images between fits.
    **detector_params : dict
        Parameters of :class:`SPADEDetector` (``n_neighbors``, ...); an
        explicit ``global_channels`` wins.

    Returns
    -------
    pipeline : sklearn.pipeline.Pipeline
        Steps ``"patchembedder"`` and ``"spadedetector"``.

    See Also
    --------
    SPADEDetector : The detector.
    PatchEmbedder : The embedder.

    Examples
    --------
    >>> import numpy as np
    >>> from skpatch import make_spade_pipeline
    >>> pipe = make_spade_pipeline(
    ...     embedder_params={"weights": None, "image_size": 64, "crop_size": None},
    ...     n_neighbors=3, map_size=64,
    ... )
    >>> pipe[0].layers, pipe[-1].global_channels
    (('stage1', 'stage2', 'stage4'), 112)
    >>> images = np.random.RandomState(0).randint(0, 256, (8, 64, 64), dtype=np.uint8)
    >>> pipe.fit(images).score_samples(images).shape
    (8,)
    """
    default = tuple(get_backbone(backbone).default_layers)
    params = {"layers": default, **(embedder_params or {})}
    layers = default if params["layers"] is None else params["layers"]  # None: as PatchEmbedder
    last = layers if isinstance(layers, str) else layers[-1]
    detector_params = {"global_channels": _layer_channels(backbone, last), **detector_params}
    return make_pipeline(
        PatchEmbedder(backbone, **params), SPADEDetector(**detector_params), memory=memory
    )
