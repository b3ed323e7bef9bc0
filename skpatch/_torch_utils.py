"""Small torch helpers shared by the embedder and the detectors.

Kept free of estimator code so that every kernel module can import it.
"""

import contextlib
import math
import warnings
from concurrent.futures import ThreadPoolExecutor

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
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(
            f"device={device!r} is not a torch device: use 'auto', 'cpu', 'cuda' or "
            "'cuda:<index>'."
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device={str(device)!r} was requested but CUDA is not available on this "
            "machine; use device='auto' or device='cpu'."
        )
    if device.type == "meta":  # tensors without data: nothing could be computed
        raise ValueError(
            "device='meta' holds no data, so nothing can be computed on it; use "
            "device='auto', 'cpu' or 'cuda'."
        )
    if device.type not in ("cpu", "cuda"):
        try:  # another backend (mps, xpu...): torch knows whether it can use it
            torch.empty(0, device=device)
        except (RuntimeError, AssertionError):
            raise ValueError(
                f"device={str(device)!r} was requested but this torch cannot use it on "
                "this machine; use device='auto' or device='cpu'."
            ) from None
    return device


def cpu_fallback_state(state, owner):
    """Unpickled ``state`` with ``device`` set to ``"cpu"`` when it names an absent CUDA.

    An estimator fitted with ``device="cuda"`` holds NumPy state only, so it
    can score on any machine; what would fail is its ``device`` parameter,
    which :func:`resolve_device` refuses when CUDA is missing. Loading it on
    a CPU-only machine therefore switches the parameter to ``"cpu"`` with a
    warning, as skorch does with its ``map_location`` fallback.
    """
    device = state.get("device")
    if not isinstance(device, (str, torch.device)) or device == "auto":
        return state
    try:
        device_type = torch.device(device).type
    except (RuntimeError, ValueError):
        return state  # an invalid value: parameter validation reports it later
    if device_type == "cuda" and not torch.cuda.is_available():
        warnings.warn(
            f"{owner} was saved with device={str(device)!r} but CUDA is not available on "
            "this machine; it is loaded with device='cpu' (its fitted state is NumPy, so "
            "scores are the same up to float rounding).",
            UserWarning,
            stacklevel=3,
        )
        state = {**state, "device": "cpu"}
    return state


def as_tensor(array, device, dtype=None):
    """NumPy array (or tensor) -> tensor on ``device``, without a copy when possible."""
    if torch.is_tensor(array):
        dtype = None if dtype is None else torch.from_numpy(np.empty(0, dtype)).dtype
        return array.to(device=device, dtype=dtype)
    array = np.asarray(array)
    if dtype is not None:
        array = array.astype(dtype, copy=False)
    if not array.flags.writeable or any(stride < 0 for stride in array.strides):
        # torch warns on read-only buffers (memmaps) and refuses negative
        # strides; a copy is the safe answer. Other strides are kept: the
        # embedder's channels-last arrays stay channels-last tensors.
        array = np.array(array, order="C")
    return torch.from_numpy(array).to(device)


def is_view_on(array, device):
    """Whether :func:`as_tensor` gives a tensor of ``array`` on ``device`` without a copy."""
    if torch.is_tensor(array):
        return array.device == torch.device(device)
    return (
        torch.device(device).type == "cpu"
        and array.flags.writeable
        and all(stride >= 0 for stride in array.strides)
    )


@contextlib.contextmanager
def seeded(seed, device="cpu"):
    """Torch's global generators of the CPU and of ``device`` seeded inside the block.

    Both are restored afterwards, and no other GPU's is touched:
    ``torch.manual_seed`` seeds every GPU's generator, which
    ``fork_rng(devices=[])`` neither saves nor restores (a network built on
    the CPU reset the user's CUDA generators).
    """
    device = torch.device(device)
    cuda = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.default_generator.manual_seed(seed)
        if cuda:
            with torch.cuda.device(device):
                torch.cuda.manual_seed(seed)
        yield


