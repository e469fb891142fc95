"""What every image job returns: the image (its parameters embedded as PNG metadata), the seed used and the
parameters, whose model / LoRA / sampler fields are the same for every task (`base_metadata`)."""
from __future__ import annotations

from dataclasses import dataclass

from PIL import Image


@dataclass
class ImageResult:
    image: Image.Image   # carries its parameters as PNG metadata
    seed: int
    params: dict


def base_metadata(model, lora, strength) -> dict:
    return {"model": model.id, "lora": lora or "none", "lora_strength": strength if lora else 0.0,
            "sampler": "DDIM (eta 0)"}
