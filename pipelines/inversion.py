"""Real-image DDIM inversion and reconstruction, with PSNR / SSIM / MSE against the source.

Inversion at guidance 1 followed by reconstruction at guidance 1 round-trips almost exactly; larger
reconstruction guidance (e.g. 7.5) shows the classic DDIM-inversion drift that NTI later fixes.
Inverted latents are cached per session (image hash + settings), so changing only the reconstruction
guidance does not invert again.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
from PIL import Image

from . import ddim
from .cache import LRUCache
from .events import CancelToken, Job, Progress
from .generate import ImageResult, base_metadata, validate_common
from .image_io import load_image
from .latents import decode_to_pil, encode_image
from .lora import lora_applied
from .metadata import with_metadata
from .metrics import mse, psnr, ssim
from .stream import PreviewOptions, stream_steps
from .text import encode_prompt
from .validation import check_number


@dataclass
class InversionParams:
    prompt: str = ""                 # empty: unconditional inversion
    steps: int = 50
    inversion_guidance: float = 1.0
    guidance: float = 1.0            # reconstruction guidance w
    lora: str | None = None
    lora_strength: float = 1.0


@dataclass
class InversionResult:
    source: Image.Image              # the resized input the model saw
    reconstruction: ImageResult
    x_T: torch.Tensor
    metrics: dict                    # psnr / ssim / mse vs source, and psnr vs the VAE-only round trip
    cached: bool = False


def image_key(image: Image.Image) -> str:
    return hashlib.sha1(image.tobytes() + repr(image.size).encode()).hexdigest()


def prepare_image(model, image) -> Image.Image:
    """Any upload -> RGB at the model's resolution (long side), sides multiples of the model's step."""
    return load_image(image, resolution=model.resolution, multiple=model.size_multiple)


def invert_and_reconstruct(model, image, p: InversionParams, cache: LRUCache | None = None,
                           cancel: CancelToken | None = None, preview: PreviewOptions | None = None) -> Job:
    steps, guidance, strength = validate_common(model, p.steps, p.guidance, p.lora_strength)
    inv_guidance = check_number(p.inversion_guidance, "Inversion guidance", 0, 50)
    source = prepare_image(model, image)
    prompt = (p.prompt or "").strip()
    total = 2 * steps
    yield Progress("encoding image", 0, total, preview=source)
    cond = encode_prompt(model, prompt)
    uncond = encode_prompt(model, "")
    key = (model.id, id(model.pipe), image_key(source), prompt, steps, inv_guidance, p.lora, strength)
    hit = cache.get(key) if cache is not None else None
    with lora_applied(model, p.lora, strength):
        z0 = encode_image(model, source)
        if hit is None:
            states = ddim.invert(model.unet, z0, cond, uncond, inv_guidance, steps, model.scheduler_config, cancel)
            x_T = yield from stream_steps(model, states, "inverting", 0, total, preview)
            if cache is not None:
                cache.put(key, x_T)
        else:
            x_T = hit
            yield Progress("inverting (cached)", steps, total)
        states = ddim.sample(model.unet, x_T, cond, uncond, guidance, steps, model.scheduler_config, cancel)
        z_rec = yield from stream_steps(model, states, "reconstructing", steps, total, preview)
    recon = decode_to_pil(model, z_rec)
    vae_only = decode_to_pil(model, z0)
    metrics = {
        "psnr": psnr(source, recon), "ssim": ssim(source, recon), "mse": mse(source, recon),
        "psnr_vs_vae": psnr(vae_only, recon), "vae_psnr": psnr(source, vae_only),
    }
    meta = {"prompt": prompt, "task": "invert", "steps": steps, "inversion_guidance": inv_guidance,
            "guidance": guidance, "size": f"{source.width}x{source.height}", "eta": 0.0,
            **base_metadata(model, p.lora, strength)}
    result = InversionResult(source, ImageResult(with_metadata(recon, meta), -1, meta), x_T, metrics, hit is not None)
    yield Progress("done", total, total, preview=result.reconstruction.image, result=result,
                   message=f"PSNR {metrics['psnr']:.2f} dB, SSIM {metrics['ssim']:.4f}, MSE {metrics['mse']:.5f}")
