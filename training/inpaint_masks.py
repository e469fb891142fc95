"""Training masks for the embedded model's 9-channel inpainting UNet (training/train_inpaint.py), at the world's 64 px.

The mixture (docs: /work/shared/research/dreambooth_inpainting.md §1.7; SD-1.5's 25 % full masks, LaMa-style boxes
and strokes, plus masks around the world's objects):

| share | kind        | mask                                                                              |
|-------|-------------|-----------------------------------------------------------------------------------|
| 25 %  | `full`      | the whole image (plain text-to-image with the mask channel set)                   |
| 25 %  | `footprint` | around one object: its footprint dilated 2-4 px, then a blurred-and-thresholded    |
|       |             | blob, its convex hull, or its bounding circle grown 3-5 px (the shape-free form)   |
| 15 %  | `cells`     | one to three cells of the world's 3x3 grid (any union)                            |
| 20 %  | `boxes`     | 1-3 axis-aligned boxes, sides 8-40 px                                             |
| 15 %  | `strokes`   | 1-3 brush strokes of 1-4 segments, 3-12 px wide                                   |

A raw object mask would give the answer away (the model would learn to colour the mask in): every footprint mask
is strictly larger than the object and rounded off. A scene without objects draws `boxes` instead of `footprint`.
Every mask is nonempty. All draws come from the numpy generator passed in.
"""
from __future__ import annotations

import math

import cv2
import numpy as np

KINDS = ("full", "footprint", "cells", "boxes", "strokes")
SHARES = (0.25, 0.25, 0.15, 0.20, 0.15)
FOOTPRINT_FORMS = ("blob", "hull", "disc")


def _disk(radius: int) -> np.ndarray:
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))


def dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """Bool mask grown by `radius` px with a round kernel."""
    return cv2.dilate(np.asarray(mask, np.uint8), _disk(int(radius))).astype(bool)


def footprint_mask(rng: np.random.Generator, footprint: np.ndarray, centre=None, radius: float | None = None,
                   form: str | None = None) -> np.ndarray:
    """A mask around one object that keeps its shape hidden: its footprint (bool, every pixel it touches) dilated
    2-4 px, then a blob (Gaussian-blurred and thresholded below half, so corners round off and the mask grows a
    little more) or its convex hull; or (`centre`, `radius` given: the object's bounding circle) that circle grown
    3-5 px. Always contains the footprint dilated by 2 px."""
    footprint = np.asarray(footprint, bool)
    grown = dilate(footprint, int(rng.integers(2, 5)))
    forms = FOOTPRINT_FORMS if centre is not None else FOOTPRINT_FORMS[:2]
    form = form or forms[int(rng.integers(len(forms)))]
    if form == "blob":
        sigma = float(rng.uniform(1.5, 3.5))
        soft = cv2.GaussianBlur(grown.astype(np.float32), (0, 0), sigma)
        out = soft > float(rng.uniform(0.15, 0.4))
    elif form == "hull":
        points = cv2.findNonZero(grown.astype(np.uint8))
        out = np.zeros(grown.shape, np.uint8)
        cv2.fillConvexPoly(out, cv2.convexHull(points), 1)
        out = out.astype(bool)
    elif form == "disc":  # the shape-free form: the same for every shape of one size
        if centre is None or radius is None:
            raise ValueError("a disc footprint mask needs the object's centre and radius")
        # every pixel the object touches has its centre within radius + 0.71 px: the disc holds the footprint
        # grown by 2 px or more, and nothing else of the object shows (no union with the grown footprint)
        return disc_mask(grown.shape[0], centre, radius + float(rng.uniform(3, 5)))
    else:
        raise ValueError(f"unknown footprint form {form!r}")
    return out | grown


