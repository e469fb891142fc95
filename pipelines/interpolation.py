"""Interpolation (Smooth Diffusion): frames from slerp(x_T^A, x_T^B, eta) with linearly interpolated text
embeddings, plus the ISTD smoothness measure of a sequence. Two sources of endpoints:

  seeds        two Gaussian x_T (Smooth Diffusion's test);
  real images  two uploads, resized to one common size and inverted together: dual null-text inversion fits
               one null embedding per step shared by both images (the sum of both losses), and every frame
               reuses those nulls (lerped, which is a no-op when shared; NPI's per-image nulls do change).

Endpoints (noises or inversions, and prompt embeddings) are cached per session, so scrubbing the eta slider
costs exactly one generation per frame.

A comparison renders one sequence twice from the same endpoints and settings, without and then with a LoRA
(the Smooth LoRA by default), so the two ISTDs say what the LoRA does to the smoothness of the interpolation.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from . import singdiffusion
from .core import ddim
from .core.cache import LRUCache
from .core.errors import InputError
from .core.events import CancelToken, Job, Kind, Progress
from .core.latents import decode_to_pil, initial_noise
from .core.limits import get_limits
from .core.lora import lora_applied
from .core.metadata import with_metadata
from .core.results import ImageResult, base_metadata
from .core.stream import PreviewOptions, stream_steps
from .core.text import encode_prompt
from .core.validation import check_number, check_prompt, check_size, resolve_seed, validate_common
from .core.video import write_gif, write_mp4


def slerp(a: torch.Tensor, b: torch.Tensor, t: float, dot_threshold: float = 0.9995) -> torch.Tensor:
    """Spherical interpolation of two tensors (in float64); falls back to lerp when nearly parallel."""
    a64, b64 = a.double().flatten(), b.double().flatten()
    cos = torch.dot(a64, b64) / (a64.norm() * b64.norm())
    if cos.abs() > dot_threshold:
        out = (1 - t) * a64 + t * b64
    else:
        theta = torch.arccos(cos.clamp(-1, 1))
        s = torch.sin(theta)
        out = torch.sin((1 - t) * theta) / s * a64 + torch.sin(t * theta) / s * b64
    return out.view_as(a).to(a.dtype)


def lerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """Linear interpolation that is exact at both ends (a + (b - a) * 1 can miss b by an ulp)."""
    return torch.lerp(a, b, float(t))


def adjacent_distances(frames: list) -> np.ndarray:
    """L2 distance between consecutive frames, pixels scaled to [0,1] (as in the Smooth Diffusion paper)."""
    arrs = [np.asarray(f, dtype=np.float64) / 255.0 for f in frames]
    return np.array([np.linalg.norm(arrs[k + 1] - arrs[k]) for k in range(len(arrs) - 1)])


def istd(frames: list) -> float:
    """Interpolation standard deviation: std of the adjacent-frame distances (0 = perfectly even steps)."""
    d = adjacent_distances(frames)
    return float(d.std()) if len(d) else 0.0


@dataclass
class InterpolationParams:
    prompt_a: str
    prompt_b: str = ""            # empty: same as prompt A
    negative_prompt: str = ""
    seed_a: int = 0
    seed_b: int = 1
    steps: int = 30
    guidance: float = 7.5
    width: int | None = None
    height: int | None = None
    lora: str | None = None
    lora_strength: float = 1.0
    singular_step: bool = False       # SingDiffusion's singular step on each frame's start (pipelines/singdiffusion.py)
    singular_normalise: bool = True   # its official guidance form (see GenerateParams)


@dataclass
class Endpoints:
    noise_a: torch.Tensor
    noise_b: torch.Tensor
    cond_a: torch.Tensor
    cond_b: torch.Tensor
    uncond: torch.Tensor | list        # one embedding, or per step (B=2: row 0 for A, row 1 for B)
    seed_a: int
    seed_b: int
    # start(x_T, cond, uncond, guidance, steps, cancel) -> the latent sampling starts from (the singular step)
    start: Callable | None = None

    def uncond_at(self, eta: float):
        if isinstance(self.uncond, list):
            return [lerp(u[:1], u[1:2], eta) for u in self.uncond]
        return self.uncond


@dataclass
class SequenceResult:
    frames: list            # PIL images with metadata
    etas: list
    distances: list
    istd: float
    gif_path: str | None = None
    mp4_path: str | None = None


@dataclass
class LoraComparison:
    """One interpolation rendered twice from the same endpoints and settings: without and with a LoRA."""
    without: SequenceResult
    with_lora: SequenceResult
    lora: str               # the adapter name
    strength: float

    @property
    def istd_ratio(self) -> float | None:
        """ISTD with the LoRA over ISTD without it (below 1: the LoRA made the steps more even); None when the
        sequence without the LoRA has ISTD 0."""
        return self.with_lora.istd / self.without.istd if self.without.istd > 0 else None


@dataclass
class ComparisonFrames:
    """A comparison's `Progress.partial` while it renders frames: the frames so far of one of its sequences."""
    with_lora: bool
    frames: list


