"""Loading user images safely and converting between PIL and model tensors.

``load_image`` is the single entry point for untrusted uploads: every failure
becomes an ``InputError`` with a one-sentence message for the UI, never a raw
PIL traceback.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import torch
from diffusers.image_processor import VaeImageProcessor
from PIL import Image, ImageOps

from pipelines.core.errors import InputError
from pipelines.core.limits import MB, get_limits

MIN_SIDE = 8  # smaller images carry no usable content for a VAE (8x downsampling)
# Decoders Pillow may try on an upload: the common web formats. Others (EPS would run Ghostscript, and a long tail
# of rarely used parsers) are never opened, so they read as "not an image". Pillow's JPEG opener also reads MPO
# (multi-picture JPEGs from phones); "MPO" has no opener of its own, and naming it here made Image.open fail on
# every format listed after it.
FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")

_NOT_AN_IMAGE = "The uploaded file is not an image I can read (cannot identify image file)."


def fit_size(width: int, height: int, *, resolution: int, multiple: int) -> tuple[int, int]:
    """Size whose long side is ``resolution``, keeping the aspect ratio.

    Both sides are rounded to the nearest multiple of ``multiple`` (at least
    ``multiple``). The long side is ``resolution`` itself when it is a
    multiple of ``multiple``; otherwise it is rounded the same way.
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"width and height must be positive, got {width}x{height}")
    if resolution <= 0 or multiple <= 0:
        raise ValueError(f"resolution and multiple must be positive, got {resolution}, {multiple}")
    scale = resolution / max(width, height)

    def snap(side: float) -> int:
        # floor(x + 0.5) instead of round(): Python's round() is banker's rounding.
        return max(multiple, math.floor(side / multiple + 0.5) * multiple)

    return snap(width * scale), snap(height * scale)


def _check_size(width: int, height: int) -> None:
    """Size rules on the header's (or array's) size, before any pixel is decoded."""
    limits = get_limits()
    if width * height > limits.max_pixels:
        raise InputError(
            f"The image is too large ({width}x{height} px); "
            f"the limit is {limits.max_pixels / 1_000_000:g} megapixels."
        )
    # A sliver (1x4096) would be squeezed to a few pixels or blown up into a huge job by the resizers.
    if max(width, height) > limits.max_aspect * min(width, height):
        raise InputError(
            f"The image is too narrow ({width}x{height} px): "
            f"its long side may be at most {limits.max_aspect:g} times its short side."
        )
    if width < MIN_SIDE or height < MIN_SIDE:
        raise InputError(
            f"The image is too small ({width}x{height} px); "
            f"it must be at least {MIN_SIDE} px on each side."
        )


def _file_size(n: int) -> str:
    return f"{round(n / MB, 1):g} MB" if n >= MB else f"{math.ceil(n / 1024)} KB"


def _check_bytes(n: int) -> None:
    limit = get_limits().max_upload_bytes
    if n > limit:
        raise InputError(f"The file is too large ({_file_size(n)}); the limit is {_file_size(limit)}.")


def _from_array(arr: np.ndarray) -> Image.Image:
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (3, 4)):
        raise InputError(f"The image array has an unsupported shape {arr.shape}.")
    # Check before converting so a huge array is not copied again.
    _check_size(arr.shape[1], arr.shape[0])
    if np.issubdtype(arr.dtype, np.floating):
        # Floats are [0,1]; NaN/inf would otherwise wrap around in the uint8 cast.
        arr = np.nan_to_num(arr, nan=0.0, posinf=1.0, neginf=0.0)
        arr = np.round(np.clip(arr, 0.0, 1.0) * 255.0).astype(np.uint8)
    elif arr.dtype != np.uint8:
        raise InputError(f"The image array has an unsupported data type ({arr.dtype}).")
    return Image.fromarray(np.ascontiguousarray(arr))


