"""InstructPix2Pix noise prediction: the UNet sees [noisy latent, input-image latent] (8 channels) and the
instruction; two guidance scales pull towards the instruction (sT) and towards the input image (sI).

    eps = eps(none) + sI * (eps(image) - eps(none)) + sT * (eps(image + text) - eps(image))

"none" drops both conditions (empty prompt, zero image latent), as the model saw in training. The input
latent is the VAE posterior mode WITHOUT the scaling factor, as diffusers' InstructPix2Pix pipeline feeds it,
so published IP2P weights and ours read the same input.
"""
from __future__ import annotations

import torch

DEFAULT_TEXT_GUIDANCE = 7.5   # sT, the IP2P paper's default
DEFAULT_IMAGE_GUIDANCE = 1.5  # sI


def instruct_eps(unet, x: torch.Tensor, t, cond: torch.Tensor, uncond: torch.Tensor, image_latents: torch.Tensor,
                 text_guidance: float, image_guidance: float) -> torch.Tensor:
    """Three-way guided noise prediction in one batched UNet call."""
    img = torch.cat([image_latents, image_latents, torch.zeros_like(image_latents)])
    inp = torch.cat([torch.cat([x, x, x]), img], dim=1)
    e_full, e_image, e_none = unet(inp, t, encoder_hidden_states=torch.cat([cond, uncond, uncond])).sample.chunk(3)
    return e_none + image_guidance * (e_image - e_none) + text_guidance * (e_full - e_image)
