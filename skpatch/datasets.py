"""Image anomaly-detection datasets and synthetic defects.

* :func:`load_mvtec` reads a category laid out as the MVTec AD benchmark.
* :func:`load_image_folder` reads a folder of normal images, optionally a folder
  of anomalous images and a folder of their ground-truth masks.
* :func:`load_elpv` and :func:`load_elpv_split` give the ELPV solar-cell
  dataset (PyPI package ``elpv-dataset``) and the one-class benchmark split.
* :func:`make_contaminated_split` moves anomalous test images into the training
  set, the noisy-training protocol of SoftPatch and RPaDiM.
* :func:`make_synthetic_defects` paints scratches, stains, cut-and-paste patches
  and intensity changes on normal images, with exact pixel masks.

Images are returned as ``uint8`` arrays, ``(n, H, W, 3)`` for files read from
disk (grayscale files are converted to RGB) and ``(n, 300, 300)`` for ELPV; masks
are boolean ``(n, H, W)`` arrays.
"""

import numbers
import warnings
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage
from sklearn.utils import Bunch, check_random_state

__all__ = [
    "load_mvtec",
    "load_image_folder",
    "load_elpv",
    "load_elpv_split",
    "make_contaminated_split",
    "make_synthetic_defects",
]

#: File extensions (case-insensitive) recognised as images by the folder loaders.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")

DEFECT_KINDS = ("scratch", "blob", "cutpaste", "intensity")

# Smallest change, on the [0, 1] scale (5 grey levels of a uint8 image), that
# make_synthetic_defects counts as visible and puts in the mask.
_MIN_VISIBLE_DELTA = 5 / 255

_ELPV_CELL_TYPES = ("mono", "poly", "all")

_ELPV_DESCR = """\
ELPV: electroluminescence images of solar cells
===============================================

2,624 grayscale images (300 x 300 pixels, uint8) of functional and defective
solar cells extracted from electroluminescence images of 44 photovoltaic
modules, normalised for size and perspective. Each cell is annotated with a
defect probability in {0, 1/3, 2/3, 1} (the confidence of the expert
annotators) and the type of the module it comes from, 'mono'- (1,074 cells)
or 'poly'-crystalline (1,550 cells). There are no pixel masks.

Data: https://github.com/zae-bayern/elpv-dataset (PyPI: elpv-dataset).

License: Creative Commons Attribution-NonCommercial-ShareAlike 4.0
International (CC BY-NC-SA 4.0); for commercial use contact the authors.

If you use this dataset, please cite:

* Buerhop-Lutz, C.; Deitsch, S.; Maier, A.; Gallwitz, F.; Berger, S.; Doll, B.;
  Hauch, J.; Camus, C. & Brabec, C. J. A Benchmark for Visual Identification of
  Defective Solar Cells in Electroluminescence Imagery. European PV Solar
  Energy Conference and Exhibition (EU PVSEC), 2018.
  DOI: 10.4229/35thEUPVSEC20182018-5CV.3.15
* Deitsch, S.; Christlein, V.; Berger, S.; Buerhop-Lutz, C.; Maier, A.;
  Gallwitz, F. & Riess, C. Automatic classification of defective photovoltaic
  module cells in electroluminescence images. Solar Energy 185, 455-468, 2019.
  DOI: 10.1016/j.solener.2019.02.067
* Deitsch, S.; Buerhop-Lutz, C.; Sovetkin, E.; Steland, A.; Maier, A.;
  Gallwitz, F. & Riess, C. Segmentation of photovoltaic module cells in
  uncalibrated electroluminescence images. Machine Vision and Applications
  32(4), 2021. DOI: 10.1007/s00138-021-01191-9
"""


# --------------------------------------------------------------------------
# Parameter checks
# --------------------------------------------------------------------------
def _is_int(value):
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def _check_image_size(image_size):
    if image_size is None:
        return None
    if not _is_int(image_size) or image_size < 1:
        raise ValueError(
            f"image_size must be a positive int or None, got {image_size!r}"
        )
    return int(image_size)


