import pickle

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.pipeline import Pipeline, make_pipeline

from skpatch import AnomalyMapRefiner, PaDiMDetector, PatchEmbedder, anomaly_map, make_pni_pipeline
from skpatch._refine import RefinementDecoder, refinement_loss
from skpatch.datasets import make_synthetic_defects

from _common import FAST_PARAMS, ON_GPU

EMBEDDER = {"weights": None, "image_size": 32, "crop_size": None}
FAST_REFINER = {"n_epochs": 2, "width": 4, "random_state": 0}


def _refiner(**params):
    return make_pni_pipeline(
        embedder_params=EMBEDDER, map_size=32, **FAST_PARAMS["PNIDetector"],
        refine=True, refiner_params={**FAST_REFINER, **params},
    )


def test_loss_is_the_papers():
    rng = np.random.RandomState(0)
    refined = torch.as_tensor(rng.uniform(size=(2, 1, 5, 6)))
    target = torch.as_tensor(rng.uniform(size=(2, 1, 5, 6)) > 0.5).double()
    loss = refinement_loss(refined, target)
    expected = []
    for a, t in zip(refined.numpy()[:, 0], target.numpy()[:, 0]):
        d = a - t
        reg = np.sqrt((d**2).sum()) / 30
        grad = np.sqrt((np.diff(d, axis=0) ** 2).sum()) + np.sqrt((np.diff(d, axis=1) ** 2).sum())
        expected.append((reg + grad / 60) / 2)
    assert float(loss) == pytest.approx(np.mean(expected))
    assert float(refinement_loss(target, target)) == 0


def test_decoder_shapes_and_coarse_map_skip():
    decoder = RefinementDecoder((8, 16, 32), width=4).eval()
    image, amap = torch.randn(2, 3, 32, 32), torch.randn(2, 1, 32, 32)
    features = [torch.randn(2, 8, 8, 8), torch.randn(2, 16, 4, 4), torch.randn(2, 32, 2, 2)]
    out = decoder(image, amap, features)
    assert out.shape == (2, 1, 32, 32)
    # the coarse map enters the output directly (initial skip weight 1)
    with torch.no_grad():
        delta = decoder(image, amap + 1, features) - out
    assert (delta > 0.5).float().mean() > 0.9


def test_fit_trains_on_synthetic_defects_and_refines(images):
    model = _refiner(n_epochs=3).fit(images)
    assert isinstance(model, AnomalyMapRefiner)
    assert len(model.loss_curve_) == 3 and model.loss_curve_[-1] < model.loss_curve_[0]
    maps = model.anomaly_map(images[:3])
    assert maps.shape == (3, 32, 32) and maps.min() >= 0 and maps.max() <= 1
    # the one call for maps works on the wrapper
    np.testing.assert_array_equal(anomaly_map(model, images[:3]), maps)
    # image score: the wrapped pipeline's by default, or the refined maximum
    np.testing.assert_array_equal(
        model.score_samples(images), model.estimator_.score_samples(images)
    )
    assert model.offset_ == model.estimator_[-1].offset_
    model.set_params(image_score="refined").fit(images)
    np.testing.assert_allclose(
        -model.score_samples(images[:3]), model.anomaly_map(images[:3]).reshape(3, -1).max(1)
    )
    assert set(model.predict(images)) <= {-1, 1}


def test_every_image_trains_in_batches_of_two_or_more(images, monkeypatch):
    # Batch norm needs 2 images: a lone last image joins the batch before it
    # (it was skipped, and batch_size=1 trained nothing and reported 0 loss).
    seen = []

    def spy(refined, target):
        seen.append(len(refined))
        return refinement_loss(refined, target)

    monkeypatch.setattr("skpatch._refine.refinement_loss", spy)
    _refiner(n_epochs=1, batch_size=4, max_images=9).fit(images)
    assert sorted(seen) == [4, 5]
    for bad in ({"batch_size": 1}, {"max_images": 1}):
        with pytest.raises(ValueError, match=f"'{next(iter(bad))}' parameter"):
            _refiner(**bad).fit(images)


