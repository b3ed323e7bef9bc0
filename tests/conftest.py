import numpy as np
import pytest
import torch


@pytest.fixture(autouse=True)
def _few_threads():
    # Tests run on 2-core CI machines; keep torch from oversubscribing.
    torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture
def torch_threads():
    """``torch.set_num_threads`` for a test; the thread count is restored afterwards."""
    original = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(original)


@pytest.fixture
def rng():
    return np.random.RandomState(0)


@pytest.fixture
def images(rng):
    """Ten tiny grayscale uint8 images with a smooth texture."""
    yy, xx = np.mgrid[0:32, 0:32]
    base = 127 + 60 * np.sin(xx / 3.0) * np.cos(yy / 4.0)
    noise = rng.normal(0, 8, size=(10, 32, 32))
    return np.clip(base + noise, 0, 255).astype(np.uint8)
