"""InstructPix2Pix: edit an image by a written instruction.

The UNet sees [noisy latent, input-image latent] (8 channels) and the instruction; two guidance scales pull
towards the instruction (sT) and towards the input image (sI), in one batched UNet call per step:

    eps = eps(none) + sI * (eps(image) - eps(none)) + sT * (eps(image + text) - eps(image))

"none" drops both conditions (empty prompt, zero image latent), as the model saw in training. Unlike
diffusers' pipeline, sI < 1 does not switch all guidance off: the formula holds for every value.
The input latent is the VAE posterior mode WITHOUT the scaling factor, as diffusers' InstructPix2Pix
pipeline and the reference code feed it, so published IP2P weights and ours read the same input.

Sampling reuses the studio's one sampling loop (ddim.sample_scheduled) with Euler ancestral, as the
reference app, or DDIM.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch
from diffusers import DDIMScheduler, EulerAncestralDiscreteScheduler
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image, ImageOps

from .core import ddim
from .core.errors import InputError
from .core.events import CancelToken, Job, Kind, Progress
from .core.image_io import fit_size, load_rgb
from .core.latents import decode_to_pil, encode_image
from .core.limits import get_limits
from .core.metadata import with_metadata
from .core.results import ImageResult
from .core.stream import PreviewOptions, stream_steps
from .core.text import encode_prompt
from .core.validation import check_number, resolve_seed, shown

DEFAULT_TEXT_GUIDANCE = 7.5   # sT, the IP2P paper's default
DEFAULT_IMAGE_GUIDANCE = 1.5  # sI
SCHEDULERS = {"euler_a": "Euler ancestral (reference)", "ddim": "DDIM (eta 0, deterministic)"}
RANDOM_SEED_MAX = 100_000
# "Randomize" draws within +-20% of the model's recommended scales: the reference app's 6-9 and 1.2-1.8
# around the paper's 7.5 / 1.5.
RANDOM_SPREAD = 0.2


@dataclass
class InstructParams:
    instruction: str
    text_guidance: float | None = None   # None: the model's recommended scale (recommended_guidance)
    image_guidance: float | None = None
    steps: int = 50
    seed: int = -1
    scheduler: str = "euler_a"
    randomize_seed: bool = False   # draw the seed from 0..100000, as the reference app
    randomize_cfg: bool = False    # draw sT and sI within RANDOM_SPREAD of the recommended, 2 decimals


@dataclass
class InstructResult:
    edited: ImageResult    # carries its parameters (seed and guidance actually used) as PNG metadata
    source: Image.Image    # the input as the model saw it (resized and centre-cropped)
    params: dict
    latents: torch.Tensor | None = None   # the final latent (None when the input was returned unchanged)


def recommended_guidance(model) -> tuple[float, float]:
    """(sT, sI) the model's folder recommends in studio_model.json ("instruct_guidance": {"text", "image"}), else
    the paper's 7.5 / 1.5. A small model trained on one world can want other scales than SD-sized weights."""
    rec = model.info.get("instruct_guidance") if getattr(model, "info", None) else None
    if isinstance(rec, dict):
        try:
            return float(rec["text"]), float(rec["image"])
        except (KeyError, TypeError, ValueError):
            pass
    return DEFAULT_TEXT_GUIDANCE, DEFAULT_IMAGE_GUIDANCE


def random_ranges(text_guidance: float, image_guidance: float) -> tuple[tuple[float, float], tuple[float, float]]:
    """The "Randomize" CFG ranges around recommended scales."""
    return tuple((v * (1 - RANDOM_SPREAD), v * (1 + RANDOM_SPREAD)) for v in (text_guidance, image_guidance))


def instruct_eps(unet, x: torch.Tensor, t, cond: torch.Tensor, uncond: torch.Tensor, image_latents: torch.Tensor,
                 text_guidance: float, image_guidance: float) -> torch.Tensor:
    """Three-way guided noise prediction in one batched UNet call (batch order as diffusers: text, image, none)."""
    img = torch.cat([image_latents, image_latents, torch.zeros_like(image_latents)])
    inp = torch.cat([torch.cat([x, x, x]), img], dim=1)
    e_full, e_image, e_none = unet(inp, t, encoder_hidden_states=torch.cat([cond, uncond, uncond])).sample.chunk(3)
    # summed in diffusers' order, so both give bit-identical results
    return e_none + text_guidance * (e_full - e_image) + image_guidance * (e_image - e_none)


