"""The ``skpatch`` command line: fit and score folders, errors, help."""

import csv
import subprocess
import sys

import joblib
import numpy as np
import pytest
from PIL import Image
from sklearn.pipeline import Pipeline, make_pipeline

import skpatch._compose
import skpatch.cli
from skpatch import PaDiMDetector, PatchEmbedder, anomaly_map
from skpatch.cli import _ALL_DETECTORS, _detectors, _jet, build_parser, main

from _common import FAST_PARAMS

# Eight training images cannot estimate the covariances: expected here.
pytestmark = pytest.mark.filterwarnings("ignore:.*fewer training samples")

# A random network on 32-pixel images keeps every run to a fraction of a second.
TINY = ["--weights", "none", "--image-size", "32", "--crop-size", "none"]


def _texture(rng, shape=(40, 48)):
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]
    base = 127 + 60 * np.sin(xx / 3.0) * np.cos(yy / 4.0)
    return np.clip(base + rng.normal(0, 8, size=shape), 0, 255).astype(np.uint8)


@pytest.fixture
def folders(tmp_path):
    """good/ (8 images), test/ (2 good) and test/defect/ (1 with a white square)."""
    rng = np.random.RandomState(0)
    good, test = tmp_path / "good", tmp_path / "test"
    (test / "defect").mkdir(parents=True)
    good.mkdir()
    for i in range(8):
        Image.fromarray(_texture(rng)).save(good / f"{i:02d}.png")
    for i in range(2):
        Image.fromarray(_texture(rng)).convert("RGB").save(test / f"ok_{i}.png")
    bad = _texture(rng)
    bad[10:22, 12:24] = 255
    Image.fromarray(bad).save(test / "defect" / "bad.png")
    (test / "notes.txt").write_text("not an image")
    return tmp_path


def _fit(folders, *extra, detector="padim"):
    out = folders / f"{detector}.joblib"
    argv = ["fit", "--normal", str(folders / "good"), "--out", str(out), "--detector",
            detector, "-q", *TINY, *extra]
    assert main(argv) == 0
    return out


def _read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_fit_saves_the_pipeline_the_options_describe(folders):
    out = _fit(folders, "-p", "n_features=10", "-p", "epsilon=0.05", "--batch-size", "3")
    model = joblib.load(out)
    assert isinstance(model, Pipeline)
    embedder, detector = model[0], model[-1]
    assert isinstance(embedder, PatchEmbedder) and isinstance(detector, PaDiMDetector)
    assert embedder.weights is None and embedder.image_size == 32
    assert embedder.crop_size is None and embedder.batch_size == 3
    assert detector.n_features == 10 and detector.epsilon == 0.05
    # The network sees 40 x 48 images resized to 32 x 38: maps of that shape.
    assert detector.random_state == 0 and detector.map_size == (32, 38)
    assert detector.n_samples_seen_ == 8

    # The same model as fitting the pipeline in Python.
    paths = sorted(str(p) for p in (folders / "good").iterdir())
    reference = make_pipeline(
        PatchEmbedder(weights=None, image_size=32, crop_size=None),
        PaDiMDetector(n_features=10, epsilon=0.05, map_size=(32, 38), random_state=0),
    ).fit(paths)
    np.testing.assert_allclose(detector.mean_, reference[-1].mean_, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        detector.precision_cholesky_, reference[-1].precision_cholesky_, rtol=1e-3, atol=1e-4
    )


def test_fit_streams_through_fit_in_batches(folders, monkeypatch):
    calls = []
    original = skpatch._compose.fit_in_batches

    def spy(estimator, X, *, batch_size):
        calls.append((len(X), batch_size))
        return original(estimator, X, batch_size=batch_size)

    monkeypatch.setattr(skpatch._compose, "fit_in_batches", spy)
    _fit(folders, "--batch-size", "3", "-p", "n_features=10", "--stream", "always")
    assert calls == [(8, 3)]
    # auto: tiny embeddings fit in memory, so no streaming ...
    _fit(folders, "--batch-size", "3", "-p", "n_features=10")
    assert calls == [(8, 3)]
    # ... unless they would exceed the budget.
    monkeypatch.setattr(skpatch.cli, "_STREAM_ABOVE_BYTES", 1000)
    model = joblib.load(_fit(folders, "--batch-size", "3", "-p", "n_features=10"))
    assert calls == [(8, 3), (8, 3)] and model[-1].n_samples_seen_ == 8