def disc_mask(size: int, centre, radius: float) -> np.ndarray:
    """Pixels whose centres lie within `radius` of `centre` ((x, y); pixel (i, j) is centred at (j, i))."""
    ys, xs = np.mgrid[0:size, 0:size]
    return (xs - centre[0]) ** 2 + (ys - centre[1]) ** 2 <= radius * radius


def object_mask_around(rng: np.random.Generator, scene, index: int, form: str | None = None) -> np.ndarray:
    """`footprint_mask` of object `index` of a world scene."""
    obj = scene.objects[index]
    return footprint_mask(rng, scene.footprint(index), obj.centre, obj.radius, form)


def cells_mask(rng: np.random.Generator, size: int = 64) -> np.ndarray:
    """One to three of the world's 3x3 grid cells (world.cell_of's thirds)."""
    count = int(rng.integers(1, 4))
    chosen = rng.choice(9, count, replace=False)
    edges = [round(size * k / 3) for k in range(4)]
    out = np.zeros((size, size), bool)
    for c in chosen:
        row, col = divmod(int(c), 3)
        out[edges[row]:edges[row + 1], edges[col]:edges[col + 1]] = True
    return out


def boxes_mask(rng: np.random.Generator, size: int = 64, low: int = 8, high: int = 40) -> np.ndarray:
    """1-3 boxes, sides uniform in [low, high] px, anywhere inside the image."""
    out = np.zeros((size, size), bool)
    for _ in range(int(rng.integers(1, 4))):
        h, w = (int(rng.integers(low, high + 1)) for _ in range(2))
        y, x = int(rng.integers(0, size - h + 1)), int(rng.integers(0, size - w + 1))
        out[y:y + h, x:x + w] = True
    return out


def strokes_mask(rng: np.random.Generator, size: int = 64, low: int = 3, high: int = 12) -> np.ndarray:
    """1-3 brush strokes (LaMa's kind, scaled to 64 px): each 1-4 straight segments of 8-40 px with round joins,
    one width in [low, high] px per stroke."""
    out = np.zeros((size, size), np.uint8)
    for _ in range(int(rng.integers(1, 4))):
        width = int(rng.integers(low, high + 1))
        x, y = float(rng.uniform(0, size)), float(rng.uniform(0, size))
        angle = float(rng.uniform(0, 2 * math.pi))
        for _ in range(int(rng.integers(1, 5))):
            angle += float(rng.uniform(-math.pi / 2, math.pi / 2))
            length = float(rng.uniform(8, 40))
            nx = float(np.clip(x + length * math.cos(angle), 0, size - 1))
            ny = float(np.clip(y + length * math.sin(angle), 0, size - 1))
            cv2.line(out, (round(x), round(y)), (round(nx), round(ny)), 1, width)
            cv2.circle(out, (round(nx), round(ny)), width // 2, 1, -1)
            x, y = nx, ny
        cv2.circle(out, (round(x), round(y)), width // 2, 1, -1)
    return out.astype(bool)


def sample_mask(rng: np.random.Generator, scene, kind: str | None = None) -> tuple[np.ndarray, str, int | None]:
    """A mask for a world scene from the mixture: (bool (H, W) mask, its kind, the object index a footprint mask
    is around or None). `kind` forces one kind; a footprint mask on a scene without objects becomes boxes."""
    size = scene.size
    kind = kind or KINDS[int(rng.choice(len(KINDS), p=SHARES))]
    if kind == "footprint" and not scene.objects:
        kind = "boxes"
    index = None
    if kind == "full":
        mask = np.ones((size, size), bool)
    elif kind == "footprint":
        index = int(rng.integers(len(scene.objects)))
        mask = object_mask_around(rng, scene, index)
    elif kind == "cells":
        mask = cells_mask(rng, size)
    elif kind == "boxes":
        mask = boxes_mask(rng, size)
    elif kind == "strokes":
        mask = strokes_mask(rng, size)
    else:
        raise ValueError(f"unknown mask kind {kind!r} (kinds: {', '.join(KINDS)})")
    return mask, kind, index
