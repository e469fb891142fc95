"""Text-to-image: DDIM from seeded noise, with live previews and an optional LoRA."""
from __future__ import annotations

from dataclasses import dataclass, replace

from . import singdiffusion
from .core import ddim
from .core.errors import InputError
from .core.events import CancelToken, Job, Kind, Progress
from .core.latents import decode_to_pil, initial_noise
from .core.limits import get_limits
from .core.lora import lora_applied
from .core.metadata import with_metadata
from .core.results import ImageResult, base_metadata
from .core.stream import PreviewOptions, stream_steps
from .core.text import encode_prompt
from .core.validation import MAX_SEED, check_number, check_prompt, check_size, resolve_seed, validate_common
from .drag.trajectory import Trajectory, store_trajectory
from .fast import fast_generate


@dataclass
class GenerateParams:
    prompt: str
    negative_prompt: str = ""
    seed: int = -1
    steps: int = 30
    guidance: float = 7.5
    width: int | None = None
    height: int | None = None
    lora: str | None = None       # adapter name, None for the base model
    lora_strength: float = 1.0
    fast: bool = False            # LCM-LoRA few-step sampling (pipelines/fast.py): steps 1-8, guidance 0-2
    singular_step: bool = False   # SingDiffusion's initial singular step (pipelines/singdiffusion.py)
    singular_normalise: bool = True  # its official guidance form (y_u + w (y_c - y_u)) / w; False: without / w


def generate(model, p: GenerateParams, cancel: CancelToken | None = None, preview: PreviewOptions | None = None,
             trajectories=None) -> Job:
    """`trajectories`: an optional LRUCache (the drag cache) that keeps this image's latent trajectory, so that
    dragging it later skips inversion and LoRA (pipelines/drag/trajectory.py)."""
    check_singular(model, p)
    if p.fast:  # LCM's trajectory is not DDIM's: a drag of a fast image inverts it as it would any image
        return (yield from fast_generate(model, p, cancel, preview))
    prompt = check_prompt(p.prompt)
    steps, guidance, strength = validate_common(model, p.steps, p.guidance, p.lora_strength)
    width, height = check_size(model, p.width, p.height)
    seed = resolve_seed(p.seed)
    total = steps + 1
    yield Progress("encoding prompt", 0, total, message=f"seed {seed}")
    cond = encode_prompt(model, prompt)
    uncond = encode_prompt(model, p.negative_prompt or "")
    x_T = initial_noise(model, seed, width, height)
    start = None
    if p.singular_step:  # x_T becomes the latent at the first timestep (it was pure noise x_1)
        yield Progress("singular step", 0, total, message=f"seed {seed}")
        start = singdiffusion.studio_start(model, x_T, cond, uncond, guidance, steps, p.singular_normalise, cancel)
        x_T = start.latents
    with lora_applied(model, p.lora, strength):
        states = ddim.sample(model.unet, x_T, cond, uncond, guidance, steps, model.scheduler_config, cancel)
        if trajectories is not None:
            latents = [x_T]
            states = ddim.recorded(states, latents)
        x0 = yield from stream_steps(model, states, "sampling", 0, total, preview)
    image = decode_to_pil(model, x0)
    if trajectories is not None:
        store_trajectory(trajectories, model, image, Trajectory(latents, cond, uncond, guidance, steps, prompt, p.lora,
                                                                strength if p.lora else 0.0))
    meta = {"prompt": prompt, "negative_prompt": p.negative_prompt or "", "task": "generate", "seed": seed,
            "steps": steps, "guidance": guidance, "size": f"{width}x{height}", "eta": 0.0,
            **base_metadata(model, p.lora, strength), "singular_step": False,
            **singdiffusion.meta_for(start.applied if start is not None else None, p.singular_normalise)}
    result = ImageResult(with_metadata(image, meta), seed, meta)
    note = f" · {start.note}" if start is not None and start.note else ""
    yield Progress("done", total, total, preview=result.image, result=result, message=f"seed {seed}{note}")


def check_singular(model, p: GenerateParams) -> None:
    """The singular step needs the model's SingDiffusion module and the standard sampler: said before any work."""
    if p.singular_step:
        if p.fast:
            raise InputError("SingDiffusion's singular step runs with the standard sampler: turn off Fast or the "
                             "singular step.")
        singdiffusion.require_module(model)


def batch_seeds(seed, count: int) -> list[int]:
    """The seeds of a batch: `seed` (a random one for -1), then +1 for each further image (wrapping past
    MAX_SEED), as A1111's batch count does."""
    first = resolve_seed(seed)
    return [(first + i) % (MAX_SEED + 1) for i in range(count)]


def generate_batch(model, p: GenerateParams, count: int = 1, cancel: CancelToken | None = None,
                   preview: PreviewOptions | None = None, trajectories=None) -> Job:
    """`count` images, one `generate` job per image with the seeds of batch_seeds. Progress runs over the whole
    batch ("image 2/4 · sampling"); each finished image is streamed as a RESULTS event whose `partial` lists the
    images so far; the last event's result is the last image (an ImageResult, as generate's) and its `partial`
    the whole batch. Everything is checked before the first image starts."""
    count = check_number(count, "Batch count", 1, get_limits().max_batch_count, integer=True)
    check_prompt(p.prompt)
    steps = validate_common(model, p.steps, p.guidance, p.lora_strength)[0]
    check_size(model, p.width, p.height)
    check_singular(model, p)
    seeds = batch_seeds(p.seed, count)
    per = steps + 1
    total = per * count
    done = []
    for i, seed in enumerate(seeds):
        if cancel is not None:
            cancel.check()
        label = f"image {i + 1}/{count}" if count > 1 else ""
        for ev in generate(model, replace(p, seed=seed), cancel, preview, trajectories):
            step = i * per + ev.step
            if ev.done:
                done.append(ev.result)
                if i + 1 < count:
                    yield Progress(f"{label} done", step, total, preview=ev.result.image, partial=list(done),
                                   kind=Kind.RESULTS, message=f"seed {seed}")
                    break
                yield replace(ev, step=total, total=total, partial=list(done), kind=Kind.RESULTS)
            else:
                yield replace(ev, stage=f"{label} · {ev.stage}" if label else ev.stage, step=step, total=total)
