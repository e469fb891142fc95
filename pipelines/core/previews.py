"""Cheap live previews: a linear latent -> RGB map applied to the predicted x0.

For SD1.x weights we use the published factors (ComfyUI's SD15 table). For any other VAE we fit a 4x3
matrix plus bias by least squares from that VAE's own encodings, and store it with the model
(`latent_rgb.json` in the model folder) so it is computed once.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

PREVIEW_FILE = "latent_rgb.json"

# Rows: latent channels 0-3; columns: R, G, B. Applies to model-space latents (VAE latents x 0.18215).
SD15_FACTORS = [
    [0.3512, 0.2297, 0.3227],
    [0.3250, 0.4974, 0.2350],
    [-0.2829, 0.1762, 0.2721],
    [-0.2120, -0.2616, -0.7177],
]


class LatentPreviewer:
    """Maps (1,C,h,w) model-space latents to a small RGB PIL image at latent resolution."""

    def __init__(self, factors, bias=None, source: str = "fitted"):
        self.factors = torch.tensor(factors, dtype=torch.float32)  # (C, 3)
        self.bias = torch.tensor(bias if bias is not None else [0.0, 0.0, 0.0], dtype=torch.float32)
        self.source = source

    def to_rgb(self, latents: torch.Tensor) -> torch.Tensor:
        """(N,C,h,w) -> (N,3,h,w) in roughly [-1,1], computed where the latents are (no full-size copy)."""
        f = self.factors.to(latents.device, torch.float32)
        b = self.bias.to(latents.device, torch.float32).view(1, 3, 1, 1)
        return torch.einsum("nchw,cr->nrhw", latents.detach().float(), f) + b

    def __call__(self, latents: torch.Tensor) -> Image.Image:
        """A latent-resolution RGB image; only these few bytes leave the GPU (the UI scales it up)."""
        rgb = self.to_rgb(latents[:1])[0]
        arr = ((rgb.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
        return Image.fromarray(arr)

    def to_dict(self) -> dict:
        return {"factors": self.factors.tolist(), "bias": self.bias.tolist(), "source": self.source}

    def save(self, folder: str | Path) -> None:
        Path(folder, PREVIEW_FILE).write_text(json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, folder: str | Path) -> LatentPreviewer | None:
        path = Path(folder, PREVIEW_FILE)
        if not path.is_file():
            return None
        data = json.loads(path.read_text())
        return cls(data["factors"], data.get("bias"), data.get("source", "fitted"))


def is_sd_vae(vae) -> bool:
    """True for the SD1.x KL-f8 autoencoder architecture, whose published factors apply."""
    cfg = vae.config
    return (
        cfg.latent_channels == 4
        and list(cfg.block_out_channels) == [128, 256, 512, 512]
        and abs(float(cfg.scaling_factor) - 0.18215) < 1e-6
    )


def calibration_images(size: int, count: int = 24, seed: int = 0) -> torch.Tensor:
    """Varied colourful images in [-1,1]: flat colours, gradients and blobs, so every RGB direction shows."""
    g = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / max(size - 1, 1)
    out = []
    for i in range(count):
        c0, c1 = g.uniform(0, 1, 3), g.uniform(0, 1, 3)
        kind = i % 3
        if kind == 0:
            img = np.broadcast_to(c0, (size, size, 3)).copy()
        elif kind == 1:
            w = (xx if i % 2 else yy)[..., None]
            img = c0 * (1 - w) + c1 * w
        else:
            cx, cy, r = g.uniform(0.2, 0.8), g.uniform(0.2, 0.8), g.uniform(0.1, 0.35)
            inside = (((xx - cx) ** 2 + (yy - cy) ** 2) < r * r)[..., None]
            img = np.where(inside, c1, c0)
        out.append(torch.from_numpy(img.astype(np.float32)).permute(2, 0, 1))
    return torch.stack(out) * 2 - 1


@torch.no_grad()
def fit_previewer(vae, *, size: int = 64, count: int = 24) -> LatentPreviewer:
    """Least-squares fit of [latent, 1] -> RGB of the VAE's own decode (what a preview stands in for),
    on the encodings of varied calibration images."""
    param = next(vae.parameters())
    images = calibration_images(size, count).to(param.device, param.dtype)
    latents = vae.encode(images).latent_dist.mean
    decoded = vae.decode(latents).sample.float().clamp(-1, 1)
    latents = latents.float() * float(vae.config.scaling_factor)
    h, w = latents.shape[-2:]
    target = torch.nn.functional.interpolate(decoded, size=(h, w), mode="area")
    x = latents.permute(0, 2, 3, 1).reshape(-1, latents.shape[1]).cpu()
    y = target.permute(0, 2, 3, 1).reshape(-1, 3).cpu()
    x1 = torch.cat([x, torch.ones(len(x), 1)], dim=1)
    sol = torch.linalg.lstsq(x1.double(), y.double()).solution.float()  # (C+1, 3)
    return LatentPreviewer(sol[:-1].tolist(), sol[-1].tolist(), source="fitted")


def previewer_for(vae, folder: str | Path | None) -> LatentPreviewer:
    """Stored factors if the model folder has them, published ones for SD VAEs, else fit now."""
    if folder is not None:
        stored = LatentPreviewer.load(folder)
        if stored is not None:
            return stored
    if is_sd_vae(vae):
        return LatentPreviewer(SD15_FACTORS, None, source="sd15-published")
    return fit_previewer(vae)