def check_frames(n_frames) -> int:
    return check_number(n_frames, "Number of frames", 2, get_limits().max_frames, integer=True)


def check_comparison_lora(model, name: str | None) -> str:
    """The adapter a comparison applies must be loaded: said before anything is rendered."""
    if not name:
        raise InputError("Choose the LoRA to compare with (the Smooth LoRA, adapter 'smooth', by default).")
    if name not in model.loras:
        loaded = f" (loaded: {', '.join(model.loras)})" if model.loras else ""
        raise InputError(f"LoRA {name!r} is not loaded for {model.label}{loaded}: load it in 'Model and LoRA' first.")
    return name


def comparison_part(job: Job, with_lora: bool, label: str) -> Job:
    """Re-yields the events of one sequence of a comparison, stages prefixed with `label` and frames wrapped in
    ComparisonFrames; the sequence's own final event is dropped (the comparison's last event carries the result).
    Returns the sequence's return value; the sequence is closed however this ends."""
    try:
        while True:
            try:
                ev = next(job)
            except StopIteration as stop:
                return stop.value
            if ev.done:
                continue
            partial = (ComparisonFrames(with_lora, ev.partial) if ev.kind is Kind.FRAMES
                       else ev.partial)
            yield replace(ev, stage=f"{label}: {ev.stage}", partial=partial)
    finally:
        job.close()


def comparison_labels(name: str, strength: float) -> tuple[str, str]:
    return "without LoRA", f"with {name} x{strength:g}"


def comparison_done(result: LoraComparison, total: int) -> Progress:
    ratio = result.istd_ratio
    ratio_text = f", ratio {ratio:.3f}" if ratio is not None else ""
    return Progress("done", total, total, result=result,
                    message=f"ISTD {result.without.istd:.4f} without, {result.with_lora.istd:.4f} with "
                            f"{result.lora}{ratio_text}")


def _endpoints(model, p: InterpolationParams, cache: LRUCache | None,
               width: int, height: int) -> tuple[Endpoints, bool]:
    prompt_a = check_prompt(p.prompt_a, "prompt A")
    prompt_b = (p.prompt_b or "").strip() or prompt_a
    seed_a, seed_b = resolve_seed(p.seed_a), resolve_seed(p.seed_b)
    key = (model.id, id(model.pipe), prompt_a, prompt_b, p.negative_prompt or "", seed_a, seed_b, width, height)
    hit = cache.get(key) if cache is not None else None
    if hit is not None:
        return hit, True
    ends = Endpoints(
        initial_noise(model, seed_a, width, height), initial_noise(model, seed_b, width, height),
        encode_prompt(model, prompt_a), encode_prompt(model, prompt_b), encode_prompt(model, p.negative_prompt or ""),
        seed_a, seed_b,
    )
    if cache is not None:
        cache.put(key, ends)
    return ends, False


def with_singular_step(model, p: InterpolationParams, ends: Endpoints, steps: int) -> Endpoints:
    """The endpoints whose frames start with SingDiffusion's singular step when `p` asks for it: each frame's
    slerped noise is its x_1, the frame's lerped prompt its condition. InputError without a module; a schedule
    where the step does nothing (zero terminal SNR) leaves the endpoints as they are."""
    if not p.singular_step:
        return ends
    singdiffusion.require_module(model)
    if singdiffusion.refusal(ddim.make_scheduler(model.scheduler_config, steps)):
        return ends

    def start(x_T, cond, uncond, guidance, n_steps, cancel):
        return singdiffusion.studio_start(model, x_T, cond, uncond, guidance, n_steps, p.singular_normalise,
                                          cancel).latents
    return replace(ends, start=start)


def _meta(model, p: InterpolationParams, ends: Endpoints, eta: float, steps, guidance, strength, w, h) -> dict:
    singular = singdiffusion.meta_for(ends.start is not None if p.singular_step else None, p.singular_normalise)
    return {"prompt": p.prompt_a.strip(), "prompt_b": (p.prompt_b or "").strip() or p.prompt_a.strip(),
            "negative_prompt": p.negative_prompt or "", "task": "interpolate", "seed_a": ends.seed_a,
            "seed_b": ends.seed_b, "interpolation_eta": round(float(eta), 6), "steps": steps,
            "guidance": guidance, "size": f"{w}x{h}", "eta": 0.0, **base_metadata(model, p.lora, strength), **singular}


def render_frame(model, ends: Endpoints, eta: float, steps, guidance, cancel, offset, total, preview, stage):
    """One frame at ratio eta of any endpoints: slerped noise, lerped prompt embeddings, DDIM; returns the image."""
    x_T = slerp(ends.noise_a, ends.noise_b, eta)
    cond = lerp(ends.cond_a, ends.cond_b, eta)
    uncond = ends.uncond_at(eta)
    if ends.start is not None:
        x_T = ends.start(x_T, cond, uncond, guidance, steps, cancel)
    states = ddim.sample(model.unet, x_T, cond, uncond, guidance, steps, model.scheduler_config, cancel)
    x0 = yield from stream_steps(model, states, stage, offset, total, preview)
    return decode_to_pil(model, x0)


