"""DragDiffusion (Shi et al., CVPR 2024): move points of an image (handles) to new places (targets).

  1. LoRA     a per-image LoRA on the UNet's attention projections, trained on the image with its prompt, keeps
              the drag faithful to it (lora.py); cached per image content and settings
  2. invert   DDIM inversion with the shared core to step round(strength x steps) of the schedule (t = 681 of
              1000 at the defaults 0.7 x 50), with the prompt at guidance 1; cached
  3. drag     the inverted latent z_t is optimised (Adam): motion supervision pulls a (2 r1 + 1)^2 patch of UNet
              decoder features around each handle one unit step towards its target, a mask term keeps the
              one-step DDIM denoise of z_t outside the editable region, and after every step each handle is
              re-found by nearest neighbour to its original feature within r2 (points.py); stop
              when every handle is within 2 feature pixels of its target or after the iteration limit
  4. denoise  [original z_t, dragged z_t] are denoised together with mutual self-attention: in the decoder's
              self-attention layers both attend to the original's keys and values (unet.py)

Warm start (`warm_start`, off by default as in the reference): before step 3 the painted region's inverted latent is
carried along the drag (warp.py) and the handles start at their targets, so the optimisation only
corrects the move. On the embedded model's 16x16 latents, where one feature pixel per iteration is slow and
colours drift on the way, it raised drag success from 0.55 to 0.95 on 20 held-out tuning scenes, and to 1.0 with
no per-image LoRA (which remembers the old layout and pulls a carried object back); the eval table has the rest.

Features: the output of `unet.up_blocks[i]` by a forward hook, bilinearly upsampled to 4x the latent size (the
reference's `sup_res` 256 for SD1.5's 64x64 latents, i.e. half of a 512 image; the full image on the embedded
model, whose VAE factor is 4). `feature_block` is numbered as on SD1.5 and counted from the decoder's output end:
the default 2 is the reference's `unet_feature_idx=[3]`, SD1.5's up_blocks[2] (640 channels at full latent
resolution); on the embedded model's three up blocks it is up_blocks[1] (128 channels, full latent resolution),
on the tiny model's two up_blocks[0]. Point distances (the stop rule, r1, r2) are in pixels of that grid, as in
the reference: 2 image pixels each on SD1.5, 1 on the embedded model.

Images generated in the studio keep their latent trajectory (`generate(..., trajectories=cache)`): dragging one
starts from its own latent at that step with its own prompt embeddings and guidance, without LoRA or inversion
(the reference's "Editing Generated Image"; with guidance > 1 the unconditional and conditional features are
concatenated, weighted (1 - c, c) with c = s / (2 s - 1), as there).

Every change to the shared UNet (peft adapters, requires_grad, attention processors, hooks) is undone by a
context manager, on error and cancel too; the cancel token is checked before every UNet call.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch
from diffusers import DDIMScheduler
from PIL import Image

from ..core import ddim
from ..core.cache import LRUCache
from ..core.errors import InputError
from ..core.events import CancelToken, Job, Kind, Progress
from ..core.latents import decode_to_pil, encode_image
from ..core.limits import get_limits
from ..core.lora import SMOOTH_NAME
from ..core.masks import latent_cells, user_mask
from ..core.metadata import with_metadata
from ..core.peft_state import adapters_active, peft_state_restored
from ..core.results import ImageResult, base_metadata
from ..core.stream import PreviewOptions, preview_image, stream_steps
from ..core.text import encode_prompt
from ..core.validation import check_number, resolve_seed, validate_common
from ..inversion import image_key, prepare_image
from .lora import ADAPTER, adapter_state, add_adapter, train_lora
from .points import (
    REACHED,
    check_point_count,
    check_points,
    distance,
    draw_points,
    motion_supervision,
    reached,
    to_feature,
    to_image,
    track_points,
)
from .trajectory import find_trajectory
from .unet import (
    feature_block_index,
    feature_hook,
    mutual_self_attention,
    upsample,
)
from .warp import displacement_field, warp_region

__all__ = ["DragParams", "DragResult", "DragSettings", "check_points", "drag", "draw_points", "prepare_drag_mask",
           "validate_drag"]

SUPERVISION_PER_LATENT = 4   # supervision grid = 4x the latent: the reference's sup_res 256 for SD's 64 latents
PREVIEW_EVERY = 5         # drag iterations between previews (a preview costs a decode, not a UNet call)


@dataclass
class DragParams:
    handles: list[tuple[float, float]]   # (x, y) in image pixels of the prepared (model-resolution) image
    targets: list[tuple[float, float]]   # same length as handles
    prompt: str = ""
    lora_steps: int = 80                 # 0 = no LoRA
    lora_rank: int = 16
    lora_lr: float = 5e-4
    drag_iterations: int = 80
    latent_lr: float = 0.01
    mask_weight: float = 0.1             # lambda
    inversion_strength: float = 0.7
    steps: int = 50
    feature_block: int = 2               # SD1.5 numbering from the output end (module docstring)
    r1: int = 1
    r2: int = 3
    warm_start: bool = False             # carry the painted region's latent along the drag first (warp.py)
    smooth_lora: bool = False
    guidance: float = 1.0
    seed: int = 0                        # LoRA init and training noise; -1 = random
    mutual_attention_step: int = 0       # first denoising step (of those run) with the original's keys/values
    mutual_attention_layer: int = 10     # first self-attention layer, SD1.5 numbering (unet.mutual_layer_start)


@dataclass
class DragResult:
    image: ImageResult                    # PNG with metadata
    source: Image.Image                   # the prepared input
    handles: list[tuple[float, float]]    # final tracked handle positions (image pixels)
    targets: list[tuple[float, float]]
    timings: dict                         # seconds: lora, inversion, drag, denoise
    cached: dict                          # {"lora": bool, "inversion": bool, "trajectory": bool}
    params: dict
    lora_losses: list[float] = field(default_factory=list)


@dataclass(frozen=True)
class DragSettings:
    """DragParams after validation (`validate_drag`): every number range-checked and typed, the seed resolved, the
    prompt stripped. The job, its caches' keys and its metadata read these, never the raw DragParams."""
    steps: int
    guidance: float
    inversion_strength: float
    lora_steps: int
    lora_rank: int
    lora_lr: float
    drag_iterations: int
    latent_lr: float
    mask_weight: float
    feature_block: int
    r1: int
    r2: int
    mutual_attention_step: int
    mutual_attention_layer: int
    seed: int
    prompt: str
    smooth_lora: bool
    warm_start: bool


