"""Training images for the autoencoder: the synthetic world (train split only) and crops of a few
public-domain / CC0 colour photos that ship inside scikit-image's wheel (no download needed).

Everything comes out as float tensors (B, 3, H, W) in [-1, 1]. Randomness only comes from the
`np.random.Generator` passed in, so a seeded trainer draws the same batches again.

Photo hold-out: the right quarter of every photo (x >= PHOTO_TRAIN_FRACTION * width) is reserved for
evaluation (`photo_eval_set`); training crops are boxes chosen inside the left part only, so no training
pixel ever comes from the evaluation strip.
"""
from __future__ import annotations

from functools import cache

import numpy as np
import torch
from PIL import Image

from training import world

# name -> (source, licence), as stated in skimage.data's docstrings (scikit-image 0.26.0).
# Only colour photographs whose licence is public domain or CC0 are used.
PHOTOS: dict[str, tuple[str, str]] = {
    "astronaut": ("Eileen Collins, NASA Great Images database (https://flic.kr/p/r9qvLn)",
                  "public domain (no known copyright restrictions)"),
    "coffee": ("coffee cup, courtesy of Pikolo Espresso Bar, photo by Rachel Michetti", "CC0"),
    "chelsea": ("Chelsea the cat, photo by Stefan van der Walt", "CC0"),
    "rocket": ("DSCOVR launch on Falcon 9, SpaceX Photos on Flickr "
               "(https://www.flickr.com/photos/spacexphotos/16511594820/)", "public domain (released by SpaceX)"),
    "hubble_deep_field": ("Hubble eXtreme Deep Field, NASA / HubbleSite 2012 release 37",
                          "public domain (NASA media guidelines)"),
    "retina": ("fundus photograph of a normal left eye, Mikael Haggstrom, Wikimedia Commons",
               "CC0 1.0 Universal"),
}
PHOTO_TRAIN_FRACTION = 0.75       # left 75% of each photo trains; the right 25% strip is evaluation only
CROP = 64
SHORT_SIDE_RANGE = (64, 256)      # a crop shows the photo as if resized to this short side
WORLD_SEED_LIMIT = world.HELD_OUT_SEED - 1000  # margin: dataset() may skip a few seeds past the one drawn


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) float in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


# --------------------------------------------------------------------------------------------- world


def world_seeds(rng: np.random.Generator, batch: int) -> np.ndarray:
    """Seeds for one world batch: always in the train split."""
    return rng.integers(0, WORLD_SEED_LIMIT, size=batch)


def world_images(seeds, size: int = 64) -> np.ndarray:
    # split="train" makes dataset() raise rather than ever yield a held-out seed.
    return np.stack([next(world.dataset(int(s), 1, size, split="train"))[0] for s in seeds])


def world_batch(rng: np.random.Generator, batch: int, size: int = 64) -> torch.Tensor:
    return to_tensor(world_images(world_seeds(rng, batch), size))


def world_eval_set(count: int = 256, size: int = 64) -> torch.Tensor:
    """The first `count` held-out world images (seeds from HELD_OUT_SEED up), never trained on."""
    return to_tensor(np.stack([im for im, _, _ in world.dataset(world.HELD_OUT_SEED, count, size)]))


# --------------------------------------------------------------------------------------------- photos


@cache
def photo(name: str) -> Image.Image:
    import skimage.data

    if name not in PHOTOS:
        raise KeyError(f"{name!r} is not a licensed photo here")
    return Image.fromarray(getattr(skimage.data, name)()).convert("RGB")


def train_region(name: str) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) of the part of a photo that training crops may use."""
    w, h = photo(name).size
    return 0, 0, int(w * PHOTO_TRAIN_FRACTION), h


def eval_region(name: str) -> tuple[int, int, int, int]:
    w, h = photo(name).size
    return int(w * PHOTO_TRAIN_FRACTION), 0, w, h


def photo_crop_box(rng: np.random.Generator, name: str) -> tuple[int, int, int, int]:
    """A random square box inside the training region; resized to CROP px it shows the photo as if its
    short side were 64-256 px (never upscaled: a box is at least CROP source pixels wide)."""
    x0, y0, x1, y1 = train_region(name)
    w, h = photo(name).size
    target = rng.uniform(*SHORT_SIDE_RANGE)
    side = int(round(CROP * min(w, h) / target))
    side = max(CROP, min(side, x1 - x0, y1 - y0))
    left = int(rng.integers(x0, x1 - side + 1))
    top = int(rng.integers(y0, y1 - side + 1))
    return left, top, left + side, top + side


def _crop(name: str, box) -> np.ndarray:
    return np.asarray(photo(name).resize((CROP, CROP), Image.Resampling.BOX if box[2] - box[0] > CROP
                                         else Image.Resampling.BILINEAR, box=box))


def photo_batch(rng: np.random.Generator, batch: int, size: int = 64) -> torch.Tensor:
    if size != CROP:
        raise ValueError(f"photo crops are {CROP} px")
    names = list(PHOTOS)
    out = []
    for _ in range(batch):
        name = names[int(rng.integers(len(names)))]
        im = _crop(name, photo_crop_box(rng, name))
        if rng.random() < 0.5:
            im = im[:, ::-1]
        if rng.random() < 0.5:
            im = im[::-1]
        out.append(im)
    return to_tensor(np.stack(out))


def photo_eval_boxes(name: str) -> list[tuple[int, int, int, int]]:
    """Fixed boxes tiling the evaluation strip at two scales (full strip width and half of it)."""
    x0, y0, x1, y1 = eval_region(name)
    boxes = []
    for side in (x1 - x0, (x1 - x0) // 2):
        for top in range(y0, y1 - side + 1, side):
            for left in range(x0, x1 - side + 1, side):
                boxes.append((left, top, left + side, top + side))
    return boxes


@cache
def _photo_eval_array() -> np.ndarray:
    return np.stack([_crop(name, box) for name in PHOTOS for box in photo_eval_boxes(name)])


def photo_eval_set() -> torch.Tensor:
    """64 px tiles of the held-out strips of every photo (never seen in training)."""
    return to_tensor(_photo_eval_array())


# --------------------------------------------------------------------------------------------- mixed


def mixed_batch(rng: np.random.Generator, batch: int, photo_fraction: float = 0.25, size: int = 64
                ) -> torch.Tensor:
    """World images plus a fixed share of photo crops (the VAE must also pass ordinary images)."""
    n_photo = int(round(batch * photo_fraction))
    parts = [world_batch(rng, batch - n_photo, size)]
    if n_photo:
        parts.append(photo_batch(rng, n_photo, size))
    return torch.cat(parts)
