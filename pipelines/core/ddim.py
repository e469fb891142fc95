"""The one DDIM core (eta 0) every method reuses: guided noise prediction, sampling from a given x_T, and
DDIM inversion from x_0 to x_T.

Plain tensors in, generators of (step, x_t, predicted x0) out; the caller decides what to show. Each
call gets its own scheduler copy, so shared model state is never touched. The cancel token is checked
before every UNet call.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
from diffusers import DDIMScheduler

from .events import CancelToken

Embeds = torch.Tensor | Sequence[torch.Tensor]


@dataclass
class StepState:
    index: int          # 0-based step within this pass
    total: int          # steps in this pass
    timestep: int
    latents: torch.Tensor   # x_t after this step
    pred_x0: torch.Tensor   # the model's guess of the clean latent at this step


def make_scheduler(scheduler_config, steps: int) -> DDIMScheduler:
    sched = DDIMScheduler.from_config(scheduler_config)
    sched.set_timesteps(int(steps))
    return sched


def embedding_at(embeds: Embeds, i: int) -> torch.Tensor:
    """A single embedding, or a per-step list (null-text inversion, prompt switching)."""
    return embeds if isinstance(embeds, torch.Tensor) else embeds[i]


def guided_eps(unet, x: torch.Tensor, t, cond: torch.Tensor, uncond: torch.Tensor | None,
               guidance: float) -> torch.Tensor:
    """Classifier-free guided noise prediction; one batched UNet call, or cond only at guidance 1."""
    if uncond is None or guidance == 1.0:
        return unet(x, t, encoder_hidden_states=cond).sample
    out = unet(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([uncond, cond])).sample
    eps_u, eps_c = out.chunk(2)
    return eps_u + guidance * (eps_c - eps_u)


def alpha_cumprod(sched: DDIMScheduler, t: int) -> torch.Tensor:
    """alpha-bar at timestep t; t < 0 (the step past the last) gives the scheduler's final alpha-bar."""
    return sched.alphas_cumprod[t] if t >= 0 else sched.final_alpha_cumprod


def move(x: torch.Tensor, eps: torch.Tensor, a_from: torch.Tensor, a_to: torch.Tensor):
    """The deterministic DDIM update (eta 0) from noise level alpha-bar `a_from` to `a_to`, written out so that
    gradients flow through it: towards less noise it is DDIMScheduler.step's update, towards more it is DDIM
    inversion. Returns (x at a_to, the predicted x0)."""
    x0 = (x - (1 - a_from).sqrt() * eps) / a_from.sqrt()
    return a_to.sqrt() * x0 + (1 - a_to).sqrt() * eps, x0


@torch.no_grad()
def sample(
    unet, x_T: torch.Tensor, cond: Embeds, uncond: Embeds | None, guidance: float, steps: int, scheduler_config,
    cancel: CancelToken | None = None, start_index: int = 0,
) -> Iterator[StepState]:
    """DDIM (eta 0) from x_T down to x_0; yields after every step. start_index > 0 skips the noisiest steps
    (x_T is then the latent at timesteps[start_index], as in SDEdit or inversion to an intermediate t)."""
    def eps(x, t, k):
        return guided_eps(unet, x, t, embedding_at(cond, k), None if uncond is None else embedding_at(uncond, k),
                          guidance)

    return sample_with(eps, x_T, steps, scheduler_config, cancel, start_index)


@torch.no_grad()
def sample_with(
    eps_fn: Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor], x_T: torch.Tensor, steps: int,
    scheduler_config, cancel: CancelToken | None = None, start_index: int = 0,
    after_step: Callable[[torch.Tensor, int], torch.Tensor] | None = None,
) -> Iterator[StepState]:
    """The DDIM loop itself, for any noise predictor eps_fn(x_t, t, step_index) (e.g. InstructPix2Pix's
    three-way guidance). `sample` is this loop with classifier-free guidance. `after_step(x, step_index)`
    may replace each new latent (Prompt-to-Prompt's local blend, DiffEdit's masked update)."""
    sched = make_scheduler(scheduler_config, steps)
    return sample_scheduled(eps_fn, x_T, sched, cancel, start_index, after_step, eta=0.0)


@torch.no_grad()
def sample_scheduled(
    eps_fn: Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor], x: torch.Tensor, sched,
    cancel: CancelToken | None = None, start_index: int = 0,
    after_step: Callable[[torch.Tensor, int], torch.Tensor] | None = None, **step_kwargs,
) -> Iterator[StepState]:
    """The same loop for any diffusers scheduler whose timesteps are set (DDIM above; Euler ancestral for
    InstructPix2Pix and LCM for the fast mode, which draw noise from `step_kwargs["generator"]`; Euler also scales
    its model input).
    x is the starting latent as the scheduler expects it (times init_noise_sigma for sigma schedulers)."""
    timesteps = sched.timesteps[start_index:]
    n = len(timesteps)
    for i, t in enumerate(timesteps):
        if cancel is not None:
            cancel.check()
        out = sched.step(eps_fn(sched.scale_model_input(x, t), t, start_index + i), t, x, **step_kwargs)
        x = out.prev_sample
        if after_step is not None:
            x = after_step(x, start_index + i)
        yield StepState(i, n, int(t), x, predicted_x0(out))


def predicted_x0(out) -> torch.Tensor:
    """A scheduler step's clean-latent estimate: `pred_original_sample` (DDIM, Euler, ...), or `denoised`
    (LCMScheduler, whose boundary-conditioned x0 is also its last step's output)."""
    pred = getattr(out, "pred_original_sample", None)
    return out.denoised if pred is None else pred


def recorded(states: Iterable[StepState], latents: list) -> Iterator[StepState]:
    """Passes the states through, appending each step's latent to `latents` (a trajectory kept for later)."""
    for st in states:
        latents.append(st.latents.detach())
        yield st


@torch.no_grad()
def invert(
    unet, x_0: torch.Tensor, cond: Embeds, uncond: Embeds | None, guidance: float, steps: int, scheduler_config,
    cancel: CancelToken | None = None, end_index: int | None = None,
) -> Iterator[StepState]:
    """DDIM inversion x_0 -> x_T (the reverse of `sample`'s update). Noise is predicted at the target
    timestep from the current, less noisy latent. `end_index` stops early (e.g. at 0.7 of the way);
    embeddings are indexed by the sampling step that will later undo this step."""
    sched = make_scheduler(scheduler_config, steps)
    ascending = sched.timesteps.flip(0)
    stride = sched.config.num_train_timesteps // sched.num_inference_steps
    n = len(ascending) if end_index is None else int(end_index)
    x = x_0
    for i in range(n):
        if cancel is not None:
            cancel.check()
        t = int(ascending[i])
        k = len(ascending) - 1 - i  # the sampling step index that undoes this inversion step
        a_prev, a_t = alpha_cumprod(sched, t - stride), alpha_cumprod(sched, t)
        eps = guided_eps(unet, x, t, embedding_at(cond, k), None if uncond is None else embedding_at(uncond, k),
                         guidance)
        x, x0 = move(x, eps, a_prev, a_t)
        yield StepState(i, n, t, x, x0)
