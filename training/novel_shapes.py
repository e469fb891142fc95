"""Shapes the world never contains, drawn in its style: a test subject for personalisation (DreamBooth).

A heart is drawn like a world object (training/world.py): one of the world's colours, a bounding radius from
`world.SIZES`, its centroid in a grid cell, antialiased by the world's 4x4 supersampled coverage and blended over
a world background. `heart_scores` reads a detected object's mask the way the checker reads the world's shapes
(training/checker.py `shape_scores`: a template of the same area centred on the mask's centroid), with the heart
as a fifth template, so "is this a heart?" means "does the heart fit it better than every world shape?".
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from training import world
from training.checker import check, shape_scores

HEART = "heart"
POINTS = 96          # polygon vertices of the heart's outline


def _outline() -> np.ndarray:
    """The classic heart curve (tip down, in image coordinates), shifted so its area centroid is the origin and
    scaled so its farthest point is at distance 1."""
    t = np.linspace(0, 2 * math.pi, POINTS, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
    x1, y1 = np.roll(x, -1), np.roll(y, -1)
    cross = x * y1 - x1 * y
    area = cross.sum() / 2
    cx, cy = ((x + x1) * cross).sum() / (6 * area), ((y + y1) * cross).sum() / (6 * area)
    pts = np.stack([x - cx, y - cy], axis=1)
    return pts / np.linalg.norm(pts, axis=1).max()


_UNIT = _outline()


def _inside(points: np.ndarray, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Even-odd point-in-polygon for sample points (xs, ys)."""
    xs, ys = np.broadcast_arrays(xs, ys)
    inside = np.zeros(xs.shape, bool)
    x0, y0 = points[-1]
    for x1, y1 in points:
        if y0 != y1:
            inside ^= ((y1 > ys) != (y0 > ys)) & (xs < (x0 - x1) * (ys - y1) / (y0 - y1) + x1)
        x0, y0 = x1, y1
    return inside


def heart_coverage(centre: tuple[float, float], radius: float, size: int) -> np.ndarray:
    """(size, size) float32 in [0, 1]: the share of each pixel a heart of bounding radius `radius` covers,
    sampled on the world's 4x4 grid per pixel (pixel (i, j) spans [j - 1/2, j + 1/2] x [i - 1/2, i + 1/2])."""
    cover = np.zeros((size, size), np.float32)
    cx, cy = centre
    x0, x1 = max(0, int(math.floor(cx - radius)) - 1), min(size, int(math.ceil(cx + radius)) + 2)
    y0, y1 = max(0, int(math.floor(cy - radius)) - 1), min(size, int(math.ceil(cy + radius)) + 2)
    if x0 >= x1 or y0 >= y1:
        return cover
    k = world.SUPERSAMPLE
    offsets = (np.arange(k) + 0.5) / k - 0.5
    xs = (np.arange(x0, x1)[:, None] + offsets[None, :]).reshape(-1)
    ys = (np.arange(y0, y1)[:, None] + offsets[None, :]).reshape(-1)
    inside = _inside(_UNIT * radius + np.array([cx, cy]), xs[None, :], ys[:, None])
    cover[y0:y1, x0:x1] = inside.reshape(y1 - y0, k, x1 - x0, k).mean(axis=(1, 3))
    return cover


def _unit_area() -> float:
    r = 40.0
    return float(heart_coverage((50.0, 50.0), r, 101).sum()) / (r * r)


UNIT_AREA = _unit_area()


@dataclass(frozen=True)
class Heart:
    colour: str
    size: str            # "small" or "large" (world.SIZES)
    cell: str            # world.CELLS
    centre: tuple[float, float]
    radius: float


def place(colour: str, size_name: str, cell: str, image_size: int = 64, jitter: tuple[float, float] = (0, 0)
          ) -> Heart:
    """A heart centred in `cell` (moved by `jitter` pixels), kept inside the image border margin."""
    radius = world.SIZES[size_name] * image_size
    row, col = divmod(world.CELLS.index(cell), 3)
    lo = radius + world.BORDER_MARGIN * image_size
    hi = image_size - 1 - lo
    cx = min(max((col + 0.5) * image_size / 3 - 0.5 + jitter[0], lo), hi)
    cy = min(max((row + 0.5) * image_size / 3 - 0.5 + jitter[1], lo), hi)
    return Heart(colour, size_name, cell, (float(cx), float(cy)), float(radius))


