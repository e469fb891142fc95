import io
import struct
import time
import zlib

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from pipelines.core.errors import InputError
from pipelines.core.image_io import fit_size, load_image, load_rgb, pil_to_tensor, tensor_to_pil

RES = dict(resolution=512, multiple=8)


def _png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _fake_png(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height (a decompression bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


# --- fit_size ---------------------------------------------------------------


@pytest.mark.parametrize(
    "size, expected",
    [
        ((4000, 3000), (512, 384)),
        ((3000, 4000), (384, 512)),
        ((9, 5), (512, 288)),  # 5 * 512 / 9 = 284.4 -> nearest multiple of 8
        ((100, 100), (512, 512)),
        ((5000, 10), (512, 8)),  # short side never below `multiple`
    ],
)
def test_fit_size(size, expected):
    assert fit_size(*size, **RES) == expected


def test_fit_size_other_multiple():
    assert fit_size(1920, 1080, resolution=1024, multiple=64) == (1024, 576)
    assert fit_size(1000, 10, resolution=512, multiple=64) == (512, 64)


def test_fit_size_rejects_bad_arguments():
    with pytest.raises(ValueError):
        fit_size(0, 10, **RES)
    with pytest.raises(ValueError):
        fit_size(10, 10, resolution=512, multiple=0)


# --- load_image: sizes ------------------------------------------------------


def test_huge_image_is_downscaled():
    out = load_image(Image.new("RGB", (4000, 3000), (10, 200, 30)), **RES)
    assert out.size == (512, 384)
    assert out.mode == "RGB"
    assert out.getpixel((256, 192)) == (10, 200, 30)


def test_tiny_image_is_upscaled(tmp_path):
    path = tmp_path / "tiny.png"
    Image.new("RGB", (9, 8), (40, 80, 120)).save(path)
    for source in (path, str(path), path.read_bytes()):
        out = load_image(source, **RES)
        assert out.size == (512, 456)  # 8 * 512 / 9 = 455.1 -> 456
        assert out.getpixel((100, 100)) == (40, 80, 120)


@pytest.mark.parametrize("size", [(3, 3), (9, 5), (7, 50), (50, 7)])
def test_too_small_is_rejected(size):
    with pytest.raises(InputError, match="too small"):
        load_image(_png_bytes(Image.new("RGB", size)), **RES)


def test_eight_pixels_is_enough():
    assert load_image(Image.new("RGB", (8, 8)), resolution=64, multiple=8).size == (64, 64)


# --- load_image: bad input --------------------------------------------------


@pytest.mark.parametrize("source", [None, b"", "", np.zeros((0, 0, 3), np.uint8)])
def test_empty_source(source):
    with pytest.raises(InputError, match="No image was given"):
        load_image(source, **RES)


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match="not found"):
        load_image(tmp_path / "nope.png", **RES)


def test_corrupt_bytes():
    junk = np.random.default_rng(0).integers(0, 256, 2000, dtype=np.uint8).tobytes()
    with pytest.raises(InputError, match="not an image I can read") as info:
        load_image(junk, **RES)
    assert "\n" not in str(info.value)


def test_text_file(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("this is not an image\n")
    with pytest.raises(InputError) as info:
        load_image(path, **RES)
    assert str(info.value) == (
        "The uploaded file is not an image I can read (cannot identify image file)."
    )


def test_truncated_png():
    noise = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    data = _png_bytes(Image.fromarray(noise))
    with pytest.raises(InputError, match="truncated"):
        load_image(data[: len(data) // 2], **RES)


def test_decompression_bomb_rejected_quickly():
    start = time.perf_counter()
    with pytest.raises(InputError, match="too large"):
        load_image(_fake_png(30000, 30000), **RES)
    # Decoding 30000x30000 RGB would take 2.7 GB and many seconds.
    assert time.perf_counter() - start < 1.0


def test_over_the_pixel_limit_rejected_before_decoding(monkeypatch):
    calls = []
    real_load = ImageFile.ImageFile.load
    monkeypatch.setattr(
        ImageFile.ImageFile, "load", lambda self: calls.append(self.size) or real_load(self)
    )
    # 64 MP: below Pillow's own bomb limit, above ours.
    with pytest.raises(InputError, match="too large"):
        load_image(_fake_png(8000, 8000), **RES)
    assert calls == []


def test_over_the_pixel_limit_array_rejected():
    big = np.broadcast_to(np.uint8(0), (8000, 7000))  # a view: no 56 MB allocation
    with pytest.raises(InputError, match="too large"):
        load_image(big, **RES)


# --- load_image: modes ------------------------------------------------------


def test_grayscale_becomes_rgb():
    out = load_image(Image.new("L", (16, 16), 77), resolution=16, multiple=8)
    assert out.mode == "RGB"
    assert out.getpixel((3, 3)) == (77, 77, 77)


def test_16bit_grayscale_is_scaled_not_clipped():
    arr = np.full((16, 16), 32896, dtype=np.uint16)  # 128 * 257
    data = _png_bytes(Image.fromarray(arr))
    out = load_image(data, resolution=16, multiple=8)
    assert out.getpixel((0, 0)) == (128, 128, 128)


def test_float_mode_in_unit_range_is_scaled():
    img = Image.fromarray(np.full((16, 16), 0.5, dtype=np.float32), "F")
    assert load_image(img, resolution=16, multiple=8).getpixel((0, 0)) == (128, 128, 128)


def test_cmyk_and_bilevel_become_rgb():
    cmyk = Image.new("CMYK", (16, 16), (0, 0, 0, 0))
    assert load_image(cmyk, resolution=16, multiple=8).getpixel((0, 0)) == (255, 255, 255)
    bilevel = Image.new("1", (16, 16), 0)
    assert load_image(bilevel, resolution=16, multiple=8).getpixel((0, 0)) == (0, 0, 0)


def test_rgba_transparent_pixels_become_white():
    arr = np.zeros((16, 16, 4), dtype=np.uint8)
    arr[:, :8] = (255, 0, 0, 255)  # opaque red
    arr[:, 8:] = (0, 0, 255, 0)  # fully transparent blue
    arr[0, 0] = (0, 0, 0, 128)  # half-transparent black
    source = Image.fromarray(arr, "RGBA")
    out = load_image(_png_bytes(source), resolution=16, multiple=8)
    assert out.mode == "RGB"
    assert out.getpixel((2, 5)) == (255, 0, 0)
    assert out.getpixel((12, 5)) == (255, 255, 255)
    assert out.getpixel((0, 0)) == pytest.approx((127, 127, 127), abs=1)
    assert source.mode == "RGBA"  # the caller's image is untouched


def test_la_transparent_becomes_white():
    img = Image.new("LA", (16, 16), (0, 0))
    assert load_image(img, resolution=16, multiple=8).getpixel((4, 4)) == (255, 255, 255)


def test_palette_image():
    img = Image.new("P", (16, 16), 1)
    img.putpalette([0, 0, 0, 200, 100, 50] + [0] * 762)
    out = load_image(_png_bytes(img), resolution=16, multiple=8)
    assert out.getpixel((5, 5)) == (200, 100, 50)


def test_palette_with_transparency_becomes_white():
    img = Image.new("P", (16, 16), 1)
    img.putpalette([0, 0, 0, 200, 100, 50] + [0] * 762)
    img.paste(0, (0, 0, 8, 16))  # left half uses index 0, marked transparent
    buf = io.BytesIO()
    img.save(buf, format="PNG", transparency=0)
    out = load_image(buf.getvalue(), resolution=16, multiple=8)
    assert out.getpixel((2, 2)) == (255, 255, 255)
    assert out.getpixel((12, 2)) == (200, 100, 50)


def test_exif_orientation_is_applied():
    img = Image.new("RGB", (32, 16), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 16, 16))  # left half red
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif.tobytes(), quality=95)
    out = load_image(buf.getvalue(), resolution=32, multiple=8)
    assert out.size == (16, 32)
    # After rotating clockwise the former left half is on top.
    top, bottom = out.getpixel((8, 4)), out.getpixel((8, 28))
    assert top[0] > 200 and top[2] < 60
    assert bottom[2] > 200 and bottom[0] < 60


# --- load_image: numpy ------------------------------------------------------


def test_numpy_uint8_inputs():
    gray = np.full((16, 24), 50, dtype=np.uint8)
    rgb = np.zeros((16, 24, 3), dtype=np.uint8)
    rgb[..., 1] = 90
    rgba = np.zeros((16, 24, 4), dtype=np.uint8)  # fully transparent
    out_gray = load_image(gray, resolution=24, multiple=8)
    assert out_gray.size == (24, 16)
    assert out_gray.getpixel((0, 0)) == (50, 50, 50)
    assert load_image(rgb, resolution=24, multiple=8).getpixel((0, 0)) == (0, 90, 0)
    assert load_image(rgba, resolution=24, multiple=8).getpixel((0, 0)) == (255, 255, 255)


def test_numpy_float_input():
    arr = np.zeros((16, 16, 3), dtype=np.float32)
    arr[..., 0] = 1.0
    arr[..., 1] = 0.5
    arr[..., 2] = 2.0  # out of range: clipped
    out = load_image(arr, resolution=16, multiple=8)
    assert out.getpixel((0, 0)) == (255, 128, 255)


@pytest.mark.parametrize(
    "arr",
    [np.zeros((16, 16, 2), np.uint8), np.zeros((16, 16), np.int32), np.zeros((2, 16, 16, 3))],
)
def test_numpy_unsupported(arr):
    with pytest.raises(InputError):
        load_image(arr, **RES)


def test_unsupported_type():
    with pytest.raises(InputError, match="Unsupported"):
        load_image(12345, **RES)


# --- tensors ------------------------------------------------------------------


def test_pil_to_tensor_range_and_shape():
    img = Image.new("RGB", (5, 3), (0, 255, 51))
    t = pil_to_tensor(img)
    assert t.shape == (1, 3, 3, 5)
    assert t.dtype == torch.float32
    assert t[0, :, 0, 0].tolist() == pytest.approx([-1.0, 1.0, -0.6])


def test_tensor_round_trip_is_exact():
    values = np.arange(256 * 3, dtype=np.uint8).reshape(16, 16, 3)  # every byte value
    values = np.concatenate([values, 255 - values], axis=1)
    img = Image.fromarray(values, "RGB")
    back = tensor_to_pil(pil_to_tensor(img))
    assert np.array_equal(np.asarray(back), values)
    assert np.array_equal(np.asarray(tensor_to_pil(pil_to_tensor(img)[0])), values)


def test_tensor_to_pil_rounding_and_clamping():
    x = torch.tensor([-2.0, -1.0, 0.0, 1.0, 3.0]).view(1, 1, 5).expand(3, 1, 5)
    out = np.asarray(tensor_to_pil(x))
    # 0.0 -> 0.5 * 255 = 127.5 -> numpy round-half-even -> 128 (as in diffusers)
    assert out[0, :, 0].tolist() == [0, 0, 128, 255, 255]


def test_tensor_to_pil_rejects_bad_shapes():
    with pytest.raises(ValueError):
        tensor_to_pil(torch.zeros(2, 3, 4, 4))
    with pytest.raises(ValueError):
        tensor_to_pil(torch.zeros(4, 4, 3))


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF"])
def test_every_accepted_format_opens_and_a_huge_one_gets_the_size_message(fmt, monkeypatch):
    """Each web format loads (pixels as saved, lossless ones exactly), and a huge header is refused with its size,
    also when the app has armed Pillow's own bomb guard at the pixel cap (Image.MAX_IMAGE_PIXELS)."""
    import io

    from pipelines.core.image_io import check_image_header

    rng = np.random.default_rng(0)
    # flat 16x16 blocks of 64 possible colours: exact in a GIF palette, near-exact through JPEG's 8x8 DCT
    blocks = (rng.integers(0, 4, (3, 4, 3)) * 85).astype(np.uint8)
    arr = blocks.repeat(16, axis=0).repeat(16, axis=1)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    assert check_image_header(buf.getvalue())[:2] == (64, 48)
    loaded = np.asarray(load_rgb(buf.getvalue())).astype(int)
    assert loaded.shape == (48, 64, 3)
    assert np.abs(loaded - arr).mean() < (6 if fmt == "JPEG" else 1e-9)
    huge = io.BytesIO()
    # 1-bit (a few MB even uncompressed, under the upload cap) where the format has it
    Image.new("L" if fmt in ("JPEG", "WEBP") else "1", (16000, 1100)).save(
        huge, fmt, **({"compression": "packbits"} if fmt == "TIFF" else {}))
    for guard in (None, 16_000_000):
        if guard:
            monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", guard)
        with pytest.raises(InputError, match="too large .16000x1100 px"):
            check_image_header(huge.getvalue())