# --------------------------------------------------------------------------
# Reading images and masks
# --------------------------------------------------------------------------
def _list_images(folder, what):
    """Sorted image files (non-recursive, hidden files skipped) of a folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{what} folder not found: {folder}")
    paths = sorted(
        p
        for p in folder.iterdir()
        if p.is_file()
        and not p.name.startswith(".")
        and p.suffix.lower() in IMAGE_EXTENSIONS
    )
    if not paths:
        raise FileNotFoundError(
            f"no images found in the {what} folder {folder} "
            f"(looked for {', '.join(IMAGE_EXTENSIONS)})"
        )
    return paths


# What PIL raises for a corrupt, truncated or non-image file (some plugins raise SyntaxError).
_READ_ERRORS = (OSError, ValueError, SyntaxError)


def _read_error(path, exc):
    return ValueError(f"could not read image file {path}: {exc}")


def _image_sizes(paths):
    """(width, height) of each file, read from the headers only."""
    sizes = []
    for path in paths:
        try:
            with Image.open(path) as im:
                sizes.append(im.size)
        except _READ_ERRORS as exc:
            raise _read_error(path, exc) from exc
    return sizes


def _unreadable(paths):
    """``(path, error)`` of the files that do not decode completely."""
    bad = []
    for path in paths:
        try:
            with Image.open(path) as im:
                im.load()
        except _READ_ERRORS as exc:
            bad.append((path, exc))
    return bad


def _to_rgb(im):
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit grayscale: PIL's convert("RGB") would clip instead of scale.
        a = np.asarray(im, dtype=np.float64) / 257.0
        im = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8))
    elif im.mode == "F":
        # Float images (TIFF) in [0, 1]; convert("RGB") would clip them to 0 / 1.
        a = np.asarray(im, dtype=np.float64)
        if not (np.isfinite(a).all() and a.min() >= 0 and a.max() <= 1):
            raise ValueError("a float image must have values in [0, 1]")
        im = Image.fromarray(np.rint(a * 255).astype(np.uint8))
    return im.convert("RGB")


def _read_images(paths, image_size, what):
    """Stack image files into a uint8 (n, H, W, 3) array.

    Returns the array and the original (width, height) of each file.
    """
    sizes = _image_sizes(paths)
    if image_size is None:
        distinct = {}
        for size, path in zip(sizes, paths):
            distinct.setdefault(size, path)
        if len(distinct) > 1:
            listing = ", ".join(
                f"{w}x{h} (e.g. {p.name})" for (w, h), p in list(distinct.items())[:4]
            )
            raise ValueError(
                f"the {what} images do not all have the same size: {listing}; "
                "pass image_size=<int> to resize them to a common square size"
            )
        width, height = sizes[0]
    else:
        width = height = image_size
    out = np.empty((len(paths), height, width, 3), dtype=np.uint8)
    for i, path in enumerate(paths):
        try:
            with Image.open(path) as im:
                im = _to_rgb(im)
                if im.size != (width, height):
                    im = im.resize((width, height), Image.Resampling.BICUBIC)
                out[i] = np.asarray(im)
        except _READ_ERRORS as exc:
            raise _read_error(path, exc) from exc
    return out, sizes


def _read_mask(path, image_path, image_wh, out_hw):
    """Boolean mask of one file, checked against its image's size."""
    try:
        with Image.open(path) as im:
            size = im.size
            a = np.asarray(im.convert("L"))
    except _READ_ERRORS as exc:
        raise _read_error(path, exc) from exc
    if size != tuple(image_wh):
        raise ValueError(
            f"mask {path} is {size[0]}x{size[1]} but its image "
            f"{image_path} is {image_wh[0]}x{image_wh[1]}"
        )
    # 0/255 and 0/1 masks alike; robust to JPEG noise around 0 and 255.
    mask = a > (int(a.max()) // 2)
    if mask.shape != tuple(out_hw):
        m = Image.fromarray(mask.astype(np.uint8) * 255)
        m = m.resize((out_hw[1], out_hw[0]), Image.Resampling.NEAREST)
        mask = np.asarray(m) > 127
    return mask


def _match_masks(image_paths, mask_dir, mask_suffix, what, skipped=()):
    """Mask file of each image: same stem plus ``mask_suffix``, any image extension.

    Raises when an image has no mask, when a mask has no image, or when a
    stem is ambiguous. Masks of the ``skipped`` (unreadable) images are ignored.
    """
    skipped_stems = {Path(p).stem for p in skipped}
    mask_dir = Path(mask_dir)
    if not mask_dir.is_dir():
        raise FileNotFoundError(f"mask folder for the {what} images not found: {mask_dir}")
    by_stem = {}
    for path in image_paths:
        if path.stem in by_stem:
            raise ValueError(
                f"two {what} images share the stem {path.stem!r} ({by_stem[path.stem].name}, "
                f"{path.name}): their masks cannot be told apart"
            )
        by_stem[path.stem] = path
    masks, orphans = {}, []
    mask_files = sorted(
        p
        for p in mask_dir.iterdir()
        if p.is_file()
        and not p.name.startswith(".")
        and p.suffix.lower() in IMAGE_EXTENSIONS
    )
    for path in mask_files:
        stem = path.stem
        key = stem[: len(stem) - len(mask_suffix)] if stem.endswith(mask_suffix) else None
        if key not in by_stem:
            if key not in skipped_stems:
                orphans.append(path)
            continue
        if key in masks:
            raise ValueError(
                f"two masks for the image {by_stem[key]}: {masks[key].name} and {path.name}"
            )
        masks[key] = path
    if orphans:
        shown = ", ".join(p.name for p in orphans[:5])
        more = f" and {len(orphans) - 5} more" if len(orphans) > 5 else ""
        raise ValueError(
            f"mask without image in {mask_dir}: {shown}{more} match no {what} image "
            f"(a mask of image 'NAME.png' is 'NAME{mask_suffix}.png')"
        )
    missing = [p for p in image_paths if p.stem not in masks]
    if missing:
        shown = ", ".join(p.name for p in missing[:5])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise FileNotFoundError(
            f"image without mask: no mask in {mask_dir} for the {what} image(s) "
            f"{shown}{more} (expected e.g. "
            f"{mask_dir / (missing[0].stem + mask_suffix + '.png')})"
        )
    return [masks[p.stem] for p in image_paths]


def _read_masks(mask_paths, image_paths, sizes, out_hw):
    out = np.empty((len(mask_paths), *out_hw), dtype=bool)
    for i, (mpath, ipath, wh) in enumerate(zip(mask_paths, image_paths, sizes)):
        out[i] = _read_mask(mpath, ipath, wh, out_hw)
    return out


# --------------------------------------------------------------------------
# MVTec AD and generic folders
# --------------------------------------------------------------------------
def load_mvtec(root, category, *, image_size=None):
    """Load one category of a dataset in the MVTec AD folder layout.

    The layout is::

        root/category/train/good/*.png                     normal training images
        root/category/test/<defect_type>/*.png             test images ('good' = normal)
        root/category/ground_truth/<defect_type>/<stem>_mask.png

    Every anomalous test image must have exactly one mask and every mask an
    image. Files are read in sorted order: defect types alphabetically, then
    file names.

    Parameters
    ----------
    root : str or path-like
        Folder that holds the category folders (e.g. ``mvtec_anomaly_detection``).
    category : str
        Name of the category folder, e.g. ``"bottle"``.
    image_size : int or None, default=None
        If an int, images are resized (bicubic) and masks (nearest neighbour) to
        ``image_size x image_size``, which bounds memory (MVTec images are up to
        1024 x 1024). If None, all images of a split must have the same size.

    Returns
    -------
    data : :class:`~sklearn.utils.Bunch`
        Dictionary-like object with attributes

        train_images : ndarray of shape (n_train, H, W, 3), dtype uint8
            Normal training images; grayscale files are converted to RGB.
        train_paths : ndarray of str of shape (n_train,)
            Their file paths.
        test_images : ndarray of shape (n_test, H, W, 3), dtype uint8
            Test images.
        test_labels : ndarray of shape (n_test,), dtype int64
            0 for normal ('good') images, 1 for anomalous ones.
        test_masks : ndarray of shape (n_test, H, W), dtype bool
            Ground-truth masks, all False for normal images.
        test_defect_types : ndarray of str of shape (n_test,)
            Name of the defect folder of each test image ('good' for normal).
        test_paths : ndarray of str of shape (n_test,)
            File paths of the test images.
        category : str
            The category.

    Raises
    ------
    FileNotFoundError
        If the root or category folder, a split folder, an image or a mask is
        missing (the message names what is missing and, for an unknown
        category, the available ones).
    ValueError
        If a mask has no image, a mask's size differs from its image's, or the
        images of a split differ in size and ``image_size`` is None.

    See Also
    --------
    load_image_folder : Loader for a plain folder layout.

    Examples
    --------
    >>> from skpatch.datasets import load_mvtec
    >>> data = load_mvtec("mvtec_anomaly_detection", "bottle",
    ...                   image_size=256)  # doctest: +SKIP
    >>> data.test_images.shape, data.test_masks.shape  # doctest: +SKIP
    ((83, 256, 256, 3), (83, 256, 256))
    """
    image_size = _check_image_size(image_size)
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"MVTec root folder not found: {root}")
    if not isinstance(category, str) or not category:
        raise ValueError(f"category must be a non-empty str, got {category!r}")
    cat_dir = root / category
    if not cat_dir.is_dir():
        available = sorted(
            p.name for p in root.iterdir() if p.is_dir() and (p / "train").is_dir()
        )
        raise FileNotFoundError(
            f"unknown category {category!r}: no folder {cat_dir}; "
            f"categories found in {root}: {available or 'none'}"
        )

    train_paths = _list_images(cat_dir / "train" / "good", f"{category!r} train/good")
    train_images, _ = _read_images(train_paths, image_size, f"{category!r} train")

    test_dir = cat_dir / "test"
    if not test_dir.is_dir():
        raise FileNotFoundError(f"test folder not found: {test_dir}")
    defect_types = sorted(p.name for p in test_dir.iterdir() if p.is_dir())
    if not defect_types:
        raise FileNotFoundError(f"no defect-type folders in the test folder {test_dir}")
    gt_dir = cat_dir / "ground_truth"
    if gt_dir.is_dir():
        unknown = sorted(
            p.name
            for p in gt_dir.iterdir()
            if p.is_dir() and p.name != "good" and p.name not in defect_types
        )
        if unknown:
            raise ValueError(
                f"mask without image: ground-truth folder(s) {unknown} in {gt_dir} "
                f"have no test folder (test defect types: {defect_types})"
            )

    test_paths, test_types, mask_paths = [], [], []
    for defect in defect_types:
        paths = _list_images(test_dir / defect, f"{category!r} test/{defect}")
        test_paths += paths
        test_types += [defect] * len(paths)
        if defect == "good":
            mask_paths += [None] * len(paths)
            continue
        if not (gt_dir / defect).is_dir():
            raise FileNotFoundError(
                f"image without mask: no ground-truth folder for the defect type "
                f"{defect!r} (expected {gt_dir / defect})"
            )
        mask_paths += _match_masks(paths, gt_dir / defect, "_mask", f"{category!r} test/{defect}")

    test_images, sizes = _read_images(test_paths, image_size, f"{category!r} test")
    out_hw = test_images.shape[1:3]
    test_masks = np.zeros((len(test_paths), *out_hw), dtype=bool)
    for i, (mpath, ipath, wh) in enumerate(zip(mask_paths, test_paths, sizes)):
        if mpath is not None:
            test_masks[i] = _read_mask(mpath, ipath, wh, out_hw)
    test_types = np.asarray(test_types, dtype=str)
    return Bunch(
        train_images=train_images,
        train_paths=np.asarray([str(p) for p in train_paths]),
        test_images=test_images,
        test_labels=(test_types != "good").astype(np.int64),
        test_masks=test_masks,
        test_defect_types=test_types,
        test_paths=np.asarray([str(p) for p in test_paths]),
        category=category,
    )


