"""The backbones skpatch ships: EfficientNet-Lite (offline weights) and ResNets."""

import functools
import os

import torch
from torch import nn

from ._efficientnet_lite import (
    STAGE_STRIDES,
    build_efficientnet_lite,
    efficientnet_lite_weights_path,
    fold_batchnorm,
)
from ._registry import (
    Backbone,
    WeightsUnavailableError,
    _load_state_dict_file,
    _state_dict_mismatch,
    register_backbone,
)

# The TensorFlow-trained EfficientNet-Lite weights expect inputs in [-1, 1].
HALF_NORM = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
IMAGENET_NORM = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


# --------------------------------------------------------------------- EfficientNet-Lite
def _load_lite_weights(module, variant):
    try:
        path = efficientnet_lite_weights_path(variant)
    except ImportError as exc:
        raise WeightsUnavailableError(str(exc)) from exc
    _load_state_dict_file(module, path)


def _register_lite(variant):
    register_backbone(
        Backbone(
            name=f"efficientnet_{variant}",
            build=functools.partial(build_efficientnet_lite, variant),
            stages=lambda module: module.stages(),
            # Strides 4 / 8 / 16, the analogue of ResNet's layer1-3 used by PaDiM.
            default_layers=("stage1", "stage2", "stage4"),
            mean=HALF_NORM[0],
            std=HALF_NORM[1],
            load_pretrained=functools.partial(_load_lite_weights, variant=variant),
            strides=dict(STAGE_STRIDES),
            fuse=lambda module: module.fuse_batchnorm(),
        )
    )


for _variant in ("lite0", "lite1", "lite2"):
    _register_lite(_variant)


# --------------------------------------------------------------------- torchvision ResNets
def _resnet_stages(module):
    stem = nn.Sequential(module.conv1, module.bn1, module.relu, module.maxpool)
    return [("stem", stem)] + [(f"layer{i}", getattr(module, f"layer{i}")) for i in range(1, 5)]


def _fuse_resnet(module):
    fold_batchnorm(module, "conv1", "bn1")
    for i in range(1, 5):
        for block in getattr(module, f"layer{i}"):
            for j in (1, 2, 3):
                if hasattr(block, f"conv{j}"):
                    fold_batchnorm(block, f"conv{j}", f"bn{j}")
            if block.downsample is not None:
                fold_batchnorm(block.downsample, "0", "1")


def _load_torchvision_weights(module, weights_enum):
    """Load torchvision's ImageNet weights: from its cache, else by download."""
    weights = weights_enum.IMAGENET1K_V1
    filename = weights.url.rsplit("/", 1)[-1]
    cached = os.path.join(torch.hub.get_dir(), "checkpoints", filename)
    replace = f"Delete it, and download it again or copy it from {weights.url}."
    try:
        state_dict = weights.get_state_dict(progress=False, check_hash=True, weights_only=True)
    except Exception as exc:  # URLError, timeout, hash mismatch, unreadable file, ...
        if os.path.isfile(cached):
            # torch never downloads over a cached file: say which one to replace
            raise WeightsUnavailableError(
                f"torchvision's cached weights file {cached!r} cannot be read "
                f"({type(exc).__name__}): it is corrupt or truncated. {replace}"
            ) from exc
        reason = (str(exc).strip().splitlines() or [""])[0]
        raise WeightsUnavailableError(
            f"could not obtain torchvision's ImageNet weights {filename} "
            f"({type(exc).__name__}: {reason}). "
            f"On a machine without internet, copy the file from {weights.url} into "
            f"{os.path.dirname(cached)}/ (torchvision's cache; TORCH_HOME moves it), or pass "
            "weights='/path/to/state_dict.pth'. weights=None gives a randomly "
            "initialized network (for tests only)."
        ) from exc
    # One line, not torch's message, which lists every key (19 kB for a wrong file).
    mismatch = _state_dict_mismatch(module.state_dict(), state_dict)
    if mismatch:
        raise WeightsUnavailableError(
            f"torchvision's cached weights file {cached!r} does not match this backbone's "
            f"architecture: {mismatch}. {replace}"
        )
    module.load_state_dict(state_dict, strict=True)


def _register_resnet(name, builder, weights_enum):
    register_backbone(
        Backbone(
            name=name,
            build=functools.partial(builder, weights=None),
            stages=_resnet_stages,
            # PaDiM §IV-B: the first three layers of a ResNet.
            default_layers=("layer1", "layer2", "layer3"),
            mean=IMAGENET_NORM[0],
            std=IMAGENET_NORM[1],
            load_pretrained=functools.partial(_load_torchvision_weights, weights_enum=weights_enum),
            strides={"stem": 4, "layer1": 4, "layer2": 8, "layer3": 16, "layer4": 32},
            fuse=_fuse_resnet,
        )
    )


def _register_resnets():
    from torchvision import models

    _register_resnet("resnet18", models.resnet18, models.ResNet18_Weights)
    _register_resnet(
        "wide_resnet50_2", models.wide_resnet50_2, models.Wide_ResNet50_2_Weights
    )


_register_resnets()
