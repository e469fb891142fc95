"""The UNet hooks DragDiffusion needs, each installed by a context manager that always removes it:

  feature_hook          the output of one decoder block (`unet.up_blocks[i]`), read by a forward hook
  mutual_self_attention MasaCtrl's mutual self-attention: in the decoder's self-attention layers from a chosen
                        one on, every batch item attends with its own queries to the keys and values of the
                        reference (original) branch, installed as attention processors

Block and layer numbers are given as on SD1.5, the model the reference was tuned on, and mapped onto smaller
UNets (`feature_block_index`, `mutual_layer_start`), so one default means the same place on every model.
"""
from __future__ import annotations

import re
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from ..core.attention import call_fallback, from_tokens, to_tokens

SD15_UP_BLOCKS = 4      # SD1.5's decoder: up_blocks 0..3; the reference reads up_blocks[2] ("unet_feature_idx 3")
SD15_SELF_LAYERS = 16   # SD1.5's transformer blocks in forward order: down 0-5, mid 6, up 7-15

_ATTN1 = re.compile(r"^(down_blocks|mid_block|up_blocks)(?:\.(\d+))?\.attentions\.(\d+)\.transformer_blocks\.(\d+)"
                    r"\.attn1\.processor$")
_SECTION = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}


def feature_block_index(unet, block: int) -> int:
    """The `up_blocks` index for an SD1.5-numbered decoder block, counted from the output end: SD1.5's
    up_blocks[2] (full latent resolution, the block before the last) is up_blocks[1] of the embedded model's
    three and up_blocks[0] of the tiny model's two."""
    n = len(unet.up_blocks)
    return min(max(int(block) - (SD15_UP_BLOCKS - n), 0), n - 1)


@contextmanager
def feature_hook(unet, index: int):
    """While open, `store["features"]` holds the output of `unet.up_blocks[index]` from the last forward."""
    store: dict = {}
    handle = unet.up_blocks[index].register_forward_hook(lambda mod, args, out: store.__setitem__("features", out))
    try:
        yield store
    finally:
        handle.remove()


def upsample(features: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Bilinear upsampling to the supervision grid, in fp32 (L1 distances of fp16 features are coarse)."""
    return F.interpolate(features.float(), size=grid, mode="bilinear", align_corners=False)


def self_attention_layers(unet) -> list[str]:
    """Processor names of every transformer block's self-attention, in forward order (down, mid, up), as
    MasaCtrl counts them."""
    found = []
    for name in unet.attn_processors:
        m = _ATTN1.match(name)
        if m:
            key = (_SECTION[m.group(1)], int(m.group(2) or 0), int(m.group(3)), int(m.group(4)))
            found.append((key, name))
    return [name for _, name in sorted(found)]


def mutual_layer_start(n_layers: int, layer: int) -> int:
    """The first controlled layer for an SD1.5-numbered `layer`: as given on UNets with at least SD1.5's 16
    self-attention layers, scaled by n_layers / 16 on smaller ones (the reference's 10, the last 6 of SD1.5's 9 decoder
    layers, becomes 4 on the embedded and the tiny model: the last 3 of their 4 decoder layers)."""
    layer = int(layer)
    if n_layers < SD15_SELF_LAYERS:
        layer = round(layer * n_layers / SD15_SELF_LAYERS)
    return min(max(layer, 0), n_layers - 1)


class MutualControl:
    """Per-step switch: the processors edit only from denoising step `start_step` on (0 = the first step run)."""

    def __init__(self, start_step: int) -> None:
        self.start_step = int(start_step)
        self.step = 0

    @property
    def active(self) -> bool:
        return self.step >= self.start_step


class MutualAttnProcessor:
    """Self-attention in which batch items come in pairs [reference, edited] (or [u_ref, u_edit, c_ref, c_edit]
    under guidance): both attend with their own queries to the reference item's keys and values. The
    projections are the layer's own modules, so LoRA adapters on them stay in effect."""

    def __init__(self, control: MutualControl, fallback) -> None:
        self.control = control
        self.fallback = fallback

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args,
                 **kwargs):
        if encoder_hidden_states is not None or not self.control.active or hidden_states.shape[0] % 2:
            return call_fallback(self.fallback, attn, hidden_states, encoder_hidden_states, attention_mask, temb,
                                 kwargs)
        hidden_states, residual, shape = to_tokens(attn, hidden_states, temb)
        batch = hidden_states.shape[0]
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, hidden_states.shape[1], batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])

        query = attn.to_q(hidden_states)
        ref = hidden_states[0::2]  # keys and values come only from the reference items: half the projections
        key = attn.to_k(ref).repeat_interleave(2, dim=0)
        value = attn.to_v(ref).repeat_interleave(2, dim=0)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=0.0,
                                             is_causal=False)
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        return from_tokens(attn, out, residual, shape)


@contextmanager
def mutual_self_attention(unet, layer: int, start_step: int):
    """Installs mutual self-attention on the self-attention layers from `layer` (SD1.5 numbering) to the last;
    yields (control, names of the controlled layers). The original processor objects are put back afterwards,
    also when the block raises (Cancelled included)."""
    saved = dict(unet.attn_processors)
    names = self_attention_layers(unet)
    chosen = names[mutual_layer_start(len(names), layer):] if names else []
    control = MutualControl(start_step)
    procs = dict(saved)
    for name in chosen:
        procs[name] = MutualAttnProcessor(control, saved[name])
    unet.set_attn_processor(procs)
    try:
        yield control, chosen
    finally:
        unet.set_attn_processor(dict(saved))  # set_attn_processor pops from the dict it is given