def load_image_folder(
    normal_dir,
    anomalous_dir=None,
    mask_dir=None,
    *,
    image_size=None,
    mask_suffix="_mask",
    on_error="raise",
):
    """Load images from a folder of normal and a folder of anomalous images.

    Images are the files of the folders (not their sub-folders) with a
    ``.png``, ``.jpg``, ``.jpeg``, ``.bmp``, ``.tif`` or ``.tiff`` extension
    (any case; hidden files are skipped), in sorted order, normal images first.
    The mask of the anomalous image ``NAME.ext`` is the file
    ``NAME<mask_suffix>.<any image extension>`` in ``mask_dir``; any non-zero
    pixel is anomalous.

    Parameters
    ----------
    normal_dir : str or path-like
        Folder of normal images (label 0).
    anomalous_dir : str or path-like, default=None
        Folder of anomalous images (label 1).
    mask_dir : str or path-like, default=None
        Folder of the masks of the anomalous images; requires ``anomalous_dir``.
        Every anomalous image must have a mask and every mask an image.
    image_size : int or None, default=None
        If an int, images are resized (bicubic) and masks (nearest neighbour) to
        ``image_size x image_size``. If None, all images must have the same size.
    mask_suffix : str, default="_mask"
        Appended to an image's stem to name its mask.
    on_error : {"raise", "skip"}, default="raise"
        What to do with an image or mask file that cannot be read (corrupt,
        truncated, not an image despite its extension): ``"raise"`` raises a
        ``ValueError`` naming the file; ``"skip"`` leaves the file out (an
        anomalous image with an unreadable mask too) and warns with the list
        of skipped files. ``"skip"`` decodes every file twice.

    Returns
    -------
    data : :class:`~sklearn.utils.Bunch`
        Dictionary-like object with attributes

        images : ndarray of shape (n, H, W, 3), dtype uint8
            Normal images, then anomalous ones; grayscale files become RGB.
        labels : ndarray of shape (n,), dtype int64
            0 for normal, 1 for anomalous images.
        masks : ndarray of shape (n, H, W), dtype bool, or None
            Ground-truth masks (all False for normal images); None when
            ``mask_dir`` is None.
        paths : ndarray of str of shape (n,)
            File paths of the images.

    Raises
    ------
    FileNotFoundError
        If a folder is missing, holds no images, or an anomalous image has no mask.
    ValueError
        For a mask without image, ambiguous masks, a mask whose size differs
        from its image's, images of different sizes when ``image_size`` is
        None, ``mask_dir`` without ``anomalous_dir``, or an unreadable file
        when ``on_error="raise"`` (the message names the file).

    See Also
    --------
    load_mvtec : Loader for the MVTec AD layout.
    """
    image_size = _check_image_size(image_size)
    if not isinstance(mask_suffix, str):
        raise ValueError(f"mask_suffix must be a str, got {mask_suffix!r}")
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    if mask_dir is not None and anomalous_dir is None:
        raise ValueError(
            "mask_dir was given without anomalous_dir: masks belong to anomalous images"
        )
    normal = _list_images(normal_dir, "normal")
    anomalous = [] if anomalous_dir is None else _list_images(anomalous_dir, "anomalous")
    skipped = []
    if on_error == "skip":
        skipped = _unreadable(normal + anomalous)
        bad = {path for path, _ in skipped}
        normal = [p for p in normal if p not in bad]
        anomalous = [p for p in anomalous if p not in bad]
    mask_paths = None
    if mask_dir is not None:
        mask_paths = _match_masks(
            anomalous, mask_dir, mask_suffix, "anomalous", skipped=[p for p, _ in skipped]
        )
        if on_error == "skip":
            bad_masks = _unreadable(mask_paths)
            bad = {path for path, _ in bad_masks}
            skipped += bad_masks
            kept = [i for i, m in enumerate(mask_paths) if m not in bad]
            anomalous = [anomalous[i] for i in kept]
            mask_paths = [mask_paths[i] for i in kept]
    if skipped:
        listing = "; ".join(f"{path} ({exc})" for path, exc in skipped[:5])
        more = f"; and {len(skipped) - 5} more" if len(skipped) > 5 else ""
        warnings.warn(
            f"skipped {len(skipped)} unreadable file(s) (on_error='skip'): {listing}{more}",
            UserWarning,
            stacklevel=2,
        )
    if not normal:
        raise ValueError(f"no readable image in the normal folder {normal_dir}")
    paths = normal + anomalous
    images, sizes = _read_images(paths, image_size, "normal and anomalous")
    labels = np.r_[np.zeros(len(normal), np.int64), np.ones(len(anomalous), np.int64)]
    masks = None
    if mask_paths is not None:
        masks = np.zeros(images.shape[:3], dtype=bool)
        masks[len(normal):] = _read_masks(
            mask_paths, anomalous, sizes[len(normal):], images.shape[1:3]
        )
    return Bunch(
        images=images,
        labels=labels,
        masks=masks,
        paths=np.asarray([str(p) for p in paths]),
    )


# --------------------------------------------------------------------------
# ELPV
# --------------------------------------------------------------------------
def _load_elpv_raw():
    try:
        from elpv_dataset.utils import load_dataset
    except ImportError as exc:
        raise ImportError(
            "the ELPV dataset needs the package 'elpv-dataset': "
            "pip install elpv-dataset (or pip install 'skpatch[examples]')"
        ) from exc
    images, probs, types = load_dataset()
    return (
        np.asarray(images, dtype=np.uint8),
        np.asarray(probs, dtype=np.float64),
        np.asarray(types).astype(str),
    )


def _check_cell_type(cell_type):
    if cell_type not in _ELPV_CELL_TYPES:
        raise ValueError(f"cell_type must be one of {_ELPV_CELL_TYPES}, got {cell_type!r}")