@dataclass
class _LatentDrag:
    """Step 3's problem, built by `drag` and read by the optimisation and its previews: the latent at timestep t,
    what the UNet is conditioned on there, where the features come from, and the points to move."""
    z_t: torch.Tensor                       # the latent at t (inverted, cached, or from a trajectory)
    cond: torch.Tensor
    uncond: torch.Tensor | None             # None without guidance
    guidance: float
    sched: DDIMScheduler                    # the job's DDIM schedule
    t: torch.Tensor                         # z_t's timestep
    grid: tuple[int, int]                   # supervision grid (h, w)
    block: int                              # index of the up block whose output are the features
    keep: torch.Tensor | None               # the mask term's latent keep-weight (1, 1, h, w); None = no mask term
    h_feat: list[tuple[float, float]]       # handles and targets on the grid
    t_feat: list[tuple[float, float]]
    size: tuple[int, int]                   # image (width, height)
    handles: list[tuple[float, float]]      # image pixels, for the previews
    targets: list[tuple[float, float]]
    z_start: torch.Tensor | None = None     # a warm start (warp.py): the optimisation starts here


# ----------------------------------------------------------------------------------------------- inputs

def validate_drag(model, p: DragParams) -> DragSettings:
    """Every number range-checked (InputError with a UI sentence) before any image is read or UNet run."""
    steps, guidance, _ = validate_common(model, p.steps, p.guidance, 1.0)
    strength = check_number(p.inversion_strength, "Inversion strength", 0, 1)
    n_actual = min(steps, round(strength * steps))
    if n_actual < 1:
        raise InputError(f"Inversion strength {strength:g} of {steps} steps inverts no step at all: raise it to at "
                         f"least {1 / steps:.2g}.")
    limits = get_limits()
    check_point_count(p.handles, p.targets)
    s = DragSettings(
        steps=steps, guidance=guidance, inversion_strength=strength,
        lora_steps=check_number(p.lora_steps, "LoRA steps", 0, limits.max_lora_steps, integer=True),
        lora_rank=check_number(p.lora_rank, "LoRA rank", 1, limits.max_lora_rank, integer=True),
        lora_lr=check_number(p.lora_lr, "LoRA learning rate", 0, 1),
        drag_iterations=check_number(p.drag_iterations, "Drag iterations", 0, limits.max_drag_iterations,
                                     integer=True),
        latent_lr=check_number(p.latent_lr, "Latent learning rate", 0, 1),
        mask_weight=check_number(p.mask_weight, "Mask term lambda", 0, 100),
        feature_block=check_number(p.feature_block, "Feature block", 0, 3, integer=True),
        r1=check_number(p.r1, "r1 (supervision patch radius)", 0, 16, integer=True),
        r2=check_number(p.r2, "r2 (tracking radius)", 1, 32, integer=True),
        mutual_attention_step=check_number(p.mutual_attention_step, "Mutual attention step", 0, 1000, integer=True),
        mutual_attention_layer=check_number(p.mutual_attention_layer, "Mutual attention layer", 0, 64, integer=True),
        seed=resolve_seed(p.seed),
        prompt=(p.prompt or "").strip(),
        smooth_lora=bool(p.smooth_lora),
        warm_start=bool(p.warm_start),
    )
    if s.lora_steps and s.lora_lr <= 0:
        raise InputError("The LoRA learning rate must be above 0 (or set LoRA steps to 0 for no LoRA).")
    if s.drag_iterations and s.latent_lr <= 0:
        raise InputError("The latent learning rate must be above 0.")
    if ADAPTER in model.loras:
        raise InputError(f"A loaded LoRA is named {ADAPTER!r}, the name the drag uses for its own: reload it under "
                         f"another name.")
    if s.smooth_lora and SMOOTH_NAME not in model.loras:
        raise InputError("The Smooth LoRA is not loaded: load it first (Model and LoRA), or untick "
                         "'Use the Smooth LoRA during the drag'.")
    return s


