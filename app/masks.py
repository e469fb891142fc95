"""Reading and writing the values of Gradio's ImageEditor / ImageMask (numpy type): the picture, the painted
mask and the stroke composite. Plain numpy and PIL, so it is tested without a browser.

An editor value is a dict {"background": HxWx(3|4) or None, "layers": [HxWx4 ...], "composite": HxWx(3|4)}.
Painted pixels are those with alpha > 0 in any layer (Gradio's own inpainting demo reads layers[0]'s alpha;
every layer counts here, so a second layer the user adds is not silently ignored).

Values written to an editor follow what Gradio 6.31's editor does when it receives one: it loads `composite`,
when present, as the picture (so a value's composite must never hold anything but the picture), and it loads
each layer into a new layer as large as the bounding box of the background and of a box of the editor's
`canvas_size` at the origin, centring a smaller layer image in it. A layer is therefore written at exactly
that size (`layer_size`), drawn from the top-left corner, so it lands on the picture pixel for pixel.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

from pipelines.core.errors import InputError

DISPLAY_SIDE = 512          # small model images (64 px) are shown this large so they can be painted on
EDITOR_CANVAS = (DISPLAY_SIDE, DISPLAY_SIDE)  # the canvas_size of the editors that receive values from here
OVERLAY_RGBA = (255, 40, 200, 140)  # how an estimated mask is drawn as a layer: translucent magenta
# the brush that paints the same colour and opacity into the layer (Gradio stores opacity 140/255 as alpha 140)
OVERLAY_BRUSH = ("#{:02x}{:02x}{:02x}".format(*OVERLAY_RGBA[:3]), OVERLAY_RGBA[3] / 255)


def _rgb(arr: np.ndarray, blank: tuple[int, int, int] = (255, 255, 255)) -> np.ndarray:
    """RGB uint8; transparent pixels composited onto `blank` (a blank canvas is white paper)."""
    arr = np.asarray(arr)
    if arr.dtype != np.uint8:
        arr = np.clip(arr, 0, 255).astype(np.uint8)
    if arr.ndim == 2:
        return np.repeat(arr[..., None], 3, axis=2)
    if arr.shape[2] == 4:
        a = arr[..., 3:4].astype(np.float32) / 255.0
        out = arr[..., :3].astype(np.float32) * a + np.array(blank, np.float32) * (1 - a)
        return np.round(out).astype(np.uint8)
    return arr[..., :3]


def _layer_mask(layer, shape: tuple[int, int] | None) -> np.ndarray | None:
    arr = np.asarray(layer)
    if arr.ndim != 3 or arr.shape[2] != 4:
        return None
    m = arr[..., 3] > 0
    if shape is None or m.shape == shape:
        return m
    (lh, lw), (h, w) = m.shape, shape
    if lh * w != lw * h and lh >= h and lw >= w:
        return m[:h, :w]  # a canvas-sized layer (module doc): the picture is its top-left corner
    return m  # the picture's shape at another scale (API clients paint at display size): resized by the pipeline


def painted(value) -> np.ndarray | None:
    """Bool (H, W): pixels painted in any layer; None when no layer holds any paint. A layer larger than the
    picture and of another shape (module doc) is read from its top-left corner, at the picture's size."""
    if not isinstance(value, dict):
        return None
    bg = value.get("background")
    shape = np.asarray(bg).shape[:2] if bg is not None and np.asarray(bg).ndim >= 2 else None
    mask = None
    for layer in value.get("layers") or []:
        m = None if layer is None else _layer_mask(layer, shape)
        if m is not None:
            mask = m if mask is None else (mask | m if mask.shape == m.shape else mask)
    return mask if mask is not None and mask.any() else None


def background(value) -> Image.Image | None:
    """The uploaded picture under the paint (None on a blank canvas)."""
    bg = value.get("background") if isinstance(value, dict) else None
    if bg is None:
        return None
    arr = np.asarray(bg)
    if arr.size == 0 or (arr.ndim == 3 and arr.shape[2] == 4 and not arr[..., 3].any()):
        return None  # Gradio's empty canvas is a fully transparent background
    return Image.fromarray(_rgb(arr))


def composite(value) -> Image.Image | None:
    """Strokes over the picture (or over white paper on a blank canvas); None if nothing is there at all."""
    if not isinstance(value, dict):
        return None
    if background(value) is None and painted(value) is None:
        return None
    comp = value.get("composite")
    if comp is not None and np.asarray(comp).size:
        return Image.fromarray(_rgb(comp))
    base = background(value)
    base = np.asarray(base) if base is not None else None
    for layer in value.get("layers") or []:
        arr = np.asarray(layer)
        if base is None:
            base = np.full(arr.shape[:2] + (3,), 255, np.uint8)
        a = arr[..., 3:4].astype(np.float32) / 255.0
        base = np.round(arr[..., :3] * a + base * (1 - a)).astype(np.uint8)
    return Image.fromarray(base)


def shrink_display(img: Image.Image, resolution: int) -> Image.Image:
    """Undo `enlarge_for_display`: an image enlarged by a whole factor comes back pixel-exact (box filter over
    identical blocks); any other size is left to the pipeline's own resize."""
    k = max(img.size) // resolution
    if k > 1 and max(img.size) == k * resolution and img.width % k == 0 and img.height % k == 0:
        return img.resize((img.width // k, img.height // k), Image.Resampling.BOX)
    return img


def enlarge_for_display(img: Image.Image, side: int = DISPLAY_SIDE) -> Image.Image:
    """Small images blown up by a whole factor (nearest) so the brush has room; large ones as they are."""
    k = side // max(img.size)
    return img.resize((img.width * k, img.height * k), Image.Resampling.NEAREST) if k > 1 else img


def layer_size(picture_size: tuple[int, int], canvas: tuple[int, int] = EDITOR_CANVAS) -> tuple[int, int]:
    """(width, height) of a layer the editor places pixel for pixel over a picture of `picture_size` (module doc)."""
    return max(picture_size[0], canvas[0]), max(picture_size[1], canvas[1])


def editor_value(image: Image.Image, mask: np.ndarray | None, side: int = DISPLAY_SIDE,
                 canvas: tuple[int, int] = EDITOR_CANVAS) -> dict:
    """An ImageMask value showing `image` (enlarged for display) with `mask` as one translucent layer the user can
    paint over or erase. The layer is always sent, empty without a mask, so the editor drops the previous
    picture's layers; there is no composite, so the editor shows the clean picture (module doc)."""
    shown = enlarge_for_display(image.convert("RGB"), side)
    width, height = layer_size(shown.size, canvas)
    layer = np.zeros((height, width, 4), np.uint8)
    if mask is not None:
        m = Image.fromarray(np.asarray(mask, bool).astype(np.uint8) * 255).resize(shown.size, Image.Resampling.NEAREST)
        layer[:shown.height, :shown.width][np.asarray(m) > 0] = OVERLAY_RGBA
    return {"background": np.asarray(shown), "layers": [layer], "composite": None}


def display_value(value) -> dict | None:
    """The editor value with its picture enlarged for display (nothing painted), or None when the picture is
    already at display size or there is none: what an editor's upload event sends back, once."""
    picture = background(value)
    if picture is None or enlarge_for_display(picture) is picture:
        return None
    return editor_value(picture, None)


def require_picture(img: Image.Image | None, what: str) -> Image.Image:
    if img is None:
        raise InputError(f"Please upload {what}.")
    return img