def _open(source) -> Image.Image:
    """Open a path/bytes lazily: only the header is read, nothing decoded."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        _check_bytes(memoryview(source).nbytes)
        fp = io.BytesIO(bytes(source))
    else:
        path = Path(source)
        try:
            size = path.stat().st_size if path.is_file() else None
        except OSError:  # e.g. a name too long for the filesystem
            size = None
        if size is None:
            raise InputError(f"The image file '{path.name}' was not found.")
        _check_bytes(size)
        fp = path
    try:
        return Image.open(fp, formats=FORMATS)
    # Pillow raises the Error above 2x MAX_IMAGE_PIXELS (and the Warning when
    # warnings are turned into errors); between the two our own, lower
    # max_pixels check rejects the image. We do not touch the global warning
    # filters: they are not thread-safe and Gradio handlers run in threads.
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        size = _header_size(fp)
        if size is not None:
            _check_size(*size)  # says how large, as for any image over our cap
        raise InputError("The image is too large (its header claims too many pixels).") from exc
    except Exception as exc:  # decoders raise many types on bad input
        raise InputError(_NOT_AN_IMAGE) from exc


def _header_size(fp) -> tuple[int, int] | None:
    """The stored size of an image that Pillow's bomb guard refused to open: the format's registered opener
    (Image.register_open's registry) still reads the header, which is all a size message needs."""
    with open(fp, "rb") if isinstance(fp, Path) else io.BytesIO(fp.getvalue()) as f:
        prefix = f.read(16)
        for fmt in FORMATS:
            factory, accept = Image.OPEN.get(fmt, (None, None))
            if factory is None or (accept is not None and not accept(prefix)):
                continue
            try:
                f.seek(0)
                img = factory(f, "")
                size = img.size
                img.close()
                return size
            except Exception:  # a broken header
                continue
    return None


def _high_depth_to_l(img: Image.Image) -> Image.Image:
    # PIL's own I/F -> L conversion clips instead of scaling, which turns a
    # 16-bit photo almost white; scale by the plausible range instead.
    arr = np.asarray(img, dtype=np.float64)
    if img.mode.startswith("I;16"):
        arr = arr / 257.0  # 65535 -> 255
    elif img.mode == "I" and arr.max(initial=0) > 255:
        arr = arr / 257.0  # 16-bit data stored in 32-bit ints
    elif img.mode == "F" and arr.max(initial=0) <= 1.0:
        arr = arr * 255.0  # float image in [0, 1]
    return Image.fromarray(np.round(np.clip(arr, 0, 255)).astype(np.uint8), "L")


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any mode -> RGB; transparent pixels are composited onto white."""
    if img.mode in ("I", "F") or img.mode.startswith("I;16"):
        img = _high_depth_to_l(img)
    # RGBA/LA/PA/RGBa/La modes, or a tRNS colour key (palette, L, RGB).
    if img.has_transparency_data:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def load_image(source, *, resolution: int, multiple: int) -> Image.Image:
    """Load ``source`` as an RGB image with long side ``resolution``.

    ``source`` may be a path (str/Path), encoded bytes, a numpy array
    ((H,W), (H,W,3) or (H,W,4); uint8 or float in [0,1]) or a PIL image.
    EXIF orientation is applied, transparency is composited onto white and
    the result is resized with LANCZOS to ``fit_size(...)``.
    Raises ``InputError`` for anything a user could have got wrong.
    """
    rgb = load_rgb(source)
    size = fit_size(*rgb.size, resolution=resolution, multiple=multiple)
    if rgb.size != size:
        rgb = rgb.resize(size, Image.Resampling.LANCZOS)
    return rgb


def _is_empty(source) -> bool:
    return source is None or (isinstance(source, (str, bytes, bytearray, memoryview)) and len(source) == 0)


def check_image_header(path_or_bytes) -> tuple[int, int, str]:
    """(width, height, format) of an upload from its header alone: nothing is decoded, so the app can call it on
    every upload before anything else. The same checks as load_rgb (file size, formats, size, pixels, aspect
    ratio); the size is the stored one, before any EXIF rotation (which does not change the checks)."""
    if _is_empty(path_or_bytes):
        raise InputError("No image was given.")
    if not isinstance(path_or_bytes, (str, Path, bytes, bytearray, memoryview)):
        raise InputError(f"Unsupported image input of type {type(path_or_bytes).__name__}.")
    img = _open(path_or_bytes)
    try:
        _check_size(*img.size)
        return img.width, img.height, img.format
    finally:
        img.close()


def load_rgb(source) -> Image.Image:
    """``load_image`` without the resize: the checked, upright RGB image at its own size (for callers that
    size images their own way, e.g. InstructPix2Pix's reference crop)."""
    if _is_empty(source):
        raise InputError("No image was given.")
    if isinstance(source, np.ndarray):
        if source.size == 0:
            raise InputError("No image was given.")
        img = _from_array(source)
    elif isinstance(source, Image.Image):
        img = source
    elif isinstance(source, (str, Path, bytes, bytearray, memoryview)):
        img = _open(source)
    else:
        raise InputError(f"Unsupported image input of type {type(source).__name__}.")

    opened = img if img is not source else None  # only close what we opened
    try:
        # Header size is known before decoding: reject bombs without allocating.
        _check_size(*img.size)
        img.load()
        # Both steps return new images, so ``opened`` can always be closed.
        rgb = _to_rgb(ImageOps.exif_transpose(img))
    except InputError:
        raise
    except OSError as exc:
        # Pillow reports truncated data as OSError("image file is truncated...").
        raise InputError("The image file is truncated or corrupt and cannot be decoded.") from exc
    except Exception as exc:  # decoders raise many types on bad input
        raise InputError(_NOT_AN_IMAGE) from exc
    finally:
        if opened is not None:
            opened.close()  # release the file handle of a path source
    return rgb


# diffusers' own pre/post-processing, so the studio's pixels match a stock pipeline's (no resizing: images are
# sized by prepare_image / check_size before they get here).
_VAE_IMAGES = VaeImageProcessor(do_resize=False)


def pil_to_tensor(img: Image.Image) -> torch.Tensor:
    """PIL -> (1, 3, H, W) float32 in [-1, 1], as a diffusers pipeline feeds its VAE."""
    return _VAE_IMAGES.preprocess(img.convert("RGB"))


def tensor_to_pil(x: torch.Tensor) -> Image.Image:
    """(1, 3, H, W) or (3, H, W) in [-1, 1] -> RGB PIL image, as a diffusers pipeline returns its output."""
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4 or x.shape[0] != 1 or x.shape[1] != 3:
        raise ValueError(f"expected shape (1,3,H,W) or (3,H,W), got {tuple(x.shape)}")
    return _VAE_IMAGES.postprocess(x.detach(), output_type="pil")[0]