def load_elpv(cell_type="all"):
    """Load the ELPV electroluminescence solar-cell dataset.

    2,624 cells of 300 x 300 pixels, 8-bit grayscale, each with a defect
    probability in {0, 1/3, 2/3, 1} and the type of its module ('mono' or
    'poly'). The data come with the PyPI package ``elpv-dataset``
    (``pip install elpv-dataset``, or the ``examples`` extra of skpatch) and
    are licensed CC BY-NC-SA 4.0; see ``DESCR`` for the citation.

    Parameters
    ----------
    cell_type : {'mono', 'poly', 'all'}, default='all'
        Module type of the cells to return.

    Returns
    -------
    data : :class:`~sklearn.utils.Bunch`
        Dictionary-like object with attributes

        images : ndarray of shape (n, 300, 300), dtype uint8
            Cell images in the package's order.
        defect_probability : ndarray of shape (n,), dtype float64
            0, 1/3, 2/3 or 1.
        cell_type : ndarray of str of shape (n,)
            'mono' or 'poly'.
        DESCR : str
            Description, license and citation.

    Raises
    ------
    ImportError
        If ``elpv-dataset`` is not installed.

    See Also
    --------
    load_elpv_split : The one-class train / test split of the benchmarks.

    Examples
    --------
    >>> from skpatch.datasets import load_elpv
    >>> data = load_elpv("mono")  # doctest: +SKIP
    >>> data.images.shape  # doctest: +SKIP
    (1074, 300, 300)
    """
    _check_cell_type(cell_type)
    images, probs, types = _load_elpv_raw()
    if cell_type != "all":
        keep = types == cell_type
        images, probs, types = images[keep], probs[keep], types[keep]
    return Bunch(images=images, defect_probability=probs, cell_type=types, DESCR=_ELPV_DESCR)


def _elpv_split_indices(probs, types, cell_type, train_size=0.7, random_state=0):
    """Indices (train, test normal, test anomalous) of the ELPV one-class split.

    Per cell type, a permutation (``np.random.default_rng(random_state)``,
    fresh for each type) of the probability-0 cells: the first
    ``floor(train_size * n)`` are train, the others are normal test cells;
    probability-1 cells are anomalous test cells; 1/3 and 2/3 are unused.
    """
    train, test_normal, test_anomalous = [], [], []
    for t in ("mono", "poly"):
        if cell_type not in (t, "all"):
            continue
        normal = np.flatnonzero((types == t) & (probs == 0))
        perm = np.random.default_rng(random_state).permutation(len(normal))
        n_train = int(np.floor(train_size * len(normal)))
        if n_train == 0:  # (floor leaves the test set at least one)
            raise ValueError(
                f"train_size={train_size!r} leaves none of the {len(normal)} defect-free "
                f"{t} cells for training"
            )
        train.append(normal[perm[:n_train]])
        test_normal.append(normal[perm[n_train:]])
        test_anomalous.append(np.flatnonzero((types == t) & (probs == 1.0)))
    return (
        np.concatenate(train),
        np.sort(np.concatenate(test_normal)),
        np.sort(np.concatenate(test_anomalous)),
    )


def load_elpv_split(cell_type="mono", *, train_size=0.7, random_state=0):
    """One-class train / test split of ELPV, the protocol of skpatch's benchmarks.

    For each cell type, the cells of defect probability 0 are permuted with
    ``np.random.default_rng(random_state)`` (a fresh generator per type); the
    first ``floor(train_size * n)`` of them form the training set, the rest are
    the normal test cells (label 0) and all cells of probability 1 are the
    anomalous test cells (label 1). Cells of probability 1/3 and 2/3 (uncertain
    annotations) are not used. ``'all'`` is the union of the 'mono' and 'poly'
    splits. With the defaults, 'mono' gives 411 training cells and a test set of
    177 normal and 313 anomalous cells.

    Parameters
    ----------
    cell_type : {'mono', 'poly', 'all'}, default='mono'
        Module type of the cells.
    train_size : float, default=0.7
        Fraction of the normal cells used for training, in (0, 1).
    random_state : int or None, default=0
        Seed of the permutation; None draws fresh entropy (not reproducible).

    Returns
    -------
    X_train : ndarray of shape (n_train, 300, 300), dtype uint8
        Normal training cells (in permutation order; 'mono' before 'poly').
    X_test : ndarray of shape (n_test, 300, 300), dtype uint8
        Test cells: the normal ones (sorted by dataset index), then the
        anomalous ones (sorted by dataset index).
    y_test : ndarray of shape (n_test,), dtype int64
        0 for normal, 1 for anomalous test cells.

    Raises
    ------
    ImportError
        If ``elpv-dataset`` is not installed.

    See Also
    --------
    load_elpv : The whole dataset with its annotations.

    Notes
    -----
    Images are returned at their original 300 x 300 size; the patch embedder
    resizes them. ELPV has image labels only, no masks.

    Examples
    --------
    >>> from skpatch.datasets import load_elpv_split
    >>> X_train, X_test, y_test = load_elpv_split("mono")  # doctest: +SKIP
    >>> X_train.shape, X_test.shape, int(y_test.sum())  # doctest: +SKIP
    ((411, 300, 300), (490, 300, 300), 313)
    """
    _check_cell_type(cell_type)
    if (
        not isinstance(train_size, numbers.Real)
        or isinstance(train_size, (bool, np.bool_))
        or not 0 < train_size < 1
    ):
        raise ValueError(f"train_size must be a float in (0, 1), got {train_size!r}")
    if random_state is not None and (not _is_int(random_state) or random_state < 0):
        raise ValueError(
            f"random_state must be a non-negative int or None, got {random_state!r}"
        )
    images, probs, types = _load_elpv_raw()
    train, test_normal, test_anomalous = _elpv_split_indices(
        probs, types, cell_type, train_size=train_size, random_state=random_state
    )
    test = np.concatenate([test_normal, test_anomalous])
    y_test = np.r_[
        np.zeros(len(test_normal), np.int64), np.ones(len(test_anomalous), np.int64)
    ]
    return images[train], images[test], y_test


# --------------------------------------------------------------------------
# Contaminated training sets
# --------------------------------------------------------------------------
def _take(X, indices):
    """Rows ``indices`` of an array, or items of a list (a list back)."""
    if isinstance(X, np.ndarray):
        return X[indices]
    return [X[i] for i in indices]


def _concat(a, b):
    if isinstance(a, np.ndarray) and isinstance(b, np.ndarray):
        return np.concatenate([a, b])
    return list(a) + list(b)