def test_paths_are_read_as_the_embedder_reads_them(images, tmp_path):
    paths = []
    for i, image in enumerate(images):
        paths.append(str(tmp_path / f"{i}.png"))
        Image.fromarray(image).save(paths[-1])
    rgb = np.repeat(images[..., None], 3, axis=-1)  # 8-bit files are read as RGB
    from_paths = _refiner(n_epochs=1).fit(paths)
    from_array = _refiner(n_epochs=1).fit(rgb)
    assert from_paths.loss_curve_ == from_array.loss_curve_
    np.testing.assert_array_equal(from_paths.anomaly_map(paths[:2]), from_array.anomaly_map(rgb[:2]))
    with pytest.raises(ValueError, match="AnomalyMapRefiner takes images of one size"):
        from_array.anomaly_map([images[0], images[1][:20]])


def test_same_seed_same_network_and_pickle(images):
    a = _refiner().fit(images)
    b = _refiner().fit(images)
    for key, value in a.network_state_.items():
        assert isinstance(value, np.ndarray)
        if not ON_GPU:  # CUDA's backward passes add in any order (atomics)
            np.testing.assert_array_equal(value, b.network_state_[key])
    c = pickle.loads(pickle.dumps(a))
    np.testing.assert_array_equal(a.anomaly_map(images[:2]), c.anomaly_map(images[:2]))


def test_refinement_learns_to_find_defects():
    # Flat images; defects are bright squares. Trained on the paper's kinds, the
    # refined maps separate defect pixels from normal ones better than chance.
    rng = np.random.RandomState(0)
    images = np.clip(128 + rng.normal(0, 3, size=(24, 32, 32)), 0, 255).astype(np.uint8)
    model = AnomalyMapRefiner(
        make_pipeline(
            PatchEmbedder(**EMBEDDER),
            PaDiMDetector(n_features=10, map_size=32, random_state=0),
        ),
        n_epochs=15, width=8, random_state=0,
    ).fit(images)
    test, masks = make_synthetic_defects(images[:8], kinds="cutpaste_scar", random_state=1)
    maps = model.anomaly_map(test)
    assert maps[masks].mean() > maps[~masks].mean()


def test_needs_a_pipeline_with_an_embedder(images):
    with pytest.raises(TypeError, match="PatchEmbedder"):
        AnomalyMapRefiner(PaDiMDetector()).fit(images)


def test_a_bad_device_fails_before_the_wrapped_fit(images, monkeypatch):
    pipe = make_pipeline(PatchEmbedder(weights=None, image_size=32, crop_size=None),
                         PaDiMDetector(n_features=4))
    monkeypatch.setattr(type(pipe), "fit", lambda *a, **k: pytest.fail("the pipeline was fitted"))
    with pytest.raises(ValueError, match="device='gpu' is not a torch device"):
        AnomalyMapRefiner(pipe, device="gpu").fit(images)


def test_new_defect_kinds():
    rng = np.random.RandomState(0)
    images = np.clip(128 + 40 * rng.normal(size=(4, 64, 64)), 0, 255).astype(np.uint8)
    for kind in ("cutpaste_scar", "draem"):
        out, masks, kinds = make_synthetic_defects(
            images, kinds=kind, random_state=0, return_kinds=True
        )
        assert kinds == [[kind]] * 4
        assert masks.reshape(4, -1).any(axis=1).all() and masks.mean() < 0.2
        np.testing.assert_array_equal(out[~masks], images[~masks])


def test_map_folds_gives_out_of_fold_coarse_maps(images, monkeypatch):
    # With 2 folds, the two out-of-fold clones train on complementary halves
    # (each defective image's map comes from the one without its original);
    # the final pipeline is fitted first, on every image.
    seen = []
    original_fit = Pipeline.fit

    def recording_fit(self, X, y=None, **params):
        seen.append({x.tobytes() for x in X})
        return original_fit(self, X, y, **params)

    monkeypatch.setattr(Pipeline, "fit", recording_fit)
    _refiner(map_folds=2, n_epochs=1).fit(images)
    everything = {x.tobytes() for x in images}
    assert len(seen) == 3
    assert seen[0] == everything
    assert seen[1] & seen[2] == set() and seen[1] | seen[2] == everything
    with pytest.raises(ValueError, match="map_folds=.* exceeds"):
        _refiner(map_folds=len(images) + 1).fit(images)
