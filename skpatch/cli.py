"""The ``skpatch`` command line: fit a detector on a folder, score a folder.

::

    skpatch fit --normal good/ --detector padim --out model.joblib
    skpatch score --model model.joblib new/ --csv scores.csv --maps heatmaps/

``fit`` builds the pipeline ``PatchEmbedder -> detector`` from the options,
fits it on the images of the ``--normal`` folders (streamed batch by batch
through :func:`skpatch.fit_in_batches` when the detector can stream and
``--stream`` asks for it) and saves it with :func:`joblib.dump`: the model file is an
ordinary scikit-learn :class:`~sklearn.pipeline.Pipeline` that Python code
loads with :func:`joblib.load`. ``score`` loads such a file and writes one
anomaly score and label per image, and optionally one heat-map PNG per image.

Detectors are looked up by name in a registry (``_ALL_DETECTORS``); a new
detector is one more entry there.
"""

import argparse
import ast
import csv
import os
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .datasets import IMAGE_EXTENSIONS

__all__ = ["main"]


class CommandLineError(Exception):
    """An error of the user's input, reported as one line without a traceback."""


# --------------------------------------------------------------------------
# detector registry
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class _Detector:
    """A detector of the command line: its class and pipeline factory in :mod:`skpatch.detectors`.

    The factory, ``make_<name>_pipeline(backbone, *, embedder_params=None,
    **params)``, builds the detector's recommended pipeline (RPaDiM's two
    pooled stages, for instance); the user's embedder options override its
    embedder defaults. Without a factory the pipeline is
    ``make_pipeline(PatchEmbedder(backbone, **embedder_params), Detector(**params))``.
    """

    class_name: str
    description: str
    factory: str = None

    def available(self):
        from . import detectors

        return hasattr(detectors, self.class_name) and (
            self.factory is None or hasattr(detectors, self.factory)
        )

    def parameters(self):
        """Names accepted by ``--param``: the detector's and the factory's own."""
        import inspect

        from . import detectors

        names = set(getattr(detectors, self.class_name)().get_params())
        if self.factory is not None:
            signature = inspect.signature(getattr(detectors, self.factory))
            names.update(
                name for name, p in signature.parameters.items()
                if p.kind is p.KEYWORD_ONLY and name not in ("embedder_params", "memory")
            )
        return names

    def pipeline(self, backbone, embedder_params, params):
        from sklearn.pipeline import make_pipeline

        from . import detectors
        from ._embedder import PatchEmbedder

        if self.factory is None:
            estimator = getattr(detectors, self.class_name)
            return make_pipeline(PatchEmbedder(backbone, **embedder_params), estimator(**params))
        factory = getattr(detectors, self.factory)
        return factory(backbone, embedder_params=embedder_params, **params)


#: Images per batch read, embedded and scored (``--batch-size``'s default).
_BATCH = 32


def _batch_size(args):
    """Images per batch read and scored; ``--batch-size`` also sets the forward pass when given."""
    return args.batch_size or _BATCH


#: Detectors by command-line name; one line adds a detector. Those whose
#: class is not in :mod:`skpatch.detectors` (yet) are not offered.
_ALL_DETECTORS = {
    "padim": _Detector("PaDiMDetector", "PaDiM: a Gaussian per patch position"),
    "rpadim": _Detector(
        "RobustPaDiMDetector", "RPaDiM: PaDiM robust to defective training images",
        "make_rpadim_pipeline",
    ),
    "npad": _Detector(
        "NPadDetector", "N-pad: Gaussians of each position's neighbourhood",
        "make_npad_pipeline",
    ),
    "patchcore": _Detector(
        "PatchCoreDetector", "PatchCore: nearest patch in a coreset memory bank",
        "make_patchcore_pipeline",
    ),
    "spade": _Detector(
        "SPADEDetector", "SPADE: nearest images, then nearest patches",
        "make_spade_pipeline",
    ),
    "pni": _Detector(
        "PNIDetector", "PNI: patch likelihood given its neighbourhood and position",
        "make_pni_pipeline",
    ),
}


def _detectors():
    return {name: entry for name, entry in _ALL_DETECTORS.items() if entry.available()}


# --------------------------------------------------------------------------
# option parsing
# --------------------------------------------------------------------------


