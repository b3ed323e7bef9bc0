"""PNI: patch likelihoods conditioned on position and neighbourhood (Bae, Lee & Kim, 2023)."""

import contextlib
import math
from numbers import Integral, Real

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.base import _fit_context
from sklearn.pipeline import make_pipeline
from sklearn.utils import check_random_state, gen_batches
from sklearn.utils._chunking import get_chunk_n_rows
from sklearn.utils._param_validation import Interval, StrOptions

from .._memory_bank import greedy_coreset, nearest_neighbors, patch_rows
from .._torch_utils import as_tensor, resolve_device, seeded, single_threaded, to_numpy
from ._base import BasePatchDetector, locally_aware_embedder

# Patches per block of the CPU search: its (n_emb, block) distances are
# masked and reduced while they are in the cache.
_PATCH_BLOCK = 512


# ---------------------------------------------------------------------- kernels
def neighborhood_features(x, size):
    """Concatenated features of the ``size x size`` window around every patch, centre excluded.

    ``x (b, C, h, w)`` -> ``(b * h * w, C * (size² - 1))`` in row-major grid
    order; windows reaching past the border are zero-padded. The detector
    pads the *standardized* features, so a missing neighbour is the
    channel's training mean (PNI's code pads the raw features with zeros).
    """
    n_images, n_channels, height, width = x.shape
    windows = F.unfold(x, size, padding=size // 2)  # (b, C * size², h * w)
    windows = windows.view(n_images, n_channels, size * size, height * width)
    centre = (size * size) // 2
    keep = [i for i in range(size * size) if i != centre]
    windows = windows[:, :, keep]  # (b, C, size² - 1, P)
    return windows.permute(0, 3, 2, 1).reshape(n_images * height * width, -1)


def gather_neighborhoods(x, images, rows, cols, size, mean, scale):
    """Standardized neighbourhood features of the patches ``(images, rows, cols)`` of ``x``.

    The same vectors as :func:`neighborhood_features` of ``(x - mean) / scale``
    for a sample of patches only: the training set is never unfolded (nor
    standardized) as a whole.
    """
    _, n_channels, height, width = x.shape
    radius = size // 2
    parts = []
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            if dy == 0 and dx == 0:
                continue
            r, c = rows + dy, cols + dx
            inside = (r >= 0) & (r < height) & (c >= 0) & (c < width)
            values = (x[images, :, r.clamp(0, height - 1), c.clamp(0, width - 1)] - mean) / scale
            parts.append(values * inside.unsqueeze(1).to(values.dtype))
    return torch.stack(parts, dim=1).reshape(len(images), -1) if parts else x.new_zeros(
        (len(images), 0)
    )


def spread_counts(counts, window):
    """Sum the counts ``(b, K, h, w)`` over a ``window x window`` box around each position.

    The official code adds each training count to every position of the
    window around its own (clipped at the border), which is this zero-padded
    box sum.
    """
    if window <= 1:
        return counts
    return F.avg_pool2d(
        counts, window, stride=1, padding=window // 2, divisor_override=1, count_include_pad=True
    )


def neighborhood_conv_weight(coef, n_channels, size):
    """The MLP's first layer on :func:`neighborhood_features` as a ``size x size`` convolution.

    ``coef (C (size² - 1), n_out)`` -> ``(n_out, C, size, size)`` with a zero
    centre tap: ``conv2d(x, weight, padding=size // 2)`` at every position
    equals ``neighborhood_features(x, size) @ coef`` (the same zero padding),
    without the ``C (size² - 1)``-wide copy of every patch's window.
    """
    n_out = coef.shape[1]
    weight = coef.new_zeros((n_out, size * size, n_channels))
    keep = [i for i in range(size * size) if i != (size * size) // 2]
    weight[:, keep] = coef.T.reshape(n_out, len(keep), n_channels)
    return weight.view(n_out, size, size, n_channels).permute(0, 3, 1, 2).contiguous()


class _NeighborhoodMLP(torch.nn.Module):
    """``depth`` hidden layers (Linear, BatchNorm, ReLU, Dropout) and a linear classifier."""

    def __init__(self, n_inputs, n_classes, width, depth, dropout):
        super().__init__()
        layers = []
        size = n_inputs
        for _ in range(depth):
            layers += [
                torch.nn.Linear(size, width),
                torch.nn.BatchNorm1d(width),
                torch.nn.ReLU(),
                torch.nn.Dropout(dropout),
            ]
            size = width
        layers.append(torch.nn.Linear(size, n_classes))
        self.net = torch.nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)

    def folded(self):
        """``(coefs, intercepts)`` of the eval-mode network, batch norms folded in."""
        coefs, intercepts = [], []
        modules = list(self.net)
        for i, module in enumerate(modules):
            if not isinstance(module, torch.nn.Linear):
                continue
            weight, bias = module.weight.detach(), module.bias.detach()
            following = modules[i + 1] if i + 1 < len(modules) else None
            if isinstance(following, torch.nn.BatchNorm1d):
                scale = following.weight / torch.sqrt(following.running_var + following.eps)
                bias = (bias - following.running_mean) * scale + following.bias
                weight = weight * scale.unsqueeze(1)
            coefs.append(to_numpy(weight.T.contiguous()))
            intercepts.append(to_numpy(bias.detach()))
        return coefs, intercepts


# ---------------------------------------------------------------------- detector
class PNIDetector(BasePatchDetector):
    """PNI: patch likelihoods given the position and the neighbourhood of each patch.

    Implements Part 1 of PNI (Bae, Lee & Kim, 2023), "Modeling normal feature
    distribution". The anomaly score of a patch feature ``Φ(x)`` at position
    ``x`` is ``S(x) = -log p(Φ(x) | Ω)`` where ``Ω`` is the position and the
    neighbourhood of the patch:

    1. **Coresets.** The greedy k-center coreset of all training patches
       (PatchCore's approximate version, :func:`skpatch._memory_bank.greedy_coreset`)
       gives the embedding coreset ``C_emb`` (``coreset_ratio`` of the patches,
       1 % in the paper) and the distribution coreset ``C_dist``, its first
       ``n_dist`` picks (nested, as in the official code).
    2. **Neighbourhood model** ``p(c | N_p(x))``: an MLP whose input is the
       concatenated features of the ``p x p`` window around the patch without
       the patch itself, and whose output is a softmax over ``C_dist``; it is
       trained with the cross-entropy against the index of the ``C_dist``
       element nearest to the centre feature.
    3. **Position model** ``p(c | x)``: Algorithm 1, the histogram over the
       training images of the index of the nearest ``C_dist`` element at
       every position, normalized (optionally spread over a
       ``position_window`` box, as the official code does).
    4. **Score.** ``p(c | Ω) ≈ (p(c | N_p(x)) + p(c | x)) / 2``; an element
       ``c`` of ``C_emb`` is allowed when the ``C_dist`` element that
       represents it (its nearest) has ``p(c | Ω) > τ``, with
       ``τ = 1 / (2 |C_emb|)``; with ``p(Φ | c) = λ exp(-λ ‖Φ - c‖)``,
       ``S(x) = -log max_{allowed c} p(Φ(x) | c) = λ min_{allowed c} ‖Φ(x) - c‖ - log λ``.
       The patch-score grid is upsampled and blurred (``sigma = 4``) and the
       image score is its maximum.

    The locally aware patch features (PatchCore's: two stages of the
    backbone, ``3 x 3`` average pooling) are the embedder's job:
    :func:`make_pni_pipeline` builds the recommended pipeline. The pixel-wise
    refinement network of Part 2 needs the images, which a detector never
    sees: it is :class:`~skpatch.AnomalyMapRefiner`, which wraps the fitted
    pipeline (``make_pni_pipeline(refine=True)``).

    Parameters
    ----------
    coreset_ratio : float in (0, 1], default=0.01
        Size of ``C_emb`` as a fraction of the ``N x h x w`` training patches
        (the paper's 1 %); at least 2 elements.
    n_dist : int, default=512
        Size of ``C_dist`` (the first greedy picks of ``C_emb``, clipped to
        ``|C_emb|``): the number of classes of the MLP and of the histogram.
        The official code uses 2048.
    neighborhood_size : int, default=3
        Side ``p`` of the neighbourhood window ``N_p(x)`` (odd; the official
        code's is 9, see the user guide). The MLP's input has ``C (p² - 1)``
        features.
    position_window : int, default=1
        Side of the box over which each count of Algorithm 1 is spread (odd);
        1 is the paper's histogram, the official code spreads the counts over
        the neighbourhood window.
    tau : float or None, default=None
        Threshold ``τ`` on ``p(c | Ω)``; None uses the paper's ``1 / (2 |C_emb|)``.
    lam : float, default=1.0
        ``λ`` of the likelihood ``λ exp(-λ ‖Φ - c‖)``. It scales the scores
        (and shifts them by ``-log λ``), so rankings do not depend on it.
    mlp_width : int, default=256
        Units per hidden layer of the MLP (official code: 2048).
    mlp_depth : int, default=2
        Number of hidden layers (official code: 10 layers).
    dropout : float in [0, 1), default=0.1
        Dropout after every hidden layer while training.
    n_epochs : int, default=5
        Passes over the MLP's training patches (official code: 15).
    learning_rate : float, default=1e-3
        Adam's learning rate (as the official code).
    batch_size : int, default=512
        Patches per gradient step.
    max_train_patches : int or None, default=50_000
        The MLP trains on a random sample of at most this many training
        patches (drawn once per fit); None uses them all.
    max_coreset_candidates : int or None, default=100_000
        The greedy coreset picks ``C_emb`` among a random sample of at most
        this many training patches (its size is still ``coreset_ratio`` of
        *all* patches); None searches them all, as the paper. Each greedy
        pick reads every candidate once: for ELPV (320k patches) the full
        search takes minutes on two CPU cores, the default a third of it.
    sigma : float, default=4
        Standard deviation, in map pixels, of the Gaussian blur of the
        anomaly maps; 0 disables it.
    map_size : int, pair of int or None, default=224
        Size ``(H, W)`` of the anomaly maps; None keeps the patch grid.
    contamination : float in (0, 0.5], default=0.1
        Expected fraction of anomalies: ``offset_`` is this quantile of the
        training images' ``score_samples``, computed as ``calibration`` says.
    calibration : {"leave-one-out", "in-sample"}, default="leave-one-out"
        Which training scores set ``offset_``. A training patch may be an
        element of ``C_emb`` (distance 0 to itself), and the greedy coreset
        picks the most unusual patches first, precisely those that set the
        image scores of the training images; in-sample scores are therefore
        optimistic where it matters. ``"leave-one-out"`` scores every
        training image without the ``C_emb`` elements drawn from it and
        with the histogram without its own counts (see Notes);
        ``"in-sample"`` (scikit-learn's rule) uses the final model.
    random_state : int, RandomState instance or None, default=None
        Seeds the coreset (projection and starting point), the MLP's
        initialization, dropout and batch order, and the patch sample.
    device : str, default="auto"
        Torch device for the coreset, the MLP and scoring; "auto" uses CUDA
        when available. The fitted state is NumPy whatever the device.

    Attributes
    ----------
    embedding_coreset_ : ndarray of shape (n_emb, C)
        ``C_emb`` in greedy pick order; ``C_dist`` is ``embedding_coreset_[:n_dist_]``.
    n_dist_ : int
        ``|C_dist|``.
    dist_assignment_ : ndarray of shape (n_emb,)
        Index of the ``C_dist`` element nearest to each ``C_emb`` element
        (which element of ``C_dist`` represents it in ``p(c | Ω)``).
    position_prior_ : ndarray of shape (h * w, n_dist)
        ``p(c | x)`` of Algorithm 1 per position (row-major grid order).
    mlp_coefs_ : list of ndarray
        Weights ``(n_in, n_out)`` of the MLP's affine layers, with the batch
        norms folded in (eval mode).
    mlp_intercepts_ : list of ndarray
        Their biases.
    feature_mean_ : ndarray of shape (C,)
        Channel means of the training patches (the MLP's input standardization).
    feature_scale_ : ndarray of shape (C,)
        Channel standard deviations of the training patches.
    tau_ : float
        Threshold used on ``p(c | Ω)``.
    mlp_loss_ : list of float
        Mean training cross-entropy of each epoch.
    offset_ : float
        Threshold on ``score_samples``; ``decision_function = score_samples - offset_``.
    grid_shape_ : tuple of int
        Patch grid ``(h, w)`` seen in fit (``(1, 1)`` for 2-D input).
    n_features_in_ : int
        Number of embedding channels ``C`` seen in fit.

    See Also
    --------
    make_pni_pipeline : The recommended embedder and this detector in a pipeline.
    AnomalyMapRefiner : The pixel-wise refinement network of PNI's Part 2.
    PaDiMDetector : One Gaussian per position instead of a memory bank.

    Notes
    -----
    **Representing C_emb by C_dist.** The paper models ``p(c | Ω)`` on
    ``C_dist`` "to represent ``C_emb``" without saying how the two meet: here
    every element of ``C_emb`` takes the probability of its nearest element
    of ``C_dist`` (an element of ``C_dist`` represents itself), and the
    threshold ``τ = 1 / (2 |C_emb|)`` is applied to that probability.

    **No allowed element.** When no element passes ``τ`` (a neighbourhood
    and a position that predict nothing the feature is near), the official
    code always admits the farthest element of ``C_emb``: the score is then
    ``λ max_c ‖Φ(x) - c‖ - log λ``, the largest score the patch can get.

    **Two-dimensional input.** A sample ``(n, d)`` is a grid of one patch:
    the neighbourhood is all padding (the MLP learns the marginal of the
    ``C_dist`` indices) and the histogram has one position, so PNI reduces
    to a nearest-neighbour distance to the allowed part of the coreset.

    **Leave-one-out calibration.** Training image ``i`` is scored with the
    elements of ``C_emb`` that were drawn from other images, and with the
    histogram of the other ``N - 1`` images (its own counts subtracted
    exactly). The coreset selection and the MLP stay those of the full fit
    (the MLP is trained on a sample of all images; it is not re-trained
    ``N`` times). An image whose patches make up all of ``C_emb`` keeps its
    in-sample score.

    **Cost.** Fit: the greedy coreset (``O(N h w · 128 · |C_emb|)``, see
    :func:`~skpatch._memory_bank.greedy_coreset`), the nearest ``C_dist``
    element of every training patch (``O(N h w |C_dist| C)``), and
    ``n_epochs`` passes of the MLP over ``max_train_patches`` patches,
    whose neighbourhood vectors are gathered per mini-batch (the training
    set is never unfolded). Memory beyond the embeddings: ``N h w`` indices
    and the 128-d projection of the coreset selection; the patches are not
    copied into an ``(N h w, C)`` matrix (they are gathered from the
    embeddings where needed), except when ``max_coreset_candidates`` is None
    or not below ``N h w``. The fit needs all the embeddings at once (the
    histogram counts every training patch's nearest ``C_dist`` element,
    known only after the coreset: two passes), so it holds ``N C h w``
    floats and has no ``partial_fit``. Scoring: per image,
    the MLP over ``h w`` neighbourhoods and the ``h w x |C_emb|`` distances,
    in chunks of images sized by ``working_memory`` and, on the CPU, blocks
    of 512 patches whose distances stay in the cache: each patch's least
    distance per ``C_dist`` cluster, then over the clusters its position
    and neighbourhood allow (``C_emb`` is stored cluster by cluster). The fitted
    state is ``C_emb`` (grows with ``N``: 1 % of the patches), the
    ``h w x |C_dist|`` histogram and the MLP's weights (independent of ``N``).

    References
    ----------
    .. [1] J. Bae, J.-H. Lee, S. Kim, "PNI: Industrial Anomaly Detection using
       Position and Neighborhood Information", ICCV, 2023.
    .. [2] K. Roth, L. Pemula, J. Zepeda, B. Schölkopf, T. Brox, P. Gehler,
       "Towards Total Recall in Industrial Anomaly Detection", CVPR, 2022.

    Examples
    --------
    >>> import numpy as np
    >>> from skpatch import PNIDetector
    >>> rng = np.random.RandomState(0)
    >>> X = rng.normal(size=(30, 4, 5, 5)).astype(np.float32)
    >>> detector = PNIDetector(coreset_ratio=0.1, n_dist=16, n_epochs=2,
    ...                        map_size=None, random_state=0).fit(X)
    >>> detector.anomaly_map(X[:2]).shape
    (2, 5, 5)
    >>> detector.predict(X[:3] + 10)
    array([-1, -1, -1])
    """

    _parameter_constraints = {
        **BasePatchDetector._parameter_constraints,
        "coreset_ratio": [Interval(Real, 0, 1, closed="right")],
        "n_dist": [Interval(Integral, 1, None, closed="left")],
        "neighborhood_size": [Interval(Integral, 1, None, closed="left")],
        "position_window": [Interval(Integral, 1, None, closed="left")],
        "tau": [Interval(Real, 0, 1, closed="left"), None],
        "lam": [Interval(Real, 0, None, closed="neither")],
        "mlp_width": [Interval(Integral, 1, None, closed="left")],
        "mlp_depth": [Interval(Integral, 0, None, closed="left")],
        "dropout": [Interval(Real, 0, 1, closed="left")],
        "n_epochs": [Interval(Integral, 0, None, closed="left")],
        "learning_rate": [Interval(Real, 0, None, closed="neither")],
        "batch_size": [Interval(Integral, 2, None, closed="left")],
        "max_train_patches": [Interval(Integral, 2, None, closed="left"), None],
        "max_coreset_candidates": [Interval(Integral, 1, None, closed="left"), None],
        "calibration": [StrOptions({"leave-one-out", "in-sample"})],
        "random_state": ["random_state"],
    }

    def __init__(
        self,
        *,
        coreset_ratio=0.01,
        n_dist=512,
        neighborhood_size=3,
        position_window=1,
        tau=None,
        lam=1.0,
        mlp_width=256,
        mlp_depth=2,
        dropout=0.1,
        n_epochs=5,
        learning_rate=1e-3,
        batch_size=512,
        max_train_patches=50_000,
        max_coreset_candidates=100_000,
        sigma=4.0,
        map_size=224,
        contamination=0.1,
        calibration="leave-one-out",
        random_state=None,
        device="auto",
    ):
        self.coreset_ratio = coreset_ratio
        self.n_dist = n_dist
        self.neighborhood_size = neighborhood_size
        self.position_window = position_window
        self.tau = tau
        self.lam = lam
        self.mlp_width = mlp_width
        self.mlp_depth = mlp_depth
        self.dropout = dropout
        self.n_epochs = n_epochs
        self.learning_rate = learning_rate
        self.batch_size = batch_size
        self.max_train_patches = max_train_patches
        self.max_coreset_candidates = max_coreset_candidates
        self.sigma = sigma
        self.map_size = map_size
        self.contamination = contamination
        self.calibration = calibration
        self.random_state = random_state
        self.device = device

    # ------------------------------------------------------------------ fitting
    def _check_odd(self):
        for name in ("neighborhood_size", "position_window"):
            if getattr(self, name) % 2 == 0:
                raise ValueError(f"{name} must be odd, got {getattr(self, name)}.")

    def _coresets(self, x, device, rng):
        """``C_emb`` indices into the flat patches (image-major, pick order) and ``|C_dist|``."""
        n_images, n_channels = x.shape[:2]
        n_patches = n_images * x.shape[2] * x.shape[3]
        n_emb = min(n_patches, max(2, math.ceil(self.coreset_ratio * n_patches)))
        seed = int(rng.randint(2**31 - 1))
        limit = self.max_coreset_candidates
        if limit is None or limit >= n_patches:
            # every patch is a candidate: the (N h w, C) copy of the patches as rows
            flat = x.permute(0, 2, 3, 1).reshape(-1, n_channels)
            return greedy_coreset(flat, n_emb, random_state=seed, device=device).cpu(), min(
                self.n_dist, n_emb
            )
        # Greedy picks among a random sample of the patches: each pick reads
        # every candidate once, so this bounds both the time and the memory.
        sample = rng.choice(n_patches, max(limit, n_emb), replace=False)
        candidates = torch.as_tensor(np.sort(sample))
        picks = greedy_coreset(patch_rows(x, candidates), n_emb, random_state=seed, device=device)
        return candidates[picks.cpu()], min(self.n_dist, n_emb)

    def _train_mlp(self, x, mean, scale, targets, n_classes, device, rng):
        """Train ``p(c | N_p(x))`` on a sample of patches; returns the fitted module and losses."""
        n_images, n_channels, height, width = x.shape
        n_patches = n_images * height * width
        n_train = n_patches if self.max_train_patches is None else min(
            n_patches, self.max_train_patches
        )
        sample = rng.choice(n_patches, n_train, replace=False) if n_train < n_patches else (
            np.arange(n_patches)
        )
        sample = torch.as_tensor(np.sort(sample))
        images = sample // (height * width)
        rows = (sample % (height * width)) // width
        cols = sample % width
        n_inputs = n_channels * (self.neighborhood_size**2 - 1)
        seed = int(rng.randint(np.iinfo(np.int32).max))
        batch = min(self.batch_size, n_train)
        # Small steps (tests, tabular data) spend their time synchronizing
        # threads, which turns into large slowdowns on a busy machine.
        work = batch * (n_inputs + self.mlp_depth * self.mlp_width + n_classes) * self.mlp_width
        small = device.type == "cpu" and work < 2**22
        threads = single_threaded() if small else contextlib.nullcontext()
        with threads, seeded(seed, device):
            module = _NeighborhoodMLP(
                n_inputs, n_classes, self.mlp_width, self.mlp_depth, self.dropout
            ).to(device)
            optimizer = torch.optim.Adam(module.parameters(), lr=self.learning_rate)
            generator = torch.Generator().manual_seed(seed)
            losses = []
            module.train()
            for _ in range(self.n_epochs):
                order = torch.randperm(n_train, generator=generator)
                total, seen = 0.0, 0
                for start in range(0, n_train, batch):
                    idx = order[start : start + batch]
                    if len(idx) < 2:  # batch norm needs two samples
                        continue
                    inputs = gather_neighborhoods(
                        x, images[idx], rows[idx], cols[idx], self.neighborhood_size, mean, scale
                    ).to(device)
                    loss = F.cross_entropy(module(inputs), targets[sample[idx]].to(device))
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    total += float(loss.detach()) * len(idx)
                    seen += len(idx)
                losses.append(total / max(seen, 1))
            module.eval()
        return module, losses

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y=None):
        """Fit the coresets, the neighbourhood MLP and the position histogram.

        Parameters
        ----------
        X : ndarray of shape (n, C, h, w) or (n, d)
            Patch embeddings of normal training images.
        y : None
            Ignored.

        Returns
        -------
        self : PNIDetector
            The fitted detector.
        """
        self._check_odd()
        X = self._validate_embeddings(X, reset=True)
        n_images, n_channels, height, width = X.shape
        self._check_n_samples(n_images, 2, type(self).__name__)
        device = resolve_device(self.device)
        rng = check_random_state(self.random_state)
        n_positions = height * width
        with torch.no_grad():
            x = as_tensor(X, "cpu", np.float32)
            # Patches are gathered from x as rows where needed, never copied
            # all at once as an (N h w, C) matrix: the fit holds the
            # embeddings once (see Notes).
            picks, n_dist = self._coresets(x, device, rng)
            emb = patch_rows(x, picks).to(device)
            # Nearest C_dist element of every training patch: the MLP's targets
            # and Algorithm 1's counts (images in chunks of working_memory).
            chunk = get_chunk_n_rows(row_bytes=4 * n_positions * n_channels, max_n_rows=n_images)
            targets = torch.cat([
                nearest_neighbors(
                    x[batch].to(device).permute(0, 2, 3, 1).reshape(-1, n_channels), emb[:n_dist]
                )[1][:, 0].cpu()
                for batch in gen_batches(n_images, chunk)
            ])
            self.dist_assignment_ = to_numpy(nearest_neighbors(emb, emb[:n_dist])[1][:, 0])
            self.dist_assignment_[:n_dist] = np.arange(n_dist)
            mean = x.mean(dim=(0, 2, 3))
            scale = x.std(dim=(0, 2, 3)) if n_images * n_positions > 1 else torch.ones_like(mean)
            scale = torch.where(scale > 0, scale, torch.ones_like(scale))
            counts = self._position_counts(
                targets.view(n_images, n_positions), n_dist, (height, width)
            )
        self.embedding_coreset_ = to_numpy(emb)
        self.n_dist_ = int(n_dist)
        self.feature_mean_ = to_numpy(mean)
        self.feature_scale_ = to_numpy(scale)
        counts_total = counts.sum(dim=1, keepdim=True)
        self.position_prior_ = to_numpy(counts / counts_total.clamp(min=1))
        self.tau_ = float(self.tau if self.tau is not None else 1.0 / (2 * len(picks)))
        module, self.mlp_loss_ = self._train_mlp(x, mean, scale, targets, n_dist, device, rng)
        self.mlp_coefs_, self.mlp_intercepts_ = module.folded()
        with torch.inference_mode():
            if self.calibration == "leave-one-out":
                sources = (picks // n_positions).numpy()
                scores = self._loo_scores(X, targets.view(n_images, n_positions), counts, sources)
            else:
                scores = self._anomaly_scores(X)
        self._set_offset(scores)
        return self

    def _position_counts(self, targets, n_dist, grid):
        """Algorithm 1's counts ``(P, K)``: nearest ``C_dist`` index per position, summed."""
        n_images, n_positions = targets.shape
        counts = torch.zeros(n_positions * n_dist, dtype=torch.float64)
        flat_index = (torch.arange(n_positions) * n_dist).unsqueeze(0) + targets
        ones = torch.ones(flat_index.numel(), dtype=torch.float64)
        counts.index_add_(0, flat_index.reshape(-1), ones)
        counts = counts.view(1, *grid, n_dist).permute(0, 3, 1, 2)
        counts = spread_counts(counts, self.position_window)
        return counts[0].permute(1, 2, 0).reshape(n_positions, n_dist).float()

    def _own_counts(self, targets, n_dist):
        """Each image's own contribution ``(b, P, K)`` to the position counts."""
        n_images, n_positions = targets.shape
        own = torch.zeros(n_images, n_dist, n_positions)
        own.scatter_(1, targets.unsqueeze(1), 1.0)
        own = spread_counts(own.view(n_images, n_dist, *self.grid_shape_), self.position_window)
        return own.reshape(n_images, n_dist, n_positions).transpose(1, 2)

    # ------------------------------------------------------------------ scoring
    def _bytes_per_image(self, X, device):
        n_positions = X.shape[2] * X.shape[3]
        n_inputs = X.shape[1] * self.neighborhood_size**2
        widths = n_inputs + self.mlp_width + 3 * self.n_dist_ + 3 * len(self.embedding_coreset_)
        return n_positions * widths * X.itemsize

    def _state(self, device, dtype):
        def t(a):
            return as_tensor(a, device).to(dtype)

        def build():
            emb = t(self.embedding_coreset_)
            center = emb.mean(dim=0)
            # C_emb in the order of its C_dist clusters (see _scores_given)
            assign = torch.as_tensor(self.dist_assignment_, device=device)
            order = assign.argsort(stable=True)
            centred = emb[order] - center
            coefs = [t(c) for c in self.mlp_coefs_]
            return {
                # centring keeps the cancellation error of |a|² + |b|² - 2 a·b small
                "center": center,
                "emb": centred,
                "emb_sq": (centred * centred).sum(dim=1, keepdim=True),
                "order": order,
                "assign": assign[order],
                "threshold": self._threshold(t(self.position_prior_)),
                # The MLP as convolutions: the first layer on the window, the
                # others 1 x 1.
                "weights": [
                    neighborhood_conv_weight(coefs[0], len(center), self.neighborhood_size),
                    *(coef.T.contiguous()[:, :, None, None] for coef in coefs[1:]),
                ],
                "intercepts": [t(b) for b in self.mlp_intercepts_],
                "mean": t(self.feature_mean_).view(1, -1, 1, 1),
                "scale": t(self.feature_scale_).view(1, -1, 1, 1),
            }

        sources = (self.embedding_coreset_, self.dist_assignment_, self.position_prior_,
                   *self.mlp_coefs_, *self.mlp_intercepts_, self.feature_mean_,
                   self.feature_scale_)
        return self._on_device(("state", dtype), device, sources, build)

    def _threshold(self, prior):
        """``2 τ - p(c | x)``: ``p(c | Ω) > τ`` exactly where ``p(c | N_p(x))`` exceeds it."""
        return 2 * self.tau_ - prior

    def _neighborhood_probs(self, x, state):
        """``p(c | N_p(x))`` for every patch of ``x``: ``(b, P, K)``.

        The layers run as convolutions on the standardized grid in
        channels-last layout (on a CPU, 15-20 % less time than the later
        layers as products of rows after a transposing copy), and the logits
        come out patch-major, one row of ``K`` per patch, without a copy.
        """
        hidden = x.contiguous(memory_format=torch.channels_last) - state["mean"]
        hidden /= state["scale"]
        weights, intercepts = state["weights"], state["intercepts"]
        padding = self.neighborhood_size // 2
        for i, (weight, intercept) in enumerate(zip(weights, intercepts)):
            hidden = F.conv2d(hidden, weight, intercept, padding=padding if i == 0 else 0)
            if i < len(weights) - 1:
                hidden.relu_()
        logits = hidden.permute(0, 2, 3, 1).reshape(-1, self.n_dist_)
        return torch.softmax(logits, dim=1).view(len(x), -1, self.n_dist_)

    def _scores_given(self, x, state, threshold, excluded=None):
        """Patch scores ``(b, h, w)`` of ``x`` given ``threshold`` ((P, K) or (b, P, K)).

        ``threshold`` is :meth:`_threshold` of the position prior: cluster
        ``c`` is allowed for a patch where ``p(c | N_p(x))`` exceeds it,
        which is ``(p(c | N_p(x)) + p(c | x)) / 2 > τ`` with one comparison
        per element instead of three passes.

        ``excluded`` (b, n_emb) bool marks elements of ``C_emb`` an image may
        not use (leave-one-out calibration).

        A patch's distance is the least over the elements whose ``C_dist``
        cluster is likely at its position: the least per cluster (the
        elements are stored cluster by cluster), then over the clusters
        allowed (the others filled with ``inf``). Masking every element
        instead cost a third of the scoring (``masked_fill_`` on a CPU runs
        at 1 ns per element). Patches go a block at a time (``_PATCH_BLOCK``).
        """
        n_images, n_channels = x.shape[:2]
        n_positions = x.shape[2] * x.shape[3]
        blocked = (self._neighborhood_probs(x, state) <= threshold).view(-1, self.n_dist_)
        patches = x.permute(0, 2, 3, 1).reshape(-1, n_channels)
        emb, emb_sq, assign = state["emb"], state["emb_sq"], state["assign"]
        if excluded is not None:
            excluded = excluded[:, state["order"]]
            excluded_rows = [torch.nonzero(row)[:, 0] for row in excluded]
        distances = x.new_empty(len(patches))
        step = min(_PATCH_BLOCK if x.device.type == "cpu" else len(patches), len(patches))
        scratch = x.new_empty(len(emb) * step)
        per_cluster = x.new_empty(self.n_dist_ * step)
        for start in range(0, len(patches), step):
            stop = min(start + step, len(patches))
            queries = patches[start:stop] - state["center"]
            # |c|² - 2 Φ·c ranks the elements for a patch as the distance does
            partial = scratch[: len(emb) * (stop - start)].view(len(emb), stop - start)
            torch.addmm(emb_sq, emb, queries.T, alpha=-2, out=partial)
            if excluded is not None:
                for image in range(start // n_positions, (stop - 1) // n_positions + 1):
                    first, last = max(start, image * n_positions), min(stop, (image + 1) * n_positions)
                    partial[:, first - start : last - start].index_fill_(0, excluded_rows[image], math.inf)
            blocked_block = blocked[start:stop].T  # (K, block)
            cluster_least = per_cluster[: self.n_dist_ * (stop - start)].view(self.n_dist_, stop - start)
            cluster_least.fill_(math.inf).scatter_reduce_(0, assign[:, None].expand_as(partial), partial, "amin")
            least = torch.amin(cluster_least.masked_fill_(blocked_block, math.inf), dim=0)
            queries_sq = (queries * queries).sum(dim=1)
            # Official code: the farthest element of C_emb is always admitted.
            none = torch.isinf(least)
            if none.any():
                farthest = torch.addmm(emb_sq, emb, queries[none].T, alpha=-2)
                if excluded is not None:
                    images = torch.arange(start, stop, device=x.device)[none] // n_positions
                    farthest.masked_fill_(excluded.T[:, images], -math.inf)
                least[none] = farthest.amax(dim=0)
            least += queries_sq
            torch.sqrt(least.clamp(min=0), out=distances[start:stop])
            # A patch close to its element (a training patch in C_emb) loses its
            # digits to cancellation: its distance is recomputed directly.
            close = (least <= 1e-2 * queries_sq) & ~none
            if close.any():
                element = partial[:, close].masked_fill_(blocked_block[:, close][assign], math.inf).argmin(dim=0)
                distances[start:stop][close] = torch.linalg.vector_norm(queries[close] - emb[element], dim=1)
        scores = self.lam * distances - math.log(self.lam)
        return scores.view(n_images, *self.grid_shape_)

    def _patch_scores(self, x):
        state = self._state(x.device, x.dtype)
        return self._scores_given(x, state, state["threshold"])

    def _loo_scores(self, X, targets, counts, sources):
        """Training images' scores, each without its own coreset elements and counts."""
        device = resolve_device(self.device)
        scores = self._empty_scores(X)
        n_emb = len(self.embedding_coreset_)
        sources = torch.as_tensor(sources)
        row_bytes = self._bytes_per_image(X, device) + 4 * X.shape[2] * X.shape[3] * self.n_dist_
        chunk = get_chunk_n_rows(row_bytes=row_bytes, max_n_rows=min(len(X), 32))
        for batch in gen_batches(len(X), chunk):
            x = as_tensor(X[batch], device)
            state = self._state(device, x.dtype)
            ids = torch.arange(batch.start, batch.stop)
            excluded = sources.unsqueeze(0) == ids.unsqueeze(1)  # (b, n_emb)
            # An image that holds every element keeps them (in-sample score).
            excluded &= ~excluded.all(dim=1, keepdim=True)
            remaining = counts.unsqueeze(0) - self._own_counts(targets[batch], self.n_dist_)
            total = remaining.sum(dim=2, keepdim=True)
            prior = torch.where(
                total > 0, remaining / total.clamp(min=1e-12), counts / counts.sum(1, keepdim=True)
            )
            excluded = excluded.to(device) if n_emb else excluded
            threshold = self._threshold(prior.to(device, x.dtype))

            def patch_scores(x, state=state, threshold=threshold, excluded=excluded):
                return self._scores_given(x, state, threshold, excluded)

            scores[batch] = to_numpy(self._image_scores(x, patch_scores))
        return scores


def make_pni_pipeline(
    backbone="efficientnet_lite0",
    *,
    embedder_params=None,
    memory=None,
    refine=False,
    refiner_params=None,
    **detector_params,
):
    """The PNI pipeline: locally aware patch features, PNI, optionally the refinement.

    Builds ``make_pipeline(PatchEmbedder(...), PNIDetector(...))`` with
    PatchCore's locally aware features, on which PNI builds: the *last two*
    of the backbone's default stages, each ``3 x 3`` average-pooled
    (``pool_size=3``), upsampled to the larger map and concatenated; for a
    ResNet that is ``layer2`` + ``layer3``, for EfficientNet-Lite ``stage2`` +
    ``stage4`` (the same strides, 8 and 16). With ``refine=True`` the
    pipeline is wrapped in an :class:`~skpatch.AnomalyMapRefiner` (PNI Part 2),
    which fits it and then trains the refinement network on synthetic defects.

    Parameters
    ----------
    backbone : str, default="efficientnet_lite0"
        Registered backbone name (see :func:`skpatch.backbones.available_backbones`).
    embedder_params : dict or None, default=None
        Other :class:`~skpatch.PatchEmbedder` parameters (``weights``,
        ``image_size``, ``crop_size``, ``device``, ...); they may also
        override ``layers`` and ``pool_size``.
    memory : str, joblib.Memory or None, default=None
        Passed to :func:`~sklearn.pipeline.make_pipeline`: caches the
        embeddings of the training images between fits.
    refine : bool, default=False
        Wrap the pipeline in an :class:`~skpatch.AnomalyMapRefiner`. Off by
        default: training the refinement network costs minutes on a CPU.
    refiner_params : dict or None, default=None
        Parameters of :class:`~skpatch.AnomalyMapRefiner` when ``refine``.
    **detector_params : dict
        Parameters of :class:`PNIDetector` (``coreset_ratio``, ``n_dist``,
        ``random_state``, ...).

    Returns
    -------
    estimator : sklearn.pipeline.Pipeline or AnomalyMapRefiner
        Steps ``"patchembedder"`` and ``"pnidetector"``, or the refiner
        wrapping them.

    See Also
    --------
    PNIDetector : The detector.
    AnomalyMapRefiner : The refinement network.

    Examples
    --------
    >>> import numpy as np
    >>> from skpatch import make_pni_pipeline
    >>> pipe = make_pni_pipeline(
    ...     embedder_params={"weights": None, "image_size": 64, "crop_size": None},
    ...     map_size=64, n_dist=32, n_epochs=1, random_state=0,
    ... )
    >>> pipe[0].layers, pipe[0].pool_size
    (('stage2', 'stage4'), 3)
    >>> images = np.random.RandomState(0).randint(0, 256, (8, 64, 64), dtype=np.uint8)
    >>> pipe.fit(images).score_samples(images).shape
    (8,)
    """
    if not isinstance(refine, (bool, np.bool_)):
        raise TypeError(f"refine must be True or False, got {refine!r}")
    pipeline = make_pipeline(
        locally_aware_embedder(backbone, embedder_params), PNIDetector(**detector_params), memory=memory
    )
    if not refine:
        return pipeline
    from .._refine import AnomalyMapRefiner

    return AnomalyMapRefiner(pipeline, **(refiner_params or {}))
