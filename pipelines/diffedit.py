"""DiffEdit (Couairon et al. 2022): automatic mask from the disagreement of two prompts, then masked DDIM
decoding, on the studio's one DDIM core (diffusers' `StableDiffusionDiffEditPipeline` is deprecated).

Mask (`diffedit_mask`)
  The image's posterior-mean latent z0 is noised to the DDIM timestep of `mask_strength` (diffusers' rule:
  timesteps[steps - int(steps * s)]) with `mask_draws` noise draws; the map is the mean over draws and latent
  channels of |eps_target - eps_source|. Both branches share the unconditional ("") prediction, so with
  classifier-free guidance w the guided difference is exactly w * |eps(target) - eps(source)|: eps_u cancels and
  the factor w is removed by the normalisation, so only the two conditional branches are run (half the UNet
  batch of diffusers' four-way call; guidance does not change the mask). Normalisation is the paper's by
  default: min-max rescale of the image's map to [0, 1], binarised at the threshold (paper: 0.5).
  `normalisation="diffusers"` clips at 3x the image's mean difference and divides by that instead (threshold
  0.5 then means "difference above 1.5x the mean"). On the embedded model's recolouring scenes (16 held-out,
  20 steps, 10 draws) the min-max mask matches the object better (IoU 0.64, recall 0.69: it can miss part of
  it) and diffusers' covers it with a margin (recall 0.98, IoU 0.48). The mask is `heat > threshold`. The
  latent-resolution map is upsampled to the image with nearest neighbour, so the image mask is exactly the
  latent mask the edit applies (one latent cell = vae_factor x vae_factor pixels): what is shown is what runs.

Edit (`diffedit_edit`)
  DDIM inversion without text ("" at guidance 1) from z0 to n = round(r * steps) steps, keeping every level
  (cached per image and step count; a smaller r reuses a prefix). DDIM sampling with the target prompt (the
  negative / unconditional branch is the source prompt, or "") from the level-n latent; after every step the
  latent outside the mask is replaced by the inverted latent of the SAME noise level as the new latent, and by
  z0 itself after the last step. (diffusers blends with the level of the step just taken, one step behind, and
  ends on the inverted x_1 rather than z0.) So the final background latent is exactly z0.
  User masks (any size) are resized to the image with nearest and pooled to latent cells with "any pixel":
  a painted stroke is always edited.

  keep_background (default on): the VAE decoder mixes spatially (its mid block has global attention), so even an
  exact background latent does not decode to exactly the input. The input pixels are therefore pasted back
  outside the edited latent cells dilated by one cell (vae_factor pixels, which leaves the decoder room to blend
  the boundary): outside that region the output is bit-identical to the input. Off: the plain decode.
"""
from __future__ import annotations

import math
from collections.abc import Generator
from dataclasses import dataclass, replace

import numpy as np
import torch
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from .core import ddim
from .core.cache import LRUCache
from .core.errors import InputError
from .core.events import CancelToken, Job, Kind, Progress
from .core.latents import decode_to_pil, encode_image
from .core.limits import get_limits
from .core.masks import cells_to_image, latent_cells, paste_outside
from .core.masks import user_mask as as_user_mask
from .core.metadata import with_metadata
from .core.results import ImageResult, base_metadata
from .core.stream import PreviewOptions, stream_steps
from .core.text import encode_prompt
from .core.validation import check_number, check_prompt, resolve_seed, shown, validate_common
from .inversion import image_key, prepare_image

MAX_UNET_BATCH = 20        # latents per UNet call while estimating the mask (two branches per noise draw)
CLIP_RATIO = 3.0           # diffusers' mask_thresholding_ratio: clip the map at 3x its mean
NORMALISATIONS = ("diffusers", "paper")
OVERLAY_TINT = (255, 0, 200)
OVERLAY_ALPHA = 0.5


