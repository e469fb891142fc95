import math

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines.errors import InputError
from pipelines.metrics import mse, psnr, ssim, to_float_image


def _rand(shape, seed=0, high=1.0):
    return np.random.default_rng(seed).uniform(0.0, high, size=shape)


def _reference_ssim(a, b):
    """Brute-force SSIM over every valid 11x11 window (independent of conv2d)."""
    size, sigma = 11, 1.5
    c = np.arange(size) - (size - 1) / 2
    g = np.exp(-(c**2) / (2 * sigma**2))
    w = np.outer(g, g)
    w /= w.sum()
    c1, c2 = 0.01**2, 0.03**2
    vals = []
    for ch in range(a.shape[2]):
        for i in range(a.shape[0] - size + 1):
            for j in range(a.shape[1] - size + 1):
                x = a[i : i + size, j : j + size, ch]
                y = b[i : i + size, j : j + size, ch]
                mx, my = (w * x).sum(), (w * y).sum()
                vx = (w * (x - mx) ** 2).sum()
                vy = (w * (y - my) ** 2).sum()
                cxy = (w * (x - mx) * (y - my)).sum()
                vals.append(
                    (2 * mx * my + c1) * (2 * cxy + c2) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
                )
    return float(np.mean(vals))


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
