"""A synthetic world of flat shapes on simple backgrounds, with its ground truth known exactly.

The project's own model is trained on images from here, so every editing method can be checked by a program
(`training.checker` reads any image of this world back into the same terms).

Design, and why:
- Objects are antialiased (4x4 supersampled coverage, blended over the background): hard stair-step edges
  cost an autoencoder with a 4x smaller latent several dB, and real renders look like this too. The
  ground-truth mask is coverage >= 1/2; the footprint (coverage > 0) is every pixel an object touches, so
  edits stay pixel-identical outside the edited object's old and new footprints.
- Every object fits in a circle of its bounding `radius` around its `centre`; objects of one size share a
  radius whatever their shape, so a shape edit never grows past that circle, and objects are placed so their
  circles keep a gap: two objects never overlap, not even after a shape edit.
- Centres stay a margin away from the 3x3 grid lines and objects a margin away from the image border, so the
  grid cell is unambiguous and the border always shows pure background.
- Object colours are only used where they contrast strongly with every background pixel they could touch.
- Splits: seeds below HELD_OUT_SEED are for training; seeds from HELD_OUT_SEED up are held out (evaluation
  only). `is_held_out_prompt` also holds out about one caption in ten by its text, and the training split of
  `dataset` never yields such a caption, so evaluation can use prompts the model has never seen.
"""
from __future__ import annotations

import math
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import NamedTuple

import numpy as np

# One palette for objects and backgrounds, so "red" means the same RGB everywhere.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 25, 25),
    "orange": (255, 140, 0),
    "yellow": (250, 220, 20),
    "green": (30, 170, 50),
    "cyan": (0, 210, 230),
    "blue": (30, 60, 220),
    "purple": (130, 40, 170),
    "pink": (255, 120, 190),
    "white": (255, 255, 255),
    "black": (0, 0, 0),
    "gray": (128, 128, 128),
}
BACKGROUND_COLOURS = ("white", "black", "gray", "red", "green", "blue", "yellow", "purple")
OBJECT_COLOURS = ("red", "orange", "yellow", "green", "cyan", "blue", "purple", "pink", "white", "black")
GRADIENT_PAIRS = (("blue", "white"), ("black", "white"), ("red", "yellow"), ("green", "blue"),
                  ("purple", "black"), ("white", "gray"), ("yellow", "green"), ("blue", "purple"))
BACKGROUND_KINDS = ("solid", "gradient", "textured")
TEXTURE_PATTERNS = ("stripes", "checks")
TEXTURE_AMPLITUDE = 16          # +- levels around the base colour: visible, yet far below object contrast
MIN_CONTRAST = 100.0            # RGB distance between an object and any background pixel it may sit on

SHAPES = ("circle", "square", "triangle", "star")
# Bounding radius as a fraction of the image side. Small is as small as a star can be and still keep its
# notches (so the checker can tell it from a triangle) through mild noise and a 3x3 blur at 64 px; large is
# 1.5x that, enough for the sizes to stay apart after blur, and still fits a corner cell.
SIZES = {"small": 0.14, "large": 0.21}
STAR_INNER = 0.5                # inner/outer radius of the 5-point star: of 0.42-0.6, its notches survive blur best
CELLS = ("top left", "top", "top right", "left", "centre", "right", "bottom left", "bottom", "bottom right")
CELL_MARGIN = 0.04              # centres keep this far (fraction of the side) from the grid lines
BORDER_MARGIN = 0.05            # objects keep this far from the image border
OBJECT_GAP = 0.05               # and this far from each other (between bounding circles)

HELD_OUT_SEED = 1_000_000


def split_of(seed: int) -> str:
    """'train' for seeds below HELD_OUT_SEED, else 'held_out' (never used for training)."""
    return "train" if seed < HELD_OUT_SEED else "held_out"


def is_held_out_prompt(text: str) -> bool:
    """About one caption in ten is reserved for evaluation, decided by a stable hash of its text."""
    return zlib.crc32(text.strip().lower().encode()) % 10 == 0


def _rng(rng_or_seed) -> np.random.Generator:
    if isinstance(rng_or_seed, np.random.Generator):
        return rng_or_seed
    return np.random.default_rng(int(rng_or_seed))