def interpolation_frame(model, p: InterpolationParams, eta: float, cache: LRUCache | None = None,
                        cancel: CancelToken | None = None, preview: PreviewOptions | None = None) -> Job:
    """One frame at interpolation ratio eta in [0,1]."""
    eta = check_number(eta, "Interpolation ratio", 0, 1)
    steps, guidance, strength = validate_common(model, p.steps, p.guidance, p.lora_strength)
    w, h = check_size(model, p.width, p.height)
    ends = with_singular_step(model, p, _endpoints(model, p, cache, w, h)[0], steps)
    total = steps
    with lora_applied(model, p.lora, strength):
        image = yield from render_frame(model, ends, eta, steps, guidance, cancel, 0, total, preview,
                                        f"frame eta={eta:.2f}")
    meta = _meta(model, p, ends, eta, steps, guidance, strength, w, h)
    result = ImageResult(with_metadata(image, meta), ends.seed_a, meta)
    yield Progress("done", total, total, preview=result.image, result=result)


def interpolation_sequence(model, p: InterpolationParams, n_frames: int = 11, cache: LRUCache | None = None,
                           cancel: CancelToken | None = None, preview: PreviewOptions | None = None,
                           gif_dir: str | Path | None = None, fps: int = 8) -> Job:
    """N frames at evenly spaced eta (ends included), then their ISTD, an animated GIF and an MP4."""
    n_frames = check_frames(n_frames)
    steps, guidance, strength = validate_common(model, p.steps, p.guidance, p.lora_strength)
    w, h = check_size(model, p.width, p.height)
    ends = with_singular_step(model, p, _endpoints(model, p, cache, w, h)[0], steps)
    with lora_applied(model, p.lora, strength):
        return (yield from render_sequence(
            model, ends, n_frames, steps, guidance, cancel, preview, 0, steps * n_frames,
            lambda eta: _meta(model, p, ends, eta, steps, guidance, strength, w, h),
            Path(gif_dir) / f"interp_{ends.seed_a}_{ends.seed_b}" if gif_dir else None, fps))


def interpolation_compare(model, p: InterpolationParams, n_frames: int = 11, cache: LRUCache | None = None,
                          cancel: CancelToken | None = None, preview: PreviewOptions | None = None) -> Job:
    """The sequence without the LoRA `p.lora`, then with it at `p.lora_strength` (same endpoints, same settings);
    the LoRA is switched on only while its sequence renders. Result: a LoraComparison."""
    n_frames = check_frames(n_frames)
    steps, guidance, strength = validate_common(model, p.steps, p.guidance, p.lora_strength)
    w, h = check_size(model, p.width, p.height)
    name = check_comparison_lora(model, p.lora)
    ends = with_singular_step(model, p, _endpoints(model, p, cache, w, h)[0], steps)
    per, plain = steps * n_frames, replace(p, lora=None)
    total = 2 * per
    off_label, on_label = comparison_labels(name, strength)
    without = yield from comparison_part(render_sequence(
        model, ends, n_frames, steps, guidance, cancel, preview, 0, total,
        lambda eta: _meta(model, plain, ends, eta, steps, guidance, strength, w, h), None), False, off_label)
    with lora_applied(model, name, strength):
        with_lora = yield from comparison_part(render_sequence(
            model, ends, n_frames, steps, guidance, cancel, preview, per, total,
            lambda eta: _meta(model, p, ends, eta, steps, guidance, strength, w, h), None), True, on_label)
    result = LoraComparison(without, with_lora, name, strength)
    yield comparison_done(result, total)
    return result


def render_sequence(model, ends: Endpoints, n_frames: int, steps: int, guidance: float, cancel, preview,
                    offset: int, total: int, meta_for, out_stem: Path | None, fps: int = 8) -> Job:
    """Renders the frames of any endpoints (seeds or real images), streaming each finished frame."""
    etas = [k / (n_frames - 1) for k in range(n_frames)]
    frames = []
    for k, eta in enumerate(etas):
        image = yield from render_frame(model, ends, eta, steps, guidance, cancel, offset + k * steps, total, preview,
                                        f"frame {k + 1}/{n_frames}")
        frames.append(with_metadata(image, meta_for(eta)))
        yield Progress(f"frame {k + 1}/{n_frames}", offset + (k + 1) * steps, total, partial=list(frames),
                       kind=Kind.FRAMES)
    dists = adjacent_distances(frames)
    gif = mp4 = None
    if out_stem is not None:
        gif = str(write_gif(frames, out_stem.with_suffix(".gif"), fps))
        mp4 = write_mp4(frames, out_stem.with_suffix(".mp4"), fps)
    result = SequenceResult(frames, etas, dists.tolist(), float(dists.std()), gif, mp4)
    yield Progress("done", total, total, partial=list(frames), result=result, message=f"ISTD {result.istd:.4f}",
                   kind=Kind.FRAMES)
    return result