def render(background: world.Background, heart: Heart, image_size: int = 64) -> np.ndarray:
    """(H, W, 3) uint8: the world background with the heart blended over it by its coverage (as world.render)."""
    image = world.render_background(background, image_size)
    cover = heart_coverage(heart.centre, heart.radius, image_size)
    touched = cover > 0
    c = cover[touched][:, None]
    image[touched] = np.round(image[touched] * (1 - c) + np.array(world.COLOURS[heart.colour], np.float32) * c
                              ).astype(np.uint8)
    return image


def caption(background: world.Background, heart: Heart, noun: str, seed: int = 0) -> str:
    """A world caption of a one-object scene with `noun` (e.g. "sks circle") where the shape's name goes."""
    stand_in = world.SceneObject("circle", heart.colour, heart.size, heart.cell, heart.centre, heart.radius)
    text = world.caption(world.Scene(64, background, (stand_in,)), seed)
    return text.replace(" circle", " " + noun, 1)


def heart_scores(mask: np.ndarray) -> dict[str, float]:
    """IoU of a component's mask with each world shape and with the heart, each of the mask's area and centred
    on its centroid (checker.shape_scores plus the heart)."""
    h, w = mask.shape
    ys, xs = np.nonzero(mask)
    centre, area = (float(xs.mean()), float(ys.mean())), float(mask.sum())
    scores = shape_scores(mask)
    cover = heart_coverage(centre, math.sqrt(area / UNIT_AREA), max(h, w))[:h, :w]
    m = mask.astype(np.float32)
    scores[HEART] = float(np.minimum(m, cover).sum() / np.maximum(m, cover).sum())
    return scores


def read_shape(mask: np.ndarray) -> str:
    """The best-fitting template among the world's shapes and the heart."""
    scores = heart_scores(mask)
    return max(scores, key=scores.get)


def read_objects(image: np.ndarray) -> list[dict]:
    """checker.check's objects, each with `shape5`: its best template among the world's shapes and the heart,
    and `heart_iou`."""
    found = check(image)["objects"]
    for obj in found:
        scores = heart_scores(obj["mask"])
        obj["shape5"] = max(scores, key=scores.get)
        obj["heart_iou"] = scores[HEART]
    return found


# Instance set: four large hearts, four colours, four cells, three backgrounds. Held out for evaluation: the other
# colours and cells, and other backgrounds (`held_out_hearts`).
INSTANCES = (("red", "left", ("solid", "white")), ("blue", "top right", ("solid", "black")),
             ("yellow", "centre", ("solid", "gray")), ("green", "bottom", ("solid", "white")))
HELD_OUT_COLOURS = ("orange", "purple", "pink", "cyan")
HELD_OUT_CELLS = ("top left", "top", "right", "bottom left", "bottom right")
HELD_OUT_BACKGROUNDS = ("white", "black", "gray", "blue")


def instance_set(noun: str, image_size: int = 64) -> list[tuple[np.ndarray, str]]:
    """The four instance images with their captions (noun: the identifier and class word, "sks circle")."""
    out = []
    for i, (colour, cell, (kind, bg)) in enumerate(INSTANCES):
        background = world.Background(kind, (bg,))
        heart = place(colour, "large", cell, image_size)
        out.append((render(background, heart, image_size), caption(background, heart, noun, seed=i)))
    return out


def held_out_hearts(count: int, noun: str, size_name: str = "large", image_size: int = 64
                    ) -> list[tuple[str, world.Background, Heart]]:
    """(caption, background, heart) for evaluation: held-out colours, cells and backgrounds (colours that do not
    contrast with the background are skipped, as the world does)."""
    out, i = [], 0
    while len(out) < count:
        rng = np.random.default_rng(world.HELD_OUT_SEED + 7000 + i)
        bg = world.Background("solid", (str(rng.choice(HELD_OUT_BACKGROUNDS)),))
        colours = [c for c in HELD_OUT_COLOURS if c in world.allowed_object_colours(bg)]
        heart = place(str(rng.choice(colours)), size_name, str(rng.choice(HELD_OUT_CELLS)), image_size)
        out.append((caption(bg, heart, noun, seed=int(rng.integers(1 << 30))), bg, heart))
        i += 1
    return out
