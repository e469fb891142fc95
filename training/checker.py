"""Reads any image of the synthetic world (a render, or a model's output) back into world terms.

`check(image)` returns the background (kind and colour names) and the objects (shape, colour, centre, size,
grid cell, area, mask). It does not assume exact colours or hard edges: colours are matched to the nearest
named colour, and the shape is judged from contour measures that survive mild noise and blur.
"""
from __future__ import annotations

import math

import cv2
import numpy as np
from PIL import Image

from training.world import BACKGROUND_COLOURS, COLOURS, OBJECT_COLOURS, SIZES, cell_of

GRADIENT_JUMP = 60.0       # opposite borders this far apart in colour: a gradient, not one colour
TEXTURE_RESIDUAL = 12.0    # mean colour distance of border pixels from their median above this: textured
FOREGROUND = 50.0          # colour distance from the background estimate that marks an object pixel
MIN_AREA = 0.004           # components smaller than this fraction of the image are specks, not objects
# Shape thresholds, between the ranges measured on 3000 scenes at 64 px, clean and with noise + 3x3 blur
# (blur fills a small star's notches, so its range reaches up towards the triangle's):
STAR_SOLIDITY = 0.865      # share of the convex hull filled: star 0.61-0.84, triangle 0.89-0.95, others 0.95+
TRIANGLE_FILL = 0.61       # share of the enclosing circle filled: triangle 0.41-0.57, square 0.65+, circle 0.85+
SQUARE_BOX_FILL = 0.92     # share of the tightest rectangle filled: square 0.97-1, circle 0.77-0.86
# Size threshold on the enclosing radius: halfway (geometrically) between the world's two sizes.
SIZE_SPLIT = math.sqrt(SIZES["small"] * SIZES["large"])


def _nearest(rgb, names) -> str:
    return min(names, key=lambda n: float(np.sum((np.asarray(COLOURS[n], np.float64) - rgb) ** 2)))


def _as_array(image) -> np.ndarray:
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.stack([image] * 3, axis=-1)
    return image[..., :3].astype(np.float64)


def _background(img: np.ndarray) -> tuple[dict, np.ndarray]:
    """Background description and a per-pixel estimate of it, from the border (objects never touch it)."""
    h, w, _ = img.shape
    b = max(1, round(min(h, w) / 32))  # border band width: 2 px at 64
    top, bottom = img[:b].reshape(-1, 3), img[-b:].reshape(-1, 3)
    left, right = img[:, :b].reshape(-1, 3), img[:, -b:].reshape(-1, 3)
    med = {k: np.median(v, axis=0) for k, v in (("top", top), ("bottom", bottom), ("left", left), ("right", right))}
    across = np.linalg.norm(med["left"] - med["right"])
    down = np.linalg.norm(med["top"] - med["bottom"])
    if max(across, down) > GRADIENT_JUMP:
        horizontal = across >= down
        ends = (med["left"], med["right"]) if horizontal else (med["top"], med["bottom"])
        colours = [_nearest(e, BACKGROUND_COLOURS) for e in ends]
        # A linear gradient is constant along one axis: estimate each column (or row) from the two borders
        # that run across it, which is exact for any gradient profile (and for stripes across those borders).
        if horizontal:
            line = np.median(np.concatenate([img[:b], img[-b:]], axis=0), axis=0)     # (w, 3)
            estimate = np.broadcast_to(line[None], img.shape)
        else:
            line = np.median(np.concatenate([img[:, :b], img[:, -b:]], axis=1), axis=1)  # (h, 3)
            estimate = np.broadcast_to(line[:, None], img.shape)
        if colours[0] != colours[1]:
            info = {"kind": "gradient", "colour": colours[0], "colours": colours,
                    "direction": "horizontal" if horizontal else "vertical", "rgb": [float(v) for v in ends[0]]}
            return info, estimate
        # The world's gradients join two different named colours: opposite borders that differ but name the
        # same colour are one colour with stripes that fall differently on them (a generated texture's phase
        # is arbitrary). The estimate above still models the stripes; the description is one textured colour.
        info = {"kind": "textured", "colour": colours[0], "colours": colours[:1], "direction": "",
                "rgb": [float(v) for v in np.median(np.concatenate([top, bottom, left, right]), axis=0)]}
        return info, estimate
    ring = np.concatenate([top, bottom, left, right])
    base = np.median(ring, axis=0)
    residual = float(np.mean(np.linalg.norm(ring - base, axis=1)))
    colour = _nearest(base, BACKGROUND_COLOURS)
    kind = "textured" if residual > TEXTURE_RESIDUAL else "solid"
    info = {"kind": kind, "colour": colour, "colours": [colour], "direction": "", "rgb": [float(v) for v in base]}
    return info, np.broadcast_to(base, img.shape)


