"""DragDiffusion's point machinery, as plain functions on feature maps: checking user points, image <-> feature
coordinates, motion supervision, point tracking, the stop rule, and drawing points and arrows.

Feature points are (row, col) on the supervision grid (the UNet feature map upsampled to 4x the latent size, the
reference's `sup_res`); image points are (x, y) pixels whose centres are at integer coordinates.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..core.errors import InputError
from ..core.limits import Limits, get_limits
from ..core.validation import shown

MAX_POINTS = Limits.max_points   # pairs (the default; get_limits() is what is enforced): each adds a loss term
REACHED = 2.0            # the reference's stop rule: every handle closer than 2 feature pixels to its target

Point = tuple[float, float]

_PAIRS = "Drag points must be a list of [x, y] pairs"


def _unpaired(n_handles: int, n_targets: int) -> InputError:
    return InputError(f"{n_handles} handle point(s) but {n_targets} target(s): every handle needs exactly one "
                      f"target.")


def _as_list(points) -> list:
    if isinstance(points, (str, bytes, dict)):
        raise InputError(f"{_PAIRS}, got {_kind(points)}.")
    try:
        return list(points or [])
    except TypeError:  # a number, or anything else that is not a sequence
        raise InputError(f"{_PAIRS}, got {_kind(points)}.") from None


def _kind(value) -> str:
    """What a JSON value is, in words."""
    if isinstance(value, bool):
        return "true/false"
    return {int: "a number", float: "a number", str: "text", dict: "an object"}.get(type(value),
                                                                                  f"a {type(value).__name__}")


def check_point_count(handles, targets) -> None:
    """Only the counts (cheap, before the image is read): paired, and at most the limit's pairs."""
    n_h, n_t = len(_as_list(handles)), len(_as_list(targets))
    if n_h != n_t:
        raise _unpaired(n_h, n_t)
    cap = get_limits().max_points
    if n_h > cap:
        raise InputError(f"{n_h} point pairs is too many; use at most {cap}.")


def _coordinate(v) -> float | None:
    """A finite JSON number as a float, else None (bools, strings, nested values, NaN, inf, huge ints)."""
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        return None
    try:
        x = float(v)
    except (OverflowError, ValueError):
        return None
    return x if math.isfinite(x) else None


def parse_points(value) -> list[tuple[int, int]]:
    """The raw JSON a client sends for the clicked points ([[x, y], ...]: handle, target, handle, ...) -> (x, y)
    int pixels, rounded half up. None is no points (check_points then asks for some). Bounds are check_points'
    job, once the image size is known."""
    if value is None:
        return []
    cap = 2 * get_limits().max_points
    if not isinstance(value, (list, tuple)):
        raise InputError(f"{_PAIRS}, got {_kind(value)}.")
    if len(value) > cap:
        raise InputError(f"{_PAIRS}, at most {cap} of them ({cap // 2} handle/target pairs); got {len(value)}.")
    out = []
    for i, entry in enumerate(value):
        xy = [_coordinate(v) for v in entry] if isinstance(entry, (list, tuple)) and len(entry) == 2 else [None]
        if None in xy:
            raise InputError(f"{_PAIRS} of finite numbers; entry {i + 1} is not.")
        out.append(tuple(math.floor(v + 0.5) for v in xy))
    if len(out) % 2:
        raise _unpaired(len(out) // 2 + 1, len(out) // 2)
    return out


def check_points(handles, targets, size: tuple[int, int]) -> tuple[list[Point], list[Point]]:
    """Validated (x, y) float pairs: InputError when empty, unpaired, malformed or outside the image."""
    handles, targets = _as_list(handles), _as_list(targets)
    if not handles and not targets:
        raise InputError("No points: click a handle point on the image, then the target it should move to.")
    check_point_count(handles, targets)
    width, height = size
    out = []
    for kind, points in (("Handle", handles), ("Target", targets)):
        parsed = []
        for i, p in enumerate(points):
            try:
                x, y = (float(v) for v in p)
            except (TypeError, ValueError, OverflowError):
                raise InputError(f"{kind} point {i + 1} is not an (x, y) pair: {shown(p)}.") from None
            if not (math.isfinite(x) and math.isfinite(y)):
                raise InputError(f"{kind} point {i + 1} has a coordinate that is not a number: {shown(p)}.")
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
ARROW_OUTLINE = (0, 0, 0)   # drawn under the white arrow, so it shows on white images as on black ones


def draw_points(image: Image.Image, handles, targets, current=None) -> Image.Image:
    """A copy of `image` with handles (red), targets (blue) and a white arrow with a black outline per pair.
    With `current` (the tracked handle positions) the original handles become red rings and the arrows start at
    `current`."""
    arr = np.array(image.convert("RGB"))  # a writable copy: cv2 draws in place
    h, w = arr.shape[:2]
    radius = max(2, min(h, w) // 64)
    thick = max(1, radius // 3)

    def px(p) -> tuple[int, int]:
        return round(float(p[0])), round(float(p[1]))

    starts = list(current) if current is not None else list(handles)
    arrows = [(px(a), px(b)) for a, b in zip(starts, targets) if distance(px(a), px(b)) >= 1]
    for colour, width in ((ARROW_OUTLINE, thick + 2), (ARROW, thick)):  # every outline first, then the arrows
        for a, b in arrows:
            tip = min(0.4, 3 * radius / max(distance(a, b), 1))
            cv2.arrowedLine(arr, a, b, colour, width, cv2.LINE_AA, tipLength=tip)
    for p in targets:
        cv2.circle(arr, px(p), radius, TARGET, -1, cv2.LINE_AA)
    for p in handles:
        cv2.circle(arr, px(p), radius, HANDLE, thick if current is not None else -1, cv2.LINE_AA)
    for p in current or []:
        cv2.circle(arr, px(p), radius, HANDLE, -1, cv2.LINE_AA)
    return Image.fromarray(arr)