def _size(text):
    """``"256"`` -> 256, ``"256x320"`` -> (256, 320), ``"none"`` -> None."""
    if text.lower() == "none":
        return None
    try:
        parts = [int(part) for part in text.lower().split("x")]
    except ValueError:
        parts = []
    if len(parts) not in (1, 2) or min(parts) < 1:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a size: give N (e.g. 256), HxW (e.g. 256x320) or none"
        )
    return parts[0] if len(parts) == 1 else tuple(parts)


def _weights(text):
    return None if text.lower() == "none" else text


def _positive_int(text):
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return value


def _param(text):
    """``NAME=VALUE`` with VALUE a Python literal (else a string).

    ``true``, ``false`` and ``none`` are read as ``True``, ``False`` and
    ``None`` in any case: as strings they would pass for true values.
    """
    name, sep, value = text.partition("=")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME=VALUE (e.g. n_features=100)")
    value = value.strip()
    constants = {"true": True, "false": False, "none": None}
    if value.lower() in constants:
        return name.strip(), constants[value.lower()]
    try:
        value = ast.literal_eval(value)
    except (ValueError, SyntaxError):
        pass
    if isinstance(value, list):
        value = tuple(value)
    return name.strip(), value


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Keep the layout of the descriptions; show the defaults that are values."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if (
            action.option_strings
            and default is not None
            and default is not False
            and default != []
            and default is not argparse.SUPPRESS
            and "default" not in text
        ):
            text += " (default: %(default)s)"
        return text


_FIT_DESCRIPTION = """\
Fit an anomaly detector on images of normal (good) parts and save it.

The model is the pipeline PatchEmbedder -> detector: a pretrained network
turns each image into a grid of patch embeddings, and the detector models
the embeddings of the normal images. The saved file is a scikit-learn
Pipeline (joblib); `skpatch score` uses it, and Python code loads it with
joblib.load. Load only model files that you trust: joblib files run code.

detectors:
{detectors}
"""

_FIT_EPILOG = """\
examples:
  skpatch fit --normal data/good --out model.joblib
  skpatch fit --normal data/good --detector rpadim --param tau=0.9 --out model.joblib
  skpatch fit --normal line1/good --normal line2/good --image-size 224 \\
      --crop-size none --param n_features=100 --device cuda --out model.joblib
"""

_SCORE_DESCRIPTION = """\
Score images with a model saved by `skpatch fit`.

Writes one row per image (path, score, label) as CSV, to --csv or to the
standard output. The score is the image's anomaly score (higher = more
anomalous); the label is "anomalous" when the score is above the model's
threshold (the detector's offset_, set at fit time by its contamination
parameter), else "normal". With --maps, also writes one heat-map PNG per
image: the anomaly map in colours (blue = low, red = high) over the image
as the model saw it (resized and cropped).
"""

_SCORE_EPILOG = """\
examples:
  skpatch score --model model.joblib data/new --csv scores.csv
  skpatch score --model model.joblib data/test --recursive --maps heatmaps/
  skpatch score --model model.joblib part_017.png
"""


def _add_common(parser):
    parser.add_argument(
        "--batch-size", type=_positive_int, default=None, metavar="N",
        help="images read and scored (and, when fitting a detector with partial_fit, "
        f"accumulated) per batch, default {_BATCH}; bounds the memory. When given, also "
        "the images per forward pass of the network (default: the embedder's 'auto', "
        "fewer on a CPU)",
    )
    parser.add_argument(
        "--device", default=None, metavar="DEVICE",
        help="torch device: auto (CUDA when available, else the CPU), cpu, cuda or "
        "cuda:N. fit: default auto; score: default the device saved in the model",
    )
    parser.add_argument(
        "--recursive", action="store_true",
        help="also read the images of the sub-folders",
    )
    parser.add_argument(
        "-q", "--quiet", action="store_true",
        help="no progress bar and no summary (progress bars are also off when the "
        "standard error is not a terminal)",
    )


