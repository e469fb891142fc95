"""DragDiffusion's point machinery, as plain functions on feature maps: checking user points, image <-> feature
coordinates, motion supervision, point tracking, the stop rule, and drawing points and arrows.

Feature points are (row, col) on the supervision grid (the UNet feature map upsampled to 4x the latent size, the
reference's `sup_res`); image points are (x, y) pixels whose centres are at integer coordinates.
"""
from __future__ import annotations

import math
from typing import Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .errors import InputError

MAX_POINTS = 16          # pairs; each pair adds a patch to the loss and a search per iteration
REACHED = 2.0            # the reference's stop rule: every handle closer than 2 feature pixels to its target

Point = tuple[float, float]


def check_points(handles, targets, size: tuple[int, int]) -> tuple[list[Point], list[Point]]:
    """Validated (x, y) float pairs: InputError when empty, unpaired, malformed or outside the image."""
    handles, targets = list(handles or []), list(targets or [])
    if not handles and not targets:
        raise InputError("No points: click a handle point on the image, then the target it should move to.")
    if len(handles) != len(targets):
        raise InputError(f"{len(handles)} handle point(s) but {len(targets)} target(s): every handle needs exactly "
                         f"one target.")
    if len(handles) > MAX_POINTS:
        raise InputError(f"{len(handles)} point pairs is too many; use at most {MAX_POINTS}.")
    width, height = size
    out = []
    for kind, points in (("Handle", handles), ("Target", targets)):
        parsed = []
        for i, p in enumerate(points):
            try:
                x, y = (float(v) for v in p)
            except (TypeError, ValueError):
                raise InputError(f"{kind} point {i + 1} is not an (x, y) pair: {p!r}.") from None
            if not (math.isfinite(x) and math.isfinite(y)):
                raise InputError(f"{kind} point {i + 1} has a coordinate that is not a number: {p!r}.")
            if not (0 <= x < width and 0 <= y < height):
                raise InputError(f"{kind} point {i + 1} at ({x:g}, {y:g}) is outside the {width}x{height} image.")
            parsed.append((x, y))
        out.append(parsed)
    return out[0], out[1]


# ------------------------------------------------------------------------------------------- coordinates

def to_feature(point: Point, size: tuple[int, int], grid: tuple[int, int]) -> tuple[int, int]:
    """Image (x, y) -> the nearest feature (row, col). Pixel centres map to pixel centres (as bilinear
    upsampling with align_corners=False places them); the reference rounds to the grid as well."""
    (x, y), (width, height), (rows, cols) = point, size, grid
    row = round((y + 0.5) * rows / height - 0.5)
    col = round((x + 0.5) * cols / width - 0.5)
    return min(max(row, 0), rows - 1), min(max(col, 0), cols - 1)


def to_image(point: Sequence[float], size: tuple[int, int], grid: tuple[int, int]) -> Point:
    """Feature (row, col) -> image (x, y)."""
    (row, col), (width, height), (rows, cols) = point, size, grid
    return ((col + 0.5) * width / cols - 0.5, (row + 0.5) * height / rows - 0.5)


def distance(a: Sequence[float], b: Sequence[float]) -> float:
    return math.hypot(a[0] - b[0], a[1] - b[1])


def reached(handles, targets, tol: float = REACHED) -> bool:
    return all(distance(h, t) < tol for h, t in zip(handles, targets))


# ------------------------------------------------------------------------------------------- supervision

def _window(centre: float, r: int, limit: int) -> tuple[int, int]:
    """[lo, hi) of a (2r+1) window around int(centre), clipped at the border (the reference's boundary check)."""
    c = int(centre)
    return max(0, c - r), min(limit, c + r + 1)


