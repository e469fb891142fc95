"""UNets with extra input channels (InstructPix2Pix's image latent, inpainting's mask and masked-image latent),
made from a text-to-image UNet so that the widened one equals it exactly until training moves the new weights."""
from __future__ import annotations

import torch


def widened_unet(base_unet, in_channels: int):
    """A copy of `base_unet` taking `in_channels` inputs: its conv_in weights on the first channels, zeros on the
    new ones, the same bias (diffusers' example scripts leave it re-initialised, which changes the output at
    step 0). A UNet that already has `in_channels` inputs is returned as it is."""
    from diffusers import UNet2DConditionModel

    old = int(base_unet.config.in_channels)
    if old == in_channels:
        return base_unet
    if in_channels < old:
        raise ValueError(f"cannot narrow a {old}-channel UNet to {in_channels} channels")
    config = dict(base_unet.config)
    config["in_channels"] = in_channels
    unet = UNet2DConditionModel.from_config(config)
    state = base_unet.state_dict()
    conv = state["conv_in.weight"]
    extra = conv.new_zeros(conv.shape[0], in_channels - old, *conv.shape[2:])
    state["conv_in.weight"] = torch.cat([conv, extra], dim=1)
    unet.load_state_dict(state)
    return unet.to(device=conv.device, dtype=conv.dtype)