def test_stream_always_needs_partial_fit(folders, capsys):
    err = _error(["fit", "--normal", str(folders / "good"), "--out", str(folders / "m.joblib"),
                  "--detector", "rpadim", "--stream", "always", *TINY], capsys)
    assert "cannot stream: it has no partial_fit" in err
    # PatchCore streams, except with LOF denoising, which needs every image at once
    err = _error(["fit", "--normal", str(folders / "good"), "--out", str(folders / "m.joblib"),
                  "--detector", "patchcore", "-p", "denoising=lof", "--stream", "always",
                  *TINY], capsys)
    assert "cannot stream: its LOF denoising compares all training images" in err
    assert "no partial_fit" not in err


def test_fit_without_partial_fit_embeds_in_batches(folders, monkeypatch):
    # RPaDiM has no partial_fit: the embeddings are collected, then fitted once.
    monkeypatch.setattr(
        skpatch._compose, "fit_in_batches", lambda *a, **k: pytest.fail("streamed")
    )
    out = _fit(folders, "--batch-size", "3", detector="rpadim")
    model = joblib.load(out)
    assert model[0].pool_size == 3 and len(model[0].layers) == 2  # the RPaDiM pipeline
    assert model[-1].support_.shape[0] == 8


def test_fit_options_override_the_detector_defaults(folders):
    out = _fit(folders, "--layers", "stage1, stage2", "--pool-size", "1", detector="rpadim")
    embedder = joblib.load(out)[0]
    assert embedder.layers == ("stage1", "stage2") and embedder.pool_size == 1
    assert embedder.batch_size == "auto"  # no --batch-size: the embedder's own passes


def test_score_writes_scores_labels_and_heat_maps(folders):
    # A pair image size gives maps of exactly the image the network sees.
    model_path = _fit(folders, "-p", "n_features=10", "--image-size", "32x38")
    csv_path, maps = folders / "scores.csv", folders / "maps"
    argv = ["score", "--model", str(model_path), str(folders / "test"), "--recursive",
            "--csv", str(csv_path), "--maps", str(maps), "--alpha", "1", "-q"]
    assert main(argv) == 0

    rows = _read_csv(csv_path)
    paths = [str(folders / "test" / "defect" / "bad.png")] + [
        str(folders / "test" / f"ok_{i}.png") for i in range(2)
    ]
    assert [row["path"] for row in rows] == paths
    model = joblib.load(model_path)
    expected = -model.score_samples(paths)
    np.testing.assert_allclose([float(row["score"]) for row in rows], expected, rtol=1e-5)
    labels = np.where(model.predict(paths) == -1, "anomalous", "normal")
    assert [row["label"] for row in rows] == labels.tolist()

    # One PNG per image, in the layout of the input folder; with --alpha 1 it
    # is exactly the colormap of the anomaly map on the default scale.
    written = sorted(p.relative_to(maps).as_posix() for p in maps.rglob("*.png"))
    assert written == ["defect/bad.png", "ok_0.png", "ok_1.png"]
    heat = np.asarray(Image.open(maps / "defect" / "bad.png"))
    threshold = -model[-1].offset_
    vmin, vmax = threshold - abs(threshold) / 2, threshold + abs(threshold) / 2
    seen = anomaly_map(model, paths[:1])[0]
    assert seen.shape == (32, 38) and heat.shape == (32, 38, 3)
    colors = _jet((seen - vmin) / (vmax - vmin)).astype(int)
    assert np.abs(heat.astype(int) - colors).max() <= 1


