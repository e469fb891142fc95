"""Small helpers shared by the test modules."""
from contextlib import contextmanager

import numpy as np


def pixels(img) -> np.ndarray:
    """RGB pixels as int16, so differences of two images do not wrap around."""
    return np.asarray(img.convert("RGB"), dtype=np.int16)


@contextmanager
def forward_calls(module):
    """Counts forward calls of a torch module while the block runs (the hook is removed afterwards)."""
    calls = []
    handle = module.register_forward_hook(lambda mod, args, out: calls.append(1))
    try:
        yield calls
    finally:
        handle.remove()