@dataclass
class DiffEditParams:
    target_prompt: str
    source_prompt: str = ""        # empty = unconditional ("") as the source of the mask difference
    threshold: float = 0.5         # binarise the normalised difference map (0..1)
    mask_strength: float = 0.5     # encode strength for mask estimation (0 < s <= 1)
    mask_draws: int = 10           # noise draws averaged (1..64)
    encode_ratio: float = 0.8      # r: invert to this fraction of the steps (0..1)
    steps: int = 50
    guidance: float = 7.5
    seed: int = 0                  # noise draws of the mask estimate (-1 = random)
    keep_background: bool = True   # paste the input pixels back outside the (dilated) edited region
    normalisation: str = "paper"   # "paper": min-max to [0, 1]; "diffusers": clip at 3x mean, / that


@dataclass
class DiffEditMask:
    source: Image.Image            # the prepared (resized) input
    mask: np.ndarray               # bool (H, W) at image resolution
    heat: np.ndarray               # float32 (H, W) in [0, 1], the normalised difference map (nearest-upsampled)
    overlay: Image.Image           # source with the mask tinted (for display)
    params: dict


@dataclass
class DiffEditResult:
    edited: ImageResult            # image with PNG metadata
    source: Image.Image
    mask: np.ndarray               # bool (H, W): the latent cells actually edited, at image resolution
    overlay: Image.Image
    cached: bool                   # inversion came from the cache
    params: dict


@dataclass
class InvertedPath:
    """DDIM inversion of one image without text: z0 and the latent after every inversion step (level i is
    at the i-th smallest DDIM timestep), as far as it has been computed."""
    z0: torch.Tensor
    levels: list[torch.Tensor]


# ----------------------------------------------------------------------------------------------- validation


def validate_params(model, p: DiffEditParams) -> DiffEditParams:
    """Range-checks everything before any image is read or model run; returns a normalised copy."""
    target = check_prompt(p.target_prompt, "target prompt")
    source = "" if p.source_prompt is None else str(p.source_prompt).strip()
    steps, guidance, _ = validate_common(model, p.steps, p.guidance, 1.0)
    threshold = check_number(p.threshold, "Mask threshold", 0, 1)
    strength = check_number(p.mask_strength, "Mask encode strength", 0, 1)
    if strength <= 0:
        raise InputError("Mask encode strength must be above 0: the image has to be noised to compare the prompts.")
    draws = check_number(p.mask_draws, "Mask noise draws", 1, get_limits().max_mask_draws, integer=True)
    ratio = check_number(p.encode_ratio, "Encoding ratio r", 0, 1)
    seed = resolve_seed(p.seed)
    norm = str(p.normalisation or "paper").strip().lower()
    if norm not in NORMALISATIONS:
        raise InputError(f"Unknown mask normalisation {shown(p.normalisation)}; choose diffusers or paper.")
    return replace(p, target_prompt=target, source_prompt=source, threshold=threshold, mask_strength=strength,
                   mask_draws=draws, encode_ratio=ratio, steps=steps, guidance=guidance, seed=seed,
                   keep_background=bool(p.keep_background), normalisation=norm)


def encode_steps(ratio: float, steps: int) -> int:
    """n = round(r * steps), halves rounded up (not Python's banker's rounding)."""
    return min(steps, max(0, math.floor(ratio * steps + 0.5)))


def mask_timestep_index(strength: float, steps: int) -> int:
    """diffusers' index of the mask's encode timestep: steps - int(steps * s), at least one step of noise."""
    return steps - min(steps, max(1, int(steps * strength)))


# ----------------------------------------------------------------------------------------------- the mask


