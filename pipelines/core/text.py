"""Prompt -> CLIP token embeddings, exactly as diffusers' StableDiffusionPipeline.encode_prompt does."""
from __future__ import annotations

import torch

from .validation import check_text_length


@torch.no_grad()
def encode_prompt(model, prompt: str) -> torch.Tensor:
    """(1, 77, D) embeddings of one prompt ("" gives the unconditional embedding)."""
    check_text_length(prompt)
    tok = model.tokenizer
    ids = tok(prompt, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt")
    mask = None
    if getattr(model.text_encoder.config, "use_attention_mask", False):
        mask = ids.attention_mask.to(model.device)
    emb = model.text_encoder(ids.input_ids.to(model.device), attention_mask=mask)[0]
    return emb.to(model.dtype)
