"""Reads any image of the synthetic world (a render, or a model's output) back into world terms.

`check(image)` returns the background (kind and colour names) and the objects (shape, colour, centre, size,
grid cell, area, mask). It does not assume exact colours or hard edges: colours are matched to the nearest
named colour, and the shape is the world shape that overlaps the object best (see `_shape`).
"""
from __future__ import annotations

import functools
import math

import cv2
import numpy as np
from PIL import Image

from training.world import (
    BACKGROUND_COLOURS,
    COLOURS,
    OBJECT_COLOURS,
    SHAPES,
    SIZES,
    SceneObject,
    cell_of,
    object_coverage,
)

GRADIENT_JUMP = 60.0       # opposite borders this far apart in colour: a gradient, not one colour
TEXTURE_RESIDUAL = 12.0    # mean colour distance of border pixels from their median above this: textured
FOREGROUND = 50.0          # colour distance from the background estimate that marks an object pixel
MIN_AREA = 0.004           # components smaller than this fraction of the image are specks, not objects
# A template overlap (`shape_scores`) this high is as clean as a render: 64 px renders score 0.89-1 on their own
# shape, crude painted blobs and the model's rounded-off shapes 0.7-0.85.
CLEAN_OVERLAP = 0.85
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


@functools.cache
def _unit_area(shape: str) -> float:
    """Area of a world shape of bounding radius 1 (measured on a large render, so antialiasing is negligible)."""
    r = 40.0
    obj = SceneObject(shape, "red", "large", "centre", (50.0, 50.0), r)
    return float(object_coverage(obj, 101).sum()) / (r * r)


def shape_scores(mask: np.ndarray) -> dict[str, float]:
    """IoU of one component's mask with each world shape of the same area, centred on the mask's centroid.

    The world draws every shape upright with its centroid on its centre, so this is a template match with
    nothing left to fit. It reads what a person reads in a model's output: a square with rounded corners is
    still nearer the square than the circle of its area, and a triangle with slightly concave sides nearer
    the triangle than the star (contour thresholds called both wrong). Clean 64 px renders score 0.89-1 on their
    own shape and at most 0.84 on any other."""
    h, w = mask.shape
    ys, xs = np.nonzero(mask)
    centre, area, m = (float(xs.mean()), float(ys.mean())), float(mask.sum()), mask.astype(np.float32)
    scores = {}
    for shape in SHAPES:
        ideal = SceneObject(shape, "red", "large", "centre", centre, math.sqrt(area / _unit_area(shape)))
        cover = object_coverage(ideal, max(h, w))[:h, :w]
        scores[shape] = float(np.minimum(m, cover).sum() / np.maximum(m, cover).sum())
    return scores


def _shape(mask: np.ndarray) -> tuple[str, float]:
    """Shape name (best template match) and bounding radius of one component's mask."""
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    # Contours run through pixel centres, so the enclosing circle grows by half a pixel to hold whole pixels.
    (_, _), radius = cv2.minEnclosingCircle(max(contours, key=cv2.contourArea))
    scores = shape_scores(mask)
    return max(scores, key=scores.get), radius + 0.5


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