def test_score_to_stdout_with_explicit_color_scale(folders, capsys):
    model_path = _fit(folders, "-p", "n_features=10")
    image = folders / "test" / "ok_0.png"
    maps = folders / "maps"
    argv = ["score", "--model", str(model_path), str(image), "--maps", str(maps),
            "--vmin=-1e9", "--vmax=-1e8", "--alpha", "1", "--device", "cpu"]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    lines = out.strip().splitlines()
    assert lines[0] == "path,score,label" and lines[1].startswith(f"{image},")
    assert "scored 1 images" in err
    # Every score is above --vmax: the whole map is the top of the scale, red.
    heat = np.asarray(Image.open(maps / "ok_0.png"))
    assert (heat == [128, 0, 0]).all()


def _score_on_cpu(folders, model_path, cls, monkeypatch):
    """``skpatch score --device cpu``: the ``set_params`` calls it made on ``cls``."""
    seen = []
    original = cls.set_params

    def spy(self, **params):
        seen.append(params)
        return original(self, **params)

    monkeypatch.setattr(cls, "set_params", spy)
    argv = ["score", "--model", str(model_path), str(folders / "test"), "--device", "cpu",
            "--csv", str(folders / "s.csv"), "-q"]
    assert main(argv) == 0
    return seen


def test_score_device_option_reaches_every_step(folders, monkeypatch):
    seen = _score_on_cpu(folders, _fit(folders), Pipeline, monkeypatch)
    assert seen == [{"patchembedder__device": "cpu", "padimdetector__device": "cpu"}]


def test_fit_and_score_options_reach_pni_refinement_network(folders, monkeypatch):
    from skpatch import AnomalyMapRefiner

    model_path = _fit(folders, "-p", "refine=true", "-p", "refiner_params={'n_epochs': 1}",
                      "--device", "cpu", detector="pni")
    model = joblib.load(model_path)
    assert isinstance(model, AnomalyMapRefiner)
    assert (model.device, model.random_state, model.n_epochs) == ("cpu", 0, 1)
    assert {"device": "cpu"} in _score_on_cpu(folders, model_path, AnomalyMapRefiner, monkeypatch)


def test_score_options_reach_the_fitted_pipeline_of_image_shifting(folders, capsys):
    # N-pad's ImageShiftDetector scores with its fitted clone, estimator_: a
    # device set on its unfitted template only was silently ignored.
    model_path = _fit(folders, "-p", "max_shift=2", detector="npad")
    argv = ["score", "--model", str(model_path), str(folders / "test"), "--device", "nodevice",
            "--csv", str(folders / "s.csv"), "-q"]
    assert "nodevice" in _error(argv, capsys)


@pytest.mark.parametrize("clash", ["two folders", "two extensions"])
def test_score_refuses_heat_maps_that_overwrite_each_other(folders, clash, capsys):
    model_path = _fit(folders, "-p", "n_features=10")
    other = folders / "other"
    other.mkdir()
    image = Image.open(folders / "test" / "ok_0.png")
    if clash == "two folders":
        image.save(other / "ok_0.png")
        inputs = [str(folders / "test"), str(other)]
    else:
        image.save(folders / "test" / "ok_0.jpg")
        inputs = [str(folders / "test")]
    maps = folders / "maps"
    argv = ["score", "--model", str(model_path), *inputs, "--maps", str(maps), "-q"]
    assert main(argv) == 1
    assert "would both write the heat map ok_0.png" in capsys.readouterr().err
    assert not maps.exists()


def test_score_refuses_heat_maps_that_overwrite_the_images(folders, capsys):
    model_path = _fit(folders, "-p", "n_features=10")
    test = folders / "test"
    before = (test / "ok_0.png").read_bytes()
    argv = ["score", "--model", str(model_path), str(test), "--maps", str(test), "-q"]
    assert main(argv) == 1
    assert "would overwrite an input image" in capsys.readouterr().err
    assert (test / "ok_0.png").read_bytes() == before


@pytest.mark.parametrize(
    "threshold, vmin, vmax, expected",
    [(4.0, None, None, (2.0, 6.0)), (-4.0, None, None, (-6.0, -2.0)),
     (0.0, None, None, (-1.0, 1.0)), (0.0, 0.5, None, (0.5, 1.0)), (4.0, 1.0, 9.0, (1.0, 9.0))],
)
def test_default_color_scale_is_centred_on_the_threshold(threshold, vmin, vmax, expected):
    args = build_parser().parse_args(["score", "--model", "m.joblib", "x"])
    args.vmin, args.vmax = vmin, vmax
    assert skpatch.cli._color_scale(args, threshold) == expected


