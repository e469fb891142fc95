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

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from .core.errors import InputError

SUBFOLDER = "singdiffusion"            # a model folder's own module: <model>/singdiffusion/
ENV = "STUDIO_SINGDIFFUSION"           # a module folder for models without their own
CONFIG = "config.json"
WEIGHTS = "diffusion_pytorch_model.safetensors"
PICKLED = "diffusion_pytorch_model.bin"
PLACEHOLDER_T = 1                      # the timestep the module is called with (it ignores it), as officially
# State-dict keys of time conditioning: with every ResnetBlock2D's time_emb_proj removed, nothing these layers
# compute reaches the output, so a file may have them or not. Any other missing or unexpected key is an error.
TIME_KEYS = ("time_emb_proj.",)
TIME_PREFIXES = ("time_embedding.", "add_embedding.", "class_embedding.")
ZERO_SNR = 1e-6                        # abar at t0 below this: the schedule reaches pure noise


def is_time_key(key: str) -> bool:
    return any(part in key for part in TIME_KEYS) or key.startswith(TIME_PREFIXES)


# ------------------------------------------------------------------------------------------------ the module


def remove_time_conditioning(unet):
    """The official surgery: every ResnetBlock2D without its time projection and time-embedding norm (the block
    then only normalises: no time embedding reaches the features). Returns `unet`."""
    from diffusers.models.resnet import ResnetBlock2D

    for block in unet.modules():
        if isinstance(block, ResnetBlock2D):
            block.time_emb_proj = None
            block.time_embedding_norm = None
    return unet


def module_from_config(config: dict):
    """A timestep-free module of the layout `config` describes (randomly initialised)."""
    from diffusers import UNet2DConditionModel

    return remove_time_conditioning(UNet2DConditionModel.from_config(config))


def check_keys(missing, unexpected, where: str = "the module") -> None:
    """Only time-conditioning keys may be missing or unexpected (see TIME_KEYS): else a clear error."""
    bad_missing = [k for k in missing if not is_time_key(k)]
    bad_unexpected = [k for k in unexpected if not is_time_key(k)]
    if bad_missing or bad_unexpected:
        parts = []
        if bad_missing:
            parts.append(f"{len(bad_missing)} missing (e.g. {', '.join(bad_missing[:3])})")
        if bad_unexpected:
            parts.append(f"{len(bad_unexpected)} unexpected (e.g. {', '.join(bad_unexpected[:3])})")
        raise InputError(f"The weights of {where} do not fit its config.json: {'; '.join(parts)} keys. Only time "
                         f"conditioning keys (time_emb_proj, time_embedding) may differ.")


def load_state_checked(module, state: dict, where: str = "the module") -> None:
    """Loads `state` into `module` (non-strict), refusing anything but time-conditioning key differences."""
    own = module.state_dict()
    wrong = [k for k, v in state.items() if k in own and tuple(v.shape) != tuple(own[k].shape)
             and not is_time_key(k)]
    if wrong:
        k = wrong[0]
        raise InputError(f"The weights of {where} do not fit its config.json: {len(wrong)} tensors of another shape "
                         f"(e.g. {k}: {tuple(state[k].shape)} for {tuple(own[k].shape)}).")
    state = {k: v for k, v in state.items() if k not in own or tuple(v.shape) == tuple(own[k].shape)}
    missing, unexpected = module.load_state_dict(state, strict=False)
    check_keys(missing, unexpected, where)


def read_config(folder: Path) -> dict:
    path = Path(folder) / CONFIG
    if not path.is_file():
        raise InputError(f"No SingDiffusion module in {shown_path(folder)}: it needs {CONFIG} and {WEIGHTS}.")
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeError, json.JSONDecodeError) as exc:
        raise InputError(f"The SingDiffusion {CONFIG} in {shown_path(folder)} is not valid JSON.") from exc
    if not isinstance(config, dict) or config.get("_class_name", "UNet2DConditionModel") != "UNet2DConditionModel":
        raise InputError(f"The SingDiffusion {CONFIG} in {shown_path(folder)} does not describe a "
                         f"UNet2DConditionModel.")
    return config


def shown_path(folder) -> str:
    """A folder as messages name it: its last two parts, never a whole server path."""
    parts = Path(str(folder)).parts
    return "/".join(parts[-2:]) if parts else str(folder)


def load_module(folder, device=None, dtype=None, expect_channels: int | None = None,
                expect_text_dim: int | None = None):
    """The module in `folder` (config.json + diffusion_pytorch_model.safetensors), time conditioning removed,
    eval mode, no gradients, on `device` in `dtype`. With `expect_*` given, a module that does not fit the model
    (latent channels, text-state width) is refused with a clear message."""
    from safetensors.torch import load_file

    folder = Path(folder)
    config = read_config(folder)
    weights = folder / WEIGHTS
    if not weights.is_file():
        hint = (f" It has the official pickled {PICKLED}: convert it with `python -m pipelines.singdiffusion_convert "
                f"{PICKLED} <folder>`." if (folder / PICKLED).is_file() else "")
        raise InputError(f"No {WEIGHTS} in {shown_path(folder)}.{hint}")
    if expect_channels is not None and (int(config.get("in_channels", 4)) != expect_channels
                                        or int(config.get("out_channels", 4)) != expect_channels):
        raise InputError(f"The SingDiffusion module in {shown_path(folder)} works on {config.get('in_channels')}-"
                         f"channel latents; this model's have {expect_channels}.")
    if expect_text_dim is not None and int(config.get("cross_attention_dim", -1)) != expect_text_dim:
        raise InputError(f"The SingDiffusion module in {shown_path(folder)} reads {config.get('cross_attention_dim')}"
                         f"-wide text states; this model's text encoder gives {expect_text_dim}.")
    try:
        module = module_from_config(config)
        state = load_file(str(weights))
    except InputError:
        raise
    except Exception as exc:  # noqa: BLE001 - a damaged file or config becomes one clear message
        raise InputError(f"The SingDiffusion module in {shown_path(folder)} could not be read "
                         f"({type(exc).__name__}).") from exc
    load_state_checked(module, state, f"the SingDiffusion module in {shown_path(folder)}")
    # nn.Module.to: diffusers' own .to warns about dtype casts that concern only its from_pretrained
    module = torch.nn.Module.to(module, device=device or "cpu", dtype=dtype or torch.float32)
    return module.eval().requires_grad_(False)


def save_module(module, folder, dtype: torch.dtype | None = None) -> Path:
    """Writes `module` as config.json + diffusion_pytorch_model.safetensors (optionally cast, e.g. float16)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = {k: v for k, v in dict(module.config).items() if not k.startswith("_")}
    config = {"_class_name": "UNet2DConditionModel", **config}
    (folder / CONFIG).write_text(json.dumps(config, indent=1, default=list))
    state = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().contiguous().cpu()
             for k, v in module.state_dict().items()}
    save_file(state, str(folder / WEIGHTS), metadata={"format": "pt"})
    return folder


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


def meta_for(start: SingularStart | None, normalise: bool = True) -> dict:
    """PNG metadata of a run that asked for the singular step: whether it was applied, and the guidance form
    only when it is not the official one."""
    if start is None:
        return {}
    meta = {"singular_step": bool(start.applied)}
    if start.applied and not normalise:
        meta["singular_normalise"] = False
    return meta
