"""Pixel-wise refinement of anomaly maps (PNI, Bae, Lee & Kim, 2023, Part 2)."""

import contextlib
from numbers import Integral, Real

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.base import BaseEstimator, MetaEstimatorMixin, OutlierMixin, _fit_context, clone
from sklearn.utils import check_random_state, gen_batches
from sklearn.utils._param_validation import HasMethods, Interval, StrOptions
from sklearn.utils.validation import check_is_fitted

from ._compose import _split, anomaly_map
from ._images import load_batch, preprocess, stack_images
from ._torch_utils import cpu_fallback_state, resolve_device, seeded, single_threaded, to_numpy
from .backbones import get_backbone
from .datasets import make_synthetic_defects


def _conv_block(n_in, n_out):
    return torch.nn.Sequential(
        torch.nn.Conv2d(n_in, n_out, 3, padding=1, bias=False),
        torch.nn.BatchNorm2d(n_out),
        torch.nn.ReLU(inplace=True),
        torch.nn.Conv2d(n_out, n_out, 3, padding=1, bias=False),
        torch.nn.BatchNorm2d(n_out),
        torch.nn.ReLU(inplace=True),
    )


class RefinementDecoder(torch.nn.Module):
    """Decoder of the refinement network: encoder features + coarse map -> refined map.

    A U-Net-like decoder over the encoder's features at strides 16, 8 and 4;
    the (standardized) coarse anomaly map is concatenated at every scale and,
    with the image, at full resolution. The output adds a learned multiple of
    the coarse map before the sigmoid, so that training starts from it.

    Parameters
    ----------
    channels : tuple of int
        Channels of the encoder's features, from the finest to the coarsest.
    width : int
        Channels of the full-resolution layer; coarser layers have 2x and 4x.
    """

    def __init__(self, channels, width):
        super().__init__()
        fine, middle, coarse = channels
        self.coarse = _conv_block(coarse + 1, 4 * width)
        self.middle = _conv_block(4 * width + middle + 1, 2 * width)
        self.fine = _conv_block(2 * width + fine + 1, width)
        self.head = torch.nn.Sequential(
            torch.nn.Conv2d(width + 3 + 1, width, 3, padding=1),
            torch.nn.ReLU(inplace=True),
            torch.nn.Conv2d(width, 1, 1),
        )
        self.skip = torch.nn.Parameter(torch.tensor([1.0, 0.0]))

    def forward(self, image, coarse_map, features):
        """Refined-map logits ``(b, 1, H, W)``."""
        fine, middle, coarse = features

        def at(tensor, like):
            size = like.shape[-2:]
            return F.interpolate(tensor, size=size, mode="bilinear", align_corners=False)

        y = self.coarse(torch.cat([coarse, at(coarse_map, coarse)], 1))
        y = self.middle(torch.cat([at(y, middle), middle, at(coarse_map, middle)], 1))
        y = self.fine(torch.cat([at(y, fine), fine, at(coarse_map, fine)], 1))
        y = self.head(torch.cat([at(y, image), image, coarse_map], 1))
        return y + self.skip[0] * coarse_map + self.skip[1]


def refinement_loss(refined, target):
    """PNI's loss ``(ℓ_reg + ℓ_grad) / 2`` on maps ``(b, 1, H, W)``, averaged over the batch.

    ``ℓ_reg = ‖Ã - A‖₂ / HW`` and
    ``ℓ_grad = (‖∇_h Ã - ∇_h A‖₂ + ‖∇_w Ã - ∇_w A‖₂) / 2HW``
    with finite differences for the partial derivatives.
    """
    height, width = refined.shape[-2:]
    area = height * width

    def norm(t):
        return torch.linalg.vector_norm(t.flatten(1), dim=1)

    reg = norm(refined - target) / area
    diff = refined - target
    grad = (norm(diff[..., 1:, :] - diff[..., :-1, :]) + norm(diff[..., 1:] - diff[..., :-1])) / (
        2 * area
    )
    return ((reg + grad) / 2).mean()


