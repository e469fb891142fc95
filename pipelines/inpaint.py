"""Text-guided inpainting: the painted region of an image regenerated from a prompt, the rest kept.

Two ways, one sampling loop (ddim.sample_scheduled, DDIM eta 0, a preview per step, Stop before every UNet call):

- **Inpainting UNet** (9 input channels: noisy latent | mask | masked-image latent, Stable Diffusion's order): the
  embedded model's `unet_inpaint/`, or a Hub SD-inpainting checkpoint loaded as the model. Every step feeds the
  UNet the mask and the masked-image latent beside the noisy latent (both doubled for classifier-free guidance).
  The mask is the latent cells any painted pixel touches (core/inpaint_inputs.hole_cells); the masked-image
  latent is the VAE posterior mean of the image with those cells blanked to 0 (mid-gray), times the scaling
  factor: the rule the trainer uses.
- **Latent blend** (a 4-channel text-to-image UNet; the fallback for models without an inpainting UNet): after
  every step, the latent outside the hole is the image's latent noised with the initial noise to the NEXT
  timestep (after the last step: the clean image latent), as diffusers' inpainting pipeline does for 4-channel
  UNets.

With the same components, seed and a cell-aligned mask, both give diffusers' StableDiffusionInpaintPipeline's
latents (tests/test_inpaint.py). `strength` < 1 starts from the image's latent noised to the strength's timestep
(int(steps x strength) steps run, as diffusers); at 1 from pure noise. The image latent is the posterior mean.

keep_unmasked (default on): the VAE decoder mixes spatially, so even an exact latent outside the hole does not
decode to exactly the input; the input pixels are pasted back outside the hole's cells grown by one cell
(core/masks.paste_outside), so outside that margin the result is the input, bit for bit.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch
from PIL import Image

from .core import ddim
from .core.errors import InputError
from .core.events import CancelToken, Job, Kind, Progress
from .core.image_io import pil_to_tensor
from .core.inpaint_inputs import cells_tensor, hole_cells, masked_image, unet_input
from .core.latents import decode_to_pil, encode_image, initial_noise
from .core.limits import get_limits
from .core.masks import cells_to_image, paste_outside, user_mask
from .core.metadata import with_metadata
from .core.results import ImageResult, base_metadata
from .core.stream import PreviewOptions, stream_steps
from .core.text import encode_prompt
from .core.validation import check_number, check_text_length, resolve_seed
from .inversion import prepare_image
from .sdedit import check_strength, strength_schedule

UNET = "inpaint-unet"      # the 9-channel inpainting UNet
BLEND = "latent-blend"     # the 4-channel fallback
METHOD_LABELS = {UNET: "inpainting UNet (9 channels)", BLEND: "latent blend (4-channel fallback)"}


@dataclass
class InpaintParams:
    prompt: str
    negative_prompt: str = ""
    steps: int = 50
    guidance: float = 7.5
    strength: float = 1.0          # 1: the hole starts from pure noise; < 1: from the image noised (img2img)
    seed: int = -1                 # -1 = random
    keep_unmasked: bool = True     # paste the input back outside the hole's cells grown by one (exact outside)
    blend: bool = False            # the 4-channel latent blend even when the model has an inpainting UNet


@dataclass
class InpaintResult:
    edited: ImageResult            # the result (pasted back when keep_unmasked), PNG metadata embedded
    source: Image.Image            # the input as the model saw it (resized)
    mask: np.ndarray               # bool (H, W): the latent cells regenerated, at image resolution
    decoded: Image.Image           # the plain VAE decode, before any paste-back
    latents: torch.Tensor          # the final latent
    method: str                    # UNET or BLEND
    params: dict


class _InpaintInputs:
    """A 9-channel UNet called like a 4-channel one (ddim.guided_eps calls unet(x, t, encoder_hidden_states=...)):
    the mask and the masked-image latent are appended to every batch it is given, doubled with it for guidance."""

    def __init__(self, unet, cells: torch.Tensor, masked_latent: torch.Tensor):
        self.unet, self.cells, self.masked_latent = unet, cells, masked_latent

    def __call__(self, x, t, encoder_hidden_states):
        n = x.shape[0]
        extra = (self.cells.expand(n, -1, -1, -1), self.masked_latent.expand(n, -1, -1, -1))
        return self.unet(unet_input(x, *extra), t, encoder_hidden_states=encoder_hidden_states)


def check_params(p: InpaintParams) -> InpaintParams:
    """Range checks before any image is read or model run; returns a normalised copy (the seed resolved)."""
    prompt = check_text_length("" if p.prompt is None else str(p.prompt), "prompt").strip()
    negative = check_text_length("" if p.negative_prompt is None else str(p.negative_prompt), "negative prompt")
    steps = check_number(p.steps, "Steps", 1, get_limits().max_steps, integer=True)
    guidance = check_number(p.guidance, "Guidance", 0, 50)
    strength = check_strength(p.strength)
    seed = resolve_seed(p.seed)
    return replace(p, prompt=prompt, negative_prompt=negative.strip(), steps=steps, guidance=guidance,
                   strength=strength, seed=seed, keep_unmasked=bool(p.keep_unmasked), blend=bool(p.blend))


def choose_method(model, blend: bool) -> str:
    """UNET when the model has an inpainting UNet (and the blend is not asked for), else BLEND; an inpainting-only
    model (its main UNet takes 9 channels) has no 4-channel UNet to blend with."""
    if model.is_instruct:
        raise InputError(f"{model.label} is an InstructPix2Pix model: it cannot inpaint. Use the Instruct tab, or "
                         "load a text-to-image or inpainting model.")
    if blend and model.is_inpaint:
        raise InputError(f"{model.label} is an inpainting model: it has no text-to-image UNet for the latent blend. "
                         "Untick the latent blend.")
    return BLEND if blend or not model.has_inpaint_unet() else UNET


def hole(model, mask, size: tuple[int, int]) -> np.ndarray:
    """A painted mask (any size; alpha or nonzero = repaint) -> the latent cells to regenerate (bool (h, w))."""
    if mask is None:
        raise InputError("No mask given: paint the region to repaint.")
    painted = user_mask(mask, size)
    if not painted.any():
        raise InputError("The mask is empty (nothing painted, or a fully transparent mask image), so nothing would "
                         "change: paint the region to repaint.")
    return hole_cells(painted, model.vae_factor)


@torch.no_grad()
def masked_image_latent(model, source: Image.Image, cells: np.ndarray) -> torch.Tensor:
    """The 9-channel UNet's masked-image latent: the VAE posterior mean of the image with the hole cells set to 0
    (in [-1, 1]), times the scaling factor."""
    vae = model.vae
    dtype = next(vae.parameters()).dtype
    x = pil_to_tensor(source).to(model.device, dtype)
    blanked = masked_image(x, cells_tensor(cells, model.device, dtype), model.vae_factor)
    return (vae.encode(blanked).latent_dist.mean * vae.config.scaling_factor).to(model.dtype)


def sample_states(unet, method: str, x_T: torch.Tensor, sched, start: int, cond, uncond, guidance: float,
                  cells: torch.Tensor, masked_latent: torch.Tensor | None, image_latent: torch.Tensor | None,
                  noise: torch.Tensor, cancel: CancelToken | None = None):
    """The DDIM states of one inpainting run from x_T (the latent at timesteps[start]). `cells` (1, 1, h, w) float,
    1 = repaint. UNET: the 9-channel inputs every step. BLEND: outside the hole, image_latent noised with `noise` to
    the next timestep after each step (image_latent itself after the last), and previews show it there."""
    timesteps = sched.timesteps
    after = None
    if method == UNET:
        net = _InpaintInputs(unet, cells, masked_latent)
    else:
        net = unet

        def after(x_new: torch.Tensor, k: int) -> torch.Tensor:
            known = image_latent if k + 1 >= len(timesteps) else sched.add_noise(image_latent, noise,
                                                                                 timesteps[k + 1:k + 2])
            return (1 - cells) * known + cells * x_new

    def eps(x_t, t, _k):
        return ddim.guided_eps(net, x_t, t, cond, uncond, guidance)

    states = ddim.sample_scheduled(eps, x_T, sched, cancel, start, after, eta=0.0)
    if method == UNET:
        return states
    return (replace(st, pred_x0=cells * st.pred_x0 + (1 - cells) * image_latent) for st in states)


def inpaint(model, image, mask, p: InpaintParams, cancel: CancelToken | None = None,
            preview: PreviewOptions | None = None) -> Job:
    """Regenerates the masked region of `image` from `p.prompt`; the last event's result is an InpaintResult.
    `mask`: any mask-like input at any size (alpha of RGBA images, else nonzero pixels = repaint)."""
    p = check_params(p)
    method = choose_method(model, p.blend)
    if method == BLEND and not p.prompt:
        raise InputError("Please enter a prompt: the latent blend has only the prompt to say what fills the mask.")
    steps_run, start_t = strength_schedule(model.scheduler_config, p.steps, p.strength)
    if image is None:
        raise InputError("No image given: upload the image to inpaint.")
    source = prepare_image(model, image)
    cells = hole(model, mask, source.size)
    f = model.vae_factor
    unet = model.inpaint_unet() if method == UNET else model.unet  # may load weights: after every check
    total = steps_run + 1
    shown = cells_to_image(cells, f)
    yield Progress("encoding image", 0, total, preview=source, kind=Kind.SOURCE,
                   message=f"seed {p.seed} · {METHOD_LABELS[method]}")
    if cancel is not None:
        cancel.check()
    cond = encode_prompt(model, p.prompt)
    uncond = encode_prompt(model, p.negative_prompt)
    m = cells_tensor(cells, model.device, model.dtype)
    masked_latent = masked_image_latent(model, source, cells) if method == UNET else None
    image_latent = encode_image(model, source) if method == BLEND or p.strength < 1 else None
    noise = initial_noise(model, p.seed, source.width, source.height)
    sched = ddim.make_scheduler(model.scheduler_config, p.steps)
    start = p.steps - steps_run
    x = (noise * sched.init_noise_sigma if p.strength == 1.0
         else sched.add_noise(image_latent, noise, sched.timesteps[start:start + 1]))
    states = sample_states(unet, method, x, sched, start, cond, uncond, p.guidance, m, masked_latent, image_latent,
                           noise, cancel)
    z = yield from stream_steps(model, states, "inpainting", 0, total, preview)
    decoded = decode_to_pil(model, z)
    out = decoded
    if p.keep_unmasked and not cells.all():
        out = paste_outside(decoded, source, cells, f)
    meta = {"task": "inpaint", "prompt": p.prompt, "negative_prompt": p.negative_prompt, "steps": p.steps,
            "steps_run": steps_run, "start_timestep": start_t, "guidance": p.guidance, "strength": p.strength,
            "seed": p.seed, "keep_unmasked": p.keep_unmasked, "inpaint_method": method,
            "mask_fraction": round(float(shown.mean()), 4), "size": f"{source.width}x{source.height}", "eta": 0.0,
            **base_metadata(model, None, 0.0)}
    result = InpaintResult(ImageResult(with_metadata(out, meta), p.seed, meta), source, shown, decoded, z, method,
                           meta)
    yield Progress("done", total, total, preview=out, result=result,
                   message=f"seed {p.seed} · {METHOD_LABELS[method]} · {100 * float(shown.mean()):.0f}% repainted")
