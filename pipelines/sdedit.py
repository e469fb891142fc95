"""SDEdit (Meng et al., ICLR 2022): guided image synthesis from strokes, as diffusers' img2img does it.

The guide image (a stroke painting, or a photo with strokes on it) is encoded, noised to an intermediate
timestep t0 and denoised from there with DDIM (eta 0) and classifier-free guidance. `strength` is diffusers'
img2img strength, the usual stand-in for SDEdit's t0: of an N-step schedule, int(N * strength) steps run,
starting at timesteps[N - int(N * strength)] (strength_schedule). A higher strength gives a more realistic
image that follows the strokes less faithfully; a lower one keeps the strokes (and their crudeness).

Masked SDEdit (the paper's masked rule, and what diffusers' inpainting pipeline does with a 4-channel UNet):
after every step, the latent outside the mask is replaced by the guide's latent re-noised, with the same noise,
to the next timestep of the schedule (after the last step: the guide's latent itself). The decoded image then
gets the ORIGINAL pixels pasted back outside the mask, so unpainted regions are kept exactly, not just
through a VAE round trip.

Noise: repeat k uses seed + k, drawn from a CPU generator (the same picture on any device). Unlike diffusers'
img2img, which first samples the VAE posterior with that generator and then draws the noise, we encode with
the posterior mean (deterministic, as every other method here) and the noise is the generator's first draw.

Fast mode (`fast=True`, Stable Diffusion 1.5 models): the same steps with LCM-LoRA and LCMScheduler instead of
DDIM (pipelines/fast.py): of N (1-8) LCM timesteps int(N * strength) run, e.g. strength 0.5 of 4 steps runs
[499, 259]; LCM's fresh noise between steps continues the repeat's generator.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace

import numpy as np
import torch
from PIL import Image

from .core import ddim
from .core.errors import InputError
from .core.events import CancelToken, Job, Kind, Progress
from .core.latents import decode_to_pil, encode_image
from .core.limits import get_limits
from .core.lora import lora_applied
from .core.masks import cells_to_image, grow_cells, latent_cells, user_mask
from .core.metadata import with_metadata
from .core.results import ImageResult, base_metadata
from .core.stream import PreviewOptions, stream_steps
from .core.text import encode_prompt
from .core.validation import MAX_SEED, check_number, check_prompt, check_text_length, resolve_seed, validate_common
from .fast import check_fast, ensure_lcm_lora, fast_metadata, lcm_applied, lcm_scheduler, seeded_noise, uses_cfg
from .inversion import prepare_image

# The painted region is grown by this many latent pixels (one latent pixel = vae_factor image pixels: 4 px on
# the embedded model, 8 px on SD). Strokes are hand-drawn with soft, jagged edges, and the object the model
# draws from them rarely matches their outline exactly: one latent pixel of margin lets the model redraw that
# rim and the seam where regenerated latents meet the re-noised guide (the VAE decoder mixes neighbouring
# latents there). More would regenerate unpainted content next to the strokes, which a mask exists to keep.
MASK_DILATION = 1


@dataclass
class SDEditParams:
    prompt: str
    negative_prompt: str = ""
    strength: float = 0.6        # ~ SDEdit's t0; the UI offers 0.3..0.9, the pipeline accepts 0 < s <= 1
    steps: int = 50              # the FULL schedule; int(steps * strength) of them run (as diffusers img2img)
    guidance: float = 7.5
    seed: int = -1               # -1 = random; repeat k uses seed + k
    repeats: int = 1             # N candidates to pick from (1..Limits.max_repeats)
    lora: str | None = None
    lora_strength: float = 1.0
    fast: bool = False           # LCM-LoRA (pipelines/fast.py): steps 1-8 (the full LCM schedule), guidance 0-2


@dataclass
class SDEditResult:
    images: list[ImageResult]    # one per repeat, each with PNG metadata, its seed recorded
    source: Image.Image          # the prepared guide image (strokes composite), as the model saw it
    mask: np.ndarray | None      # bool (H, W) at image resolution, True = repainted; None = global SDEdit
    params: dict                 # includes steps_run, start_timestep and the seeds


def strength_schedule(scheduler_config, steps: int, strength: float,
                      make_scheduler=ddim.make_scheduler) -> tuple[int, int]:
    """(steps actually run, start timestep) for `strength` on an N-step schedule, exactly as diffusers'
    StableDiffusionImg2ImgPipeline.get_timesteps maps it (int() truncates, as there). `make_scheduler` gives
    the schedule (DDIM's, or fast.lcm_scheduler's)."""
    steps = int(steps)
    run = min(int(steps * float(strength)), steps)
    if run < 1:
        raise InputError(f"Strength {float(strength):g} is too low for {steps} steps: strength x steps gives no step "
                         f"(int({steps} x {float(strength):g}) = 0). Raise the strength to at least {1 / steps:.3g} "
                         f"or use more steps.")
    sched = make_scheduler(scheduler_config, steps)
    return run, int(sched.timesteps[steps - run])


def check_strength(strength) -> float:
    s = check_number(strength, "Strength", 0, 1)
    if s <= 0:
        raise InputError(f"Strength must be above 0 (and at most 1), got {strength!r}.")
    return s


def prepare_mask(mask, size: tuple[int, int], vae_factor: int) -> tuple[np.ndarray, torch.Tensor] | None:
    """A user mask -> (image-resolution bool mask, latent mask (1, 1, h, w) float), or None for global SDEdit.

    The mask is resized to the image (nearest), taken to the latent grid (a latent pixel repaints when any
    image pixel of its block does), dilated by MASK_DILATION latent pixels, and taken back to the image, so the
    image mask is exactly the set of pixels whose latents were regenerated. All True: global SDEdit (None)."""
    if mask is None:
        return None
    m = user_mask(mask, size)
    if not m.any():
        raise InputError("The mask is empty: paint the region to repaint, or clear the mask to edit the whole image.")
    cells = grow_cells(latent_cells(m, vae_factor), MASK_DILATION)
    if cells.all():
        return None
    return cells_to_image(cells, vae_factor), torch.from_numpy(cells.astype(np.float32))[None, None]


def denoise(unet, z0: torch.Tensor, noise: torch.Tensor, cond, uncond, guidance: float, steps: int,
            scheduler_config, strength: float, latent_mask: torch.Tensor | None = None,
            cancel: CancelToken | None = None, make_scheduler=ddim.make_scheduler,
            **step_kwargs) -> Iterator[ddim.StepState]:
    """The SDEdit loop on latents: noise z0 to the start timestep, then DDIM through the remaining steps of
    the shared core. With `latent_mask` (1 = repaint), the rest is replaced after each step by z0 re-noised to
    the next timestep (z0 itself after the last step), and previews show z0 there. `make_scheduler` and
    `step_kwargs` choose another sampler (fast mode: fast.lcm_scheduler and its noise generator)."""
    run, _ = strength_schedule(scheduler_config, steps, strength, make_scheduler)
    start = int(steps) - run
    sched = make_scheduler(scheduler_config, steps)
    if hasattr(sched, "set_begin_index"):  # schedulers that count their steps (LCM) start counting there
        sched.set_begin_index(start)
    timesteps = sched.timesteps
    x = sched.add_noise(z0, noise, timesteps[start:start + 1])
    after = None
    if latent_mask is not None:
        m = latent_mask.to(z0.device, z0.dtype)

        def after(x_new: torch.Tensor, k: int) -> torch.Tensor:
            known = z0 if k + 1 >= len(timesteps) else sched.add_noise(z0, noise, timesteps[k + 1:k + 2])
            return m * x_new + (1 - m) * known

    def eps(x_t, t, k):
        return ddim.guided_eps(unet, x_t, t, cond, uncond, guidance)

    states = ddim.sample_scheduled(eps, x, sched, cancel, start, after, **step_kwargs)
    if latent_mask is None:
        return states
    return _with_known_preview(states, z0, m)


def _with_known_preview(states: Iterable[ddim.StepState], z0, m) -> Iterator[ddim.StepState]:
    for st in states:
        yield replace(st, pred_x0=m * st.pred_x0 + (1 - m) * z0)


def _is_blank(image: Image.Image) -> bool:
    arr = np.asarray(image)
    return bool((arr == arr[:1, :1]).all())


def sdedit(model, image, p: SDEditParams, mask=None, cancel: CancelToken | None = None,
           preview: PreviewOptions | None = None) -> Job:
    """SDEdit of a guide image; `mask` (any size, True/nonzero = repaint) makes it local. The last event's
    result is an SDEditResult with one image per repeat."""
    prompt = check_prompt(p.prompt)
    steps, guidance, lora_strength = validate_common(model, p.steps, p.guidance, p.lora_strength)
    fast = bool(p.fast)
    if fast:
        steps, guidance = check_fast(model, steps, guidance)
    negative = check_text_length(p.negative_prompt or "", "negative prompt")
    strength = check_strength(p.strength)
    repeats = check_number(p.repeats, "Repeats", 1, get_limits().max_repeats, integer=True)
    make_scheduler = lcm_scheduler if fast else ddim.make_scheduler
    steps_run, start_t = strength_schedule(model.scheduler_config, steps, strength, make_scheduler)
    if image is None or (isinstance(image, np.ndarray) and image.size == 0):
        raise InputError("The canvas is empty: paint some strokes or upload an image first.")
    source = prepare_image(model, image)
    if _is_blank(source):
        raise InputError("The canvas is blank (one flat colour): paint some strokes or upload an image first.")
    masks = prepare_mask(mask, source.size, model.vae_factor)
    image_mask, latent_mask = masks if masks is not None else (None, None)
    seed = resolve_seed(p.seed)
    seeds = [(seed + k) % (MAX_SEED + 1) for k in range(repeats)]

    total = repeats * steps_run + 1
    yield Progress("encoding image", 0, total, preview=source, kind=Kind.SOURCE,
                   message=f"{steps_run} of {steps} steps from t={start_t}")
    lcm_hash = ensure_lcm_lora(model) if fast else None
    z0 = encode_image(model, source)
    cond = encode_prompt(model, prompt)
    uncond = encode_prompt(model, negative) if not fast or uses_cfg(guidance) else None
    meta = {"prompt": prompt, "negative_prompt": negative, "task": "sdedit", "strength": strength,
            "steps": steps, "steps_run": steps_run, "start_timestep": start_t, "guidance": guidance,
            "masked": image_mask is not None, "size": f"{source.width}x{source.height}", "eta": 0.0,
            **base_metadata(model, p.lora, lora_strength)}
    if fast:
        del meta["eta"]
        meta.update(fast_metadata(lcm_hash))
    src = np.asarray(source)
    results: list[ImageResult] = []
    with lcm_applied(model, p.lora, lora_strength) if fast else lora_applied(model, p.lora, lora_strength):
        for k, s in enumerate(seeds):
            noise, gen = seeded_noise(model, s, source.width, source.height)  # noise: initial_noise's for s
            sampler = dict(make_scheduler=lcm_scheduler, generator=gen) if fast else {}
            states = denoise(model.unet, z0, noise, cond, uncond, guidance, steps, model.scheduler_config, strength,
                             latent_mask, cancel, **sampler)
            z = yield from stream_steps(model, states, f"repeat {k + 1}/{repeats}: denoising", k * steps_run,
                                        total, preview)
            out = decode_to_pil(model, z)
            if image_mask is not None:  # unpainted pixels are the guide's own, exactly
                out = Image.fromarray(np.where(image_mask[..., None], np.asarray(out), src))
            m = {**meta, "seed": s, "repeat": k + 1, "repeats": repeats}
            results.append(ImageResult(with_metadata(out, m), s, m))
            yield Progress(f"repeat {k + 1}/{repeats}: done", (k + 1) * steps_run, total, preview=out,
                           partial=list(results), message=f"seed {s}", kind=Kind.RESULTS)
    params = {**meta, "seed": seeds[0], "seeds": seeds, "repeats": repeats}
    result = SDEditResult(results, source, image_mask, params)
    yield Progress("done", total, total, preview=results[0].image, result=result,
                   message=f"{repeats} candidate(s), seeds {seeds[0]}..{seeds[-1]}: {steps_run} of {steps} steps "
                           f"from t={start_t}")