class AnomalyMapRefiner(MetaEstimatorMixin, OutlierMixin, BaseEstimator):
    """PNI's pixel-wise refinement network around a fitted anomaly-detection pipeline.

    Implements Part 2 of PNI (Bae, Lee & Kim, 2023): a supervised network
    ``f(I, Â; θ)`` that takes an image ``I`` and the anomaly map ``Â`` of the
    wrapped detector and returns a refined map, trained on synthetic defects
    made from the normal training images (CutPaste, CutPaste-scar and
    DRAEM-like defects, see :func:`skpatch.datasets.make_synthetic_defects`)
    with the loss ``(ℓ_reg + ℓ_grad) / 2``: ``ℓ_reg`` compares the refined
    map with the defect mask, ``ℓ_grad`` their finite-difference gradients
    (see :ref:`pni`).

    The network needs the images, which a detector inside a pipeline never
    sees, so this meta-estimator wraps the whole pipeline: ``fit`` fits a
    clone of it on the training images, paints defects on them, computes
    their coarse maps with the fitted pipeline, and trains the network to
    turn each (image, coarse map) into the defect mask.

    **Encoder.** The paper's encoder is a DenseNet-161 modified to take the
    image and the map as four channels; those weights are not available
    offline. Here the encoder is the pipeline's own pretrained backbone
    (its stages of strides 4, 8 and 16), *frozen*, and the map enters the
    decoder at every scale instead of the first convolution: the encoder's
    features of each training image are computed once and only the small
    decoder is trained, which keeps training to minutes on a CPU.

    Parameters
    ----------
    estimator : Pipeline
        A pipeline that starts with a :class:`~skpatch.PatchEmbedder` and
        ends with a skpatch detector, e.g. :func:`make_pni_pipeline`.
        Cloned in ``fit``.
    kinds : sequence of str, default=("cutpaste", "cutpaste_scar", "draem")
        Synthetic defects to train on (the paper's CutPaste, CutPaste
        (scar) and DRÆM; it also drew defects by hand).
    n_copies : int, default=1
        Defective copies made of each training image.
    map_folds : int or None, default=None
        How the coarse maps of the defective training images are made. None
        (the paper's procedure): by the pipeline fitted on all training
        images, which has seen the defect-free originals, so the maps are
        cleaner outside the defects than on new images. An integer ``k >=
        2``: out of fold, each image's map by a clone fitted on the other
        ``k - 1`` folds, so the network trains on maps like those it will
        refine (``k`` extra fits).
    max_images : int or None, default=200
        At most this many defective images (a random subset, at least 2);
        bounds the cached encoder features (about 0.5 MB per 224 x 224
        image).
    n_epochs : int, default=10
        Passes over the defective images.
    batch_size : int, default=8
        Images per gradient step, at least 2 (batch norm); a last batch of
        one image joins the batch before it.
    learning_rate : float, default=1e-3
        Adam's learning rate.
    width : int, default=16
        Channels of the decoder's full-resolution layer (2x and 4x coarser).
    image_score : {"coarse", "refined"}, default="coarse"
        Image score of :meth:`score_samples`: the wrapped pipeline's, or the
        maximum of the refined map (calibrated on the training images).
    random_state : int, RandomState instance or None, default=None
        Seeds the synthetic defects, the initialization and the batch order.
    device : str, default="auto"
        Torch device of the network; "auto" uses CUDA when available.
    verbose : int, default=0
        Print the loss of every epoch when positive.

    Attributes
    ----------
    estimator_ : Pipeline
        The fitted clone of ``estimator``.
    network_state_ : dict of str to ndarray
        The decoder's weights (NumPy, so that the pickle is portable).
    map_mean_ : float
        Mean of the coarse maps of the defective training images.
    map_scale_ : float
        Their standard deviation: coarse maps enter the network standardized.
    loss_curve_ : list of float
        Mean training loss of each epoch.
    offset_ : float
        Threshold on ``score_samples``: the wrapped detector's ``offset_``
        (``image_score="coarse"``) or the ``contamination`` quantile of the
        training images' refined scores.

    See Also
    --------
    make_pni_pipeline : Builds this wrapper around the PNI pipeline (``refine=True``).
    PNIDetector : PNI's Part 1.

    Notes
    -----
    The refined map is the network's output in [0, 1] (a per-pixel
    probability of a defect), resized to the wrapped detector's map size.
    The network works at the embedder's crop resolution: images are resized
    and cropped as the embedder does, so the coarse map and the image are
    aligned.

    Training costs one CNN forward pass and one coarse map per defective
    image, then ``n_epochs`` passes of the decoder; the defective images'
    coarse maps come from a pipeline fitted on their defect-free originals,
    so they are somewhat optimistic outside the defects (as for every
    detector on its training images).

    References
    ----------
    .. [1] J. Bae, J.-H. Lee, S. Kim, "PNI: Industrial Anomaly Detection using
       Position and Neighborhood Information", ICCV, 2023.

    Examples
    --------
    >>> import numpy as np
    >>> from skpatch import make_pni_pipeline
    >>> images = np.random.RandomState(0).randint(0, 256, (6, 32, 32), dtype=np.uint8)
    >>> model = make_pni_pipeline(
    ...     embedder_params={"weights": None, "image_size": 32, "crop_size": None},
    ...     map_size=32, n_dist=16, n_epochs=1, random_state=0,
    ...     refine=True, refiner_params={"n_epochs": 1, "random_state": 0},
    ... ).fit(images)
    >>> model.anomaly_map(images[:2]).shape
    (2, 32, 32)
    """

    _parameter_constraints = {
        "estimator": [HasMethods(["fit", "score_samples"])],
        "kinds": [list, tuple, str],
        "n_copies": [Interval(Integral, 1, None, closed="left")],
        "map_folds": [Interval(Integral, 2, None, closed="left"), None],
        "max_images": [Interval(Integral, 2, None, closed="left"), None],
        "n_epochs": [Interval(Integral, 0, None, closed="left")],
        "batch_size": [Interval(Integral, 2, None, closed="left")],  # batch norm
        "learning_rate": [Interval(Real, 0, None, closed="neither")],
        "width": [Interval(Integral, 1, None, closed="left")],
        "image_score": [StrOptions({"coarse", "refined"})],
        "random_state": ["random_state"],
        "device": [str],
        "verbose": ["verbose"],
    }

    def __init__(
        self,
        estimator,
        *,
        kinds=("cutpaste", "cutpaste_scar", "draem"),
        n_copies=1,
        map_folds=None,
        max_images=200,
        n_epochs=10,
        batch_size=8,
        learning_rate=1e-3,
        width=16,
        image_score="coarse",
        random_state=None,
        device="auto",
        verbose=0,
    ):
        self.estimator = estimator
        self.kinds = kinds
        self.n_copies = n_copies
        self.map_folds = map_folds
        self.max_images = max_images
        self.n_epochs = n_epochs
        self.batch_size = batch_size
        self.learning_rate = learning_rate
        self.width = width
        self.image_score = image_score
        self.random_state = random_state
        self.device = device
        self.verbose = verbose

    def __setstate__(self, state):
        # A refiner saved with device="cuda" loads on a CPU-only machine.
        super().__setstate__(cpu_fallback_state(state, type(self).__name__))

    def _validate_params(self):
        # and a device torch knows, before the wrapped pipeline's fit
        super()._validate_params()
        resolve_device(self.device)

    # ------------------------------------------------------------------ pieces
    def _embedder(self, estimator):
        transformers, detector = _split(estimator)
        embedder = next((t for t in transformers if hasattr(t, "_extractor")), None)
        if embedder is None or not hasattr(detector, "anomaly_map"):
            raise TypeError(
                "AnomalyMapRefiner wraps a Pipeline that starts with a PatchEmbedder and "
                f"ends with a skpatch detector; got {type(estimator).__name__}."
            )
        return embedder

    def _encoder(self):
        """The frozen backbone stages of strides 4, 8 and 16 (the embedder's network)."""
        embedder = self._embedder(self.estimator_)
        spec = get_backbone(embedder.backbone)
        encoder = clone(embedder).set_params(
            layers=tuple(spec.default_layers), pool_size=1, device=self.device
        )
        extractor, device = encoder._extractor()
        return encoder, extractor, spec, device

    def _inputs(self, images, maps, encoder, extractor, spec, device):
        """Network inputs of a batch: normalized image, standardized map, encoder features."""
        batch = slice(0, len(images))
        with torch.no_grad():
            image = load_batch(
                images, batch, encoder.image_size, encoder.crop_size, spec.mean, spec.std, device
            )
            features = [f.float().contiguous() for f in extractor(image)]
            coarse = torch.as_tensor(maps, device=device, dtype=torch.float32).unsqueeze(1)
            coarse = F.interpolate(
                coarse, size=image.shape[-2:], mode="bilinear", align_corners=False
            )
            coarse = (coarse - self.map_mean_) / self.map_scale_
        return image.float().contiguous(), coarse, features

    def _masks(self, masks, encoder, device):
        """Defect masks brought to the network's frame (the embedder's resize and crop)."""
        m = torch.as_tensor(masks, dtype=torch.float32).unsqueeze(1).expand(-1, 3, -1, -1)
        m = preprocess(m, encoder.image_size, encoder.crop_size, (0, 0, 0), (1, 1, 1), device)
        return (m[:, :1] > 0.5).float()

    @staticmethod
    def _threads(image, device):
        """Single-threaded for small batches: thread synchronization would dominate them."""
        small = device.type == "cpu" and image.shape[0] * image.shape[-2] * image.shape[-1] < 2**16
        return single_threaded() if small else contextlib.nullcontext()

    def _network(self, channels, device):
        network = RefinementDecoder(channels, self.width)
        if hasattr(self, "network_state_"):
            network.load_state_dict(
                {k: torch.from_numpy(np.asarray(v)) for k, v in self.network_state_.items()}
            )
        return network.to(device)

    def _coarse_maps(self, X, pool, defective, rng):
        """Coarse maps of the defective copies ``defective`` of ``X[pool]`` (see ``map_folds``)."""
        if self.map_folds is None:
            return anomaly_map(self.estimator_, defective)
        if self.map_folds > len(X):
            raise ValueError(
                f"map_folds={self.map_folds} exceeds the {len(X)} training images."
            )
        fold_of_image = rng.permutation(len(X)) % self.map_folds
        fold = fold_of_image[pool]
        coarse = None
        for k in range(self.map_folds):
            held = fold == k
            if not held.any():
                continue
            model = clone(self.estimator).fit(X[fold_of_image != k])
            maps = anomaly_map(model, defective[held])
            if coarse is None:
                coarse = np.empty((len(defective), *maps.shape[1:]), dtype=maps.dtype)
            coarse[held] = maps
        return coarse

    # ------------------------------------------------------------------ fit
    @_fit_context(prefer_skip_nested_validation=False)
    def fit(self, X, y=None):
        """Fit the wrapped pipeline, then the refinement network on synthetic defects.

        Parameters
        ----------
        X : ndarray of shape (n, H, W) or (n, H, W, 3), or list
            Normal training images (``uint8`` or float in [0, 1]), or a
            list of images of one size (paths, PIL images or arrays).
        y : None
            Ignored.

        Returns
        -------
        self : AnomalyMapRefiner
            The fitted refiner.
        """
        X = stack_images(X, type(self).__name__)
        self._embedder(self.estimator)
        for attribute in ("network_state_",):
            self.__dict__.pop(attribute, None)
        self.estimator_ = clone(self.estimator).fit(X, y)
        rng = check_random_state(self.random_state)
        pool = np.tile(np.arange(len(X)), self.n_copies)
        if self.max_images is not None and len(pool) > self.max_images:
            pool = np.sort(rng.choice(pool, self.max_images, replace=False))
        defective, masks = make_synthetic_defects(X[pool], kinds=self.kinds, random_state=rng)
        coarse = self._coarse_maps(X, pool, defective, rng)
        self.map_mean_ = float(coarse.mean())
        self.map_scale_ = float(coarse.std()) or 1.0

        encoder, extractor, spec, device = self._encoder()
        cache = []
        # Batch norm trains on batches of 2 or more: a last lone image joins
        # the batch before it.
        for batch in gen_batches(len(defective), self.batch_size, min_batch_size=2):
            image, amap, features = self._inputs(
                defective[batch], coarse[batch], encoder, extractor, spec, device
            )
            target = self._masks(masks[batch], encoder, device)
            cache.append((image, amap, features, target))
        channels = tuple(f.shape[1] for f in cache[0][2])
        seed = int(rng.randint(np.iinfo(np.int32).max))
        threads = self._threads(cache[0][0], device)
        with threads, seeded(seed, device):
            network = self._network(channels, device)
            optimizer = torch.optim.Adam(network.parameters(), lr=self.learning_rate)
            generator = torch.Generator().manual_seed(seed)
            self.loss_curve_ = []
            network.train()
            for epoch in range(self.n_epochs):
                total = 0.0
                for i in torch.randperm(len(cache), generator=generator).tolist():
                    image, amap, features, target = cache[i]
                    refined = torch.sigmoid(network(image, amap, features))
                    loss = refinement_loss(refined, target)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    total += float(loss.detach()) * len(image)
                self.loss_curve_.append(total / len(defective))
                if self.verbose:
                    print(f"[AnomalyMapRefiner] epoch {epoch + 1}/{self.n_epochs} "
                          f"loss {self.loss_curve_[-1]:.3e}", flush=True)
        network.eval()
        self.network_state_ = {k: to_numpy(v) for k, v in network.state_dict().items()}
        detector = _split(self.estimator_)[1]
        if self.image_score == "coarse":
            self.offset_ = float(detector.offset_)
        else:
            scores = self.score_samples(X)
            self.offset_ = float(np.percentile(scores, 100.0 * detector.contamination))
        return self

    # ------------------------------------------------------------------ scoring
    def anomaly_map(self, X):
        """Refined anomaly maps: the network's per-pixel defect probability.

        Parameters
        ----------
        X : ndarray of shape (n, H, W) or (n, H, W, 3), or list
            Images, or a list of images of one size (paths, PIL images or
            arrays).

        Returns
        -------
        maps : ndarray of shape (n, H_map, W_map)
            Refined maps in [0, 1] at the wrapped detector's map size.
        """
        check_is_fitted(self)
        X = stack_images(X, type(self).__name__)
        encoder, extractor, spec, device = self._encoder()
        network = None
        out = None
        for batch in gen_batches(len(X), max(self.batch_size, 16)):
            coarse = anomaly_map(self.estimator_, X[batch])
            image, amap, features = self._inputs(
                X[batch], coarse, encoder, extractor, spec, device
            )
            if network is None:
                network = self._network(tuple(f.shape[1] for f in features), device).eval()
            with torch.inference_mode(), self._threads(image, device):
                refined = torch.sigmoid(network(image, amap, features))
                refined = F.interpolate(
                    refined, size=coarse.shape[-2:], mode="bilinear", align_corners=False
                )[:, 0]
            if out is None:
                out = np.empty((len(X), *coarse.shape[1:]), dtype=np.float32)
            out[batch] = to_numpy(refined)
        return out

    def score_samples(self, X):
        """Opposite of the image anomaly score (``image_score`` says which): higher = more normal.

        Parameters
        ----------
        X : ndarray of shape (n, H, W) or (n, H, W, 3), or list
            Images, or a list of images of one size (paths, PIL images or
            arrays).

        Returns
        -------
        scores : ndarray of shape (n,)
            The wrapped pipeline's ``score_samples``, or minus the maximum of
            the refined map.
        """
        check_is_fitted(self)
        if self.image_score == "coarse":
            return self.estimator_.score_samples(X)
        maps = self.anomaly_map(X)
        return -maps.reshape(len(maps), -1).max(axis=1)

    def decision_function(self, X):
        """``score_samples(X) - offset_``: negative for outliers.

        Parameters
        ----------
        X : ndarray of shape (n, H, W) or (n, H, W, 3), or list
            Images, or a list of images of one size (paths, PIL images or
            arrays).

        Returns
        -------
        decision : ndarray of shape (n,)
            Shifted scores; the threshold is 0.
        """
        return self.score_samples(X) - self.offset_

    def predict(self, X):
        """Label images: +1 normal, -1 anomalous.

        Parameters
        ----------
        X : ndarray of shape (n, H, W) or (n, H, W, 3), or list
            Images, or a list of images of one size (paths, PIL images or
            arrays).

        Returns
        -------
        labels : ndarray of shape (n,)
            +1 for inliers, -1 for outliers.
        """
        return np.where(self.decision_function(X) < 0, -1, 1)