@torch.no_grad()
def difference_map(unet, z0: torch.Tensor, noise: torch.Tensor, t, source: torch.Tensor, target: torch.Tensor,
                   scheduler, cancel: CancelToken | None = None) -> Generator[int, None, torch.Tensor]:
    """Mean over noise draws and channels of |eps(x_t, target) - eps(x_t, source)| -> (h, w), raw.

    z0 (1, C, h, w); noise (D, C, h, w); source/target (1, L, E) embeddings. x_t = add_noise(z0, noise, t).
    Runs in UNet batches of at most MAX_UNET_BATCH; yields the number of draws done after each call."""
    draws = noise.shape[0]
    per_call = max(1, MAX_UNET_BATCH // 2)
    x_t = scheduler.add_noise(z0.expand(draws, -1, -1, -1), noise, t)
    total = torch.zeros(z0.shape[-2:], dtype=torch.float32, device=z0.device)
    done = 0
    while done < draws:
        if cancel is not None:
            cancel.check()
        x = x_t[done:done + per_call]
        k = len(x)
        emb = torch.cat([source.expand(k, -1, -1), target.expand(k, -1, -1)])
        eps_src, eps_tgt = unet(torch.cat([x, x]), t, encoder_hidden_states=emb).sample.chunk(2)
        total += (eps_tgt - eps_src).abs().float().mean(dim=1).sum(dim=0)
        done += k
        yield done
    return total / draws


def normalise_map(raw: torch.Tensor, mode: str = "diffusers", ratio: float = CLIP_RATIO) -> torch.Tensor:
    """The difference map -> [0, 1]. "diffusers": clip at ratio x mean and divide by it; "paper": min-max.
    A flat map (the prompts do not change the prediction anywhere) is a user error: there is nothing to edit."""
    if mode == "paper":
        lo, scale = raw.min(), raw.max() - raw.min()
    else:
        lo, scale = torch.zeros((), dtype=raw.dtype), raw.mean() * ratio
    if not torch.isfinite(scale) or float(scale) <= 0:
        raise InputError("The source and target prompts make no difference to the model's prediction anywhere, "
                         "so the mask would be empty: describe the change in the target prompt.")
    return (raw - lo).clamp(0, scale) / scale


def overlay_image(source: Image.Image, mask: np.ndarray) -> Image.Image:
    """The source with the mask tinted."""
    px = np.asarray(source.convert("RGB"), dtype=np.float32)
    tint = np.asarray(OVERLAY_TINT, dtype=np.float32)
    out = np.where(mask[..., None], px * (1 - OVERLAY_ALPHA) + tint * OVERLAY_ALPHA, px)
    return Image.fromarray(np.round(out).clip(0, 255).astype(np.uint8))


def _mask_calls(draws: int) -> int:
    return math.ceil(draws / max(1, MAX_UNET_BATCH // 2))


def _check_prompts_differ(p: DiffEditParams) -> None:
    if p.source_prompt == p.target_prompt:
        raise InputError("Source and target prompts are identical, so the mask would be empty: "
                         "describe the change in the target prompt.")


def _estimate_mask(model, source: Image.Image, z0: torch.Tensor, p: DiffEditParams, cancel, offset: int,
                   total: int) -> Generator[Progress, None, tuple[DiffEditMask, torch.Tensor]]:
    """Progress events of the mask estimate; returns (DiffEditMask, latent mask (h, w) bool tensor)."""
    _check_prompts_differ(p)
    sched = ddim.make_scheduler(model.scheduler_config, p.steps)
    index = mask_timestep_index(p.mask_strength, p.steps)
    t = sched.timesteps[index]
    gen = torch.Generator("cpu").manual_seed(int(p.seed))
    noise = randn_tensor((p.mask_draws, *z0.shape[1:]), generator=gen, device=z0.device, dtype=z0.dtype)
    src, tgt = encode_prompt(model, p.source_prompt), encode_prompt(model, p.target_prompt)
    job = difference_map(model.unet, z0, noise, t, src, tgt, sched, cancel)
    calls = _mask_calls(p.mask_draws)
    step = 0
    while True:
        try:
            next(job)
        except StopIteration as stop:
            raw = stop.value
            break
        step += 1
        yield Progress("estimating mask", offset + step, total,
                       message=f"{min(step * (MAX_UNET_BATCH // 2), p.mask_draws)}/{p.mask_draws} noise draws")
    norm = normalise_map(raw, p.normalisation)
    latent = norm > p.threshold
    f = model.vae_factor
    heat = cells_to_image(norm.cpu().numpy().astype(np.float32), f)
    mask = cells_to_image(latent.cpu().numpy(), f)
    fraction = float(mask.mean())
    params = {"task": "diffedit-mask", "prompt": p.target_prompt, "source_prompt": p.source_prompt,
              "threshold": p.threshold, "normalisation": p.normalisation, "mask_strength": p.mask_strength,
              "mask_timestep": int(t),
              "mask_draws": p.mask_draws, "steps": p.steps, "seed": p.seed, "mask_fraction": fraction,
              "mean_difference": float(raw.mean())}
    result = DiffEditMask(source, mask, heat, overlay_image(source, mask), params)
    note = "the mask is empty: lower the threshold or paint the region to edit" if not mask.any() else \
        f"mask covers {100 * fraction:.1f}% of the image"
    yield Progress("mask ready", offset + calls, total, preview=result.overlay, partial=result, message=note,
                   kind=Kind.MASK)
    return result, latent


def diffedit_mask(model, image, p: DiffEditParams, cancel: CancelToken | None = None,
                  preview: PreviewOptions | None = None) -> Job:
    """Estimates the DiffEdit mask; the last event's result is a DiffEditMask (possibly empty: flagged in
    its message and params['mask_fraction'] == 0). Identical prompts or an all-zero map: InputError."""
    p = validate_params(model, p)
    _check_prompts_differ(p)
    source = prepare_image(model, image)
    total = _mask_calls(p.mask_draws)
    yield Progress("encoding image", 0, total, preview=source, message=f"seed {p.seed}", kind=Kind.SOURCE)
    z0 = encode_image(model, source)
    result, _ = yield from _estimate_mask(model, source, z0, p, cancel, 0, total)
    yield Progress("done", total, total, preview=result.overlay, result=result,
                   message=f"mask covers {100 * result.params['mask_fraction']:.1f}% of the image")


# ----------------------------------------------------------------------------------------------- the edit


def inversion_key(model, source: Image.Image, steps: int) -> tuple:
    """Cache key of an image's text-free inversion. Not r: the entry keeps every level computed, so any r up to
    the deepest one inverted so far is a prefix of it."""
    return ("diffedit", model.id, id(model.pipe), image_key(source), int(steps))


def _invert(model, z0: torch.Tensor, n: int, steps: int, cache: LRUCache | None, key, cancel, preview, offset,
            total) -> Generator[Progress, None, tuple[InvertedPath, bool]]:
    hit = cache.get(key) if cache is not None else None
    if hit is not None and len(hit.levels) >= n:
        yield Progress("inversion (cached)", offset + n, total)
        return hit, True
    empty = encode_prompt(model, "")
    levels: list[torch.Tensor] = []
    states = ddim.invert(model.unet, z0, empty, None, 1.0, steps, model.scheduler_config, cancel, end_index=n)
    yield from stream_steps(model, ddim.recorded(states, levels), "inverting", offset, total, preview)
    path = InvertedPath(z0, levels)
    if cache is not None:
        cache.put(key, path)
    return path, False


def masked_decode(model, path: InvertedPath, n: int, mask: torch.Tensor, cond: torch.Tensor,
                  uncond: torch.Tensor, guidance: float, steps: int, cancel: CancelToken | None = None):
    """DDIM states of DiffEdit's masked decoding from inversion level n; `mask` (1, 1, h, w) bool, True = edit.
    After sampling step k the latent is at the noise level of inversion level steps-2-k (z0 after the last)."""
    levels, z0 = path.levels, path.z0

    def eps(x, t, k):
        return ddim.guided_eps(model.unet, x, t, cond, uncond, guidance)

    def keep_background(x, k):
        ref = z0 if k >= steps - 1 else levels[steps - 2 - k]
        return torch.where(mask, x, ref)

    return ddim.sample_with(eps, levels[n - 1], steps, model.scheduler_config, cancel, start_index=steps - n,
                            after_step=keep_background)


def diffedit_edit(model, image, p: DiffEditParams, mask=None, cache: LRUCache | None = None,
                  cancel: CancelToken | None = None, preview: PreviewOptions | None = None) -> Job:
    """DiffEdit: mask (given, or estimated first with the same events as diffedit_mask), inversion to r (cached),
    masked decoding with the target prompt. The last event's result is a DiffEditResult.

    r giving zero steps is a no-op (the input comes back unchanged, no inversion); an empty mask is an
    InputError (nothing would change); a full mask is a plain DDIM edit of the whole image."""
    p = validate_params(model, p)
    source = prepare_image(model, image)
    f = model.vae_factor
    user_mask = None if mask is None else as_user_mask(mask, source.size)
    if user_mask is None:
        _check_prompts_differ(p)
    elif not user_mask.any():
        raise InputError("The mask is empty, so nothing would change: paint the region to edit.")
    steps, n = p.steps, encode_steps(p.encode_ratio, p.steps)
    mask_units = _mask_calls(p.mask_draws) if user_mask is None else 0
    total = mask_units + 2 * n
    yield Progress("encoding image", 0, total, preview=source, kind=Kind.SOURCE)
    key = inversion_key(model, source, steps)
    hit = cache.get(key) if cache is not None else None
    z0 = hit.z0 if hit is not None else encode_image(model, source)
    if user_mask is None:
        _, lat = yield from _estimate_mask(model, source, z0, p, cancel, 0, total)
        lat = lat.cpu().numpy()
        if not lat.any():
            raise InputError("The mask is empty, so nothing would change: lower the threshold or paint the region "
                             "to edit.")
    else:
        lat = latent_cells(user_mask, f)
    used = cells_to_image(lat, f)
    cached = False
    if n == 0:
        edited = source.copy() if p.keep_background else decode_to_pil(model, z0)
    else:
        path, cached = yield from _invert(model, z0, n, steps, cache, key, cancel, preview, mask_units, total)
        cond = encode_prompt(model, p.target_prompt)
        uncond = encode_prompt(model, p.source_prompt)
        m = torch.from_numpy(lat).to(z0.device)[None, None]
        states = masked_decode(model, path, n, m, cond, uncond, p.guidance, steps, cancel)
        z = yield from stream_steps(model, states, "editing (DiffEdit)", mask_units + n, total, preview)
        edited = decode_to_pil(model, z)
        if p.keep_background and not lat.all():
            edited = paste_outside(edited, source, lat, f)
    meta = {"task": "diffedit", "prompt": p.target_prompt, "negative_prompt": p.source_prompt,
            "source_prompt": p.source_prompt, "steps": steps, "guidance": p.guidance, "encode_ratio": p.encode_ratio,
            "encode_steps": n, "mask": "auto" if user_mask is None else "user",
            "mask_fraction": float(used.mean()), "keep_background": p.keep_background,
            "size": f"{source.width}x{source.height}", "eta": 0.0, **base_metadata(model, None, 0.0)}
    if user_mask is None:
        meta.update(threshold=p.threshold, normalisation=p.normalisation, mask_strength=p.mask_strength,
                    mask_draws=p.mask_draws, seed=p.seed)
    overlay = overlay_image(source, used)
    result = DiffEditResult(ImageResult(with_metadata(edited, meta), p.seed if user_mask is None else -1, meta),
                            source, used, overlay, cached, meta)
    note = " (inversion reused from cache)" if cached else ""
    if n == 0:
        note = ": encoding ratio gives 0 steps, the image is unchanged"
    yield Progress("done", total, total, preview=result.edited.image, result=result, message=f"edited{note}")