def build_parser():
    """The argument parser of ``skpatch`` (its ``--help`` documents every option)."""
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="skpatch",
        description="Patch-based image anomaly detection (PaDiM and friends) from the "
        "command line. Run `skpatch fit --help` or `skpatch score --help` for the options.",
        formatter_class=_Formatter,
    )
    parser.add_argument("--version", action="version", version=f"skpatch {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    available = _detectors()
    detectors = "\n".join(f"  {name:<10} {entry.description}" for name, entry in available.items())
    fit = commands.add_parser(
        "fit", help="fit a detector on normal images and save it",
        description=_FIT_DESCRIPTION.format(detectors=detectors), epilog=_FIT_EPILOG,
        formatter_class=_Formatter,
    )
    fit.add_argument(
        "--normal", action="append", required=True, metavar="DIR",
        help="folder of normal training images (png, jpg, jpeg, bmp, tif, tiff); repeat "
        "the option for several folders",
    )
    fit.add_argument("--out", required=True, metavar="FILE", help="model file to write (joblib)")
    fit.add_argument(
        "--detector", default="padim", choices=list(available), help="the detector"
    )
    fit.add_argument(
        "-p", "--param", action="append", type=_param, default=[], metavar="NAME=VALUE",
        help="a parameter of the detector, e.g. n_features=100, tau=0.9, "
        "contamination=0.05; VALUE is a Python literal (true, false and none as well) "
        "or else a string; repeat for "
        "several. See the detector's documentation for its parameters",
    )
    fit.add_argument(
        "--backbone", default="efficientnet_lite0", metavar="NAME",
        help="pretrained network: efficientnet_lite0 (offline weights), "
        "efficientnet_lite1, efficientnet_lite2, resnet18, wide_resnet50_2",
    )
    fit.add_argument(
        "--weights", type=_weights, default="imagenet", metavar="WEIGHTS",
        help="imagenet (the pretrained weights), a path to a state dict, or none "
        "(a random network: for tests only)",
    )
    fit.add_argument(
        "--layers", default=None, metavar="L1,L2,...",
        help="comma-separated stages of the backbone to embed; default: the "
        "detector's choice for the backbone",
    )
    fit.add_argument(
        "--pool-size", type=_positive_int, default=None, metavar="P",
        help="side of the local average pooling of the features (odd); default: the "
        "detector's choice (1 for PaDiM, 3 for RPaDiM)",
    )
    fit.add_argument(
        "--image-size", type=_size, default=256, metavar="SIZE",
        help="resize images to SIZE: N sets the shorter side, HxW both sides, none "
        "keeps the size",
    )
    fit.add_argument(
        "--crop-size", type=_size, default=224, metavar="SIZE",
        help="center crop after resizing: N, HxW, or none to keep the whole image "
        "(use none when defects can touch the border)",
    )
    fit.add_argument(
        "--stream", choices=["auto", "always", "never"], default="auto",
        help="fit batch by batch with partial_fit (memory does not grow with the number "
        "of images; padim, and patchcore without denoising): always, never, or auto, "
        "which streams when the embeddings of all images would take more than 2 GiB. "
        "A streamed fit sets the threshold (offset_) from a sample of at most 32 of "
        "the images, scored by the final model, instead of from every image",
    )
    fit.add_argument(
        "--random-state", type=int, default=0, metavar="SEED",
        help="seed of the detector's random choices (reproducible models)",
    )
    _add_common(fit)

    score = commands.add_parser(
        "score", help="score images with a saved model",
        description=_SCORE_DESCRIPTION, epilog=_SCORE_EPILOG, formatter_class=_Formatter,
    )
    score.add_argument(
        "inputs", nargs="+", metavar="PATH",
        help="folders of images and/or image files to score",
    )
    score.add_argument(
        "--model", required=True, metavar="FILE", help="model file written by `skpatch fit`"
    )
    score.add_argument(
        "--csv", default=None, metavar="FILE",
        help="CSV file to write (columns path, score, label); default: the standard output",
    )
    score.add_argument(
        "--maps", default=None, metavar="DIR",
        help="folder to write one heat-map PNG per image into (the folder layout of "
        "the inputs is kept)",
    )
    score.add_argument(
        "--vmin", type=float, default=None, metavar="V",
        help="anomaly score drawn in blue (the bottom of the colour scale); default: "
        "the model's threshold minus half its absolute value",
    )
    score.add_argument(
        "--vmax", type=float, default=None, metavar="V",
        help="anomaly score drawn in red (the top of the colour scale); default: the "
        "model's threshold plus half its absolute value, so that the threshold is "
        "in the middle of the scale (green)",
    )
    score.add_argument(
        "--alpha", type=float, default=0.5, metavar="A",
        help="opacity of the heat map over the image, between 0 and 1",
    )
    _add_common(score)
    return parser


# --------------------------------------------------------------------------
# input files
# --------------------------------------------------------------------------


def _is_image(path):
    return path.is_file() and not path.name.startswith(".") and (
        path.suffix.lower() in IMAGE_EXTENSIONS
    )


def _list_folder(folder, recursive):
    folder = Path(folder)
    if not folder.exists():
        raise CommandLineError(f"folder not found: {folder}")
    if not folder.is_dir():
        raise CommandLineError(f"not a folder: {folder}")
    candidates = folder.rglob("*") if recursive else folder.iterdir()
    paths = sorted(
        p for p in candidates
        if _is_image(p) and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )
    if not paths:
        hint = "" if recursive else " (use --recursive to read its sub-folders)"
        raise CommandLineError(
            f"no images in {folder}: looked for {', '.join(IMAGE_EXTENSIONS)} files{hint}"
        )
    return paths


def _list_inputs(inputs, recursive):
    """``[(path, path relative to its input)]`` of the images of files and folders."""
    items = []
    for item in inputs:
        item = Path(item)
        if item.is_file():
            if item.suffix.lower() not in IMAGE_EXTENSIONS:
                raise CommandLineError(
                    f"{item} is not an image file (expected {', '.join(IMAGE_EXTENSIONS)})"
                )
            items.append((item, Path(item.name)))
        elif not item.exists():
            raise CommandLineError(f"file or folder not found: {item}")
        else:
            items.extend((p, p.relative_to(item)) for p in _list_folder(item, recursive))
    return items


def _map_name(relative):
    """The heat map's path in ``--maps``: the image's, as a PNG."""
    return relative.with_suffix(".png")


def _check_map_names(items, maps_dir):
    """Refuse inputs whose heat maps would overwrite each other or an input image."""
    first = {}
    inputs = {Path(path).resolve() for path, _ in items}
    for path, relative in items:
        other = first.setdefault(_map_name(relative), path)
        if other != path:
            raise CommandLineError(
                f"{other} and {path} would both write the heat map {_map_name(relative)}: "
                "score them in separate runs with different --maps folders, or rename one"
            )
        target = maps_dir / _map_name(relative)
        if target.resolve() in inputs:
            raise CommandLineError(
                f"the heat map {target} would overwrite an input image: give --maps a "
                "folder apart from the images"
            )


# --------------------------------------------------------------------------
# progress
# --------------------------------------------------------------------------


def _progress(total, desc, quiet):
    from tqdm.auto import tqdm

    # disable=None: tqdm turns itself off when stderr is not a terminal.
    return tqdm(total=total, desc=desc, unit="img", disable=True if quiet else None,
                file=sys.stderr, dynamic_ncols=True)


class _TickingPaths(list):
    """Paths whose slices advance a progress bar.

    :func:`skpatch.fit_in_batches` slices its input batch by batch, so the
    start of a slice is the number of images already fitted.
    """

    def __init__(self, paths, bar):
        super().__init__(paths)
        self._bar = bar

    def __getitem__(self, index):
        if isinstance(index, slice):
            self._bar.update((index.start or 0) - self._bar.n)
        return super().__getitem__(index)


def _say(args, message):
    if not args.quiet:
        print(message, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------
# fit
# --------------------------------------------------------------------------


def _network_input_size(args, image_path):
    """``(H, W)`` of the images the network sees: the crop, else the resized image.

    Without a crop, an ``N`` image size sets the shorter side only, so the
    size depends on the images' aspect ratio: it is read from ``image_path``.
    """
    if args.crop_size is not None:
        return args.crop_size
    if isinstance(args.image_size, tuple):
        return args.image_size
    from PIL import Image

    from ._images import _resize_size

    try:
        with Image.open(image_path) as image:
            width, height = image.size
    except (OSError, ValueError) as exc:
        raise CommandLineError(f"could not read image file {image_path!r}: {exc}") from exc
    if args.image_size is None:
        return height, width
    return _resize_size(height, width, args.image_size)


def _build_pipeline(args, first_image):
    entry = _ALL_DETECTORS[args.detector]
    valid = entry.parameters()
    params = {}
    for name, value in args.param:
        if name not in valid:
            raise CommandLineError(
                f"the {args.detector} detector ({entry.class_name}) has no parameter "
                f"{name!r}; its parameters are {', '.join(sorted(valid))}"
            )
        params[name] = value
    device = args.device or "auto"
    for name, value in (("random_state", args.random_state), ("device", device)):
        if name in valid:
            params.setdefault(name, value)
    refiner_params = params.get("refiner_params") or {}
    if params.get("refine") is True and isinstance(refiner_params, dict):
        # PNI's refinement network: the same device, and a fixed seed too
        params["refiner_params"] = {
            "random_state": args.random_state, "device": device, **refiner_params
        }
    if "map_size" in valid and "map_size" not in params:
        # Maps at the resolution of the image the network sees.
        params["map_size"] = _network_input_size(args, first_image)
    embedder_params = {
        "weights": args.weights,
        "image_size": args.image_size,
        "crop_size": args.crop_size,
        "device": device,
        "batch_size": args.batch_size or "auto",
    }
    if args.layers is not None:
        embedder_params["layers"] = tuple(s.strip() for s in args.layers.split(",") if s.strip())
    if args.pool_size is not None:
        embedder_params["pool_size"] = args.pool_size
    return entry.pipeline(args.backbone, embedder_params, params)


#: ``--stream auto`` streams when the embeddings of all images would take more.
_STREAM_ABOVE_BYTES = 2 * 2**30


def _stream(pipe, paths, batch_size, bar):
    """Fit batch by batch with :func:`skpatch.fit_in_batches`; memory stays flat."""
    from ._compose import fit_in_batches

    bar.reset()
    fit_in_batches(pipe, _TickingPaths(paths, bar), batch_size=batch_size)


def _embed_all(pipe, transformers, paths, args, streamable, bar):
    """Embeddings of all images, embedded batch by batch; None when it streamed instead.

    With ``--stream auto``, the first batch tells how large the embeddings of
    all images would be; beyond ``_STREAM_ABOVE_BYTES`` a detector with
    ``partial_fit`` streams instead.
    """
    for transformer in transformers:
        transformer.fit(None)
    embeddings = None
    batch_size = _batch_size(args)
    for begin in range(0, len(paths), batch_size):
        batch = paths[begin : begin + batch_size]
        for transformer in transformers:
            batch = transformer.transform(batch)
        if embeddings is None:
            total = batch.nbytes / len(batch) * len(paths)
            if args.stream == "auto" and streamable and total > _STREAM_ABOVE_BYTES:
                _stream(pipe, paths, batch_size, bar)
                return None
            embeddings = np.empty((len(paths), *batch.shape[1:]), dtype=batch.dtype)
        embeddings[begin : begin + len(batch)] = batch
        bar.update(len(batch))
    return embeddings


def _fit(args):
    import joblib
    from sklearn.pipeline import Pipeline

    from ._compose import _split

    paths = []
    for folder in args.normal:
        paths.extend(str(p) for p in _list_folder(folder, args.recursive))
    out = Path(args.out)
    if not out.parent.is_dir():
        raise CommandLineError(f"the folder of --out does not exist: {out.parent}")
    pipe = _build_pipeline(args, paths[0])
    transformers, detector = _split(pipe)
    _say(args, f"fitting {args.detector} ({type(detector).__name__}) on {len(paths)} images")
    start = time.perf_counter()
    # PatchCore's LOF denoising compares all training images at once: no streaming.
    denoised = getattr(detector, "denoising", None) is not None
    streamable = isinstance(pipe, Pipeline) and hasattr(detector, "partial_fit") and not denoised
    if args.stream == "always" and not streamable:
        why = ("its LOF denoising compares all training images at once" if denoised
               else "it has no partial_fit: it needs all training images at once")
        raise CommandLineError(
            f"the {args.detector} detector cannot stream: {why}; use --stream auto"
        )
    with _progress(len(paths), "fit", args.quiet) as bar:
        if not isinstance(pipe, Pipeline):
            # A meta-estimator on images (N-pad's image shifting) fits itself.
            pipe.fit(paths)
        elif args.stream == "always":
            _stream(pipe, paths, _batch_size(args), bar)
        else:
            embeddings = _embed_all(pipe, transformers, paths, args, streamable, bar)
            if embeddings is not None:
                detector.fit(embeddings)
        bar.update(len(paths) - bar.n)
    elapsed = time.perf_counter() - start
    joblib.dump(pipe, out)
    threshold = -getattr(detector, "offset_", np.nan)
    _say(args, f"fitted in {elapsed:.1f} s; anomaly-score threshold {threshold:.4g}; "
               f"model saved to {out} ({out.stat().st_size / 2**20:.1f} MiB)")
    return 0


# --------------------------------------------------------------------------
# score
# --------------------------------------------------------------------------


def _find_embedder(model):
    """The :class:`~skpatch.PatchEmbedder` of a model, or None."""
    from sklearn.pipeline import Pipeline

    from ._embedder import PatchEmbedder

    if isinstance(model, Pipeline):
        return model.steps[0][1] if isinstance(model.steps[0][1], PatchEmbedder) else None
    if not hasattr(model, "get_params"):
        return None
    return next(
        (v for v in model.get_params(deep=True).values() if isinstance(v, PatchEmbedder)), None
    )


def _load_model(path):
    """Load a model file; check that it is a fitted model on images from skpatch."""
    import joblib
    from sklearn.pipeline import Pipeline

    path = Path(path)
    if not path.is_file():
        raise CommandLineError(f"model file not found: {path}")
    try:
        model = joblib.load(path)
    except Exception as exc:  # pickle raises many types on a foreign file
        raise CommandLineError(
            f"{path} is not a skpatch model file (joblib could not read it: "
            f"{type(exc).__name__}: {exc})"
        ) from exc
    last = model.steps[-1][1] if isinstance(model, Pipeline) else model
    if not (
        _find_embedder(model) is not None
        and type(last).__module__.startswith("skpatch.")
        and all(hasattr(last, name) for name in ("anomaly_map", "score_samples", "offset_"))
    ):
        raise CommandLineError(
            f"{path} is not a skpatch model: expected a fitted Pipeline from PatchEmbedder "
            f"to a skpatch detector (as `skpatch fit` saves), got {type(model).__name__}"
        )
    return model


def _jet(values):
    """The 'jet' colormap (blue -> cyan -> yellow -> red) of values in [0, 1], as uint8 RGB."""
    x = 4.0 * np.clip(values, 0.0, 1.0)[..., None]
    centers = np.array([3.0, 2.0, 1.0])
    return (255 * np.clip(1.5 - np.abs(x - centers), 0.0, 1.0)).round().astype(np.uint8)


def _seen_image(path, embedder):
    """The image as the embedder sees it (resized, cropped), float (H, W, 3) in [0, 1]."""
    from ._images import _decode, preprocess

    tensor = preprocess(
        _decode(path).unsqueeze(0), embedder.image_size, embedder.crop_size,
        (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), "cpu",
    )
    return tensor[0].permute(1, 2, 0).numpy()


def _save_heatmap(path, image, anomaly_map, vmin, vmax, alpha):
    from PIL import Image

    height, width = image.shape[:2]
    if anomaly_map.shape != (height, width):
        anomaly_map = np.asarray(
            Image.fromarray(anomaly_map.astype(np.float32)).resize(
                (width, height), Image.Resampling.BILINEAR
            )
        )
    scaled = (anomaly_map - vmin) / (vmax - vmin) if vmax > vmin else anomaly_map * 0.0
    blend = (1.0 - alpha) * (255.0 * image) + alpha * _jet(scaled)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(blend.round(), 0, 255).astype(np.uint8)).save(path)


def _color_scale(args, threshold):
    vmin, vmax = args.vmin, args.vmax
    # a threshold of 0 (a model of identical images) would give an empty scale
    half_width = 0.5 * abs(threshold) or 1.0
    if vmin is None:
        vmin = threshold - half_width
    if vmax is None:
        vmax = threshold + half_width
    if not vmax > vmin:
        raise CommandLineError(f"--vmax ({vmax:g}) must be greater than --vmin ({vmin:g})")
    return vmin, vmax


def _score(args):
    from ._compose import _split

    if not 0.0 <= args.alpha <= 1.0:
        raise CommandLineError(f"--alpha must be between 0 and 1, got {args.alpha:g}")
    model = _load_model(args.model)
    items = _list_inputs(args.inputs, args.recursive)
    # A Pipeline embeds each batch once for both the scores and the maps; a
    # meta-estimator on images (N-pad's image shifting) takes the paths.
    transformers, detector = _split(model)
    # The options go to the estimators that score: a meta-estimator's fitted
    # clone (estimator_), not its unfitted template.
    fitted = getattr(model, "estimator_", model)
    embedder = _find_embedder(fitted)
    if args.device is not None:
        # Every ``device`` parameter, nested ones included (embedder, detector),
        # and the meta-estimator's own (PNI's refinement network).
        names = [k for k in fitted.get_params(deep=True) if k.split("__")[-1] == "device"]
        fitted.set_params(**dict.fromkeys(names, args.device))
        if fitted is not model and "device" in model.get_params(deep=False):
            model.set_params(device=args.device)
    if args.batch_size is not None:
        embedder.set_params(batch_size=args.batch_size)
    if len(transformers) == 1 and transformers[0] is embedder:
        # Only the detector takes the embeddings: on a GPU they stay there.
        embedder.set_params(output="torch")
    offset = float(detector.offset_)
    vmin, vmax = _color_scale(args, -offset) if args.maps else (None, None)
    maps_dir = Path(args.maps) if args.maps else None
    if maps_dir is not None:
        _check_map_names(items, maps_dir)

    # Written aside and moved into place at the end: a run that fails part-way
    # leaves no partial table (and an earlier one as it was).
    part = Path(f"{args.csv}.part") if args.csv else None
    csv_file = open(part, "w", newline="") if part else sys.stdout
    n_anomalous = 0
    done = False
    try:
        writer = csv.writer(csv_file)
        writer.writerow(["path", "score", "label"])
        with _progress(len(items), "score", args.quiet) as bar:
            batch_size = _batch_size(args)
            for start in range(0, len(items), batch_size):
                batch = items[start:start + batch_size]
                X = [str(path) for path, _ in batch]
                for transformer in transformers:
                    X = transformer.transform(X)
                score_samples = np.asarray(detector.score_samples(X), dtype=np.float64)
                anomalous = score_samples - offset < 0  # decision_function < 0
                n_anomalous += int(anomalous.sum())
                for (path, _), value, flag in zip(batch, score_samples, anomalous):
                    writer.writerow(
                        [str(path), f"{-value:.6g}", "anomalous" if flag else "normal"]
                    )
                if maps_dir is not None:
                    for (path, relative), heat in zip(batch, detector.anomaly_map(X)):
                        _save_heatmap(
                            maps_dir / _map_name(relative),
                            _seen_image(path, embedder), heat, vmin, vmax, args.alpha,
                        )
                bar.update(len(batch))
        done = True
    finally:
        if csv_file is not sys.stdout:
            csv_file.close()
            if done:
                os.replace(part, args.csv)
            else:
                part.unlink(missing_ok=True)
        else:
            csv_file.flush()
    where = f"; scores in {args.csv}" if args.csv else ""
    maps = f"; heat maps in {maps_dir}" if maps_dir is not None else ""
    _say(args, f"scored {len(items)} images: {n_anomalous} anomalous "
               f"(threshold {-offset:.4g}){where}{maps}")
    return 0


# --------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------


def main(argv=None):
    """Run the ``skpatch`` command line.

    Parameters
    ----------
    argv : list of str, default=None
        The arguments (without the program name); ``sys.argv[1:]`` when None.

    Returns
    -------
    status : int
        0 on success, 1 on an error (reported on the standard error in one
        line). Wrong options exit with status 2, as :mod:`argparse` does.
    """
    args = build_parser().parse_args(argv)
    from .backbones import WeightsUnavailableError
    from .exceptions import DegenerateTrainingSetWarning

    try:
        if args.command == "fit":
            return _fit(args)
        with warnings.catch_warnings():
            # Said once, by skpatch fit: a model of few images would repeat it
            # on every run, as its covariances are factored again after loading.
            warnings.simplefilter("ignore", DegenerateTrainingSetWarning)
            return _score(args)
    except BrokenPipeError:
        # The reader of the scores went away (``skpatch score ... | head``): a
        # quiet stop, as other command-line tools make, and no error at exit
        # when Python flushes the closed pipe.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except (CommandLineError, WeightsUnavailableError, ValueError, OSError) as exc:
        print(f"skpatch {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"skpatch {args.command}: interrupted", file=sys.stderr)
        return 130
