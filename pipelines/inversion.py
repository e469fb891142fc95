"""Real-image inversion (DDIM, null-text, negative-prompt) and reconstruction, with PSNR / SSIM / MSE.

Methods:
  ddim           DDIM inversion at the inversion guidance; reconstruction at w drifts for w > 1 (the baseline)
  nti            null-text inversion, our fast schedule (starts from the prompt embedding; nti.FAST)
  nti-reference  null-text inversion with the paper's schedule (nti.REFERENCE)
  npi            negative-prompt inversion: no optimisation, null = the source prompt's embedding

`invert_images` is the one entry point every real-image method uses (Invert tab, text editing, real-image
interpolation); its results are cached per (image content, prompt, steps, guidance, method, model, LoRA) in a
bounded per-session cache, and `force=True` ("re-invert") replaces a cached one.
"""
from __future__ import annotations

import hashlib
from collections.abc import Generator, Sequence
from dataclasses import dataclass, field, replace

import torch
from PIL import Image

from . import nti
from .core import ddim
from .core.cache import LRUCache
from .core.errors import InputError
from .core.events import CancelToken, Job, Kind, Progress
from .core.image_io import load_image
from .core.latents import decode_to_pil, encode_image
from .core.limits import get_limits
from .core.lora import lora_applied
from .core.metadata import with_metadata
from .core.metrics import mse, psnr, ssim
from .core.results import ImageResult, base_metadata
from .core.stream import PreviewOptions, step_preview, stream_steps
from .core.text import encode_prompt
from .core.validation import check_number, shown, validate_common

METHODS = {
    "ddim": "DDIM inversion",
    "nti": "Null-text inversion (fast)",
    "nti-reference": "Null-text inversion (paper schedule)",
    "npi": "Negative-prompt inversion (no optimisation)",
}


@dataclass
class InversionParams:
    prompt: str = ""                 # empty: unconditional inversion
    steps: int = 50
    inversion_guidance: float = 1.0  # DDIM only: null-text methods always invert at 1 (their pivot)
    guidance: float = 1.0            # reconstruction guidance w (null-text methods fit their embeddings to it)
    lora: str | None = None
    lora_strength: float = 1.0
    method: str = "ddim"
    inner_steps: int = 10            # null-text methods: most Adam iterations per step
    force: bool = False              # re-invert even when a cached inversion exists


@dataclass
class Inversion:
    """A cached inversion of one or more images: what reconstruction and editing start from."""

    method: str
    x_T: torch.Tensor                     # (B, C, h, w)
    cond: torch.Tensor                    # (B, L, D) source prompt embeddings
    uncond: list[torch.Tensor] | torch.Tensor   # per-step nulls (B, L, D) or one "" embedding (1, L, D)
    guidance: float                       # the w the nulls were fitted for (reconstruction guidance)
    steps: int
    z0: torch.Tensor                      # VAE latents of the sources
    reconstruction: torch.Tensor | None   # latents of guided sampling from x_T (null-text methods)
    losses: list[float] = field(default_factory=list)   # per step (summed over groups)
    evals: dict = field(default_factory=dict)


@dataclass
class InversionResult:
    source: Image.Image              # the resized input the model saw
    reconstruction: ImageResult
    x_T: torch.Tensor
    metrics: dict                    # psnr / ssim / mse vs source, and psnr vs the VAE-only round trip
    cached: bool = False
    method: str = "ddim"
    losses: list = field(default_factory=list)
    inversion: Inversion | None = None


def image_key(image: Image.Image) -> str:
    return hashlib.sha1(image.tobytes() + repr(image.size).encode()).hexdigest()


def prepare_image(model, image, size: tuple[int, int] | None = None) -> Image.Image:
    """Any upload -> RGB at the model's resolution (long side), sides multiples of the model's step; with
    `size`, resized to exactly that (width, height) instead."""
    img = load_image(image, resolution=model.resolution, multiple=model.size_multiple)
    return img if size is None or img.size == tuple(size) else img.resize(tuple(size), Image.LANCZOS)


def check_method(method: str) -> str:
    method = str(method or "ddim").strip().lower()
    if method not in METHODS:
        raise InputError(f"Unknown inversion method {shown(method)}; choose one of {', '.join(METHODS)}.")
    return method


def validate_inversion(p: InversionParams, steps: int, guidance: float, strength: float) -> InversionParams:
    """Range-checks everything an inversion takes, before any image is read or model run."""
    return replace(p, steps=steps, guidance=guidance, lora_strength=strength, method=check_method(p.method),
                   inversion_guidance=check_number(p.inversion_guidance, "Inversion guidance", 0, 50),
                   inner_steps=check_number(p.inner_steps, "Inner iterations", 1, get_limits().max_inner_steps,
                                            integer=True))


