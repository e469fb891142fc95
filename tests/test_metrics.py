import io
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from pipelines.core.errors import InputError
from pipelines.core.metrics import mse, psnr, ssim, to_float_image

EXAMPLES = Path(__file__).resolve().parents[1] / "assets" / "examples"


def _rand(shape, seed=0, high=1.0):
    return np.random.default_rng(seed).uniform(0.0, high, size=shape)


def _reference_ssim(a, b, size=11):
    """SSIM by its definition (Wang et al. 2004), independent of any filtering code: for every `size` x `size`
    window wholly inside the image, Gaussian-weighted (sigma 1.5, cut to the window and renormalised) means,
    population variances and covariance, per channel; the mean over windows and channels."""
    sigma = 1.5
    c = np.arange(size) - (size - 1) / 2
    g = np.exp(-(c**2) / (2 * sigma**2))
    w = np.outer(g, g)
    w /= w.sum()
    c1, c2 = 0.01**2, 0.03**2
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.ndim == 2:
        a, b = a[..., None], b[..., None]
    # (rows, cols, channels, size, size): every window position, as a view
    x = np.lib.stride_tricks.sliding_window_view(a, (size, size), axis=(0, 1))
    y = np.lib.stride_tricks.sliding_window_view(b, (size, size), axis=(0, 1))

    def wmean(t):
        return np.einsum("...ij,ij->...", t, w)

    mx, my = wmean(x), wmean(y)
    vx = wmean((x - mx[..., None, None]) ** 2)
    vy = wmean((y - my[..., None, None]) ** 2)
    cxy = wmean((x - mx[..., None, None]) * (y - my[..., None, None]))
    vals = (2 * mx * my + c1) * (2 * cxy + c2) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return float(np.mean(vals))


def _reference_psnr(a, b, data_range=1.0):
    """PSNR by its definition: 10 log10(range^2 / MSE)."""
    err = np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)
    return 10 * math.log10(data_range**2 / err)


def _example(name, size=None):
    img = Image.open(EXAMPLES / name).convert("RGB")
    if size is not None:
        img = img.resize(size, Image.BICUBIC)
    return img


def _jpeg(img, quality=30):
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    buf.seek(0)
    return Image.open(buf).convert("RGB")


def _image_pairs():
    """(name, reference, distorted) float images in [0, 1]: random ones and the example pictures (flat regions,
    hard edges, pen strokes) under noise, JPEG, blur and a brightness shift."""
    rng = np.random.default_rng(11)
    pairs = []
    for shape in [(11, 11, 3), (16, 14, 3), (37, 50, 3), (64, 64, 3)]:
        a = rng.uniform(size=shape)
        pairs.append((f"random {shape}", a, np.clip(a + rng.normal(0, 0.1, shape), 0, 1)))
    for name, size in [("blue_triangle_centre.png", None), ("yellow_circle_bottom_left.png", None),
                       ("strokes_red_blob_left.png", (96, 96)), ("strokes_yellow_patch_top_right.png", (80, 120))]:
        img = _example(name, size)
        a = np.asarray(img, np.float64) / 255
        pairs.append((f"{name} noise", a, np.clip(a + rng.normal(0, 0.05, a.shape), 0, 1)))
        pairs.append((f"{name} jpeg", a, np.asarray(_jpeg(img), np.float64) / 255))
        pairs.append((f"{name} blur", a, np.asarray(img.filter(ImageFilter.GaussianBlur(1.5)), np.float64) / 255))
        pairs.append((f"{name} brighter", a, np.clip(a + 0.08, 0, 1)))
    return pairs


def test_to_float_image_layouts_agree():
    hwc = _rand((6, 5, 3))
    chw = torch.from_numpy(hwc).permute(2, 0, 1)
    expected = torch.from_numpy(hwc).permute(2, 0, 1)[None]
    assert to_float_image(hwc).shape == (1, 3, 6, 5)
    assert torch.equal(to_float_image(hwc), expected)
    assert torch.equal(to_float_image(chw), expected)
    assert torch.equal(to_float_image(chw[None]), expected)
    assert to_float_image(hwc).dtype == torch.float64


def test_to_float_image_pil_scaled_to_unit_range():
    img = Image.new("RGB", (4, 3), (255, 0, 51))
    t = to_float_image(img)
    assert t.shape == (1, 3, 3, 4)
    assert t[0, :, 0, 0].tolist() == pytest.approx([1.0, 0.0, 0.2])


def test_mse_and_psnr_of_constant_offset():
    a = _rand((16, 16, 3), high=0.9)
    b = a + 0.1
    assert mse(a, b) == pytest.approx(0.01, rel=1e-12)
    assert psnr(a, b) == pytest.approx(20.0, abs=1e-9)
    # data_range scales the peak: 10*log10(255^2 / 0.01)
    assert psnr(a, b, data_range=255.0) == pytest.approx(20.0 + 20 * math.log10(255), abs=1e-9)


def test_psnr_of_identical_images_is_inf():
    a = _rand((8, 8, 3))
    assert mse(a, a) == 0.0
    assert psnr(a, a.copy()) == float("inf")


def test_metrics_accept_mixed_input_types():
    a = _rand((8, 8, 3))
    b = np.clip(a + 0.05, 0, 1)
    expected = float(np.mean((a - b) ** 2))
    assert mse(torch.from_numpy(a).permute(2, 0, 1), b) == pytest.approx(expected)


def test_ssim_identical_is_one():
    a = _rand((32, 32, 3))
    assert ssim(a, a) == pytest.approx(1.0, abs=1e-12)