def _pick(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


# --------------------------------------------------------------------------------------------- the scene


@dataclass(frozen=True)
class Background:
    kind: str                    # "solid", "gradient" or "textured"
    colours: tuple[str, ...]     # one name; a gradient has (start, end)
    direction: str = ""          # gradient only: "horizontal" (start on the left) or "vertical" (start on top)
    pattern: str = ""            # textured only: "stripes" or "checks"

    @property
    def rgbs(self) -> list[tuple[int, int, int]]:
        return [COLOURS[c] for c in self.colours]


@dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    size: str
    cell: str
    centre: tuple[float, float]  # (x, y) in pixels; pixel (row i, column j) has its centre at (j, i)
    radius: float                # bounding radius: the whole shape lies within it

    @property
    def rgb(self) -> tuple[int, int, int]:
        return COLOURS[self.colour]


@dataclass(frozen=True)
class Scene:
    size: int
    background: Background
    objects: tuple[SceneObject, ...] = ()

    def mask(self, index: int) -> np.ndarray:
        """Boolean (H, W) mask of one object: the pixels it covers at least half."""
        return object_mask(self.objects[index], self.size)

    def footprint(self, index: int) -> np.ndarray:
        """Boolean (H, W): every pixel object `index` touches at all (its antialiased rim included)."""
        return object_coverage(self.objects[index], self.size) > 0

    def masks(self) -> list[np.ndarray]:
        return [self.mask(i) for i in range(len(self.objects))]

    def to_dict(self) -> dict:
        bg = self.background
        return {
            "size": self.size,
            "background": {"kind": bg.kind, "colours": list(bg.colours), "rgbs": [list(c) for c in bg.rgbs],
                           "direction": bg.direction, "pattern": bg.pattern},
            "objects": [{"shape": o.shape, "colour": o.colour, "rgb": list(o.rgb), "size": o.size, "cell": o.cell,
                         "centre": [round(o.centre[0], 3), round(o.centre[1], 3)], "radius": round(o.radius, 3)}
                        for o in self.objects],
        }


# --------------------------------------------------------------------------------------------- geometry


SUPERSAMPLE = 4                 # coverage is measured on a 4x4 grid of points per pixel


def _polygon_inside(points: np.ndarray, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Which sample points (xs, ys) lie inside a polygon (even-odd rule), computed exactly."""
    xs, ys = np.broadcast_arrays(xs, ys)
    inside = np.zeros(xs.shape, bool)
    x0, y0 = points[-1]
    for x1, y1 in points:
        if y0 != y1:  # horizontal edges never cross a horizontal ray
            inside ^= ((y1 > ys) != (y0 > ys)) & (xs < (x0 - x1) * (ys - y1) / (y0 - y1) + x1)
        x0, y0 = x1, y1
    return inside


def _regular_points(cx: float, cy: float, radii: list[float], count: int) -> np.ndarray:
    """Points around (cx, cy) starting straight up (image y grows downwards), cycling through `radii`."""
    angles = -math.pi / 2 + 2 * math.pi * np.arange(count) / count
    r = np.array([radii[i % len(radii)] for i in range(count)])
    return np.stack([cx + r * np.cos(angles), cy + r * np.sin(angles)], axis=1)


def _inside(obj: SceneObject, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    cx, cy = obj.centre
    r = obj.radius
    if obj.shape == "circle":
        return (xs - cx) ** 2 + (ys - cy) ** 2 <= r * r
    if obj.shape == "square":  # axis-aligned, corners on the bounding circle
        a = r / math.sqrt(2)
        return _polygon_inside(np.array([[cx - a, cy - a], [cx + a, cy - a], [cx + a, cy + a], [cx - a, cy + a]]),
                               xs, ys)
    if obj.shape == "triangle":  # equilateral, pointing up
        return _polygon_inside(_regular_points(cx, cy, [r], 3), xs, ys)
    if obj.shape == "star":  # five points, pointing up
        return _polygon_inside(_regular_points(cx, cy, [r, r * STAR_INNER], 10), xs, ys)
    raise ValueError(f"unknown shape {obj.shape!r}")


def object_coverage(obj: SceneObject, size: int) -> np.ndarray:
    """(H, W) float32 in [0, 1]: the share of each pixel the object covers (pixel (i, j) spans
    [j - 1/2, j + 1/2] x [i - 1/2, i + 1/2]). Only the bounding box is sampled, which keeps it cheap."""
    cover = np.zeros((size, size), np.float32)
    cx, cy = obj.centre
    x0, x1 = max(0, int(math.floor(cx - obj.radius)) - 1), min(size, int(math.ceil(cx + obj.radius)) + 2)
    y0, y1 = max(0, int(math.floor(cy - obj.radius)) - 1), min(size, int(math.ceil(cy + obj.radius)) + 2)
    if x0 >= x1 or y0 >= y1:
        return cover
    offsets = (np.arange(SUPERSAMPLE) + 0.5) / SUPERSAMPLE - 0.5
    xs = (np.arange(x0, x1)[:, None] + offsets[None, :]).reshape(-1)
    ys = (np.arange(y0, y1)[:, None] + offsets[None, :]).reshape(-1)
    inside = _inside(obj, xs[None, :], ys[:, None])
    cover[y0:y1, x0:x1] = inside.reshape(y1 - y0, SUPERSAMPLE, x1 - x0, SUPERSAMPLE).mean(axis=(1, 3))
    return cover


def object_mask(obj: SceneObject, size: int) -> np.ndarray:
    """The ground-truth mask: pixels the object covers at least half."""
    return object_coverage(obj, size) >= 0.5


def cell_of(x: float, y: float, width: int, height: int | None = None) -> str:
    """Grid cell name of a point, by thirds of the image (shared with the checker)."""
    col = min(2, max(0, int(3 * x / width)))
    row = min(2, max(0, int(3 * y / (height or width))))
    return CELLS[3 * row + col]


def _centre_range(index: int, radius: float, size: int) -> tuple[float, float]:
    """Where a centre may lie along one axis for grid index 0..2: inside its third, off the lines and border."""
    third = size / 3
    lo = max(index * third + CELL_MARGIN * size, radius + BORDER_MARGIN * size)
    hi = min((index + 1) * third - CELL_MARGIN * size, size - 1 - radius - BORDER_MARGIN * size)
    return lo, hi


def _fits(candidate: SceneObject, others, size: int) -> bool:
    gap = OBJECT_GAP * size
    for o in others:
        if o.cell == candidate.cell:
            return False
        if math.dist(o.centre, candidate.centre) < o.radius + candidate.radius + gap:
            return False
    return True


def _place(rng: np.random.Generator, shape: str, colour: str, size_name: str, others, size: int
           ) -> SceneObject | None:
    """An object at a random spot of a free cell, clear of `others`; None if no spot was found."""
    radius = SIZES[size_name] * size
    free = [c for c in CELLS if c not in {o.cell for o in others}]
    for _ in range(100):
        name = _pick(rng, free)
        row, col = divmod(CELLS.index(name), 3)
        x = rng.uniform(*_centre_range(col, radius, size))
        y = rng.uniform(*_centre_range(row, radius, size))
        obj = SceneObject(shape, colour, size_name, name, (float(x), float(y)), float(radius))
        if _fits(obj, others, size):
            return obj
    return None


# --------------------------------------------------------------------------------------------- colours


def _segment_distance(p, a, b) -> float:
    """RGB distance from colour p to the segment a..b (every colour a linear gradient takes)."""
    p, a, b = (np.asarray(v, np.float64) for v in (p, a, b))
    ab = b - a
    t = 0.0 if not ab.any() else float(np.clip(np.dot(p - a, ab) / np.dot(ab, ab), 0, 1))
    return float(np.linalg.norm(p - (a + t * ab)))


def _texture_levels(rgb) -> list[np.ndarray]:
    """The two colours of a textured background: base +- amplitude, centred so neither clips."""
    centre = np.clip(np.asarray(rgb, np.float64), TEXTURE_AMPLITUDE, 255 - TEXTURE_AMPLITUDE)
    return [centre - TEXTURE_AMPLITUDE, centre + TEXTURE_AMPLITUDE]


def allowed_object_colours(background: Background) -> list[str]:
    """Object colours that contrast with every background pixel (a gradient's whole range, a texture's levels)."""
    if background.kind == "gradient":
        a, b = background.rgbs
        return [c for c in OBJECT_COLOURS if _segment_distance(COLOURS[c], a, b) >= MIN_CONTRAST]
    if background.kind == "textured":
        levels = _texture_levels(background.rgbs[0])
        return [c for c in OBJECT_COLOURS
                if min(np.linalg.norm(np.asarray(COLOURS[c]) - lv) for lv in levels) >= MIN_CONTRAST]
    return [c for c in OBJECT_COLOURS if math.dist(COLOURS[c], background.rgbs[0]) >= MIN_CONTRAST]


# --------------------------------------------------------------------------------------------- sampling


def _sample_background(rng: np.random.Generator, kind: str | None = None) -> Background:
    kind = kind or _pick(rng, ("solid",) * 3 + ("gradient", "textured"))
    if kind == "solid":
        return Background("solid", (_pick(rng, BACKGROUND_COLOURS),))
    if kind == "gradient":
        pair = _pick(rng, GRADIENT_PAIRS)
        if rng.random() < 0.5:
            pair = pair[::-1]
        return Background("gradient", tuple(pair), direction=_pick(rng, ("horizontal", "vertical")))
    if kind == "textured":
        return Background("textured", (_pick(rng, BACKGROUND_COLOURS),), pattern=_pick(rng, TEXTURE_PATTERNS))
    raise ValueError(f"unknown background kind {kind!r}")


def sample_scene(rng_or_seed, size: int = 64, n_objects: int | None = None,
                 background_kind: str | None = None) -> Scene:
    """A random scene: a background and 0-2 objects (n_objects=None: 10% empty, 50% one, 40% two)."""
    rng = _rng(rng_or_seed)
    background = _sample_background(rng, background_kind)
    if n_objects is None:
        n_objects = int(rng.choice(3, p=[0.1, 0.5, 0.4]))
    if not 0 <= n_objects <= 2:
        raise ValueError("n_objects must be 0, 1 or 2")
    colours = allowed_object_colours(background)
    while True:  # a large object near the middle can leave no room for a second one: then lay out afresh
        objects: list[SceneObject] = []
        for _ in range(n_objects):
            obj = _place(rng, _pick(rng, SHAPES), _pick(rng, colours), _pick(rng, tuple(SIZES)), objects, size)
            if obj is None:
                break
            objects.append(obj)
        if len(objects) == n_objects:
            return Scene(size, background, tuple(objects))


# --------------------------------------------------------------------------------------------- rendering


def render_background(background: Background, size: int) -> np.ndarray:
    if background.kind == "solid":
        return np.broadcast_to(np.array(background.rgbs[0], np.uint8), (size, size, 3)).copy()
    if background.kind == "gradient":
        t = np.linspace(0.0, 1.0, size)[:, None]
        a, b = (np.array(c, np.float64) for c in background.rgbs)
        line = np.round((1 - t) * a + t * b).astype(np.uint8)           # (size, 3)
        if background.direction == "horizontal":
            return np.broadcast_to(line[None, :, :], (size, size, 3)).copy()
        return np.broadcast_to(line[:, None, :], (size, size, 3)).copy()
    if background.kind == "textured":
        period = max(2, size // 16)  # the same texture scale at every image size
        ys, xs = np.mgrid[0:size, 0:size] // period
        high = (xs % 2 == 0) if background.pattern == "stripes" else ((xs + ys) % 2 == 0)
        low, hi = (np.round(lv).astype(np.uint8) for lv in _texture_levels(background.rgbs[0]))
        return np.where(high[..., None], hi, low)
    raise ValueError(f"unknown background kind {background.kind!r}")


def render(scene: Scene) -> np.ndarray:
    """(H, W, 3) uint8 RGB: the background, then each object blended over it by its coverage. Objects never
    overlap, so the order does not matter and pixels no object touches stay exactly background."""
    image = render_background(scene.background, scene.size)
    for obj in scene.objects:
        cover = object_coverage(obj, scene.size)
        touched = cover > 0
        c = cover[touched][:, None]
        image[touched] = np.round(image[touched] * (1 - c) + np.array(obj.rgb, np.float32) * c).astype(np.uint8)
    return image


# --------------------------------------------------------------------------------------------- captions

_WHERE = {
    "top left": ("in the top left", "in the top left corner", "at the top left"),
    "top": ("at the top", "at the top centre"),
    "top right": ("in the top right", "in the top right corner", "at the top right"),
    "left": ("on the left", "on the left side"),
    "centre": ("in the centre", "in the middle"),
    "right": ("on the right", "on the right side"),
    "bottom left": ("in the bottom left", "in the bottom left corner", "at the bottom left"),
    "bottom": ("at the bottom", "at the bottom centre"),
    "bottom right": ("in the bottom right", "in the bottom right corner", "at the bottom right"),
}


def _a(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _where(cell: str, rng: np.random.Generator) -> str:
    return _pick(rng, _WHERE[cell])


def _background_phrase(bg: Background, rng: np.random.Generator) -> str:
    """A noun phrase without its article, e.g. 'white background', 'textured green background'."""
    if bg.kind == "solid":
        return f"{bg.colours[0]} background"
    if bg.kind == "textured":
        return _pick(rng, (f"textured {bg.colours[0]} background", f"{bg.colours[0]} textured background"))
    a, b = bg.colours
    sides = ("on the left", "on the right") if bg.direction == "horizontal" else ("at the top", "at the bottom")
    return _pick(rng, (f"gradient background from {a} to {b}", f"{a} to {b} gradient background",
                       f"gradient background from {a} {sides[0]} to {b} {sides[1]}"))


def _object_phrase(obj: SceneObject, with_size: bool) -> str:
    return _a(f"{obj.size} {obj.colour} {obj.shape}" if with_size else f"{obj.colour} {obj.shape}")


def caption(scene: Scene, rng_or_seed) -> str:
    """A natural caption, one of several templates, always true of the scene (it may leave details out)."""
    rng = _rng(rng_or_seed)
    bg = _background_phrase(scene.background, rng)
    objs = scene.objects
    if not objs:
        return _pick(rng, (f"a plain {bg}", f"an empty {bg}", f"just {_a(bg)}", _a(bg)))
    if len(objs) == 1:
        o = objs[0]
        thing, where = _object_phrase(o, with_size=rng.random() < 0.9), _where(o.cell, rng)
        return _pick(rng, (f"{thing} {where} on {_a(bg)}", f"{thing} {where}, {bg}",
                           f"{_a(bg)} with {thing} {where}"))
    with_size, with_where = rng.random() < 0.5, rng.random() < 0.5
    if (objs[0].colour, objs[0].shape) == (objs[1].colour, objs[1].shape):
        with_where = True  # not "a red circle and a red circle"
    parts = [_object_phrase(o, with_size) + (f" {_where(o.cell, rng)}" if with_where else "") for o in objs]
    things = f"{parts[0]} and {parts[1]}"
    return _pick(rng, (f"{things} on {_a(bg)}", f"{things}, {bg}", f"{_a(bg)} with {things}"))


def captioned_scenes(seed: int, count: int, size: int = 64, split: str | None = None
                     ) -> Iterator[tuple[str, Scene]]:
    """(caption, scene) for seeds seed, seed+1, ...: `dataset`'s items without rendering them (for callers that
    need only the ground truth). Each item depends only on its own seed.

    The split is that of `seed` unless given; the range may not cross HELD_OUT_SEED. In the training split,
    items whose caption is a held-out prompt are skipped (the next seed is used), so exactly `count` come out.
    """
    split = split or split_of(seed)
    if split not in ("train", "held_out"):
        raise ValueError(f"unknown split {split!r}")
    s, produced = seed, 0
    while produced < count:
        if split_of(s) != split:
            raise ValueError(f"seed {s} is not in the {split} split (held out from {HELD_OUT_SEED})")
        rng = np.random.default_rng(s)
        scene = sample_scene(rng, size)
        text = caption(scene, rng)
        s += 1
        if split == "train" and is_held_out_prompt(text):
            continue
        produced += 1
        yield text, scene


def dataset(seed: int, count: int, size: int = 64, split: str | None = None
            ) -> Iterator[tuple[np.ndarray, str, Scene]]:
    """(image, caption, scene): `captioned_scenes` with each scene rendered."""
    for text, scene in captioned_scenes(seed, count, size, split):
        yield render(scene), text, scene


# --------------------------------------------------------------------------------------------- edits

EDIT_KINDS = ("recolour", "reshape", "background", "add", "remove")


class Edit(NamedTuple):
    instruction: str
    scene: Scene           # the edited scene
    kind: str              # one of EDIT_KINDS
    index: int | None      # edited object: in the edited scene for "add", in the input scene for the others;
                           # None for "background"


def _refer(scene: Scene, i: int, rng: np.random.Generator) -> str:
    """An unambiguous way to name object i, e.g. 'the circle', 'the red square', 'the red square on the left'."""
    o = scene.objects[i]
    others = [p for j, p in enumerate(scene.objects) if j != i]
    options = []
    if all(p.shape != o.shape for p in others):
        options.append(f"the {o.shape}")
    if all((p.shape, p.colour) != (o.shape, o.colour) for p in others):
        options.append(f"the {o.colour} {o.shape}")
    if all((p.shape, p.colour, p.size) != (o.shape, o.colour, o.size) for p in others):
        options.append(f"the {o.size} {o.colour} {o.shape}")
    options.append(f"the {o.colour} {o.shape} {_where(o.cell, rng)}")  # cells differ, so this is always unique
    return _pick(rng, options)


def _replace_object(scene: Scene, i: int, obj: SceneObject) -> Scene:
    return replace(scene, objects=scene.objects[:i] + (obj,) + scene.objects[i + 1:])


def _object_to_add(scene: Scene, rng: np.random.Generator) -> SceneObject | None:
    """A new object that fits beside the present ones, or None (scenes hold at most two objects, and a
    large object near the middle may leave no room)."""
    if len(scene.objects) >= 2:
        return None
    colours = allowed_object_colours(scene.background)
    for _ in range(20):
        obj = _place(rng, _pick(rng, SHAPES), _pick(rng, colours), _pick(rng, tuple(SIZES)),
                     scene.objects, scene.size)
        if obj is not None:
            return obj
    return None


def background_options(scene: Scene) -> list[str]:
    """Solid colours the background can turn into: new ones, contrasting with every object."""
    return [c for c in BACKGROUND_COLOURS if c not in scene.background.colours  # a real change of colour
            and all(o.colour in allowed_object_colours(Background("solid", (c,))) for o in scene.objects)]


def make_edit(scene: Scene, rng_or_seed, kind: str | None = None) -> Edit:
    """A paired edit for InstructPix2Pix-style training. Rendering the edited scene changes only the edited
    object's old and new footprints (for a background edit: only the pixels no object fully covers)."""
    rng = _rng(rng_or_seed)
    added = _object_to_add(scene, rng)
    possible = [k for k, ok in (("recolour", scene.objects), ("reshape", scene.objects),
                                ("background", background_options(scene)), ("add", added),
                                ("remove", scene.objects)) if ok]
    kind = kind or _pick(rng, possible)
    if kind not in possible:
        raise ValueError(f"a {kind!r} edit is not possible on this scene (possible: {possible})")

    if kind == "background":
        colour = _pick(rng, background_options(scene))
        edited = replace(scene, background=Background("solid", (colour,)))
        text = _pick(rng, (f"make the background {colour}", f"change the background to {colour}",
                           f"turn the background {colour}", f"give it {_a(colour)} background"))
        return Edit(text, edited, kind, None)

    if kind == "add":
        edited = replace(scene, objects=scene.objects + (added,))
        thing, where = _a(f"{added.size} {added.colour} {added.shape}"), _where(added.cell, rng)
        text = _pick(rng, (f"add {thing} {where}", f"put {thing} {where}", f"draw {thing} {where}"))
        return Edit(text, edited, kind, len(edited.objects) - 1)

    i = int(rng.integers(len(scene.objects)))
    o, ref = scene.objects[i], _refer(scene, i, rng)
    if kind == "remove":
        edited = replace(scene, objects=scene.objects[:i] + scene.objects[i + 1:])
        text = _pick(rng, (f"remove {ref}", f"delete {ref}", f"take away {ref}", f"get rid of {ref}"))
        return Edit(text, edited, kind, i)
    if kind == "recolour":
        colour = _pick(rng, [c for c in allowed_object_colours(scene.background) if c != o.colour])
        edited = _replace_object(scene, i, replace(o, colour=colour))
        text = _pick(rng, (f"make {ref} {colour}", f"turn {ref} {colour}", f"change the colour of {ref} to {colour}",
                           f"paint {ref} {colour}"))
        return Edit(text, edited, kind, i)
    if kind == "reshape":
        shape = _pick(rng, [s for s in SHAPES if s != o.shape])
        edited = _replace_object(scene, i, replace(o, shape=shape))
        text = _pick(rng, (f"turn {ref} into {_a(shape)}", f"change {ref} into {_a(shape)}",
                           f"make {ref} {_a(shape)}", f"replace {ref} with {_a(f'{o.colour} {shape}')}"))
        return Edit(text, edited, kind, i)
    raise ValueError(f"unknown edit kind {kind!r}")
