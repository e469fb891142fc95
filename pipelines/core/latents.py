"""VAE encode/decode and initial noise, in model space (VAE latents x scaling_factor)."""
from __future__ import annotations

import torch
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from .image_io import pil_to_tensor, tensor_to_pil


def latent_shape(model, width: int, height: int) -> tuple[int, int, int, int]:
    f = model.vae_factor
    return (1, model.latent_channels, height // f, width // f)


def initial_noise(model, seed: int, width: int, height: int) -> torch.Tensor:
    """x_T from a CPU generator: the same picture for the same seed on any device (as diffusers advises)."""
    gen = torch.Generator("cpu").manual_seed(int(seed))
    return randn_tensor(latent_shape(model, width, height), generator=gen, device=model.device, dtype=model.dtype)


@torch.no_grad()
def encode_image(model, image: Image.Image, scaled: bool = True) -> torch.Tensor:
    """Posterior mean (deterministic, as inversion methods use), scaled to model space; `scaled=False` gives the
    raw VAE latent (= the posterior mode), the image condition InstructPix2Pix was trained on."""
    vae = model.vae
    x = pil_to_tensor(image).to(model.device, next(vae.parameters()).dtype)
    z = vae.encode(x).latent_dist.mean
    return (z * vae.config.scaling_factor if scaled else z).to(model.dtype)


@torch.no_grad()
def decode_latents(model, z: torch.Tensor) -> torch.Tensor:
    """(N,C,h,w) model-space latents -> (N,3,H,W) float images in [-1,1]."""
    vae = model.vae
    x = vae.decode(z.to(next(vae.parameters()).dtype) / vae.config.scaling_factor).sample
    return x.float()


def decode_to_pil(model, z: torch.Tensor) -> Image.Image:
    return tensor_to_pil(decode_latents(model, z[:1])[0])
