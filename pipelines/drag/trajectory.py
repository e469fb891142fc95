"""Latent trajectories of images generated in the studio, so that dragging one skips inversion and LoRA (the
reference's "Editing Generated Image" tab keeps every intermediate latent for the same reason).

`generate(..., trajectories=cache)` records (ddim.recorded) x_T and the latent after every DDIM step, with the
embeddings and guidance, under the output image's content hash; `drag(..., cache=cache)` finds it for the same pixels.
The trajectories share one slot of the caller's cache (their own small LRU), so a burst of generations cannot
evict the trained LoRAs and inversions that live in the same cache.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image

from ..core.cache import LRUCache
from ..inversion import image_key

SLOT = ("drag", "trajectories")
KEEP = 8                      # trajectories kept per cache (each a few MB at most: steps+1 latents)


@dataclass
class Trajectory:
    latents: list[torch.Tensor]   # x_T, then the latent after each step: latents[k] is x at timesteps[k]
    cond: torch.Tensor
    uncond: torch.Tensor
    guidance: float
    steps: int
    prompt: str
    lora: str | None = None
    lora_strength: float = 0.0


def _key(model, image: Image.Image) -> tuple:
    return (model.id, id(model.pipe), image_key(image.convert("RGB")))


def store_trajectory(cache: LRUCache, model, image: Image.Image, trajectory: Trajectory) -> None:
    slot = cache.get(SLOT)
    if slot is None:
        slot = LRUCache(KEEP)
        cache.put(SLOT, slot)
    slot.put(_key(model, image), trajectory)


def find_trajectory(cache: LRUCache | None, model, image: Image.Image) -> Trajectory | None:
    slot = None if cache is None else cache.get(SLOT)
    return None if slot is None else slot.get(_key(model, image))
