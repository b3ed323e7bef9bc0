"""Security: weights are loaded without running pickled code; the docs say what pickles do.

A ``torch.save`` / joblib / pickle file can run any code when it is loaded.
skpatch loads backbone weights with ``torch.load(..., weights_only=True)``,
which refuses anything but tensors and plain containers, and its docs point
to skops for model files from untrusted sources (tests/test_persistence.py
checks the skops round trip).
"""

import ast
import os
import pathlib

import numpy as np
import pytest
import torch

import skpatch
from skpatch import PatchEmbedder
from skpatch.backbones import load_backbone

ROOT = pathlib.Path(skpatch.__file__).parent
DOC = ROOT.parent / "doc" / "modules" / "reliability.rst"


class _Payload:
    """Unpickling this creates a file: a harmless stand-in for malicious code."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.fixture
def malicious_weights(tmp_path):
    path, sentinel = tmp_path / "weights.pth", tmp_path / "pwned"
    state_dict = {"_conv_stem.weight": torch.zeros(1), "payload": _Payload(sentinel)}
    torch.save(state_dict, path)
    return path, sentinel


def test_malicious_weights_file_is_refused_without_running_code(malicious_weights):
    path, sentinel = malicious_weights
    with pytest.raises(ValueError, match="could not read a state dict"):
        PatchEmbedder(weights=str(path), image_size=32, crop_size=None).transform(
            np.zeros((1, 32, 32), np.uint8)
        )
    with pytest.raises(ValueError, match="could not read a state dict") as error:
        load_backbone("resnet18", weights=path)
    # one line, which does not advise the unsafe load
    assert "\n" not in str(error.value) and "weights_only" not in str(error.value)
    assert not sentinel.exists()
    # The file is really malicious: an unsafe load runs the payload.
    torch.load(path, weights_only=False)
    assert sentinel.exists()


def _calls(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            owner = getattr(func.value, "id", "") if isinstance(func, ast.Attribute) else ""
            yield node, owner, name


def _keyword(node, name):
    for keyword in node.keywords:
        if keyword.arg == name and isinstance(keyword.value, ast.Constant):
            return keyword.value.value
    return None


# Deliberate loads of the user's own model files, documented as such.
ALLOWED = {
    # `skpatch score --model model.joblib`: its help says joblib files run code.
    ("skpatch/cli.py", "joblib.load"),
}


def test_the_package_never_unpickles_unsafely():
    unsafe = []
    for path in sorted(ROOT.rglob("*.py")):
        for node, owner, name in _calls(ast.parse(path.read_text(), str(path))):
            where = f"{path.relative_to(ROOT.parent)}:{node.lineno}"
            if owner == "torch" and name == "load" and _keyword(node, "weights_only") is not True:
                unsafe.append(f"{where}: torch.load without weights_only=True")
            if owner in ("pickle", "joblib", "cloudpickle", "dill") and name in ("load", "loads"):
                if (path.relative_to(ROOT.parent).as_posix(), f"{owner}.{name}") not in ALLOWED:
                    unsafe.append(f"{where}: {owner}.{name}")
            if owner in ("np", "numpy") and name == "load" and _keyword(node, "allow_pickle"):
                unsafe.append(f"{where}: np.load(allow_pickle=True)")
    assert not unsafe, "\n".join(unsafe)


def test_torchvision_weights_are_loaded_with_weights_only(monkeypatch):
    import torchvision.models._api as api
    from torchvision.models import resnet18

    seen = {}

    def fake_load(url, *args, **kwargs):
        seen.update(kwargs)
        return resnet18(weights=None).state_dict()

    monkeypatch.setattr(api, "load_state_dict_from_url", fake_load)
    load_backbone("resnet18", weights="imagenet")
    assert seen.get("weights_only") is True


def test_docs_warn_about_pickles_and_show_skops():
    text = DOC.read_text()
    for needle in ("weights_only=True", "skops", "joblib", "run code", "get_untrusted_types"):
        assert needle in text, needle
    assert os.path.exists(DOC)