def invert_images(model, sources: Sequence[Image.Image], prompts: Sequence[str], p: InversionParams,
                  cache: LRUCache | None = None, cancel: CancelToken | None = None,
                  preview: PreviewOptions | None = None, shared_nulls: bool = False, offset: int = 0,
                  total: int | None = None) -> Generator[Progress, None, tuple[Inversion, bool]]:
    """Inverts prepared images (same size) with their prompts; returns (inversion, came_from_cache).

    shared_nulls: one null embedding per step for all images, fitted to the sum of their losses (dual NTI).
    Must run inside the job's lora_applied block (the UNet it inverts with is the one that will sample).
    `p` comes through validate_inversion (every caller checks it before reading images)."""
    method, steps, inner, inv_guidance = p.method, int(p.steps), p.inner_steps, p.inversion_guidance
    total = total if total is not None else offset + inversion_cost(method, steps)
    key = (model.id, id(model.pipe), tuple(image_key(s) for s in sources), tuple(prompts), steps, method,
           inv_guidance if method == "ddim" else None, None if method == "ddim" else float(p.guidance),
           inner if method.startswith("nti") else None, shared_nulls, p.lora, float(p.lora_strength) if p.lora else 0.0)
    hit = None if cache is None or p.force else cache.get(key)
    if hit is not None:
        yield Progress("inversion (cached)", offset + inversion_cost(method, steps), total)
        return hit, True
    cond = torch.cat([encode_prompt(model, t) for t in prompts])
    empty = encode_prompt(model, "")
    z0 = torch.cat([encode_image(model, s) for s in sources])
    if method == "ddim":
        uncond = empty.expand(len(z0), -1, -1)
        states = ddim.invert(model.unet, z0, cond, uncond, inv_guidance, steps, model.scheduler_config, cancel)
        x_T = yield from stream_steps(model, states, "inverting", offset, total, preview)
        inv = Inversion(method, x_T, cond, uncond, float(p.guidance), steps, z0, None)
    else:
        schedule = replace(nti.REFERENCE if method == "nti-reference" else nti.FAST, inner_steps=inner)
        groups = [list(range(len(z0)))] if shared_nulls else None
        job = nti.run_inversion(model.unet, z0, cond, empty, float(p.guidance), steps, model.scheduler_config,
                                method, schedule, groups, cancel)
        result = yield from _stream_nti(model, job, offset, total, preview)
        inv = Inversion(method, result.x_T, cond, result.nulls, float(p.guidance), steps, z0,
                        result.reconstruction, [sum(group_losses) for group_losses in result.losses],
                        result.counter.as_dict())
    if cache is not None:
        cache.put(key, inv)
    return inv, False


def inversion_cost(method: str, steps: int) -> int:
    """Progress units of an inversion: pivot steps, plus fitting (or sampling) steps for null-text methods."""
    return steps if method == "ddim" else 2 * steps


def _stream_nti(model, job, offset: int, total: int, opts: PreviewOptions | None):
    """Progress events from nti.run_inversion: the pivot, then per step the loss curve so far (partial) and a
    preview of the reconstruction."""
    opts = opts or PreviewOptions()
    curve: list[float] = []
    done = 0
    while True:
        try:
            tag, ev = next(job)
        except StopIteration as stop:
            return stop.value
        done += 1
        image = step_preview(model, opts, ev.index + 1, ev.total, ev.pred_x0[:1])
        if tag == "null":
            curve.append(float(sum(ev.losses)))
            yield Progress("fitting null-text", offset + done, total, preview=image, partial=list(curve),
                           kind=Kind.LOSSES, message=f"step loss {curve[-1]:.2e} after {ev.iterations} iteration(s)",
                           stage_step=ev.index + 1, stage_total=ev.total)
        else:
            stage = "inverting" if tag == "pivot" else "reconstructing"
            yield Progress(stage, offset + done, total, preview=image, stage_step=ev.index + 1, stage_total=ev.total)


def invert_and_reconstruct(model, image, p: InversionParams, cache: LRUCache | None = None,
                           cancel: CancelToken | None = None, preview: PreviewOptions | None = None) -> Job:
    steps, guidance, strength = validate_common(model, p.steps, p.guidance, p.lora_strength)
    p = validate_inversion(p, steps, guidance, strength)
    method = p.method
    source = prepare_image(model, image)
    prompt = (p.prompt or "").strip()
    total = inversion_cost(method, steps) + (steps if method == "ddim" else 0)
    yield Progress("encoding image", 0, total, preview=source, kind=Kind.SOURCE)
    with lora_applied(model, p.lora, strength):
        inv, cached = yield from invert_images(model, [source], [prompt], p, cache, cancel, preview, total=total)
        if inv.reconstruction is None:  # DDIM: sample back at the reconstruction guidance
            states = ddim.sample(model.unet, inv.x_T, inv.cond, inv.uncond, guidance, steps, model.scheduler_config,
                                 cancel)
            z_rec = yield from stream_steps(model, states, "reconstructing", inversion_cost(method, steps), total,
                                            preview)
        else:
            z_rec = inv.reconstruction
    recon = decode_to_pil(model, z_rec)
    vae_only = decode_to_pil(model, inv.z0)
    metrics = {
        "psnr": psnr(source, recon), "ssim": ssim(source, recon), "mse": mse(source, recon),
        "psnr_vs_vae": psnr(vae_only, recon), "vae_psnr": psnr(source, vae_only), **inv.evals,
    }
    meta = {"prompt": prompt, "task": "invert", "method": method, "steps": steps, "guidance": guidance,
            "size": f"{source.width}x{source.height}", "eta": 0.0, **base_metadata(model, p.lora, strength)}
    if method == "ddim":
        meta["inversion_guidance"] = p.inversion_guidance
    if method.startswith("nti"):
        meta["inner_steps"] = p.inner_steps
    result = InversionResult(source, ImageResult(with_metadata(recon, meta), -1, meta), inv.x_T, metrics, cached,
                             method, list(inv.losses), inv)
    yield Progress("done", total, total, preview=result.reconstruction.image, result=result,
                   message=f"{METHODS[method]}: PSNR {metrics['psnr']:.2f} dB, SSIM {metrics['ssim']:.4f}, "
                           f"MSE {metrics['mse']:.5f}")
