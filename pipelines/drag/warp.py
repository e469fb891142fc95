"""Warm start for a drag: carry the editable region's latent along the drag before the optimisation.

DragDiffusion moves content by one feature pixel per iteration of latent optimisation, and on long drags (or
on small latents, where an object spans a few latent pixels) the content drifts on the way: it changes colour or
stops short. The training-free successors (SDE-Drag's copy-and-paste, FastDrag's latent warpage, RegionDrag)
move the latent itself. Here that move is only the starting point: the inverted latent of the editable region
is displaced along the drag (one translation per handle, blended by inverse squared distance to the targets
where there are several), the handles start at their targets, and point tracking plus motion supervision then
correct whatever the warp got wrong, before the same mutual-self-attention denoising.

Rigid translation fills the place the content left from what lay behind it on the far side (x - d), which is
background wherever the region holds the object and its destination. Only the painted region moves, so a warm
start needs one: with nothing painted it is skipped (the whole image would slide).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _pixel_grid(h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ys, xs): each latent pixel's row and column, (h, w) float32."""
    return torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")


def displacement_field(handles, targets, shape: tuple[int, int], scale: float) -> torch.Tensor:
    """(2, h, w) displacement (dx, dy) in latent pixels at every latent pixel of an (h, w) grid, for image-pixel
    (x, y) points (`scale` = latent pixels per image pixel): a single pair moves everything by its own vector;
    several are blended by inverse squared distance to their targets (where content lands)."""
    h, w = shape
    ys, xs = _pixel_grid(h, w)
    moves, weights = [], []
    for (hx, hy), (tx, ty) in zip(handles, targets):
        # image pixel centres -> latent coordinates (pixel centres map to pixel centres)
        gx, gy = (tx + 0.5) * scale - 0.5, (ty + 0.5) * scale - 0.5
        moves.append(torch.tensor([(tx - hx) * scale, (ty - hy) * scale]).view(2, 1, 1))
        weights.append(1.0 / ((xs - gx) ** 2 + (ys - gy) ** 2 + 1e-3))
    wsum = torch.stack(weights).sum(0)
    return sum(m * (wt / wsum) for m, wt in zip(moves, weights))


def warp_region(z: torch.Tensor, field: torch.Tensor, editable: torch.Tensor) -> torch.Tensor:
    """z (B, C, h, w) with every editable latent pixel x taken from x - field(x) (bilinear, clamped at the
    border); other pixels unchanged. `editable`: (1, 1, h, w) in {0, 1}."""
    _, _, h, w = z.shape
    ys, xs = _pixel_grid(h, w)
    src_x, src_y = xs - field[0], ys - field[1]
    grid = torch.stack([2 * src_x / max(w - 1, 1) - 1, 2 * src_y / max(h - 1, 1) - 1], dim=-1)[None]
    grid = grid.expand(z.shape[0], -1, -1, -1).to(z.device, torch.float32)
    moved = F.grid_sample(z.float(), grid, mode="bilinear", padding_mode="border", align_corners=True)
    m = editable.to(z.device, torch.float32)
    return (m * moved + (1 - m) * z.float()).to(z.dtype)
