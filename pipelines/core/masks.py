"""User masks, shared by every masked method (DiffEdit, SDEdit, drag, P2P's local blend): any mask-like input to
a bool mask at image size, image masks to latent cells, and pasting the input back outside an edited region."""
from __future__ import annotations

import cv2
import numpy as np
from PIL import Image

from .errors import InputError


def user_mask(mask, size: tuple[int, int]) -> np.ndarray:
    """A mask -> bool (H, W) at `size` (width, height), resized with nearest. True = painted: the alpha channel of
    images that have one (RGBA / LA / transparent P), otherwise any nonzero pixel (brightest channel of colour
    arrays, alpha of (H, W, 4) arrays)."""
    if isinstance(mask, Image.Image):
        if mask.mode in ("RGBA", "LA", "PA") or (mask.mode == "P" and "transparency" in mask.info):
            arr = np.asarray(mask.convert("RGBA"))[..., 3] > 0
        else:
            arr = np.asarray(mask.convert("L")) > 0
    else:
        try:
            arr = np.asarray(mask)
        except Exception:  # noqa: BLE001 - objects numpy cannot read
            arr = None
        if arr is None or arr.dtype == object or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
            raise InputError(f"The mask must be an image or an array, got {type(mask).__name__}.")
        if arr.ndim == 3 and arr.shape[2] in (1, 3, 4):
            arr = (arr[..., 3] if arr.shape[2] == 4
                   else arr.any(axis=2) if arr.dtype == bool else np.abs(arr).max(axis=2))
        if arr.ndim != 2 or arr.size == 0:
            raise InputError(f"The mask must be a 2-D image, got an array of shape {arr.shape}.")
        arr = arr if arr.dtype == bool else np.nan_to_num(arr.astype(np.float64)) > 0
    width, height = size
    if arr.shape != (height, width):
        arr = np.asarray(Image.fromarray(arr.astype(np.uint8) * 255, "L").resize((width, height), Image.NEAREST)) > 127
    return arr


def latent_cells(mask: np.ndarray, f: int) -> np.ndarray:
    """Image-resolution bool mask -> latent cells (h, w): a cell is in when any of its f x f pixels is."""
    h, w = mask.shape[0] // f, mask.shape[1] // f
    return mask[:h * f, :w * f].reshape(h, f, w, f).any(axis=(1, 3))


def cells_to_image(cells: np.ndarray, f: int) -> np.ndarray:
    """Latent cells (h, w) -> image resolution (h f, w f), each cell an f x f block (values kept)."""
    return np.repeat(np.repeat(cells, f, axis=0), f, axis=1)


def grow_cells(cells: np.ndarray, r: int = 1) -> np.ndarray:
    """Bool cells dilated by r cells in every direction (diagonals included): the seam around an edited region.
    Nothing comes in from outside the array (cv2.dilate's default border is the identity for dilation)."""
    cells = np.asarray(cells, bool)
    if cells.size == 0:
        return cells.copy()
    kernel = np.ones((2 * r + 1, 2 * r + 1), np.uint8)
    return cv2.dilate(cells.astype(np.uint8), kernel).astype(bool)


def paste_outside(edited: Image.Image, background: Image.Image, cells: np.ndarray, f: int,
                  feather: int = 0) -> Image.Image:
    """`edited` inside the latent cells grown by one cell, `background` elsewhere (both at the cells' image size).
    The VAE decoder mixes spatially (GroupNorm statistics and the mid block's attention span the whole image), so
    an exact background latent alone does not decode to the exact background; the one-cell margin leaves the
    decoder room to blend the seam. `feather` > 0 ramps from the edit to the background over that many more
    pixels instead of a hard edge; beyond them the background is exact."""
    region = cells_to_image(grow_cells(np.asarray(cells, bool)), f).astype(np.float64)
    if feather > 0:
        k = 2 * int(feather) + 1  # the box mean reaches `feather` pixels past the region's edge
        region = np.maximum(region, cv2.blur(region, (k, k), borderType=cv2.BORDER_REPLICATE))
    a = region[..., None]
    out = (a * np.asarray(edited.convert("RGB"), np.float32)
           + (1 - a) * np.asarray(background.convert("RGB"), np.float32))
    return Image.fromarray(np.clip(np.round(out), 0, 255).astype(np.uint8))