def test_jet_colormap_runs_from_blue_to_red():
    colors = _jet(np.array([0.0, 0.5, 1.0, -3.0, 7.0]))
    np.testing.assert_array_equal(
        colors, [[0, 0, 128], [128, 255, 128], [128, 0, 0], [0, 0, 128], [128, 0, 0]]
    )


def test_score_does_not_repeat_the_warnings_of_fit(folders):
    import warnings

    from skpatch.exceptions import DegenerateTrainingSetWarning

    model_path = _fit(folders)  # 8 images for 100 channels: fit warns once
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        argv = ["score", "--model", str(model_path), str(folders / "test"),
                "--csv", str(folders / "s.csv"), "-q"]
        assert main(argv) == 0
    assert not [w for w in caught if issubclass(w.category, DegenerateTrainingSetWarning)]


def test_quiet_prints_nothing(folders, capsys):
    _fit(folders)
    assert capsys.readouterr() == ("", "")


@pytest.mark.parametrize("name", sorted(_detectors()))
def test_every_registered_detector_fits_and_scores(folders, name):
    params = FAST_PARAMS.get(_ALL_DETECTORS[name].class_name, {})
    extra = [arg for key, value in params.items() for arg in ("-p", f"{key}={value!r}")]
    model_path = _fit(folders, *extra, detector=name)
    csv_path = folders / "scores.csv"
    argv = ["score", "--model", str(model_path), str(folders / "test"), "--csv",
            str(csv_path), "-q"]
    assert main(argv) == 0
    rows = _read_csv(csv_path)
    assert len(rows) == 2 and all(np.isfinite(float(row["score"])) for row in rows)


# ------------------------------------------------------------------ errors


def _error(argv, capsys):
    assert main(argv) == 1
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]  # one line after the progress messages
    assert last.startswith("skpatch ") and ": error: " in last
    return last


def test_missing_folder_is_named(folders, capsys):
    err = _error(["fit", "--normal", str(folders / "nope"), "--out", "m.joblib", *TINY], capsys)
    assert "folder not found" in err and "nope" in err


def test_folder_without_images(folders, capsys):
    empty = folders / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("x")
    err = _error(["fit", "--normal", str(empty), "--out", "m.joblib", *TINY], capsys)
    assert "no images in" in err and "empty" in err


def test_missing_model_file(folders, capsys):
    err = _error(["score", "--model", str(folders / "m.joblib"), str(folders / "test")], capsys)
    assert "model file not found" in err


def test_images_of_sub_folders_need_recursive(folders, capsys):
    nested = folders / "nested"
    (nested / "a").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(nested / "a" / "x.png")
    err = _error(["fit", "--normal", str(nested), "--out", "m.joblib", *TINY], capsys)
    assert "--recursive" in err


def test_corrupt_image_is_named(folders, capsys):
    (folders / "good" / "broken.png").write_bytes(b"not a png at all")
    err = _error(["fit", "--normal", str(folders / "good"), "--out",
                  str(folders / "m.joblib"), *TINY], capsys)
    assert "broken.png" in err


def test_file_that_is_not_a_model(folders, capsys):
    text = folders / "scores.csv"
    text.write_text("path,score\n")
    err = _error(["score", "--model", str(text), str(folders / "test")], capsys)
    assert "is not a skpatch model file" in err
    other = folders / "other.joblib"
    joblib.dump({"weights": [1, 2]}, other)
    err = _error(["score", "--model", str(other), str(folders / "test")], capsys)
    assert "is not a skpatch model" in err and "dict" in err


def test_unknown_detector_parameter_lists_the_valid_ones(folders, capsys):
    err = _error(["fit", "--normal", str(folders / "good"), "--out",
                  str(folders / "m.joblib"), "-p", "n_feature=3", *TINY], capsys)
    assert "'n_feature'" in err and "n_features" in err


