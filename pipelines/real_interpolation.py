"""Interpolation between two real images (Smooth Diffusion's image interpolation).

Both uploads are resized to one common size (image A's, at the model's resolution), inverted together (dual
null-text inversion with one shared null embedding per step, or NPI / DDIM), and every frame is sampled from
slerp of the two x_T with lerped prompt embeddings and the inversion's nulls.

A comparison with and without a LoRA inverts the images twice: without the LoRA for the sequence without it,
and with the LoRA switched on for the sequence with it (the UNet that samples is the one that inverted).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from .core.cache import LRUCache
from .core.events import CancelToken, Job, Progress
from .core.lora import lora_applied
from .core.metadata import with_metadata
from .core.results import ImageResult, base_metadata
from .core.stream import PreviewOptions
from .core.validation import check_number, check_prompt, validate_common
from .interpolation import (
    Endpoints,
    LoraComparison,
    check_comparison_lora,
    check_frames,
    comparison_done,
    comparison_labels,
    comparison_part,
    render_frame,
    render_sequence,
)
from .inversion import (
    InversionParams,
    image_key,
    inversion_cost,
    invert_images,
    prepare_image,
    validate_inversion,
)


@dataclass
class RealInterpolationParams:
    prompt_a: str
    prompt_b: str = ""               # empty: same as prompt A
    steps: int = 50
    guidance: float = 7.5
    inversion: str = "nti"           # see inversion.METHODS
    inner_steps: int = 10
    force: bool = False              # re-invert
    lora: str | None = None
    lora_strength: float = 1.0


def _prepare(model, image_a, image_b, p: RealInterpolationParams):
    prompt_a = check_prompt(p.prompt_a, "prompt for image A")
    prompt_b = (p.prompt_b or "").strip() or prompt_a
    steps, guidance, strength = validate_common(model, p.steps, p.guidance, p.lora_strength)
    inv_p = validate_inversion(InversionParams(prompt_a, steps, 1.0, guidance, p.lora, strength, p.inversion,
                                               p.inner_steps, p.force), steps, guidance, strength)
    a = prepare_image(model, image_a)
    b = prepare_image(model, image_b, size=a.size)
    return a, b, prompt_a, prompt_b, inv_p


def _endpoints(model, a, b, prompt_a, prompt_b, inv_p, cache, cancel, preview, total, offset=0):
    inv, cached = yield from invert_images(model, [a, b], [prompt_a, prompt_b], inv_p, cache, cancel, preview,
                                           shared_nulls=True, offset=offset, total=total)
    ends = Endpoints(inv.x_T[:1], inv.x_T[1:], inv.cond[:1], inv.cond[1:],
                     inv.uncond if isinstance(inv.uncond, list) else inv.uncond[:1], -1, -1)
    return ends, cached


def _meta(model, a, b, prompt_a, prompt_b, inv_p, eta) -> dict:
    meta = {"task": "interpolate_images", "prompt": prompt_a, "prompt_b": prompt_b, "image_a": image_key(a)[:12],
            "image_b": image_key(b)[:12], "inversion": inv_p.method, "interpolation_eta": round(float(eta), 6),
            "steps": inv_p.steps, "guidance": inv_p.guidance, "size": f"{a.width}x{a.height}", "eta": 0.0,
            **base_metadata(model, inv_p.lora, inv_p.lora_strength)}
    if inv_p.method.startswith("nti"):
        meta["inner_steps"] = inv_p.inner_steps
    return meta


def real_interpolation_frame(model, image_a, image_b, p: RealInterpolationParams, eta: float,
                             cache: LRUCache | None = None, cancel: CancelToken | None = None,
                             preview: PreviewOptions | None = None) -> Job:
    eta = check_number(eta, "Interpolation ratio", 0, 1)
    a, b, prompt_a, prompt_b, inv_p = _prepare(model, image_a, image_b, p)
    offset = inversion_cost(inv_p.method, inv_p.steps)
    total = offset + inv_p.steps
    yield Progress("encoding images", 0, total, preview=a)
    with lora_applied(model, inv_p.lora, inv_p.lora_strength):
        ends, cached = yield from _endpoints(model, a, b, prompt_a, prompt_b, inv_p, cache, cancel, preview, total)
        image = yield from render_frame(model, ends, eta, inv_p.steps, inv_p.guidance, cancel, offset, total, preview,
                                        f"frame eta={eta:.2f}")
    meta = _meta(model, a, b, prompt_a, prompt_b, inv_p, eta)
    result = ImageResult(with_metadata(image, meta), -1, meta)
    note = " (inversion reused from cache)" if cached else ""
    yield Progress("done", total, total, preview=result.image, result=result, message=f"frame at eta={eta:.2f}{note}",
                   cached=cached)


def real_interpolation_sequence(model, image_a, image_b, p: RealInterpolationParams, n_frames: int = 11,
                                cache: LRUCache | None = None, cancel: CancelToken | None = None,
                                preview: PreviewOptions | None = None, gif_dir: str | Path | None = None,
                                fps: int = 8) -> Job:
    n_frames = check_frames(n_frames)
    a, b, prompt_a, prompt_b, inv_p = _prepare(model, image_a, image_b, p)
    total = inversion_cost(inv_p.method, inv_p.steps) + inv_p.steps * n_frames
    yield Progress("encoding images", 0, total, preview=a)
    stem = Path(gif_dir) / f"interp_{image_key(a)[:8]}_{image_key(b)[:8]}" if gif_dir else None
    with lora_applied(model, inv_p.lora, inv_p.lora_strength):
        return (yield from _sequence(model, a, b, prompt_a, prompt_b, inv_p, n_frames, cache, cancel, preview, 0,
                                     total, stem, fps))


def real_interpolation_compare(model, image_a, image_b, p: RealInterpolationParams, n_frames: int = 11,
                               cache: LRUCache | None = None, cancel: CancelToken | None = None,
                               preview: PreviewOptions | None = None) -> Job:
    """The sequence without the LoRA `p.lora` (images inverted without it), then with it at `p.lora_strength`
    (images inverted again with it switched on); same images, prompts and settings. Result: a LoraComparison."""
    n_frames = check_frames(n_frames)
    a, b, prompt_a, prompt_b, inv_p = _prepare(model, image_a, image_b, p)
    name = check_comparison_lora(model, inv_p.lora)
    per = inversion_cost(inv_p.method, inv_p.steps) + inv_p.steps * n_frames
    total = 2 * per
    off_label, on_label = comparison_labels(name, inv_p.lora_strength)
    yield Progress("encoding images", 0, total, preview=a)
    without = yield from comparison_part(_sequence(model, a, b, prompt_a, prompt_b, replace(inv_p, lora=None),
                                                   n_frames, cache, cancel, preview, 0, total, None), False, off_label)
    with lora_applied(model, name, inv_p.lora_strength):
        with_lora = yield from comparison_part(_sequence(model, a, b, prompt_a, prompt_b, inv_p, n_frames, cache,
                                                         cancel, preview, per, total, None), True, on_label)
    result = LoraComparison(without, with_lora, name, inv_p.lora_strength)
    yield comparison_done(result, total)
    return result


def _sequence(model, a, b, prompt_a, prompt_b, inv_p, n_frames, cache, cancel, preview, offset, total, stem,
              fps=8) -> Job:
    """Inverts both images with inv_p (inside the caller's lora_applied block) and renders the frames."""
    ends, _ = yield from _endpoints(model, a, b, prompt_a, prompt_b, inv_p, cache, cancel, preview, total, offset)
    offset += inversion_cost(inv_p.method, inv_p.steps)
    return (yield from render_sequence(model, ends, n_frames, inv_p.steps, inv_p.guidance, cancel, preview, offset,
                                       total, lambda eta: _meta(model, a, b, prompt_a, prompt_b, inv_p, eta),
                                       stem, fps))