def make_contaminated_split(
    X_train, X_test, y_test, *, masks_test=None, contamination=0.1, random_state=0
):
    """Contaminate a training set with anomalous test images (noisy-training protocol).

    The protocol of SoftPatch and RPaDiM (§5.1) for training sets that are
    not clean: a random subset of the anomalous test images is moved into the
    training set, all normal training images are kept, and the moved images
    leave the test set, so that no image is both trained on and evaluated.

    Parameters
    ----------
    X_train : ndarray of shape (n_train, ...) or list
        Normal training images (or embeddings, or file paths).
    X_test : ndarray of shape (n_test, ...) or list
        Test images.
    y_test : array-like of shape (n_test,)
        Test labels, 0 = normal, 1 = anomalous.
    masks_test : ndarray of shape (n_test, H, W) or None, default=None
        Ground-truth masks of the test images; when given, those of the
        images left in the test set are returned too.
    contamination : float in [0, 1), default=0.1
        Fraction of anomalous images in the returned training set:
        ``round(contamination * n_train / (1 - contamination))`` anomalous
        images are added to the ``n_train`` normal ones (10 % of 411 normal
        images: 46 anomalous). 0 returns the inputs unchanged.
    random_state : int, RandomState instance or None, default=0
        Seed of the choice of the anomalous images and of their places in
        the training set.

    Returns
    -------
    X_train : ndarray or list of length n_train + n_anomalous
        The normal training images, in their order, with the anomalous ones
        inserted at random places.
    X_test : ndarray or list
        The test images that were not moved, in their order.
    y_train : ndarray of shape (n_train + n_anomalous,), dtype int64
        1 for the anomalous images of the training set, 0 for the others
        (to check what a robust detector dropped; a detector ignores it).
    y_test : ndarray of shape (n_test - n_anomalous,), dtype int64
        Labels of the test images left.
    masks_test : ndarray of shape (n_test - n_anomalous, H, W)
        Only when ``masks_test`` is given: the masks of the test images left.

    Raises
    ------
    ValueError
        If the lengths disagree, the labels are not 0 / 1, or fewer than
        ``n_anomalous + 1`` anomalous test images exist (one must stay in
        the test set).

    Notes
    -----
    With the same ``random_state``, the anomalous images moved at a lower
    ``contamination`` are a subset of those moved at a higher one, so that a
    sweep over ``contamination`` adds noise to the same base; the test set of
    the highest level is then contained in the others (evaluate every level
    on it to compare them on the same images).

    ``contamination`` is the share of the final training set, the meaning of
    ``contamination`` in scikit-learn's outlier detectors.

    Examples
    --------
    >>> import numpy as np
    >>> from skpatch.datasets import make_contaminated_split
    >>> X_train = np.zeros((90, 8, 8))
    >>> X_test = np.ones((40, 8, 8))
    >>> y_test = np.r_[np.zeros(20), np.ones(20)]
    >>> X_tr, X_te, y_tr, y_te = make_contaminated_split(
    ...     X_train, X_test, y_test, contamination=0.1, random_state=0)
    >>> X_tr.shape, int(y_tr.sum()), X_te.shape, int(y_te.sum())
    ((100, 8, 8), 10, (30, 8, 8), 10)
    """
    n_train, n_test = len(X_train), len(X_test)
    y = np.asarray(y_test)
    if y.ndim != 1 or len(y) != n_test:
        raise ValueError(
            f"y_test must be 1-D with one label per test image ({n_test}), got shape {y.shape}."
        )
    if not np.isin(y, (0, 1)).all():
        raise ValueError("y_test must contain only 0 (normal) and 1 (anomalous).")
    if masks_test is not None and len(masks_test) != n_test:
        raise ValueError(
            f"masks_test has {len(masks_test)} masks for {n_test} test images."
        )
    if (
        not isinstance(contamination, numbers.Real)
        or isinstance(contamination, (bool, np.bool_))
        or not 0 <= contamination < 1
    ):
        raise ValueError(f"contamination must be a float in [0, 1), got {contamination!r}")
    rng = check_random_state(random_state)
    n_anomalous = int(round(contamination * n_train / (1 - contamination)))
    anomalous = np.flatnonzero(y == 1)
    if n_anomalous and n_anomalous >= len(anomalous):
        raise ValueError(
            f"contamination={contamination} needs {n_anomalous} anomalous images in the "
            f"training set, but the test set has {len(anomalous)} and must keep at least one."
        )
    # The first n of one permutation: lower levels move a subset of higher ones.
    moved = rng.permutation(anomalous)[:n_anomalous]
    n_total = n_train + n_anomalous
    slots = np.zeros(n_total, dtype=bool)
    slots[rng.choice(n_total, n_anomalous, replace=False)] = True
    order = np.empty(n_total, dtype=np.intp)
    order[~slots] = np.arange(n_train)
    order[slots] = n_train + np.arange(n_anomalous)
    kept = np.setdiff1d(np.arange(n_test), moved)
    out = (
        _take(_concat(X_train, _take(X_test, moved)), order),
        _take(X_test, kept),
        slots.astype(np.int64),
        y[kept].astype(np.int64),
    )
    if masks_test is not None:
        out = out + (np.asarray(masks_test)[kept],)
    return out


# --------------------------------------------------------------------------
# Synthetic defects
# --------------------------------------------------------------------------
def _smoothstep(x):
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3.0 - 2.0 * x)


def _local_frame(cy, cx, radius, shape, angle=0.0):
    """Pixels within ``radius`` (box) of a centre, in a frame rotated by ``angle``.

    Returns the (rows, cols) slices of the box clipped to the image and the
    coordinates ``u`` (along the rotated rows) and ``v`` of its pixel centres,
    or None when the box lies outside the image.
    """
    H, W = shape
    y0, y1 = max(int(np.floor(cy - radius)), 0), min(int(np.ceil(cy + radius)) + 1, H)
    x0, x1 = max(int(np.floor(cx - radius)), 0), min(int(np.ceil(cx + radius)) + 1, W)
    if y0 >= y1 or x0 >= x1:
        return None
    dy = np.arange(y0, y1, dtype=np.float64)[:, None] - cy
    dx = np.arange(x0, x1, dtype=np.float64)[None, :] - cx
    c, s = np.cos(angle), np.sin(angle)
    u = c * dy + s * dx
    v = -s * dy + c * dx
    return (slice(y0, y1), slice(x0, x1)), u, v


def _irregular_radius(u, v, a, b, rng, irregularity):
    """Normalised radius of an ellipse (semi-axes a, b) with a wobbly outline.

    1 on the outline, 0 at the centre; the outline radius is modulated by a
    few low angular harmonics.
    """
    uu, vv = u / a, v / b
    rho = np.hypot(uu, vv)
    phi = np.arctan2(vv, uu)
    outline = np.ones_like(rho)
    for k in range(2, 6):
        amp = irregularity * rng.uniform(0.0, 1.0) / k
        outline += amp * np.cos(k * phi + rng.uniform(0, 2 * np.pi))
    return rho / np.maximum(outline, 0.2)


def _pick_darken(region_mean, rng):
    """Darken (True) or brighten: bright regions are more likely darkened."""
    p_dark = np.clip(0.5 + 1.2 * (region_mean - 0.5), 0.1, 0.9)
    return rng.uniform() < p_dark


def _shift(region, alpha, strength, darken):
    """Multiplicative darkening or screen brightening, weighted by alpha."""
    w = alpha[..., None] * strength
    if darken:
        return region * (1.0 - w)
    return region + (1.0 - region) * w


