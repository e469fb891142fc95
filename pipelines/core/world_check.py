"""Does a picture look like the embedded model's world (flat-colour shapes on solid, gradient or two-level textured
backgrounds)? The embedded model knows nothing else, so a photo comes out as shapes; the UI says so when a photo is
uploaded while that model is active.

The measure, on the picture shrunk to the world's 64 px: the share of pixels that are either one of the
picture's few main colours or in a smooth neighbourhood (a gradient's ramp, a flat region). Renders of the world
score at least 0.96, with faint noise (as the embedded model's results have) 0.82, its results 0.86-0.97; colour
photos (skimage's astronaut, chelsea, coffee) and noise textures 0.2-0.7. Grey pictures have few colours in any
case, so they are measured on their luminance with finer steps (the world's grey pictures, two or three levels and
ramps, score at least 0.65; skimage's camera, brick, grass, gravel and coins 0.2-0.59). A photo that is itself
mostly flat (a moon on black, a blurred sky) passes as world: the check only warns, it never refuses.
"""
from __future__ import annotations

import cv2
import numpy as np
from PIL import Image

SIDE = 64            # the world's image size
SMOOTH = 10          # a neighbourhood whose channels vary by at most this is smooth (a ramp, a flat region)
COLOUR = (16, 24, 0.8)   # colour pictures: quantisation step, main colours counted, least share for the world
GREY = (4, 3, 0.62)      # grey pictures (one luminance channel): finer steps, fewer main levels
GREY_SPREAD = 12     # a pixel whose channels differ by at most this is grey
GREY_SHARE = 0.95    # a picture with this share of grey pixels is grey


def _shrunk(image: Image.Image) -> np.ndarray:
    rgb = image.convert("RGB")
    if rgb.size != (SIDE, SIDE):
        rgb = rgb.resize((SIDE, SIDE), Image.Resampling.BOX)  # area average: noise and texture average out
    return np.asarray(rgb, dtype=np.int32)


def _explained(a: np.ndarray, step: int, main: int) -> float:
    codes = a // step
    codes = codes[..., 0] if a.shape[-1] == 1 else (codes[..., 0] * 256 + codes[..., 1]) * 256 + codes[..., 2]
    values, counts = np.unique(codes, return_counts=True)
    in_palette = np.isin(codes, values[np.argsort(counts)[::-1][:main]])
    kernel = np.ones((3, 3), np.uint8)
    u8 = a.astype(np.uint8)
    spread = cv2.dilate(u8, kernel) - cv2.erode(u8, kernel)  # each channel's 3x3 range
    spread = spread.reshape(a.shape).max(axis=-1)             # (cv2 drops a single channel axis)
    return float((in_palette | (spread <= SMOOTH)).mean())


def is_grey(image: Image.Image) -> bool:
    a = _shrunk(image)
    return bool(((a.max(-1) - a.min(-1)) <= GREY_SPREAD).mean() >= GREY_SHARE)


def world_likeness(image: Image.Image) -> float:
    """The share of the picture the world's vocabulary explains (1 = all of it); compare with world_threshold."""
    a = _shrunk(image)
    if is_grey(image):  # one luminance channel: three channels' independent noise would split every level
        return _explained(np.round(a.mean(axis=-1, keepdims=True)).astype(np.int32), *GREY[:2])
    return _explained(a, *COLOUR[:2])


def world_threshold(image: Image.Image) -> float:
    return (GREY if is_grey(image) else COLOUR)[2]


def looks_like_world(image: Image.Image) -> bool:
    """True for the world's renders and the embedded model's results; False for photos and noise textures."""
    return world_likeness(image) >= world_threshold(image)
