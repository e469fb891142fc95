"""Image quality metrics (MSE, PSNR, SSIM); PSNR and SSIM are scikit-image's.

Inputs are float images in [0, 1] given as numpy arrays, torch tensors or PIL
images, shaped (H, W, 3), (3, H, W) or (N, 3, H, W); 2-D (H, W) grayscale is
accepted as a single channel. Everything is first converted by
``to_float_image`` to ONE canonical layout: a float64 torch tensor of shape
(N, C, H, W). float64 keeps the metrics exact enough that e.g. a constant
offset of 0.1 gives PSNR 20 dB to ~1e-12.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from pipelines.core.errors import InputError

# Standard Wang et al. (2004) SSIM constants.
_WIN_SIZE = 11
_WIN_SIGMA = 1.5
_K1 = 0.01
_K2 = 0.03


def to_float_image(x) -> torch.Tensor:
    """Convert an image to a float64 tensor of shape (N, C, H, W).

    3-D inputs are channel-first (C, H, W) when the first axis has 1 or 3
    entries and the last does not have 3, otherwise channel-last (H, W, C).
    The ambiguous 3 x H x 3 case is read as channel-last, which is what
    numpy/PIL produce. uint8 inputs are scaled by 1/255 so callers can pass
    raw pixels too.
    """
    if isinstance(x, Image.Image):
        x = np.asarray(x.convert("RGB"), dtype=np.float64) / 255.0
    if isinstance(x, np.ndarray):
        is_uint8 = x.dtype == np.uint8
        t = torch.from_numpy(np.asarray(x, dtype=np.float64))
        if is_uint8:
            t = t / 255.0
    elif isinstance(x, torch.Tensor):
        is_uint8 = x.dtype == torch.uint8
        t = x.detach().to("cpu", torch.float64)
        if is_uint8:
            t = t / 255.0
    else:
        raise InputError(f"Expected an image array, tensor or PIL image, got {type(x).__name__}.")

    if t.ndim == 2:
        return t[None, None]
    if t.ndim == 3:
        channel_first = t.shape[0] in (1, 3) and t.shape[-1] != 3
        if not channel_first:
            t = t.permute(2, 0, 1)
        return t[None]
    if t.ndim == 4:
        return t
    raise InputError(f"Expected an image with 2, 3 or 4 dimensions, got shape {tuple(t.shape)}.")


def _pair(a, b) -> tuple[torch.Tensor, torch.Tensor]:
    # Compare canonical shapes so (H,W,3) vs (3,H,W) of the same image is fine.
    ta, tb = to_float_image(a), to_float_image(b)
    if ta.shape != tb.shape:
        raise InputError(
            f"The two images have different shapes ({tuple(ta.shape)} vs {tuple(tb.shape)})."
        )
    return ta, tb


def mse(a, b) -> float:
    """Mean squared error over all pixels and channels."""
    ta, tb = _pair(a, b)
    return float(torch.mean((ta - tb) ** 2))


def psnr(a, b, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB, 10 log10(data_range^2 / MSE); ``inf`` for identical images."""
    ta, tb = _pair(a, b)
    with np.errstate(divide="ignore"):  # MSE 0 (identical images) -> inf, without a warning
        return float(peak_signal_noise_ratio(ta.numpy(), tb.numpy(), data_range=data_range))


def ssim(a, b) -> float:
    """Mean structural similarity (Wang et al. 2004), data range 1: scikit-image's, with the paper's settings.

    Gaussian 11x11 window (sigma 1.5), population (not sample) covariance, K1 0.01, K2 0.03. Computed per RGB
    channel (no conversion to luminance) and averaged over channels, positions and batch. Only positions whose
    window lies wholly inside the image count, like the reference MATLAB code, so border pixels never see padded
    values. Images smaller than 11 px average over a window as large as the smaller side (the largest odd size
    that fits); the 11-tap Gaussian then reaches past the border and sees reflected pixels there.
    """
    ta, tb = _pair(a, b)
    size = min(_WIN_SIZE, ta.shape[-2], ta.shape[-1])
    win_size = size if size % 2 else size - 1  # scikit-image windows are odd
    per_image = [
        structural_similarity(x, y, win_size=win_size, data_range=1.0, channel_axis=0, gaussian_weights=True,
                              sigma=_WIN_SIGMA, use_sample_covariance=False, K1=_K1, K2=_K2)
        for x, y in zip(ta.numpy(), tb.numpy(), strict=True)
    ]
    return float(np.mean(per_image))