def _defect_scratch(img, rng):
    """Thin anti-aliased curved line, darker or brighter, tapered at its ends."""
    H, W, C = img.shape
    s = min(H, W)
    length = rng.uniform(0.15, 0.5) * s
    width = rng.uniform(1.0, 3.0)
    n_seg = 24
    t = np.linspace(0.0, 1.0, n_seg)
    heading = (
        rng.uniform(0, 2 * np.pi)
        + rng.uniform(-0.8, 0.8) * t
        + np.cumsum(rng.normal(0.0, 0.06, n_seg))
    )
    step = length / n_seg
    pts = np.zeros((n_seg + 1, 2))
    pts[1:, 0] = np.cumsum(step * np.sin(heading))
    pts[1:, 1] = np.cumsum(step * np.cos(heading))
    pts -= pts.mean(axis=0)
    pts += rng.uniform([0.15 * H, 0.15 * W], [0.85 * H, 0.85 * W])

    margin = width / 2 + 2
    y0 = max(int(np.floor(pts[:, 0].min() - margin)), 0)
    y1 = min(int(np.ceil(pts[:, 0].max() + margin)) + 1, H)
    x0 = max(int(np.floor(pts[:, 1].min() - margin)), 0)
    x1 = min(int(np.ceil(pts[:, 1].max() + margin)) + 1, W)
    if y0 >= y1 or x0 >= x1:
        return None
    qy = np.arange(y0, y1, dtype=np.float64)[:, None]
    qx = np.arange(x0, x1, dtype=np.float64)[None, :]
    dist = np.full((y1 - y0, x1 - x0), np.inf)
    along = np.zeros_like(dist)  # position of the nearest curve point, in [0, 1]
    for i in range(n_seg):
        (ay, ax), (by, bx) = pts[i], pts[i + 1]
        dy, dx = by - ay, bx - ax
        seg = max(dy * dy + dx * dx, 1e-12)
        tt = np.clip(((qy - ay) * dy + (qx - ax) * dx) / seg, 0.0, 1.0)
        d = np.hypot(qy - ay - tt * dy, qx - ax - tt * dx)
        closer = d < dist
        dist = np.where(closer, d, dist)
        along = np.where(closer, (i + tt) / n_seg, along)
    taper = np.sqrt(np.clip(np.minimum(along, 1.0 - along) / 0.15, 0.0, 1.0))
    local_width = width * (0.4 + 0.6 * taper)
    coverage = np.clip(local_width / 2 + 0.5 - dist, 0.0, 1.0)
    # Slow variation of the contrast along the scratch.
    wobble = 0.75 + 0.25 * np.cos(2 * np.pi * rng.uniform(0.5, 2.0) * along + rng.uniform(0, 6.3))
    alpha = coverage * taper * wobble
    sl = (slice(y0, y1), slice(x0, x1))
    region = img[sl]
    near = coverage > 0
    mean = float(region[near].mean()) if near.any() else float(region.mean())
    darken = _pick_darken(mean, rng)
    strength = rng.uniform(0.5, 0.9)
    return sl, _shift(region, alpha, strength, darken)


def _soft_region(img, rng, axis_range, min_axis, irregularity_range, softness_range):
    """A random irregular ellipse with a soft edge: ``(slice, alpha, minor)`` or None.

    Semi-axes are ``axis_range`` times the image side (at least ``min_axis``
    pixels; ``minor`` is the smaller); ``alpha`` in [0, 1] is the region's
    weight on the local frame.
    """
    H, W, _ = img.shape
    a, b = rng.uniform(*axis_range, size=2) * min(H, W)
    a, b = max(a, min_axis), max(b, min_axis)
    irregularity = rng.uniform(*irregularity_range)
    cy, cx = rng.uniform([0.1 * H, 0.1 * W], [0.9 * H, 0.9 * W])
    frame = _local_frame(cy, cx, max(a, b) * (1 + irregularity) + 2, (H, W),
                         rng.uniform(0, np.pi))
    if frame is None:
        return None
    sl, u, v = frame
    rho = _irregular_radius(u, v, a, b, rng, irregularity)
    return sl, _smoothstep((1.0 - rho) / rng.uniform(*softness_range)), min(a, b)


def _defect_blob(img, rng):
    """Irregular stain: smooth-edged wobbly ellipse with a soft, mottled shift."""
    region = _soft_region(img, rng, (0.03, 0.12), 1.5, (0.1, 0.5), (0.3, 0.8))
    if region is None:
        return None
    sl, alpha, minor = region
    # Mottled inside: multiply by a smooth random field.
    field = ndimage.gaussian_filter(rng.standard_normal(alpha.shape), sigma=max(minor / 3, 1.0))
    field /= max(float(np.abs(field).max()), 1e-12)
    alpha = alpha * (0.8 + 0.2 * field)
    region = img[sl]
    weights = alpha / max(float(alpha.sum()), 1e-12)
    mean = float((region.mean(axis=-1) * weights).sum())
    darken = _pick_darken(mean, rng)
    strength = rng.uniform(0.2, 0.5)
    if img.shape[2] > 1:  # a slightly tinted stain
        strength = strength * (1.0 + rng.uniform(-0.3, 0.3, size=img.shape[2]))
    return sl, np.clip(_shift(region, alpha, strength, darken), 0.0, 1.0)


def _defect_cutpaste(img, rng):
    """CutPaste: a patch of the same image, maybe rotated / flipped / jittered."""
    H, W, C = img.shape
    area = rng.uniform(0.01, 0.06) * H * W
    aspect = np.exp(rng.uniform(np.log(0.3), np.log(1 / 0.3)))
    hh = min(np.sqrt(area * aspect), 0.6 * H) / 2  # half sizes
    hw = min(np.sqrt(area / aspect), 0.6 * W) / 2
    hh, hw = max(hh, 1.0), max(hw, 1.0)
    angle = rng.uniform(-np.pi / 4, np.pi / 4) if rng.uniform() < 0.5 else 0.0
    flip_u, flip_v = rng.uniform(size=2) < 0.25
    irregular = rng.uniform() < 0.5
    half_diag = np.hypot(hh, hw)

    def centre():
        my, mx = min(half_diag, H / 2), min(half_diag, W / 2)
        return rng.uniform([my, mx], [H - my, W - mx])

    ty, tx = centre()
    for _ in range(10):  # source away from the target
        sy, sx = centre()
        if np.hypot(sy - ty, sx - tx) >= max(hh, hw):
            break
    frame = _local_frame(ty, tx, half_diag + 1, (H, W), angle)
    if frame is None:
        return None
    sl, u, v = frame
    if irregular:
        rho = _irregular_radius(u, v, hh, hw, rng, rng.uniform(0.1, 0.4))
        alpha = np.clip((1.0 - rho) * min(hh, hw) + 0.5, 0.0, 1.0)
    else:
        alpha = np.clip(hh + 0.5 - np.abs(u), 0.0, 1.0) * np.clip(hw + 0.5 - np.abs(v), 0.0, 1.0)
    src_u = -u if flip_u else u
    src_v = -v if flip_v else v
    coords = np.stack([sy + src_u, sx + src_v])
    patch = np.stack(
        [ndimage.map_coordinates(img[..., c], coords, order=1, mode="reflect") for c in range(C)],
        axis=-1,
    )
    # Colour jitter, as in CutPaste.
    contrast = rng.uniform(0.85, 1.15)
    brightness = rng.uniform(-0.1, 0.1, size=C if rng.uniform() < 0.5 else 1)
    mean = patch.mean()
    patch = np.clip((patch - mean) * contrast + mean + brightness, 0.0, 1.0)
    region = img[sl]
    a = alpha[..., None]
    return sl, a * patch + (1.0 - a) * region


