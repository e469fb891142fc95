"""Turns the DDIM core's per-step states into Progress events with previews of the predicted x0."""
from __future__ import annotations

from collections.abc import Generator, Iterable
from dataclasses import dataclass

import torch
from PIL import Image

from .ddim import StepState
from .events import Progress
from .latents import decode_to_pil


@dataclass
class PreviewOptions:
    every: int = 1              # cheap linear preview every k steps (0: none)
    full_decode_every: int = 0  # full VAE decode instead, every k steps (0: never)


def preview_image(model, pred_x0: torch.Tensor, full: bool) -> Image.Image:
    """Full VAE decode, or the linear map at latent resolution (resizing is left to the browser: a
    512 px PIL resize per step would cost more than the preview itself)."""
    return decode_to_pil(model, pred_x0) if full else model.previewer(pred_x0)


def stream_steps(
    model, states: Iterable[StepState], stage: str, offset: int, total: int, opts: PreviewOptions | None,
) -> Generator[Progress, None, torch.Tensor | None]:
    """Yields one event per step (with a preview when due) and returns the last latent."""
    opts = opts or PreviewOptions()
    x = None
    for st in states:
        x = st.latents
        yield Progress(stage, offset + st.index + 1, total, preview=step_preview(model, opts, st.index + 1, st.total,
                                                                                 st.pred_x0),
                       stage_step=st.index + 1, stage_total=st.total)
    return x


def step_preview(model, opts: PreviewOptions, k: int, steps: int, pred_x0: torch.Tensor) -> Image.Image | None:
    """The preview due after step k of `steps` (1-based): a full decode every `full_decode_every` steps, else
    the linear preview every `every` steps and on the last one; None when none is due."""
    if opts.full_decode_every and k % opts.full_decode_every == 0:
        return preview_image(model, pred_x0, full=True)
    if opts.every and (k % opts.every == 0 or k == steps):
        return preview_image(model, pred_x0, full=False)
    return None