def test_ssim_drops_with_noise():
    a = _rand((32, 32, 3), seed=1)
    rng = np.random.default_rng(2)
    light = np.clip(a + rng.normal(0, 0.02, a.shape), 0, 1)
    heavy = np.clip(a + rng.normal(0, 0.2, a.shape), 0, 1)
    s_light, s_heavy = ssim(a, light), ssim(a, heavy)
    assert 0.9 < s_light < 1.0
    assert s_heavy < s_light
    assert s_heavy < 0.9


def test_ssim_matches_brute_force_reference():
    a = _rand((16, 14, 3), seed=3)
    b = np.clip(a + np.random.default_rng(4).normal(0, 0.1, a.shape), 0, 1)
    assert ssim(a, b) == pytest.approx(_reference_ssim(a, b), abs=1e-10)


def test_ssim_of_constant_offset_image():
    # Flat images have zero variance, so SSIM reduces to the luminance term.
    a = np.full((16, 16, 3), 0.5)
    b = np.full((16, 16, 3), 0.6)
    c1 = 0.01**2
    expected = (2 * 0.5 * 0.6 + c1) / (0.5**2 + 0.6**2 + c1)
    assert ssim(a, b) == pytest.approx(expected, abs=1e-12)
    # A textured image shifted by a constant keeps structure: only luminance drops.
    t = _rand((16, 16, 3), seed=5, high=0.8)
    shifted = ssim(t, t + 0.2)
    assert shifted == pytest.approx(_reference_ssim(t, t + 0.2), abs=1e-10)
    assert 0.8 < shifted < 1.0


def test_ssim_small_image_uses_image_sized_window():
    a = _rand((6, 9, 3), seed=6)
    b = np.clip(a + 0.1, 0, 1)
    value = ssim(a, b)
    assert ssim(a, a) == pytest.approx(1.0)
    assert 0.0 < value < 1.0


def test_shape_mismatch_raises_input_error():
    with pytest.raises(InputError, match="different shapes"):
        mse(np.zeros((8, 8, 3)), np.zeros((8, 9, 3)))
    with pytest.raises(InputError):
        ssim(np.zeros((12, 12, 3)), np.zeros((1, 3, 12, 13)))
    with pytest.raises(InputError):
        psnr(np.zeros((4, 4, 3)), [[0.0]])


# --- scikit-image's PSNR / SSIM equal the definitions the hand-written ones implemented ----------------------------

def test_psnr_equals_its_definition_on_random_and_example_images():
    worst = 0.0
    for name, a, b in _image_pairs():
        for data_range in (1.0, 255.0):
            diff = abs(psnr(a, b, data_range=data_range) - _reference_psnr(a, b, data_range))
            assert diff < 1e-9, (name, data_range, diff)
            worst = max(worst, diff)
        # uint8 pixels are read as /255, so their PSNR equals the float one (training/evaluation.py passes uint8)
        a8, b8 = np.round(a * 255).astype(np.uint8), np.round(b * 255).astype(np.uint8)
        assert psnr(a8, b8) == pytest.approx(_reference_psnr(a8, b8, 255.0), abs=1e-9)
    assert worst < 1e-9


def test_psnr_of_identical_images_is_inf_without_warnings():
    a = _rand((8, 8, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert psnr(a, a.copy()) == float("inf")
        assert psnr(torch.from_numpy(a).permute(2, 0, 1), a) == float("inf")
        assert psnr(np.zeros((4, 4), np.uint8), np.zeros((4, 4), np.uint8), data_range=255.0) == float("inf")


def test_ssim_equals_its_definition_on_random_and_example_images():
    for name, a, b in _image_pairs():
        assert ssim(a, b) == pytest.approx(_reference_ssim(a, b), abs=1e-12), name
        assert ssim(a, a) == pytest.approx(1.0, abs=1e-12), name


def test_ssim_of_batches_and_grayscale_is_the_mean_over_images():
    pairs = [(a, b) for _, a, b in _image_pairs() if a.shape == (64, 64, 3)]
    x = np.stack([a for a, _ in pairs]).transpose(0, 3, 1, 2)
    y = np.stack([b for _, b in pairs]).transpose(0, 3, 1, 2)
    assert ssim(x, y) == pytest.approx(np.mean([_reference_ssim(a, b) for a, b in pairs]), abs=1e-12)
    gray_a, gray_b = pairs[0][0].mean(-1), pairs[0][1].mean(-1)
    assert ssim(gray_a, gray_b) == pytest.approx(_reference_ssim(gray_a, gray_b), abs=1e-12)


def test_ssim_below_eleven_pixels_stays_near_the_cut_window():
    # A documented difference, not an equality: scikit-image windows are odd and always filter with the 11-tap
    # Gaussian (reflected past the border), so a side under 11 px no longer gets a Gaussian cut to exactly that
    # side. On these pairs (noise sigma 0.1) the two differ by at most 1.9e-3; sides of 1-2 px can differ by 0.1+.
    rng = np.random.default_rng(12)
    for shape in [(10, 10, 3), (9, 12, 3), (8, 8, 3), (7, 7, 3), (6, 9, 3), (5, 5, 3), (3, 3, 3)]:
        a = rng.uniform(size=shape)
        b = np.clip(a + rng.normal(0, 0.1, shape), 0, 1)
        assert ssim(a, b) == pytest.approx(_reference_ssim(a, b, size=min(shape[:2])), abs=5e-3), shape
