"""Small torch helpers shared by the embedder and the detectors.

Kept free of estimator code so that every kernel module can import it.
"""

import contextlib

import numpy as np
import torch


def resolve_device(device):
    """Return the :class:`torch.device` that ``device`` names.

    ``"auto"`` picks CUDA when it is available and the CPU otherwise. Asking
    for CUDA on a machine without it is an error rather than a silent CPU
    fallback, so that a user who wants the GPU learns that they do not have it.
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device={str(device)!r} was requested but CUDA is not available on this "
            "machine; use device='auto' or device='cpu'."
        )
    return device


def as_tensor(array, device, dtype=None):
    """NumPy array -> tensor on ``device`` without a copy on the CPU when possible."""
    array = np.asarray(array)
    if dtype is not None:
        array = array.astype(dtype, copy=False)
    if not array.flags.writeable or not array.flags.c_contiguous:
        # torch warns on read-only buffers (memmaps); a copy is the safe answer.
        array = np.array(array, order="C")
    return torch.from_numpy(array).to(device)


@contextlib.contextmanager
def single_threaded():
    """Run torch single-threaded inside the block (restored afterwards).

    Batched LAPACK calls (Cholesky, triangular solves) loop over small
    matrices and parallelize inside each one; for 100 x 100 matrices that
    only adds synchronization, which turns into 4-20x slowdowns as soon as
    another process competes for the cores (measured here on 2 cores).
    """
    n_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n_threads)


def to_numpy(tensor):
    """Tensor (any device) -> NumPy array on the CPU."""
    return tensor.detach().cpu().numpy()