def prepare_drag_mask(mask, size: tuple[int, int], vae_factor: int) -> tuple[np.ndarray, torch.Tensor] | None:
    """A user mask (any size; nonzero / opaque = editable) -> (bool image mask, latent keep-weight (1, 1, h, w)),
    or None when nothing (or everything) is painted: the whole image is editable and the mask term is off (as
    the reference does since it froze whole images by mistake, DragDiffusion#45). A latent pixel is editable
    when any image pixel of its block is."""
    if mask is None:
        return None
    m = user_mask(mask, size)
    if not m.any() or m.all():
        return None
    editable = torch.from_numpy(latent_cells(m, vae_factor).astype(np.float32))[None, None]
    return m, 1.0 - editable


# ----------------------------------------------------------------------------------------------- pieces

class _Features:
    """eps and upsampled supervision features of one latent at timestep t (one UNet call; two items under
    guidance, whose features are concatenated as the reference's generated-image mode does)."""

    def __init__(self, unet, store: dict, cond, uncond, guidance: float, t, grid) -> None:
        self.unet, self.store, self.t, self.grid = unet, store, t, grid
        self.guided = uncond is not None and guidance > 1.0
        self.guidance = guidance
        self.emb = torch.cat([uncond, cond]) if self.guided else cond

    def __call__(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.cat([z, z]) if self.guided else z
        out = self.unet(x, self.t, encoder_hidden_states=self.emb).sample.float()
        feats = self.store["features"]
        if self.guided:
            eps_u, eps_c = out.chunk(2)
            out = eps_u + self.guidance * (eps_c - eps_u)
            c = self.guidance / (2 * self.guidance - 1)
            feats = torch.cat([(1 - c) * feats[:1], c * feats[1:]], dim=1)
        return out, upsample(feats, self.grid)


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _drag_preview(model, opts: PreviewOptions, x0: torch.Tensor, size, handles, targets, current) -> Image.Image:
    img = preview_image(model, x0[:1], full=bool(opts.full_decode_every))
    if img.size != tuple(size):
        img = img.resize(tuple(size), Image.BILINEAR)
    return draw_points(img, handles, targets, current)


def _readable(opts: PreviewOptions) -> PreviewOptions:
    """The drag's previews are full decodes (every PREVIEW_EVERY steps unless the session asks for more often):
    they are there to show where the object is, and the linear latent preview cannot on small latents. No
    previews when the session has them off."""
    if not (opts.every or opts.full_decode_every):
        return opts
    return PreviewOptions(every=0, full_decode_every=opts.full_decode_every or PREVIEW_EVERY)


def _edited_branch(states):
    for st in states:
        yield ddim.StepState(st.index, st.total, st.timestep, st.latents, st.pred_x0[1:2])


# ----------------------------------------------------------------------------------------------- the job

def drag(model, image, p: DragParams, mask=None, cache: LRUCache | None = None, cancel: CancelToken | None = None,
         preview: PreviewOptions | None = None) -> Job:
    """The DragDiffusion job; the last event's result is a DragResult. `image`: anything prepare_image takes;
    `mask`: None/empty = the whole image editable, else a bool/uint8 array or PIL image of any size."""
    s = validate_drag(model, p)
    opts = _readable(preview or PreviewOptions())
    source = prepare_image(model, image)
    handles, targets = check_points(p.handles, p.targets, source.size)
    masks = prepare_drag_mask(mask, source.size, model.vae_factor)
    unet, dev, dtype = model.unet, model.device, model.dtype
    notes = [] if masks is not None else ["no region painted (or all of it): the whole image is editable"]
    warm = s.warm_start and masks is not None
    if s.warm_start and masks is None:
        notes.append("warm start skipped: it moves the painted region, and none is painted")

    smooth = {SMOOTH_NAME: 1.0} if s.smooth_lora else {}
    traj = find_trajectory(cache, model, source)
    if traj is not None and traj.lora and traj.lora not in model.loras:
        notes.append(f"the LoRA {traj.lora!r} this image was generated with is no longer loaded: inverting instead")
        traj = None
    if traj is not None:
        steps, guidance = traj.steps, traj.guidance
        cond, uncond = traj.cond, traj.uncond
        notes.append(f"generated here: starting from its own latent trajectory with its {steps} steps, prompt and "
                     f"guidance {guidance:g} (no LoRA, no inversion)")
    else:
        steps, guidance = s.steps, s.guidance
        cond = encode_prompt(model, s.prompt)
        uncond = encode_prompt(model, "") if guidance != 1.0 else None
    n_actual = min(steps, max(1, round(s.inversion_strength * steps)))
    start = steps - n_actual
    sched = ddim.make_scheduler(model.scheduler_config, steps)
    t = sched.timesteps[start]
    use_lora = traj is None and s.lora_steps > 0
    iters = s.drag_iterations
    total = (s.lora_steps if use_lora else 0) + (0 if traj is not None else n_actual) + iters + n_actual
    grid = (source.height // model.vae_factor * SUPERVISION_PER_LATENT,
            source.width // model.vae_factor * SUPERVISION_PER_LATENT)
    h_feat = [to_feature(h, source.size, grid) for h in handles]
    t_feat = [to_feature(g, source.size, grid) for g in targets]
    block = feature_block_index(unet, s.feature_block)

    key = image_key(source)
    base = (model.id, id(model.pipe), key, s.prompt, s.smooth_lora, model.loras.get(SMOOTH_NAME))
    lora_key = ("drag-lora", *base, s.lora_rank, s.lora_lr, s.lora_steps, s.seed) if use_lora else None
    inv_key = ("drag-inversion", *base, steps, n_actual, lora_key)
    timings = {"lora": 0.0, "inversion": 0.0, "drag": 0.0, "denoise": 0.0}
    cached = {"lora": False, "inversion": False, "trajectory": traj is not None}
    losses: list[float] = []

    yield Progress("preparing", 0, total, preview=draw_points(source, handles, targets),
                   message="; ".join(notes) or f"{len(handles)} point pair(s)")
    done = 0
    with peft_state_restored(unet):
        # 1. LoRA: trained, or its cached weights loaded, as a temporary adapter
        _sync(dev)
        t0 = time.perf_counter()
        active = dict(smooth)
        if traj is not None and traj.lora:
            active[traj.lora] = traj.lora_strength
        if use_lora:
            state = None if cache is None else cache.get(lora_key)
            add_adapter(unet, s.lora_rank, state, s.seed)
            if state is None:
                losses = yield from train_lora(model, source, cond, smooth, s.lora_steps, s.lora_lr, s.seed,
                                               cancel, done, total)
                if cache is not None:
                    cache.put(lora_key, adapter_state(unet))
            else:
                cached["lora"] = True
                yield Progress("LoRA (cached)", s.lora_steps, total, message="per-image LoRA reused from cache")
            done += s.lora_steps
            active[ADAPTER] = 1.0
        _sync(dev)
        timings["lora"] = time.perf_counter() - t0

        with adapters_active(unet, active):
            # 2. the latent at step `start`: from the trajectory, the cache, or DDIM inversion
            t0 = time.perf_counter()
            if traj is not None:
                z_t = traj.latents[start].to(dev, dtype)
            else:
                z_t = None if cache is None else cache.get(inv_key)
                if z_t is None:
                    z0 = encode_image(model, source)
                    states = ddim.invert(unet, z0, cond, None, 1.0, steps, model.scheduler_config, cancel, n_actual)
                    z_t = yield from stream_steps(model, states, "inverting", done, total, opts)
                    if cache is not None:
                        cache.put(inv_key, z_t)
                else:
                    cached["inversion"] = True
                    yield Progress("inversion (cached)", done + n_actual, total, message="inversion reused from cache")
                done += n_actual
            _sync(dev)
            timings["inversion"] = time.perf_counter() - t0

            # 3. drag: optimise z_t (from the region carried along the drag, with a warm start)
            t0 = time.perf_counter()
            z_start = None
            if warm:
                field = displacement_field(handles, targets, tuple(z_t.shape[-2:]), 1.0 / model.vae_factor)
                z_start = warp_region(z_t, field, 1.0 - masks[1])
            keep = None if masks is None or s.mask_weight == 0 else masks[1].to(z_t.device, torch.float32)
            problem = _LatentDrag(z_t=z_t, cond=cond, uncond=uncond, guidance=guidance, sched=sched, t=t, grid=grid,
                                  block=block, keep=keep, h_feat=h_feat, t_feat=t_feat, size=source.size,
                                  handles=handles, targets=targets, z_start=z_start)
            z_opt, tracked, run, _ = yield from _optimise(model, problem, s, cancel, opts, done, total)
            done += iters
            _sync(dev)
            timings["drag"] = time.perf_counter() - t0

            # 4. denoise [original, dragged] with mutual self-attention
            t0 = time.perf_counter()
            x = torch.cat([z_t, z_opt.to(dtype)])
            cond2 = cond.expand(2, -1, -1)
            uncond2 = None if uncond is None else uncond.expand(2, -1, -1)
            with mutual_self_attention(unet, s.mutual_attention_layer, s.mutual_attention_step) as (ctl, layers):
                def eps(x_t, tt, k):
                    ctl.step = k - start
                    return ddim.guided_eps(unet, x_t, tt, cond2, uncond2, guidance)

                states = ddim.sample_with(eps, x, steps, model.scheduler_config, cancel, start)
                z = yield from stream_steps(model, _edited_branch(states), "denoising", done, total, opts)
            out = decode_to_pil(model, z[1:2])
            _sync(dev)
            timings["denoise"] = time.perf_counter() - t0

    final = [to_image(h, source.size, grid) for h in tracked] if run else list(handles)
    hit = reached(tracked, t_feat)
    params = {
        "task": "drag", "prompt": traj.prompt if traj is not None else s.prompt,
        "handles": [list(map(float, h)) for h in handles], "targets": [list(map(float, g)) for g in targets],
        "final_handles": [[round(x, 2), round(y, 2)] for x, y in final],
        "start": "trajectory" if traj is not None else "inversion", "steps": steps, "steps_run": n_actual,
        "start_timestep": int(t), "inversion_strength": s.inversion_strength, "guidance": guidance,
        "lora_steps": s.lora_steps if use_lora else 0, "lora_rank": s.lora_rank, "lora_lr": s.lora_lr,
        "seed": s.seed, "drag_iterations": iters, "iterations_run": run, "reached": hit,
        "latent_lr": s.latent_lr, "mask_weight": s.mask_weight, "masked": masks is not None,
        "feature_block": s.feature_block, "feature_up_block": block, "supervision_grid": f"{grid[1]}x{grid[0]}",
        "r1": s.r1, "r2": s.r2, "smooth_lora": s.smooth_lora, "warm_start": warm,
        "mutual_attention_step": s.mutual_attention_step, "mutual_attention_layer": s.mutual_attention_layer,
        "mutual_attention_layers": len(layers), "size": f"{source.width}x{source.height}", "eta": 0.0,
        **base_metadata(model, traj.lora if traj is not None else None,
                        traj.lora_strength if traj is not None else 0.0),
    }
    result = DragResult(ImageResult(with_metadata(out, params), s.seed, params), source, final, list(targets),
                        timings, cached, params, losses)
    reused = [k for k, c in cached.items() if c]
    msg = (f"{run} drag iteration(s), handles {'reached' if hit else 'did not reach'} their targets"
           f"{' (within ' + format(REACHED, 'g') + ' feature px)' if hit else ''}"
           f"{'; reused ' + ', '.join(reused) if reused else ''}{'; ' + '; '.join(notes) if notes else ''}")
    yield Progress("done", total, total, preview=draw_points(out, final, targets), partial=final, result=result,
                   message=msg, kind=Kind.POINTS)


def _optimise(model, d: _LatentDrag, s: DragSettings, cancel: CancelToken | None, opts: PreviewOptions, offset: int,
              total: int):
    """Motion supervision + point tracking on d.z_t (fp32 Adam). Returns (latent, tracked feature points,
    iterations run, last loss); yields one event per iteration with the current handles (image px) as partial.
    `d.z_start` (a warm start): the optimisation starts from it with the handles guessed at their targets and
    re-found by tracking from the first iteration on; the original features and the mask term's reference
    still come from z_t."""
    unet, dtype = model.unet, model.dtype
    iters, r1, r2, lam = s.drag_iterations, s.r1, s.r2, s.mask_weight
    z_t, z_start, keep, h_feat, t_feat, sched, t = d.z_t, d.z_start, d.keep, d.h_feat, d.t_feat, d.sched, d.t
    warm = z_start is not None
    current = list(t_feat) if warm else list(h_feat)
    z = (z_start if warm else z_t).detach().float().clone()
    if iters == 0 or (not warm and reached(current, t_feat)):
        return z, current, 0, None
    fp16 = model.device.type == "cuda" and dtype == torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=fp16)
    run, loss_value = 0, None
    with feature_hook(unet, d.block) as store:
        feats = _Features(unet, store, d.cond, d.uncond, d.guidance, t, d.grid)
        if cancel is not None:
            cancel.check()
        with torch.no_grad():
            eps0, f0 = feats(z_t)
            prev0 = sched.step(eps0, t, z_t.float()).prev_sample
        z.requires_grad_(True)
        opt = torch.optim.Adam([z], lr=s.latent_lr)
        for it in range(iters):
            if cancel is not None:
                cancel.check()
            with torch.enable_grad():
                eps, f1 = feats(z.to(dtype))
                if it > 0 or warm:
                    current = track_points(f0, f1.detach(), h_feat, current, r2)
                run = it + 1
                img_pts = [to_image(h, d.size, d.grid) for h in current]
                if reached(current, t_feat):
                    yield Progress("dragging", offset + iters, total, partial=img_pts, kind=Kind.POINTS,
                                   preview=_preview_at(model, opts, d, eps, z, img_pts, True),
                                   message=f"iteration {run}: every handle reached its target")
                    break
                loss = motion_supervision(f1, current, t_feat, r1)
                if keep is not None:  # the one-step denoise must stay where it was outside the editable region
                    step = sched.step(eps, t, z).prev_sample
                    term = lam * ((step - prev0) * keep).abs().sum()
                    loss = term if loss is None else loss + term
                if loss is not None:
                    scaler.scale(loss).backward()
                    scaler.step(opt)
                    scaler.update()
                    opt.zero_grad(set_to_none=True)
                    loss_value = float(loss.detach())
            far = max(distance(h, g) for h, g in zip(current, t_feat))
            yield Progress("dragging", offset + run, total, partial=img_pts, kind=Kind.POINTS,
                           preview=_preview_at(model, opts, d, eps, z, img_pts,
                                               run % PREVIEW_EVERY == 0 or run == iters),
                           message=f"iteration {run}/{iters}: loss {loss_value if loss_value is not None else 0:.4f}, "
                                   f"farthest handle {far:.1f} feature px from its target")
    return z.detach(), current, run, loss_value


def _preview_at(model, opts: PreviewOptions, d: _LatentDrag, eps, z, current, due: bool):
    if not due or not (opts.every or opts.full_decode_every):
        return None
    with torch.no_grad():
        x0 = d.sched.step(eps.detach(), d.t, z.detach()).pred_original_sample
    return _drag_preview(model, opts, x0.to(model.dtype), d.size, d.handles, d.targets, current)