def canonical_device(device):
    """``device`` as a key: an index-less CUDA device names the current one (``cuda:0``)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


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


def gather_last(x, index, out=None):
    """``x[..., index]``, the entries ``index`` of the last dimension, as a contiguous copy.

    ``torch.gather`` with the index broadcast over the other dimensions: on a
    CPU it reads whole rows of a channels-last tensor and is 2-4x faster
    than ``index_select`` or fancy indexing on the last dimension.
    """
    return torch.gather(x, -1, index.expand(*x.shape[:-1], len(index)), out=out)


def map_on_cores(function, items, device):
    """``[function(item) for item in items]``, on every CPU thread of torch at once.

    For work on the CPU: each of torch's threads takes the next item and
    runs it with torch single-threaded (the caller's grad and inference
    modes, which are per thread, are kept). For batches of small matrices
    that beats parallelism inside each operation, which LAPACK's batched
    calls lack altogether: they loop over the matrices on one core. On
    another ``device``, with one torch thread or with one item, a plain
    loop in the caller's thread.
    """
    n_threads = torch.get_num_threads()
    if torch.device(device).type != "cpu" or n_threads == 1 or len(items) < 2:
        return [function(item) for item in items]
    inference, grad = torch.is_inference_mode_enabled(), torch.is_grad_enabled()

    def call(item):
        with torch.inference_mode(inference), torch.set_grad_enabled(grad):
            return function(item)

    try:
        with ThreadPoolExecutor(
            min(n_threads, len(items)), initializer=torch.set_num_threads, initargs=(1,)
        ) as pool:
            return list(pool.map(call, items))
    finally:
        torch.set_num_threads(n_threads)  # the workers' setting is process-wide


# NumPy asks for huge pages for arrays from 4 MiB on.
_HUGE_PAGE_BYTES = 4 * 2**20


def empty(shape, dtype, device):
    """``torch.empty(shape, dtype=dtype, device=device)``; on a CPU, large ones in NumPy's memory.

    NumPy asks the kernel to back its large arrays with transparent huge
    pages (``madvise``, for that memory alone); torch's CPU allocator does
    not, unless the ``THP_MEM_ALLOC_ENABLE`` environment variable is set
    before its first allocation (a setting of the whole process, which
    skpatch leaves alone). Fresh memory is faulted in on first touch, 4 kB
    at a time without huge pages: 141 MB filled in 35-68 ms from torch and
    10-20 ms from NumPy on a 2-core host. For skpatch's own large buffers:
    the embedder's output, the Gaussian detectors' running sums and
    covariances (PaDiM's streamed fit with Wide-ResNet-50-2 at Rd 550, 3.8 GB
    each: 62-63 -> 59-60 s), RPaDiM's scatter, N-pad's chunk buffer and
    weighted covariances.
    """
    if (
        torch.device(device).type != "cpu"
        or dtype not in (torch.float32, torch.float64)
        or math.prod(shape) * dtype.itemsize < _HUGE_PAGE_BYTES
    ):
        return torch.empty(shape, dtype=dtype, device=device)
    return torch.from_numpy(np.empty(shape, dtype=numpy_dtype(dtype)))


def all_finite(x):
    """Whether the tensor ``x`` has finite entries only.

    One reduction, as scikit-learn checks arrays: a finite sum means finite
    entries (a sum that overflows falls back to the full check).
    """
    return bool(torch.isfinite(x.sum())) or bool(torch.isfinite(x).all())


def to_numpy(tensor):
    """Tensor (any device) -> NumPy array on the CPU."""
    return tensor.detach().cpu().numpy()


def to_host(x):
    """NumPy array or tensor (any device) -> NumPy array."""
    return to_numpy(x) if torch.is_tensor(x) else np.asarray(x)


def numpy_dtype(dtype):
    """The NumPy dtype of a NumPy or torch dtype."""
    if isinstance(dtype, torch.dtype):
        return torch.empty(0, dtype=dtype).numpy().dtype
    return np.dtype(dtype)


# torch >= 2.5 names it torch.OutOfMemoryError; torch.cuda.OutOfMemoryError is the same class.
_OUT_OF_MEMORY = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
# What torch's CPU allocator says (Linux / Windows) when an allocation fails.
_CPU_OUT_OF_MEMORY = ("can't allocate memory", "not enough memory")


def _is_out_of_memory(exc):
    if isinstance(exc, (_OUT_OF_MEMORY, MemoryError)):
        return True
    return isinstance(exc, RuntimeError) and any(m in str(exc) for m in _CPU_OUT_OF_MEMORY)


def overflow_advice(dtype):
    """What to do about embeddings that overflow ``dtype`` (NumPy or torch) arithmetic."""
    if "float64" in str(dtype):
        return "rescale them (their squares exceed float64's range, about 1e308)"
    return "rescale them, or cast them to float64"


@contextlib.contextmanager
def oom_advice(what, advice):
    """Re-raise an out-of-memory error of the block with advice on using less memory.

    A CUDA ``torch.OutOfMemoryError``, torch's CPU allocator failure (a
    ``RuntimeError``) or NumPy's ``MemoryError`` raised inside the block is
    raised again as the same type, with the original message followed by
    ``"<what> ran out of memory. <advice>"`` and the original traceback, so
    that code catching the error still catches it and the user reads what to
    change instead of an allocator message. Nested blocks add advice once
    (the innermost, most specific one).
    """
    try:
        yield
    except (RuntimeError, MemoryError) as exc:
        if getattr(exc, "_skpatch_advised", False) or not _is_out_of_memory(exc):
            raise
        try:
            advised = type(exc)(f"{exc}\n\n{what} ran out of memory. {advice}")
            advised._skpatch_advised = True
        except Exception:  # an exception type we cannot rebuild: keep the original
            raise exc from None
        raise advised.with_traceback(exc.__traceback__) from None
