"""Text-based editing of a real image on top of its (cached) inversion.

  threshold  Smooth Diffusion's edit: sample from x_T with the source prompt for the noisiest steps and the
             target prompt for the rest (sampling step i uses the source while i < (1 - r) N, i.e. t > T r).
             r = 0 never switches and reproduces the inversion's reconstruction exactly.
  p2p        Prompt-to-Prompt: source and target branches sampled together in one UNet batch, the target
             re-using the source's attention maps (word replace / refine / re-weight, local blend), with the
             attention processors always restored afterwards. With a local blend the input's pixels are pasted
             back outside the blend region grown by one latent cell, with a one-cell feathered seam
             (P2PSettings.keep_background).
Both use the per-step null embeddings of null-text inversion when the inversion method provides them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch
from PIL import Image

from . import p2p
from .core import ddim
from .core.cache import LRUCache
from .core.errors import InputError
from .core.events import CancelToken, Job, Kind, Progress
from .core.latents import decode_to_pil
from .core.lora import lora_applied
from .core.masks import paste_outside
from .core.metadata import with_metadata
from .core.results import ImageResult, base_metadata
from .core.stream import PreviewOptions, stream_steps
from .core.text import encode_prompt
from .core.validation import check_number, check_prompt, shown, validate_common
from .inversion import (
    InversionParams,
    inversion_cost,
    invert_images,
    prepare_image,
    validate_inversion,
)

EDIT_METHODS = ("threshold", "p2p")


@dataclass
class EditParams:
    source_prompt: str
    target_prompt: str
    method: str = "threshold"        # "threshold" (prompt switch at r) or "p2p"
    r: float = 0.8
    steps: int = 50
    guidance: float = 7.5
    # The paper's schedule: on the embedded model P2P then keeps 23 dB outside the edited object, against 16 dB
    # on the fast schedule, whose nulls start at (and stay near) the source prompt (benchmarks/eval_embedded.py).
    inversion: str = "nti-reference"
    inner_steps: int = 10
    force: bool = False              # re-invert
    lora: str | None = None
    lora_strength: float = 1.0
    p2p: p2p.P2PSettings = field(default_factory=p2p.P2PSettings)


@dataclass
class EditResult:
    edited: ImageResult
    source: Image.Image              # the resized input
    reconstruction: Image.Image | None   # the source branch (P2P) or the inversion's reconstruction
    cached: bool
    params: dict
    mask: Image.Image | None = None  # P2P local-blend region of the last step


def source_steps(r: float, steps: int) -> int:
    """Sampling steps that keep the source prompt: those with i < (1 - r) * steps."""
    return min(steps, max(0, math.ceil((1 - r) * steps - 1e-9)))


def text_edit(model, image, p: EditParams, cache: LRUCache | None = None, cancel: CancelToken | None = None,
              preview: PreviewOptions | None = None) -> Job:
    src_prompt = check_prompt(p.source_prompt, "source prompt")
    tgt_prompt = check_prompt(p.target_prompt, "target prompt")
    method = str(p.method or "").strip().lower()
    if method not in EDIT_METHODS:
        raise InputError(f"Unknown edit method {shown(p.method)}; choose threshold or p2p.")
    steps, guidance, strength = validate_common(model, p.steps, p.guidance, p.lora_strength)
    r = check_number(p.r, "Threshold r", 0, 1)
    inv_p = validate_inversion(InversionParams(src_prompt, steps, 1.0, guidance, p.lora, strength, p.inversion,
                                               p.inner_steps, p.force), steps, guidance, strength)
    controller = None
    if method == "threshold" and src_prompt == tgt_prompt:
        raise InputError("Source and target prompts are identical: change the target prompt to describe the edit.")
    source = prepare_image(model, image)
    latent_hw = (source.height // model.vae_factor, source.width // model.vae_factor)
    if method == "p2p":  # validated before any UNet call (word counts, words present, ranges)
        controller = p2p.build_controller(model.tokenizer, src_prompt, tgt_prompt, p.p2p, steps, latent_hw)
    offset = inversion_cost(inv_p.method, steps)
    total = offset + steps
    yield Progress("encoding image", 0, total, preview=source, kind=Kind.SOURCE)
    with lora_applied(model, p.lora, strength):
        inv, cached = yield from invert_images(model, [source], [src_prompt], inv_p, cache, cancel, preview,
                                               total=total)
        target = encode_prompt(model, tgt_prompt)
        if method == "threshold":
            n_src = source_steps(r, steps)
            conds = [inv.cond if k < n_src else target for k in range(steps)]
            states = ddim.sample(model.unet, inv.x_T, conds, inv.uncond, guidance, steps, model.scheduler_config,
                                 cancel)
            z = yield from stream_steps(model, states, "editing", offset, total, preview)
            edited_z, source_z = z, inv.reconstruction
        else:
            edited_z, source_z = yield from _p2p_sample(model, inv, target, controller, guidance, steps, cancel,
                                                        offset, total, preview)
    edited = decode_to_pil(model, edited_z)
    recon = decode_to_pil(model, source_z) if source_z is not None else None
    # the local blend's region of the last step, in latent cells (None: no blend)
    cells = None if controller is None or controller.last_mask is None else \
        controller.last_mask[0, 0].bool().cpu().numpy()
    # pasted only where it changes something: a region that is neither empty (nothing edited) nor the whole image
    pasted = cells is not None and p.p2p.keep_background and bool(cells.any()) and not bool(cells.all())
    if pasted:
        edited = paste_outside(edited, source, cells, model.vae_factor, feather=model.vae_factor)
    meta = {"task": "edit", "edit_method": method, "source_prompt": src_prompt, "prompt": tgt_prompt,
            "inversion": inv_p.method, "steps": steps, "guidance": guidance, "size": f"{source.width}x{source.height}",
            "eta": 0.0, **base_metadata(model, p.lora, strength)}
    if inv_p.method.startswith("nti"):
        meta["inner_steps"] = inv_p.inner_steps
    if method == "threshold":
        meta.update(r=r, source_steps=source_steps(r, steps))
    else:
        s = p.p2p
        meta.update(p2p_mode=s.mode, cross_replace_steps=s.cross_replace_steps, self_replace_steps=s.self_replace_steps,
                    reweight_words=", ".join(p2p.as_words(s.reweight_words)), reweight_scale=s.reweight_scale,
                    blend_words=", ".join(p2p.as_words(s.blend_words)), blend_threshold=s.blend_threshold,
                    blend_start=s.blend_start, keep_background=pasted)
    mask = None if cells is None else \
        Image.fromarray(cells.astype("uint8") * 255).resize(source.size, Image.NEAREST)
    result = EditResult(ImageResult(with_metadata(edited, meta), -1, meta), source, recon, cached, meta, mask)
    note = " (inversion reused from cache)" if cached else ""
    yield Progress("done", total, total, preview=result.edited.image, result=result, message=f"edited{note}")


def _p2p_sample(model, inv, target, controller, guidance, steps, cancel, offset, total, preview):
    """Source and target branches in one batch from the same x_T; returns (target latent, source latent)."""
    x = inv.x_T.expand(2, -1, -1, -1).clone()
    cond = torch.cat([inv.cond, target])

    def eps(x_t, t, k):
        controller.begin_step(k)
        return ddim.guided_eps(model.unet, x_t, t, cond, ddim.embedding_at(inv.uncond, k).expand(2, -1, -1), guidance)

    with p2p.attention_control(model.unet, controller):
        states = ddim.sample_with(eps, x, steps, model.scheduler_config, cancel, after_step=controller.after_step)
        z = yield from stream_steps(model, _target_branch(states), "editing (Prompt-to-Prompt)", offset, total,
                                    preview)
    return z[1:], z[:1]


def _target_branch(states):
    """Previews show the target branch; the full (2, ...) latents still come back at the end."""
    for st in states:
        yield replace(st, pred_x0=st.pred_x0[1:])