def sample_patch(feats: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Bilinear samples of (1, C, H, W) features at fractional (rows, cols) grids -> (1, C, h, w); exact at
    integer positions, clamped to the border beyond it."""
    _, _, H, W = feats.shape
    gy = 2 * rows / max(H - 1, 1) - 1
    gx = 2 * cols / max(W - 1, 1) - 1
    grid = torch.stack(torch.broadcast_tensors(gx[None, :], gy[:, None]), dim=-1)[None]
    return F.grid_sample(feats, grid.to(feats.dtype), mode="bilinear", padding_mode="border", align_corners=True)


def motion_supervision(feats: torch.Tensor, handles, targets, r1: int) -> torch.Tensor | None:
    """Sum over handles still >= 2 pixels from their targets of (2 r1 + 1)^2 * mean |F(q + d) - sg(F(q))| over
    the patch q around the handle, d the unit step towards the target: pulls the features one step along.
    None when every handle is close enough (nothing to supervise)."""
    _, _, H, W = feats.shape
    loss = None
    for (hr, hc), (tr, tc) in zip(handles, targets):
        dist = math.hypot(tr - hr, tc - hc)
        if dist < REACHED:
            continue
        dr, dc = (tr - hr) / dist, (tc - hc) / dist
        r_lo, r_hi = _window(hr, r1, H)
        c_lo, c_hi = _window(hc, r1, W)
        fixed = feats[:, :, r_lo:r_hi, c_lo:c_hi].detach()
        rows = torch.arange(r_lo, r_hi, device=feats.device, dtype=torch.float32) + dr
        cols = torch.arange(c_lo, c_hi, device=feats.device, dtype=torch.float32) + dc
        moved = sample_patch(feats, rows, cols)
        term = (2 * r1 + 1) ** 2 * F.l1_loss(moved, fixed)
        loss = term if loss is None else loss + term
    return loss


@torch.no_grad()
def track_points(f0: torch.Tensor, f1: torch.Tensor, initial, current, r2: int) -> list[tuple[int, int]]:
    """Each handle moves to the position, within r2 of where it is, whose feature in f1 is nearest (L1) to
    the ORIGINAL feature f0 at its initial position."""
    _, _, H, W = f1.shape
    out = []
    for (ir, ic), (cr, cc) in zip(initial, current):
        ref = f0[0, :, int(ir), int(ic)]
        r_lo, r_hi = _window(cr, r2, H)
        c_lo, c_hi = _window(cc, r2, W)
        dist = (f1[0, :, r_lo:r_hi, c_lo:c_hi] - ref[:, None, None]).abs().sum(0)
        row, col = divmod(int(dist.argmin()), dist.shape[1])
        out.append((r_lo + row, c_lo + col))
    return out


# ------------------------------------------------------------------------------------------- drawing

HANDLE = (230, 30, 30)
TARGET = (40, 90, 240)
ARROW = (255, 255, 255)


def draw_points(image: Image.Image, handles, targets, current=None) -> Image.Image:
    """A copy of `image` with handles (red), targets (blue) and a white arrow per pair. With `current` (the
    tracked handle positions) the original handles become red rings and the arrows start at `current`."""
    arr = np.array(image.convert("RGB"))  # a writable copy: cv2 draws in place
    h, w = arr.shape[:2]
    radius = max(2, min(h, w) // 64)
    thick = max(1, radius // 3)

    def px(p) -> tuple[int, int]:
        return int(round(float(p[0]))), int(round(float(p[1])))

    starts = list(current) if current is not None else list(handles)
    for a, b in zip(starts, targets):
        if distance(px(a), px(b)) >= 1:
            tip = min(0.4, 3 * radius / max(distance(px(a), px(b)), 1))
            cv2.arrowedLine(arr, px(a), px(b), ARROW, thick, cv2.LINE_AA, tipLength=tip)
    for p in targets:
        cv2.circle(arr, px(p), radius, TARGET, -1, cv2.LINE_AA)
    for p in handles:
        cv2.circle(arr, px(p), radius, HANDLE, thick if current is not None else -1, cv2.LINE_AA)
    for p in current or []:
        cv2.circle(arr, px(p), radius, HANDLE, -1, cv2.LINE_AA)
    return Image.fromarray(arr)
