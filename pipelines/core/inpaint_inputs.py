"""The inputs of a 9-channel inpainting UNet, in Stable Diffusion's order: [noisy latent (4) | mask (1) | masked-image
latent (4)]. One rule from a painted mask to those inputs, used by the trainer and by the sampler alike: the hole is
the latent cells any painted pixel touches (masks.latent_cells), so a thin stroke never vanishes at latent size, and
the masked image is blanked over exactly those cells (0 in [-1, 1], mid-gray, as in SD's training)."""
from __future__ import annotations

import numpy as np
import torch

from .masks import latent_cells

MASK_CHANNELS = 1


def hole_cells(mask: np.ndarray, f: int) -> np.ndarray:
    """Bool (H, W) painted mask (True = repaint) -> bool (H // f, W // f) latent cells to repaint."""
    return latent_cells(np.asarray(mask, bool), f)


def cells_tensor(cells, device=None, dtype=torch.float32) -> torch.Tensor:
    """Bool cells (h, w) or (B, h, w) -> float (B, 1, h, w): the UNet's mask channel (1 = repaint)."""
    t = torch.as_tensor(np.asarray(cells, bool))
    t = t[None] if t.ndim == 2 else t
    return t[:, None].to(device=device, dtype=dtype)


def cell_pixels(cells: torch.Tensor, f: int) -> torch.Tensor:
    """(B, 1, h, w) cells -> (B, 1, h * f, w * f), each cell repeated over its f x f pixels."""
    return cells.repeat_interleave(f, dim=2).repeat_interleave(f, dim=3)


def masked_image(image: torch.Tensor, cells: torch.Tensor, f: int) -> torch.Tensor:
    """The image in [-1, 1] (B, 3, H, W) with the hole cells set to 0; what the VAE encodes as the masked-image
    latent."""
    return image * (1 - cell_pixels(cells.to(image.dtype), f))


def unet_input(z_t: torch.Tensor, cells: torch.Tensor, masked_latent: torch.Tensor) -> torch.Tensor:
    """[noisy latent | mask | masked-image latent] along channels (batch sizes must already match)."""
    return torch.cat([z_t, cells.to(z_t.dtype), masked_latent.to(z_t.dtype)], dim=1)