def _defect_intensity(img, rng):
    """A large soft region brightened, darkened or with changed contrast."""
    region = _soft_region(img, rng, (0.08, 0.25), 2.0, (0.0, 0.3), (0.3, 0.7))
    if region is None:
        return None
    sl, alpha, _ = region
    region = img[sl]
    weights = alpha / max(float(alpha.sum()), 1e-12)
    mean = float((region.mean(axis=-1) * weights).sum())
    if rng.uniform() < 1 / 3:
        factor = rng.uniform(0.2, 0.5) if rng.uniform() < 0.5 else rng.uniform(1.8, 3.0)
        gain = 1.0 + alpha[..., None] * (factor - 1.0)
        return sl, np.clip(mean + (region - mean) * gain, 0.0, 1.0)
    darken = _pick_darken(mean, rng)
    return sl, _shift(region, alpha, rng.uniform(0.15, 0.4), darken)


def _defect_cutpaste_scar(img, rng):
    """CutPaste (scar): a thin rotated strip of the same image pasted elsewhere.

    CutPaste's "scar" variant: 2 to 16 pixels wide and 10 to 25 long on a
    256-pixel image (here 1 % to 6 % and 4 % to 10 % of the side), rotated by
    up to 45 degrees, with the same colour jitter.
    """
    H, W, C = img.shape
    s = min(H, W)
    hw = max(rng.uniform(0.01, 0.06) * s, 1.0) / 2  # half width
    hl = max(rng.uniform(0.04, 0.10) * s, 3.0) / 2  # half length
    angle = rng.uniform(-np.pi / 4, np.pi / 4) + (np.pi / 2 if rng.uniform() < 0.5 else 0.0)
    reach = np.hypot(hw, hl) + 1

    def centre():
        my, mx = min(reach, H / 2), min(reach, W / 2)
        return rng.uniform([my, mx], [H - my, W - mx])

    ty, tx = centre()
    for _ in range(10):  # source away from the target
        sy, sx = centre()
        if np.hypot(sy - ty, sx - tx) >= hl:
            break
    frame = _local_frame(ty, tx, reach, (H, W), angle)
    if frame is None:
        return None
    sl, u, v = frame
    alpha = np.clip(hl + 0.5 - np.abs(u), 0.0, 1.0) * np.clip(hw + 0.5 - np.abs(v), 0.0, 1.0)
    coords = np.stack([sy + u, sx + v])
    patch = np.stack(
        [ndimage.map_coordinates(img[..., c], coords, order=1, mode="reflect") for c in range(C)],
        axis=-1,
    )
    contrast = rng.uniform(0.8, 1.2)
    brightness = rng.uniform(-0.15, 0.15, size=C if rng.uniform() < 0.5 else 1)
    mean = patch.mean()
    patch = np.clip((patch - mean) * contrast + mean + brightness, 0.0, 1.0)
    a = alpha[..., None]
    return sl, a * patch + (1.0 - a) * img[sl]


