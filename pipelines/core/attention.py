"""What every custom attention processor of the studio shares (Prompt-to-Prompt, drag's mutual
self-attention): diffusers' own steps around the attention itself, so each processor writes only what it
changes. Mirrors diffusers' AttnProcessor2_0 (spatial norm, 4-D maps as token sequences, group norm, output
projection, residual, rescale)."""
from __future__ import annotations

import torch


def call_fallback(fallback, attn, hidden_states, encoder_hidden_states, attention_mask, temb, kwargs):
    """Hands a call the custom processor does not handle to the layer's original processor."""
    if temb is not None:
        kwargs["temb"] = temb
    return fallback(attn, hidden_states, encoder_hidden_states=encoder_hidden_states, attention_mask=attention_mask,
                    **kwargs)


def to_tokens(attn, hidden_states: torch.Tensor, temb=None):
    """-> (normalised tokens (B, N, C), residual, the (B, C, H, W) shape of a 4-D input or None)."""
    residual = hidden_states
    if attn.spatial_norm is not None:
        hidden_states = attn.spatial_norm(hidden_states, temb)
    shape = None
    if hidden_states.ndim == 4:
        shape = hidden_states.shape
        batch, channel, height, width = shape
        hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
    if attn.group_norm is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
    return hidden_states, residual, shape


def from_tokens(attn, out: torch.Tensor, residual: torch.Tensor, shape) -> torch.Tensor:
    """The attention result (B, N, C) -> output projection, back to 4-D, residual and rescale."""
    out = attn.to_out[1](attn.to_out[0](out))
    if shape is not None:
        out = out.transpose(-1, -2).reshape(shape)
    if attn.residual_connection:
        out = out + residual
    return out / attn.rescale_output_factor