def _shape(mask: np.ndarray) -> tuple[str, float]:
    """Shape name and bounding radius of one component's mask."""
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    contour = max(contours, key=cv2.contourArea)
    area = float(mask.sum())
    # Count the convex hull in pixels too (contours run through pixel centres, so contour areas would
    # undercount small shapes by about half their perimeter); for the same reason the radius grows by 0.5.
    hull = np.zeros(mask.shape, np.uint8)
    cv2.fillConvexPoly(hull, cv2.convexHull(contour), 1)
    (_, _), radius = cv2.minEnclosingCircle(contour)
    radius += 0.5
    if area / max(int(hull.sum()), 1) < STAR_SOLIDITY:
        return "star", radius
    if area / (math.pi * radius * radius) < TRIANGLE_FILL:
        return "triangle", radius
    # A square fills its tightest (rotated) rectangle; a circle only pi/4 of it. Contour points are pixel
    # centres, so the rectangle's sides grow by one pixel to hold whole pixels.
    (_, _), (rw, rh), _ = cv2.minAreaRect(contour)
    return ("square" if area / ((rw + 1) * (rh + 1)) > SQUARE_BOX_FILL else "circle"), radius


def _refine(img: np.ndarray, estimate: np.ndarray, mask: np.ndarray, rgb: np.ndarray) -> np.ndarray:
    """Redraw a component's edge where pixels are nearer the object's colour than the background's.

    A fixed threshold puts the edge of a blurred high-contrast object too far out (and of a low-contrast one
    too far in); halfway between the two colours is where the sharp edge was, whatever the contrast."""
    near = cv2.dilate(mask.astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)
    towards = rgb - estimate[near]                                 # background -> object, per pixel
    t = np.sum((img[near] - estimate[near]) * towards, axis=1) / np.maximum(np.sum(towards ** 2, axis=1), 1e-6)
    refined = np.zeros_like(mask)
    refined[near] = t > 0.5
    count, labels, stats, _ = cv2.connectedComponentsWithStats(refined.astype(np.uint8), connectivity=8)
    if count < 2:
        return mask
    return labels == 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))  # drop stray pixels of the ring


def check(image) -> dict:
    """Read an RGB image (array or PIL) of the world.

    Returns {'background': {kind, colour, colours, direction, rgb}, 'objects': [{shape, colour, rgb, centre,
    size, cell, area, radius, mask}, ...]}: `colours` holds one name, or a gradient's start and end (left and
    right, or top and bottom per `direction`), and `colour` is the first; `centre` is (x, y) in pixels;
    objects come in reading order."""
    img = _as_array(image)
    h, w, _ = img.shape
    background, estimate = _background(img)
    foreground = (np.linalg.norm(img - estimate, axis=2) > FOREGROUND).astype(np.uint8)
    count, labels, stats, _ = cv2.connectedComponentsWithStats(foreground, connectivity=8)
    objects = []
    for k in range(1, count):
        area = int(stats[k, cv2.CC_STAT_AREA])
        if area < MIN_AREA * h * w:
            continue
        mask = labels == k
        # The colour comes from the inside only, away from edges that blur mixes with the background.
        inner = cv2.erode(mask.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
        rgb = np.median(img[inner] if inner.sum() >= 4 else img[mask], axis=0)
        mask = _refine(img, estimate, mask, rgb)
        area = int(mask.sum())
        shape, radius = _shape(mask)
        ys, xs = np.nonzero(mask)
        x, y = float(xs.mean()), float(ys.mean())
        objects.append({
            "shape": shape,
            "colour": _nearest(rgb, OBJECT_COLOURS),
            "rgb": [float(v) for v in rgb],
            "centre": (x, y),
            "size": "large" if radius > SIZE_SPLIT * min(h, w) else "small",
            "cell": cell_of(x, y, w, h),
            "area": area,
            "radius": radius,
            "mask": mask,
        })
    objects.sort(key=lambda o: (o["centre"][1], o["centre"][0]))  # reading order, for stable output
    return {"background": background, "objects": objects}
