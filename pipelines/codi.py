"""Fast instruction editing with CoDi (conditional diffusion distillation, Mei et al. CVPR 2024): 1, 2 or 4 steps.

A CoDi model (a model folder's `codi/`, LoadedModel.codi()) is a student of the text-to-image model: its UNet plus a
condition adapter (a ControlNet copy of the UNet's encoder) that reads the input image's VAE latent. The sampler
(pipelines/core/consistency.py CodiScheduler, run by the studio's one sampling loop ddim.sample_scheduled):

    z = N(0, I) from the seed
    for t in the sub-sampled grid (1 step: 980; 2: 980, 480; 4: 980, 740, 500, 260):
        eps = eps_u + w (eps_c - eps_u)            # text guidance; one batched call; just eps_c at w = 1
        x0 = c_skip(t) z + c_out(t) (z - sqrt(1 - a_t) eps) / sqrt(a_t)
        z = sqrt(a_s) x0 + sqrt(1 - a_s) eps       # deterministic re-noise to the next timestep s, no fresh noise
    the result is the last x0

The unconditional branch is the empty instruction with the same image condition. Inputs are prepared as the
InstructPix2Pix edit prepares them, and the result is an InstructResult whose PNG parameters say mode "codi".
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.utils.torch_utils import randn_tensor

from .core import consistency, ddim
from .core.errors import InputError
from .core.events import CancelToken, Job, Kind, Progress
from .core.latents import decode_to_pil, encode_image
from .core.metadata import with_metadata
from .core.results import ImageResult
from .core.stream import PreviewOptions, stream_steps
from .core.text import encode_prompt
from .core.validation import check_number, check_text_length, resolve_seed, shown
from .instruct import InstructResult, prepare_input

STEPS = (1, 2, 4)        # what the sampler is distilled for
DEFAULT_STEPS = 4
DEFAULT_GUIDANCE = 1.0   # when codi.json names none: no text guidance
MAX_GUIDANCE = 20.0
MODE = "codi"            # the "mode" of the PNG parameters


@dataclass
class CodiParams:
    instruction: str
    steps: int = DEFAULT_STEPS
    guidance: float | None = None   # text guidance; None: the CoDi model's own (codi.json "guidance")
    seed: int = -1


def codi_guidance(config: dict | None) -> float:
    """The text guidance a CoDi model was distilled to sample with (codi.json), else 1 (none)."""
    try:
        value = float((config or {}).get("guidance", DEFAULT_GUIDANCE))
    except (TypeError, ValueError):
        return DEFAULT_GUIDANCE
    return value if 0 <= value <= MAX_GUIDANCE else DEFAULT_GUIDANCE


def check_params(p: CodiParams, default_guidance: float = DEFAULT_GUIDANCE) -> CodiParams:
    """Range checks before any weights or image are read; the seed and guidance actually used are returned."""
    steps = check_number(p.steps, "Steps", 1, max(STEPS), integer=True)
    if steps not in STEPS:
        raise InputError(f"Fast (CoDi) mode samples in 1, 2 or 4 steps, got {shown(p.steps)}.")
    guidance = check_number(default_guidance if p.guidance is None else p.guidance, "Guidance", 0, MAX_GUIDANCE)
    instruction = check_text_length("" if p.instruction is None else str(p.instruction), "instruction").strip()
    return CodiParams(instruction, steps, guidance, resolve_seed(p.seed))


def no_codi_message(model) -> str:
    return (f"{model.label} has no CoDi model (a codi/ folder), so Fast (CoDi) mode is not available for it: use "
            "Standard (InstructPix2Pix), or load the embedded model.")


def codi_scheduler(model, config: dict, steps: int) -> consistency.CodiScheduler:
    """The sampler on the model's noise schedule and the grid and scalings the CoDi model was distilled with."""
    return consistency.CodiScheduler(steps, consistency.schedule_alphas(model.scheduler_config),
                                     grid=int(config.get("grid", consistency.GRID)),
                                     sigma_data=float(config.get("sigma_data", consistency.SIGMA_DATA)),
                                     timestep_scaling=float(config.get("timestep_scaling",
                                                                       consistency.TIMESTEP_SCALING)))


def codi_edit(model, image, p: CodiParams, cancel: CancelToken | None = None,
              preview: PreviewOptions | None = None) -> Job:
    """Edits `image` by `p.instruction` in 1, 2 or 4 CoDi steps; the last event's result is an InstructResult. An
    empty instruction returns the (resized) input unchanged, as the InstructPix2Pix edit does."""
    config = model.codi_config()
    if config is None:
        raise InputError(no_codi_message(model))
    p = check_params(p, codi_guidance(config))  # before codi(), which may load weights
    codi = model.codi()
    source = prepare_input(model, image, codi.unet)
    total = p.steps + 1
    meta = {"task": "instruct", "mode": MODE, "instruction": p.instruction, "seed": p.seed, "steps": p.steps,
            "guidance": p.guidance, "size": f"{source.width}x{source.height}", "model": model.id}
    if not p.instruction:
        result = InstructResult(ImageResult(with_metadata(source, meta), p.seed, meta), source, meta)
        yield Progress("done", total, total, preview=source, result=result,
                       message="Empty instruction: the input is returned unchanged.")
        return
    yield Progress("encoding image", 0, total, preview=source, message=f"seed {p.seed}", kind=Kind.SOURCE)
    condition = encode_image(model, source)  # posterior mean x the scaling factor, as the adapter was trained
    cond = encode_prompt(model, p.instruction)
    uncond = None if p.guidance == 1.0 else encode_prompt(model, "")
    gen = torch.Generator("cpu").manual_seed(p.seed)  # CPU noise: the same edit for the same seed on any device
    z = randn_tensor(condition.shape, generator=gen, device=model.device, dtype=model.dtype)

    def eps(z_t, t, _k):
        return consistency.guided_student_eps(codi.unet, codi.adapter, z_t, t, cond, uncond, condition, p.guidance)

    states = ddim.sample_scheduled(eps, z, codi_scheduler(model, config, p.steps), cancel)
    z = yield from stream_steps(model, states, "editing", 0, total, preview)
    edited = decode_to_pil(model, z)
    result = InstructResult(ImageResult(with_metadata(edited, meta), p.seed, meta), source, meta, z)
    yield Progress("done", total, total, preview=edited, result=result,
                   message=f"seed {p.seed} · {p.steps} step{'s' * (p.steps > 1)} · guidance {p.guidance:g}")
