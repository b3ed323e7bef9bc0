"""Every gallery example (examples/plot_*.py) runs, on a few ELPV cells.

Each example is executed in-process with :func:`runpy.run_path`, in a
temporary working directory, with the real EfficientNet-Lite0 weights and the
real skpatch code. Only the ELPV table is made small: the raw loader behind
:func:`skpatch.datasets.load_elpv` and :func:`skpatch.datasets.load_elpv_split`
returns a few cells per module type and defect probability (decoding all 2,624
cells would take half a minute), and the real loaders split it as usual. The
examples size their test sets from what the loaders return, so they run the
same code on fewer images. A new ``plot_*.py`` is picked up by the glob.
"""

import glob
import os
import runpy
import warnings

import numpy as np
import pytest

import skpatch.datasets

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = sorted(glob.glob(os.path.join(ROOT, "examples", "plot_*.py")))

# Cells kept per (module type, defect probability): the mono split then has
# 8 training cells and 4 good + 4 defective test cells.
CELLS_PER_CLASS = {0.0: 12, 1 / 3: 1, 2 / 3: 1, 1.0: 4}


def _small_elpv_raw():
    """``(images, probs, types)`` of a few ELPV cells of each class, like the real raw loader."""
    elpv = pytest.importorskip("elpv_dataset")
    data_dir = os.path.join(os.path.dirname(elpv.__file__), "data")
    # The package's own table reader (elpv_dataset.utils.load_dataset).
    table = np.genfromtxt(
        os.path.join(data_dir, "labels.csv"),
        dtype=["|S19", "<f8", "|S4"],
        names=["path", "probability", "type"],
    )
    paths = np.char.decode(table["path"])
    probs = table["probability"]
    types = np.char.decode(table["type"])
    keep = []
    for cell_type in ("mono", "poly"):
        for prob, count in CELLS_PER_CLASS.items():
            rows = np.flatnonzero((types == cell_type) & np.isclose(probs, prob))
            keep.extend(rows[:count])
    keep = np.sort(keep)
    from PIL import Image

    images = []
    for path in paths[keep]:
        with Image.open(os.path.join(data_dir, path)) as image:
            images.append(np.asarray(image))
    return np.asarray(images, dtype=np.uint8), probs[keep].astype(np.float64), types[keep]


@pytest.fixture(scope="module")
def small_elpv():
    return _small_elpv_raw()


def test_examples_are_found():
    names = {os.path.basename(path) for path in EXAMPLES}
    assert {"plot_elpv_padim.py", "plot_compare_detectors.py", "plot_grid_search.py"} <= names


@pytest.mark.integration
@pytest.mark.parametrize("path", EXAMPLES, ids=os.path.basename)
def test_example_runs(path, small_elpv, tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.chdir(tmp_path)
    calls = []

    def small_raw():
        calls.append(1)
        images, probs, types = small_elpv
        return images.copy(), probs.copy(), types.copy()

    monkeypatch.setattr(skpatch.datasets, "_load_elpv_raw", small_raw)
    import matplotlib.pyplot as plt

    plt.close("all")
    try:
        with warnings.catch_warnings():
            # Too few cells for the covariances, plt.show() with Agg, tight_layout.
            warnings.simplefilter("ignore", UserWarning)
            runpy.run_path(path, run_name="__main__")
        drew = plt.get_fignums()
    finally:
        plt.close("all")
    assert drew, "the example drew no figure"
    with open(path) as f:
        uses_elpv = "load_elpv" in f.read()
    # The example ran on the small table, not on the full data set.
    assert calls or not uses_elpv, "the example did not load ELPV through skpatch.datasets"
