"""Backbone registry: name -> architecture, feature stages, normalization, weights.

Adding a backbone is one :func:`register_backbone` call: a builder of the
randomly initialized network, a function that lists its feature stages in
forward order, the default stages to embed, the input normalization its
weights expect, and a loader of its pretrained weights.
"""

import os
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights were asked for but cannot be obtained on this machine."""


@dataclass(frozen=True)
class Backbone:
    """Description of a registered backbone.

    Parameters
    ----------
    name : str
        Registry name, the value of ``PatchEmbedder(backbone=...)``.
    build : callable
        ``build() -> nn.Module``: the architecture with random weights.
    stages : callable
        ``stages(module) -> [(name, submodule), ...]``: the feature stages in
        forward order; running them one after the other is the network's
        forward pass up to its classifier head.
    default_layers : tuple of str
        Stages embedded by default.
    mean, std : tuple of float
        Per-channel input normalization the pretrained weights expect.
    load_pretrained : callable
        ``load_pretrained(module)`` loads the ImageNet weights or raises
        :class:`WeightsUnavailableError` saying how to provide them.
    strides : dict
        Output stride of each stage (for documentation and checks).
    fuse : callable or None
        ``fuse(module)`` folds batch norms into convolutions in place for
        faster inference (called after the weights are loaded).
    """

    name: str
    build: Callable[[], nn.Module]
    stages: Callable[[nn.Module], list]
    default_layers: tuple
    mean: tuple
    std: tuple
    load_pretrained: Callable[[nn.Module], None]
    strides: dict = field(default_factory=dict)
    fuse: Callable[[nn.Module], None] = None


_REGISTRY = {}


def register_backbone(backbone):
    """Add a backbone to the registry under its name.

    Parameters
    ----------
    backbone : Backbone
        The description; an existing entry of the same name is replaced.

    Returns
    -------
    backbone : Backbone
        The argument, so that the call can be used as an expression.
    """
    _REGISTRY[backbone.name] = backbone
    return backbone


def available_backbones():
    """List the names of the registered backbones.

    Returns
    -------
    names : list of str
        Sorted registry names, valid values of ``PatchEmbedder(backbone=...)``.
    """
    return sorted(_REGISTRY)


def get_backbone(name):
    """Look up a registered backbone.

    Parameters
    ----------
    name : str
        Registry name.

    Returns
    -------
    backbone : Backbone
        Its description.

    Raises
    ------
    ValueError
        If no backbone of that name is registered; the message lists the names.
    """
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown backbone {name!r}; available backbones: {available_backbones()}. "
            "New ones are added with skpatch.backbones.register_backbone."
        ) from None


class FeatureExtractor(nn.Module):
    """Run a backbone's stages up to the deepest requested one and return those.

    Stages after the deepest requested layer (and the classifier head) are
    not run: they cost time and change nothing.

    Parameters
    ----------
    stages : list of (str, torch.nn.Module)
        The backbone's stages in forward order (``Backbone.stages(module)``).
    layers : sequence of str
        Names of the stages whose outputs ``forward`` returns, in this order.
    """

    def __init__(self, stages, layers):
        super().__init__()
        names = [name for name, _ in stages]
        unknown = [layer for layer in layers if layer not in names]
        if unknown:
            raise ValueError(f"unknown layers {unknown}; this backbone has stages {names}")
        depth = max(names.index(layer) for layer in layers) + 1
        self.names = names[:depth]
        self.stages = nn.ModuleList([module for _, module in stages[:depth]])
        self.layers = list(layers)

    def forward(self, x):
        # channels_last: the layout oneDNN / cuDNN convolutions are fastest in.
        x = x.contiguous(memory_format=torch.channels_last)
        features = {}
        for name, stage in zip(self.names, self.stages):
            x = stage(x)
            features[name] = x
        return [features[layer] for layer in self.layers]


def _load_state_dict_file(module, path):
    """Load a local state dict (``torch.load(..., weights_only=True)``), strictly."""
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt file, pickle with code, ...
        # One line: torch's message runs to several and suggests weights_only=False,
        # which would run whatever code the file holds.
        raise ValueError(
            f"could not read a state dict from {path!r}: not a file of tensors saved with "
            f"torch.save(model.state_dict()) ({type(exc).__name__})"
        ) from exc
    if not isinstance(state_dict, dict):
        raise ValueError(f"{path!r} does not hold a state dict (got {type(state_dict).__name__})")
    # One line, not torch's message, which lists every key (10 kB for a wrong file).
    wrong = f"the state dict in {path!r} does not match this backbone's architecture"
    mismatch = _state_dict_mismatch(module.state_dict(), state_dict)
    if mismatch:
        raise ValueError(f"{wrong}: {mismatch}")
    try:
        module.load_state_dict(state_dict, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"{wrong}: {str(exc).strip().splitlines()[0]}") from exc


def _state_dict_mismatch(expected, given, n_examples=3):
    """One line on the keys and shapes of ``given`` that ``expected`` lacks or differ; "" if none."""

    def some(keys):
        shown = ", ".join(repr(k) for k in keys[:n_examples])
        return f"{shown}, ..." if len(keys) > n_examples else shown

    # torch fills in a BatchNorm's missing step count (files saved before 0.4.1)
    missing = [k for k in expected if k not in given and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in given if k not in expected]
    shapes = [
        k for k in expected
        if k in given and tuple(getattr(given[k], "shape", ())) != tuple(expected[k].shape)
    ]
    parts = [
        f"{len(keys)} {what} ({some(keys)})"
        for keys, what in ((missing, "keys missing"), (unexpected, "unexpected keys"),
                           (shapes, "tensors of another shape"))
        if keys
    ]
    return "; ".join(parts)


def load_backbone(name, weights="imagenet"):
    """Build a registered backbone with its weights.

    Parameters
    ----------
    name : str
        Registry name.
    weights : "imagenet", None or path, default="imagenet"
        ``"imagenet"`` uses the registry's pretrained loader, ``None`` keeps
        the random initialization (tests), a path loads a state-dict file
        strictly (``torch.load(..., weights_only=True)``).

    Returns
    -------
    module : torch.nn.Module
        The network in eval mode on the CPU.
    backbone : Backbone
        Its registry description.

    Raises
    ------
    WeightsUnavailableError
        If ``weights="imagenet"`` and the weights cannot be obtained.
    ValueError
        If ``weights`` is not a valid value or the file does not fit the architecture.
    """
    backbone = get_backbone(name)
    module = backbone.build()
    if weights is None:
        pass
    elif isinstance(weights, str) and weights == "imagenet":
        backbone.load_pretrained(module)
    elif isinstance(weights, (str, os.PathLike)):
        if not os.path.isfile(weights):
            raise ValueError(
                f"weights={weights!r} is neither 'imagenet', None, nor an existing state-dict file."
            )
        _load_state_dict_file(module, weights)
    else:
        raise ValueError(
            f"weights must be 'imagenet', None or a path to a state dict; got {weights!r}"
        )
    return module.eval(), backbone