def _defect_draem(img, rng):
    """DRAEM-like: a noise-shaped region blended with an augmented anomaly source.

    The mask is a thresholded smooth random field (value noise at 2 to 16
    cells per side, rotated; DRAEM thresholds Perlin noise), covering 1 % to
    8 % of the image in one or several blobs. The anomaly source, a texture
    data set in DRAEM, is the image itself rotated or flipped, shifted, and
    with its contrast, gamma or polarity changed (no texture data offline);
    it is blended in with an opacity ``1 - β``, ``β`` in [0, 0.8] as DRAEM.
    """
    H, W, C = img.shape
    cells = 2 ** rng.randint(1, 5, size=2)
    coarse = rng.standard_normal((int(cells[0]) + 3, int(cells[1]) + 3))
    field = ndimage.zoom(coarse, (H / cells[0], W / cells[1]), order=3, mode="reflect")
    field = field[: H + 3 * H // int(cells[0]), : W + 3 * W // int(cells[1])]
    field = ndimage.rotate(field, rng.uniform(0, 360), reshape=False, order=1, mode="reflect")
    field = field[:H, :W]
    if field.shape != (H, W):
        return None
    area = rng.uniform(0.01, 0.08)
    threshold = np.quantile(field, 1.0 - area)
    spread = max(float(field.std()), 1e-12) * 0.05
    alpha = np.clip((field - threshold) / spread, 0.0, 1.0)
    # Anomaly source: the image transformed (rotation or flips, shift, tone).
    source = np.rot90(img, rng.randint(1, 4)) if H == W else img[::-1, ::-1]
    if rng.uniform() < 0.5:
        source = source[:, ::-1]
    source = np.roll(source, (rng.randint(H), rng.randint(W)), axis=(0, 1))
    choice = rng.randint(3)
    if choice == 0:
        source = np.clip((source - 0.5) * rng.uniform(1.5, 3.0) + 0.5, 0.0, 1.0)
    elif choice == 1:
        source = source ** rng.uniform(0.3, 3.0)
    else:
        source = 1.0 - source
    beta = rng.uniform(0.0, 0.8)
    a = (alpha * (1.0 - beta))[..., None]
    return (slice(0, H), slice(0, W)), a * source + (1.0 - a) * img


_DEFECTS = {
    "scratch": _defect_scratch,
    "blob": _defect_blob,
    "cutpaste": _defect_cutpaste,
    "intensity": _defect_intensity,
    "cutpaste_scar": _defect_cutpaste_scar,
    "draem": _defect_draem,
}


def _check_kinds(kinds):
    if isinstance(kinds, str):
        kinds = (kinds,)
    try:
        kinds = tuple(kinds)
    except TypeError:
        raise ValueError(f"kinds must be a sequence of defect names, got {kinds!r}") from None
    if not kinds:
        raise ValueError(f"kinds must name at least one of {tuple(_DEFECTS)}")
    for kind in kinds:
        if kind not in _DEFECTS:
            raise ValueError(f"unknown defect kind {kind!r}; choose from {tuple(_DEFECTS)}")
    return kinds


def _paint(cur, kind, rng, quantize, min_pixels, n_tries):
    """Paint one defect of ``kind`` that changes at least ``min_pixels`` visibly."""
    for _ in range(n_tries):
        result = _DEFECTS[kind](cur, rng)
        if result is None:
            continue
        sl, new = result
        new = quantize(np.clip(new, 0.0, 1.0))
        visible = np.abs(new - cur[sl]).max(axis=-1) >= _MIN_VISIBLE_DELTA - 1e-9
        if visible.sum() >= min_pixels:
            cur = cur.copy()
            cur[sl] = new
            return cur
    return None


def make_synthetic_defects(
    images,
    *,
    kinds=DEFECT_KINDS,
    n_defects=1,
    random_state=None,
    return_kinds=False,
):
    """Paint synthetic defects with exact masks on normal images.

    Each image receives ``n_defects`` defects whose kinds are drawn uniformly
    (with replacement) from ``kinds``:

    ``'scratch'``
        A thin curved line (width 1 to 3 pixels, anti-aliased, tapered at the
        ends), darker or brighter than the surface, 15 % to 50 % of the image
        side long.
    ``'blob'``
        A stain: an irregular ellipse (semi-axes 3 % to 12 % of the side) with
        smooth edges and a soft, mottled darkening or brightening.
    ``'cutpaste'``
        A rectangle or irregular patch (1 % to 6 % of the image area) copied
        from elsewhere in the same image, possibly rotated (up to 45 degrees)
        and flipped, with a small colour jitter, as in CutPaste.
    ``'intensity'``
        A large soft region (semi-axes 8 % to 25 % of the side) brightened,
        darkened or with its contrast raised or lowered.
    ``'cutpaste_scar'``
        CutPaste's "scar": a thin strip (1 % to 6 % of the side wide, 4 % to
        10 % long) copied from elsewhere in the image, rotated, with a colour
        jitter. Not drawn by default.
    ``'draem'``
        DRAEM-like: a region shaped by thresholded smooth noise (1 % to 8 %
        of the image, one or several blobs) where a transformed copy of the
        image (rotated or flipped, shifted, contrast, gamma or polarity
        changed; DRAEM uses a texture data set) is blended in with an
        opacity of 0.2 to 1. Not drawn by default.

    ``'cutpaste'``, ``'cutpaste_scar'`` and ``'draem'`` are the defects that
    PNI's refinement network trains on (:class:`skpatch.AnomalyMapRefiner`).

    Sizes are relative to the image, so the same call works from 32 x 32 to
    1024 x 1024 images.

    Parameters
    ----------
    images : array-like of shape (n, H, W) or (n, H, W, C) with C in {1, 3}
        Normal images, ``uint8`` or float in [0, 1].
    kinds : str or sequence of str, default=("scratch", "blob", "cutpaste", "intensity")
        Kinds of defects to draw from (the four default ones,
        ``"cutpaste_scar"`` and ``"draem"``); repeat a name to draw it more often.
    n_defects : int, default=1
        Number of defects per image.
    random_state : int, RandomState instance or None, default=None
        Seed of every random choice; the same seed gives the same output.
    return_kinds : bool, default=False
        Whether to also return the kinds painted on each image.

    Returns
    -------
    defective : ndarray of the shape and dtype of ``images``
        Copies of the images with the defects painted on them.
    masks : ndarray of shape (n, H, W), dtype bool
        True where a pixel changed visibly; never empty.
    kinds : list of list of str
        Only if ``return_kinds``: the kinds painted on each image, in order.

    Raises
    ------
    ValueError
        For a bad shape, dtype or value range of ``images``, an unknown kind,
        or a bad ``n_defects``.

    Notes
    -----
    The mask holds exactly the pixels whose value changed by at least 5/255
    (in at least one channel) on the [0, 1] scale, i.e. 5 grey levels of a
    ``uint8`` image. Smaller changes (the faint tails of anti-aliased and soft
    edges) are reverted, so pixels outside the mask are *exactly* equal to the
    input and pixels inside differ by at least 5/255. A cut-and-paste patch
    copied from a similar area therefore marks only the pixels it really
    changed. A defect that changes too few pixels is placed again; after 25
    failed tries the defect becomes an ``'intensity'`` change (reported as such
    by ``return_kinds``). The input is never modified.

    Examples
    --------
    >>> import numpy as np
    >>> from skpatch.datasets import make_synthetic_defects
    >>> rng = np.random.default_rng(0)
    >>> images = rng.integers(100, 156, size=(4, 64, 64), dtype=np.uint8)
    >>> defective, masks = make_synthetic_defects(images, random_state=0)
    >>> defective.shape, defective.dtype, masks.shape
    ((4, 64, 64), dtype('uint8'), (4, 64, 64))
    >>> bool(masks.reshape(4, -1).any(axis=1).all())
    True
    >>> bool((defective[~masks] == images[~masks]).all())
    True
    """
    if isinstance(images, (list, tuple)):
        shapes = {np.shape(image) for image in images}
        if len(shapes) > 1:
            raise ValueError(
                f"images of {len(shapes)} different shapes ({', '.join(map(str, sorted(shapes)[:3]))}"
                f"{', ...' if len(shapes) > 3 else ''}): pass images of one size at a time"
            )
    X = np.asarray(images)
    if X.ndim == 3 and X.shape[-1] == 3 and min(X.shape[:2]) > 4:
        raise ValueError(
            f"images of shape {X.shape} look like a single RGB image; pass images[None] "
            "for one image, or an array (n, H, W) of grayscale images"
        )
    if X.ndim not in (3, 4) or (X.ndim == 4 and X.shape[-1] not in (1, 3)):
        raise ValueError(
            "images must have shape (n, H, W) or (n, H, W, C) with C in {1, 3}, "
            f"got {X.shape}; pass a single image as images[None]"
        )
    if X.shape[0] == 0 or X.shape[1] < 2 or X.shape[2] < 2:
        raise ValueError(
            f"images must hold at least one image of at least 2 x 2 pixels, got {X.shape}"
        )
    is_uint8 = X.dtype == np.uint8
    if not is_uint8:
        if not np.issubdtype(X.dtype, np.floating):
            raise ValueError(f"images must be uint8 or float in [0, 1], got dtype {X.dtype}")
        if not np.isfinite(X).all():
            raise ValueError("float images must be finite (found NaN or inf)")
        if X.min() < 0 or X.max() > 1:
            raise ValueError(
                "float images must be in [0, 1] "
                f"(got min {X.min():.3g}, max {X.max():.3g}); scale them first"
            )
    kinds = _check_kinds(kinds)
    if not _is_int(n_defects) or n_defects < 1:
        raise ValueError(f"n_defects must be a positive int, got {n_defects!r}")
    rng = check_random_state(random_state)

    work = X if X.ndim == 4 else X[..., None]
    n, H, W, _ = work.shape
    if is_uint8:
        def quantize(a):
            return np.rint(a * 255.0) / 255.0
    else:
        def quantize(a):
            return a.astype(X.dtype).astype(np.float64)
    min_pixels = max(3, int(np.ceil(1e-4 * H * W)))

    out = np.empty_like(work)
    masks = np.zeros((n, H, W), dtype=bool)
    painted = []
    for i in range(n):
        orig = work[i]
        base = orig.astype(np.float64) / 255.0 if is_uint8 else orig.astype(np.float64)
        for _ in range(5):  # whole-image retries: the union of defects must show
            cur, done = base, []
            for j in rng.randint(len(kinds), size=n_defects):
                kind = kinds[j]
                new = _paint(cur, kind, rng, quantize, min_pixels, 25)
                if new is None:
                    kind = "intensity"
                    new = _paint(cur, kind, rng, quantize, 1, 25)
                if new is None:
                    continue
                cur = new
                done.append(kind)
            if is_uint8:
                res = np.rint(cur * 255.0).astype(np.uint8)
                delta = np.abs(res.astype(np.int16) - orig.astype(np.int16)) / 255.0
            else:
                res = cur.astype(X.dtype)
                delta = np.abs(res.astype(np.float64) - orig.astype(np.float64))
            mask = delta.max(axis=-1) >= _MIN_VISIBLE_DELTA - 1e-9
            if mask.any():
                break
        else:
            raise RuntimeError(
                f"could not paint a visible defect on image {i}; is it degenerate?"
            )
        out[i] = np.where(mask[..., None], res, orig)
        masks[i] = mask
        painted.append(done)

    out = out.reshape(X.shape)
    if return_kinds:
        return out, masks, painted
    return out, masks