def instruct_size(width: int, height: int, resolution: int, multiple: int) -> tuple[int, int]:
    """The reference app's input size: the long side about `resolution`, the short side rounded UP to a
    multiple, then both sides floored to multiples (1024x768 -> 512x384, 1920x1080 -> 512x320 at 512/64).

    Rounding the short side up scales the long side with it (60000x50 would become a 76800x64 job at 512/64), so
    the reference size is kept only while its long side stays within the resolution (floored to a multiple)
    and its pixels within resolution**2; otherwise the long side is that cap and the short side the nearest
    multiple (the centre crop takes the difference)."""
    factor = resolution / max(width, height)
    factor = math.ceil(min(width, height) * factor / multiple) * multiple / min(width, height)
    w = max(multiple, int(width * factor / multiple) * multiple)
    h = max(multiple, int(height * factor / multiple) * multiple)
    long_cap = max(multiple, resolution // multiple * multiple)
    if max(w, h) <= long_cap and w * h <= max(resolution ** 2, multiple ** 2):
        return w, h
    return fit_size(width, height, resolution=long_cap, multiple=multiple)


def size_multiple(model, unet=None) -> int:
    """64 for SD1.5 (VAE factor 8 x the UNet's 3 downsamplings, the reference's multiple); for the embedded
    model its VAE factor 4 x 4 = 16, so every UNet level still divides the latent evenly. `unet`: the UNet that
    will edit (default: the model's InstructPix2Pix UNet)."""
    unet = unet if unet is not None else model.instruct_unet() or model.unet
    return model.vae_factor * 2 ** (len(unet.config.block_out_channels) - 1)


def prepare_input(model, image, unet=None) -> Image.Image:
    """Any upload -> RGB resized and centre-cropped (ImageOps.fit) to `instruct_size`, as the reference app."""
    img = load_rgb(image)
    size = instruct_size(*img.size, model.resolution, size_multiple(model, unet))
    return img if img.size == size else ImageOps.fit(img, size, Image.Resampling.LANCZOS)


def make_scheduler(model, name: str, steps: int):
    cls = {"euler_a": EulerAncestralDiscreteScheduler, "ddim": DDIMScheduler}[name]
    sched = cls.from_config(model.scheduler_config)
    sched.set_timesteps(int(steps), device=model.device)
    return sched


def check_params(p: InstructParams, recommended: tuple[float, float] = (DEFAULT_TEXT_GUIDANCE,
                                                                        DEFAULT_IMAGE_GUIDANCE)) -> InstructParams:
    """Range checks before any image is read; unset scales take the `recommended` (sT, sI); randomisation (as
    the reference app, around the recommended) happens here, so the values actually used are returned."""
    scheduler = str(p.scheduler or "euler_a").strip().lower()
    if scheduler not in SCHEDULERS:
        raise InputError(f"Unknown scheduler {shown(p.scheduler)}; choose one of {', '.join(SCHEDULERS)}.")
    steps = check_number(p.steps, "Steps", 1, get_limits().max_steps, integer=True)
    text_g = check_number(recommended[0] if p.text_guidance is None else p.text_guidance, "Text guidance sT", 0, 50)
    image_g = check_number(recommended[1] if p.image_guidance is None else p.image_guidance, "Image guidance sI",
                           0, 20)
    if p.randomize_cfg:
        text_range, image_range = random_ranges(*recommended)
        text_g, image_g = round(random.uniform(*text_range), 2), round(random.uniform(*image_range), 2)
    seed = random.randint(0, RANDOM_SEED_MAX) if p.randomize_seed else resolve_seed(p.seed)
    return InstructParams((p.instruction or "").strip(), text_g, image_g, steps, seed, scheduler, False, False)


def instruct_edit(model, image, p: InstructParams, cancel: CancelToken | None = None,
                  preview: PreviewOptions | None = None) -> Job:
    """Edits `image` by `p.instruction`; the last event's result is an InstructResult. An empty instruction
    returns the (resized) input unchanged, as the reference app does."""
    p = check_params(p, recommended_guidance(model))  # before instruct_unet(), which may load weights
    unet = model.instruct_unet()
    if unet is None:
        raise InputError(f"{model.label} has no InstructPix2Pix UNet: load the embedded model, or "
                         "timbrooks/instruct-pix2pix, in the Model panel.")
    source = prepare_input(model, image)
    total = p.steps + 1
    meta = {"task": "instruct", "instruction": p.instruction, "seed": p.seed, "steps": p.steps,
            "text_guidance": p.text_guidance, "image_guidance": p.image_guidance, "scheduler": p.scheduler,
            "size": f"{source.width}x{source.height}", "model": model.id}
    if not p.instruction:
        result = InstructResult(ImageResult(with_metadata(source, meta), p.seed, meta), source, meta)
        yield Progress("done", total, total, preview=source, result=result,
                       message="Empty instruction: the input is returned unchanged.")
        return
    yield Progress("encoding image", 0, total, preview=source, message=f"seed {p.seed}", kind=Kind.SOURCE)
    cond, uncond = encode_prompt(model, p.instruction), encode_prompt(model, "")
    img_lat = encode_image(model, source, scaled=False)  # unscaled, as IP2P was trained
    sched = make_scheduler(model, p.scheduler, p.steps)
    gen = torch.Generator("cpu").manual_seed(p.seed)  # CPU noise: the same edit for the same seed on any device
    x = randn_tensor(img_lat.shape, generator=gen, device=model.device, dtype=model.dtype) * sched.init_noise_sigma

    def eps(x_t, t, _k):
        return instruct_eps(unet, x_t, t, cond, uncond, img_lat, p.text_guidance, p.image_guidance)

    kwargs = {"generator": gen} if p.scheduler == "euler_a" else {"eta": 0.0}
    states = ddim.sample_scheduled(eps, x, sched, cancel, **kwargs)
    z = yield from stream_steps(model, states, "editing", 0, total, preview)
    edited = decode_to_pil(model, z)
    result = InstructResult(ImageResult(with_metadata(edited, meta), p.seed, meta), source, meta, z)
    yield Progress("done", total, total, preview=edited, result=result,
                   message=f"seed {p.seed} · sT {p.text_guidance:g} · sI {p.image_guidance:g}")
