"""SingDiffusion (Zhang et al., CVPR 2024): the initial singular step at t = 1.

Schedules whose terminal SNR is not zero (SD1.5's scaled-linear: alpha-bar 0.0047 at t = 999) never reach pure
noise, yet sampling starts from pure noise x1 as if it were the latent at the first timestep t0. The model cannot
then move the image's average far from the middle (very dark or very bright images). SingDiffusion trains a
separate, timestep-free UNet D that maps (x1, prompt) to the conditional mean clean latent E[z0 | c], and takes one
deterministic DDIM step from t = 1 to t0 with it:

    y      = D(x1, c)                              (with guidance: y = (y_u + w (y_c - y_u)) / w, the official
                                                    "normalised" form; `normalise=False` leaves out the / w)
    x_t0   = sqrt(abar_t0) y + sqrt(1 - abar_t0) x1   (VP schedulers: scheduler.add_noise(y, x1, t0))

The ordinary model samples on from x_t0. Sigma-space (Euler-type) schedulers expect `latents * init_noise_sigma`
to be the VE-space start y + sigma_t0 x1, so the latents handed to them are (y + sigma_t0 x1) / init_noise_sigma.
There is nothing to correct on zero-terminal-SNR schedules (abar_t0 = 0: x_t0 = x1) nor on starts that are not
pure noise (img2img / SDEdit, strength < 1): there the step has no effect and says why.

The module is a UNet2DConditionModel in the official layout (its `config.json`, weights
`diffusion_pytorch_model.safetensors`) with the time conditioning removed: every ResnetBlock2D's time_emb_proj is
None and its time_embedding_norm None (so no time embedding reaches the features). The official release ships a
pickled `diffusion_pytorch_model.bin`: `python -m pipelines.singdiffusion_convert SRC.bin OUT_DIR` converts it.
The module reads the prompt through the model's own text encoder (SD1.5's CLIP for SD1.5, as the official code).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .core.errors import InputError
from .core.singular_module import (  # noqa: F401 - the module's loader, part of this method's API
    CONFIG,
    ENV,
    PICKLED,
    PLACEHOLDER_T,
    SUBFOLDER,
    TIME_KEYS,
    TIME_PREFIXES,
    WEIGHTS,
    check_keys,
    is_time_key,
    load_module,
    load_state_checked,
    module_from_config,
    read_config,
    remove_time_conditioning,
    save_module,
    shown_path,
)

ZERO_SNR = 1e-6                        # abar at t0 below this: the schedule reaches pure noise


# ------------------------------------------------------------------------------------------------ the step


@dataclass
class SingularStart:
    """What the singular step did: `latents` to start sampling from (hand them to a diffusers pipeline's
    `latents=`; the studio's DDIM takes them as x_t0), whether it changed anything, and why not."""
    latents: torch.Tensor
    applied: bool
    note: str = ""
    mean: torch.Tensor | None = None      # the module's guided estimate y of E[z0 | c]
    timestep: int | None = None           # t0


def guided_mean(module, x1: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor | None, guidance: float,
                normalise: bool = True) -> torch.Tensor:
    """y = D(x1, c); with guidance w > 1 the official CFG y = (y_u + w (y_c - y_u)) / w (`normalise=False`:
    y_u + w (y_c - y_u)), the two branches in one batched call. w <= 1 (or no unconditional states): y_c."""
    w = float(guidance)
    dtype = next(module.parameters()).dtype
    x1, cond = x1.to(dtype), cond.to(dtype)
    if uncond is None or w <= 1.0:
        return module(x1, PLACEHOLDER_T, encoder_hidden_states=cond).sample
    uncond = uncond.to(dtype).expand_as(cond) if uncond.shape[0] == 1 else uncond.to(dtype)
    out = module(torch.cat([x1, x1]), PLACEHOLDER_T, encoder_hidden_states=torch.cat([uncond, cond])).sample
    y_u, y_c = out.chunk(2)
    y = y_u + w * (y_c - y_u)
    return y / w if normalise else y


def is_sigma_scheduler(scheduler) -> bool:
    """k-diffusion style schedulers (Euler, Euler ancestral, LMS, Heun, KDPM2, DPM-SDE): their latents live in
    sigma (VE) space, which diffusers pipelines enter by multiplying the start by init_noise_sigma (> 1)."""
    return getattr(scheduler, "sigmas", None) is not None and not math.isclose(
        float(scheduler.init_noise_sigma), 1.0)


def first_timestep(scheduler) -> int:
    if getattr(scheduler, "timesteps", None) is None or len(scheduler.timesteps) == 0:
        raise ValueError("set the scheduler's timesteps (set_timesteps) before the singular step")
    return scheduler.timesteps[0]


def start_alpha_bar(scheduler) -> float:
    """alpha-bar at the scheduler's first timestep t0 (for sigma schedulers 1 / (1 + sigma_t0^2))."""
    if is_sigma_scheduler(scheduler):
        sigma = float(scheduler.sigmas[0])
        return 0.0 if not math.isfinite(sigma) else 1.0 / (1.0 + sigma * sigma)
    t0 = int(first_timestep(scheduler))
    return float(scheduler.alphas_cumprod[t0])


def refusal(scheduler, strength: float = 1.0) -> str:
    """Why the singular step would do nothing here ("" when it applies): a zero-terminal-SNR schedule, or a start
    that is not pure noise (img2img / SDEdit with strength < 1)."""
    if float(strength) < 1.0:
        return (f"SingDiffusion's singular step is for starts from pure noise; with strength {float(strength):g} "
                f"the start is a noised image, so it is not applied.")
    if start_alpha_bar(scheduler) < ZERO_SNR:
        return ("SingDiffusion's singular step is not applied: this schedule has zero terminal SNR (it already "
                "starts from pure noise), so there is no gap at t = 1 to close.")
    return ""


def jump(scheduler, y: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
    """The deterministic DDIM step from t = 1 (where the noise prediction is x1 itself) to t0, as the latents a
    pipeline takes: VP schedulers add_noise(y, x1, t0); sigma schedulers (y + sigma_t0 x1) / init_noise_sigma."""
    y = y.to(x1.dtype)
    if is_sigma_scheduler(scheduler):
        sigma = scheduler.sigmas[0].to(x1.device, torch.float32)
        return ((y.float() + sigma * x1.float()) / float(scheduler.init_noise_sigma)).to(x1.dtype)
    t0 = first_timestep(scheduler)
    t = torch.as_tensor(t0).reshape(1).to(x1.device)
    return scheduler.add_noise(y, x1, t)


@torch.no_grad()
def singular_start(module, scheduler, x1: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor | None,
                   guidance: float, normalise: bool = True, strength: float = 1.0, cancel=None) -> SingularStart:
    """The initial singular step for a run of `scheduler` (timesteps set) from pure noise x1: x_t0 from
    D(x1, c), or x1 unchanged with a note when it does not apply (refusal). The cancel token is checked before
    the module's call."""
    why = refusal(scheduler, strength)
    if why:
        return SingularStart(x1, False, why)
    if cancel is not None:
        cancel.check()
    y = guided_mean(module, x1, cond, uncond, guidance, normalise)
    return SingularStart(jump(scheduler, y, x1), True, "", y, int(first_timestep(scheduler)))


def studio_start(model, x1: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor | None, guidance: float,
                 steps: int, normalise: bool = True, cancel=None) -> SingularStart:
    """The singular step before the studio's DDIM (pipelines/core/ddim.py) of `steps` steps on `model`, with the
    model's module (InputError when it has none)."""
    from .core import ddim

    module = require_module(model)
    return singular_start(module, ddim.make_scheduler(model.scheduler_config, steps), x1, cond, uncond, guidance,
                          normalise, cancel=cancel)


def require_module(model):
    """The model's SingDiffusion module, or an InputError saying where to put one."""
    module = model.singdiffusion()
    if module is None:
        raise InputError(f"{model.label} has no SingDiffusion module: put one (config.json + {WEIGHTS}) in the "
                         f"model folder's {SUBFOLDER}/, or give its folder in 'Model and LoRA', with --singdiffusion "
                         f"or in ${ENV}.")
    return module


def meta_for(applied: bool | None, normalise: bool = True) -> dict:
    """PNG metadata of a run's singular step: nothing when it was not asked for (applied None), else whether it was
    applied, and the guidance form only when it is not the official one."""
    if applied is None:
        return {}
    meta = {"singular_step": bool(applied)}
    if applied and not normalise:
        meta["singular_normalise"] = False
    return meta