@pytest.mark.parametrize(
    "text, value",
    [("refine=false", False), ("refine=True", True), ("map_size=none", None),
     ("n_features=100", 100), ("map_size=(224,224)", (224, 224)), ("map_size=[8, 9]", (8, 9)),
     ("calibration=in-sample", "in-sample"), ("name= spaced ", "spaced")],
)
def test_param_values(text, value):
    name, parsed = skpatch.cli._param(text)
    assert name == text.split("=")[0] and parsed == value and type(parsed) is type(value)


def test_invalid_detector_parameter_value(folders, capsys):
    err = _error(["fit", "--normal", str(folders / "good"), "--out",
                  str(folders / "m.joblib"), "-p", "epsilon=-1", *TINY], capsys)
    assert "epsilon" in err


def test_a_failed_score_leaves_no_partial_table(folders, capsys):
    model_path = _fit(folders)
    table = folders / "scores.csv"
    table.write_text("an earlier table\n")
    (folders / "test" / "z_broken.png").write_bytes(b"not a png at all")  # the last batch
    err = _error(["score", "--model", str(model_path), str(folders / "test"), "--csv",
                  str(table), "--batch-size", "1"], capsys)
    assert "z_broken.png" in err
    assert table.read_text() == "an earlier table\n"
    assert sorted(p.name for p in folders.iterdir() if "scores" in p.name) == ["scores.csv"]
    (folders / "test" / "z_broken.png").unlink()
    assert main(["score", "--model", str(model_path), str(folders / "test"), "--csv",
                 str(table), "-q"]) == 0
    assert len(_read_csv(table)) == 2  # ok_0.png, ok_1.png


def test_score_of_a_non_image_file(folders, capsys):
    model_path = _fit(folders)
    err = _error(["score", "--model", str(model_path), str(folders / "test" / "notes.txt")],
                 capsys)
    assert "notes.txt is not an image file" in err


@pytest.mark.parametrize(
    "argv",
    [
        ["fit", "--normal", "x", "--out", "m", "--image-size", "big"],
        ["fit", "--normal", "x", "--out", "m", "--batch-size", "0"],
        ["fit", "--normal", "x", "--out", "m", "--detector", "nope"],
        ["fit", "--normal", "x", "--out", "m", "-p", "no_equal_sign"],
        ["fit", "--out", "m"],
        ["score", "x"],
        [],
    ],
)
def test_usage_errors_exit_with_status_2(argv, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert "usage: skpatch" in capsys.readouterr().err


# ------------------------------------------------------------------ help


def _subparsers(parser):
    action = next(a for a in parser._actions if a.dest == "command")
    return action.choices


@pytest.mark.parametrize("command", ["fit", "score"])
def test_help_documents_every_option(command, capsys):
    parser = _subparsers(build_parser())[command]
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    for action in parser._actions:
        assert action.help, f"{action.dest} has no help"
        for option in action.option_strings:
            assert option in text
    assert "examples:" in text


def test_fit_help_lists_the_detectors(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--help"])
    text = capsys.readouterr().out
    for name in _detectors():
        assert f"  {name} " in text


def test_python_dash_m_skpatch_help():
    result = subprocess.run(
        [sys.executable, "-m", "skpatch", "--help"], capture_output=True, text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "usage: skpatch" in result.stdout and "fit" in result.stdout


@pytest.mark.integration
def test_fit_and_score_with_real_weights(folders):
    out = folders / "real.joblib"
    argv = ["fit", "--normal", str(folders / "good"), "--out", str(out), "-q",
            "--image-size", "64", "--crop-size", "none", "-p", "n_features=50"]
    assert main(argv) == 0
    csv_path = folders / "scores.csv"
    argv = ["score", "--model", str(out), str(folders / "test"), "--recursive", "--csv",
            str(csv_path), "-q"]
    assert main(argv) == 0
    scores = {row["path"].rsplit("/", 1)[-1]: float(row["score"]) for row in _read_csv(csv_path)}
    # The white square is the most anomalous image.
    assert scores["bad.png"] > max(scores["ok_0.png"], scores["ok_1.png"])
