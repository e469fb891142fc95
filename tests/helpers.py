"""Small helpers shared by the test modules."""
import numpy as np


def pixels(img) -> np.ndarray:
    """RGB pixels as int16, so differences of two images do not wrap around."""
    return np.asarray(img.convert("RGB"), dtype=np.int16)
