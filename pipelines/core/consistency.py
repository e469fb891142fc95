"""The math CoDi (conditional diffusion distillation, Mei et al. CVPR 2024) shares between its trainer and its
sampler: the student's noise prediction, the consistency-model boundary parameterisation, and the timestep grid.

The student is a text-to-image UNet plus a ControlNet-style adapter (a copy of the UNet's encoder whose zero
convolutions gate it in at zero, so the untrained student equals the base UNet). The adapter reads the condition
(the input image's VAE latent, times the scaling factor) and adds its residuals to the UNet's skip connections.

Consistency function (the boundary parameterisation of consistency models / LCM, sigma_data 0.5, timesteps
scaled by 10): f(z_t, t) = c_skip(t) z_t + c_out(t) x0(z_t, eps), with c_skip(0) = 1 and c_out(0) = 0, so f is
the identity at t = 0 and practically the plain x0 prediction for t >= 20.
"""
from __future__ import annotations

import torch

SIGMA_DATA = 0.5
TIMESTEP_SCALING = 10.0
GRID = 50  # distillation grid: timesteps {0, 20, ..., 980}, one DDIM step of the ODE each


def boundary_scalings(t: torch.Tensor, sigma_data: float = SIGMA_DATA,
                      timestep_scaling: float = TIMESTEP_SCALING) -> tuple[torch.Tensor, torch.Tensor]:
    """(c_skip, c_out) at integer timesteps t (any shape)."""
    scaled = t.float() * timestep_scaling
    c_skip = sigma_data ** 2 / (scaled ** 2 + sigma_data ** 2)
    c_out = scaled / (scaled ** 2 + sigma_data ** 2).sqrt()
    return c_skip, c_out


def grid_timesteps(grid: int = GRID, num_train_timesteps: int = 1000) -> torch.Tensor:
    """The distillation grid, ascending: {0, T/N, 2T/N, ..., T - T/N}."""
    return torch.arange(grid) * (num_train_timesteps // grid)


def sampling_timesteps(steps: int, grid: int = GRID, num_train_timesteps: int = 1000) -> list[int]:
    """The sampler's timesteps, noisiest first: the grid reversed, taken every grid // steps points (LCM's and
    CoDi's sub-sampling). 1 step: [980]; 2: [980, 480]; 4: [980, 740, 500, 260] for the default grid."""
    steps = int(steps)
    if not 1 <= steps <= grid:
        raise ValueError(f"steps must be 1..{grid}")
    descending = grid_timesteps(grid, num_train_timesteps).flip(0)
    return [int(t) for t in descending[:: grid // steps][:steps]]


def _per_sample(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.to(like.device, like.dtype).reshape(-1, *([1] * (like.dim() - 1)))


def predicted_x0(z_t: torch.Tensor, eps: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """x0 from an epsilon prediction at noise level alpha_bar (a scalar or one per sample)."""
    a = _per_sample(alpha_bar, z_t)
    return (z_t - (1 - a).sqrt() * eps) / a.sqrt()


def consistency_x0(z_t: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor,
                   sigma_data: float = SIGMA_DATA, timestep_scaling: float = TIMESTEP_SCALING) -> torch.Tensor:
    """f(z_t, t): the boundary-parameterised clean-latent estimate (t: one timestep per sample)."""
    t = t.reshape(-1).to(alphas_cumprod.device)
    c_skip, c_out = boundary_scalings(t, sigma_data, timestep_scaling)
    x0 = predicted_x0(z_t, eps, alphas_cumprod[t])
    return _per_sample(c_skip, z_t) * z_t + _per_sample(c_out, z_t) * x0


def renoise(x0: torch.Tensor, eps: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """The deterministic DDIM re-noise to level alpha_bar: sqrt(a) x0 + sqrt(1 - a) eps (no fresh noise)."""
    a = _per_sample(alpha_bar, x0)
    return a.sqrt() * x0 + (1 - a).sqrt() * eps


ADAPTER_EMBEDDING = (32,)  # one level: the condition is a latent already, at the UNet's resolution


def condition_adapter(unet):
    """CoDi's condition adapter: a ControlNet copied from `unet`'s encoder (zero convolutions at its outputs, so it
    adds nothing until trained) taking an image latent of the UNet's input channels. ControlNetModel.from_unet does
    not pass the UNet's addition_embed_type_num_heads (the "text" addition embedding's pooling heads), so the copy
    would pool the text with the default 64 heads, unlike the UNet it copies; this one keeps the UNet's."""
    from diffusers import ControlNetModel

    adapter = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=ADAPTER_EMBEDDING,
                                        conditioning_channels=unet.config.in_channels)
    heads = unet.config.get("addition_embed_type_num_heads")
    if (unet.config.get("addition_embed_type") == "text" and heads
            and adapter.config.addition_embed_type_num_heads != heads):
        config = {k: v for k, v in adapter.config.items() if k != "_use_default_values"}  # it would win
        fixed = ControlNetModel.from_config({**config, "addition_embed_type_num_heads": heads})
        fixed.load_state_dict(adapter.state_dict())
        adapter = fixed
    return adapter


def student_eps(unet, adapter, z_t: torch.Tensor, t: torch.Tensor, text: torch.Tensor,
                condition: torch.Tensor) -> torch.Tensor:
    """The student's noise prediction: the adapter (a diffusers ControlNetModel) reads the condition latent and
    its residuals join the UNet's skip connections. `t` is one timestep per sample or a scalar."""
    down, mid = adapter(z_t, t, encoder_hidden_states=text, controlnet_cond=condition, return_dict=False)
    return unet(z_t, t, encoder_hidden_states=text, down_block_additional_residuals=down,
                mid_block_additional_residual=mid).sample


# ------------------------------------------------------------------------------------------------ sampling
# The noise schedule of SD 1.x and of the embedded model (diffusers' scaled_linear, 0.00085-0.012, 1000 steps):
# what the trainer distils on, and the alpha-bars the sampler uses when no scheduler config is given.
SD_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def schedule_alphas(scheduler_config=None) -> torch.Tensor:
    """alpha-bar at every training timestep (float32, CPU) of a diffusers scheduler config, or of SD_SCHEDULE."""
    from diffusers import DDIMScheduler

    sched = DDIMScheduler(**SD_SCHEDULE) if scheduler_config is None else DDIMScheduler.from_config(scheduler_config)
    return sched.alphas_cumprod.float().cpu()


def guided_student_eps(unet, adapter, z_t: torch.Tensor, t, cond: torch.Tensor, uncond: torch.Tensor | None,
                       condition: torch.Tensor, guidance: float) -> torch.Tensor:
    """The student's noise prediction with text classifier-free guidance eps_u + w (eps_c - eps_u), both branches
    in one batched call (the unconditional one is the empty instruction with the same image condition); the
    conditional prediction alone at w = 1."""
    if uncond is None or guidance == 1.0:
        return student_eps(unet, adapter, z_t, t, cond, condition)
    eps_u, eps_c = student_eps(unet, adapter, torch.cat([z_t, z_t]), t, torch.cat([uncond, cond]),
                               torch.cat([condition, condition])).chunk(2)
    return eps_u + guidance * (eps_c - eps_u)


class _Step:
    def __init__(self, prev_sample: torch.Tensor, pred_original_sample: torch.Tensor):
        self.prev_sample, self.pred_original_sample = prev_sample, pred_original_sample


class CodiScheduler:
    """CoDi's multistep sampler in the shape of a diffusers scheduler, for the studio's one sampling loop
    (pipelines/core/ddim.py sample_scheduled): at each timestep of `sampling_timesteps`, the consistency function
    gives x0 = f(z_t, t); the next timestep's latent is the deterministic re-noise sqrt(a_s) x0 + sqrt(1 - a_s) eps
    with the same eps (no fresh noise); after the last timestep the result is x0 itself."""

    init_noise_sigma = 1.0

    def __init__(self, steps: int, alphas_cumprod: torch.Tensor | None = None, grid: int = GRID,
                 sigma_data: float = SIGMA_DATA, timestep_scaling: float = TIMESTEP_SCALING):
        self.alphas_cumprod = (schedule_alphas() if alphas_cumprod is None else alphas_cumprod).float().cpu()
        self.timesteps = torch.tensor(sampling_timesteps(steps, grid, len(self.alphas_cumprod)))
        self.sigma_data, self.timestep_scaling = sigma_data, timestep_scaling

    def scale_model_input(self, x: torch.Tensor, t) -> torch.Tensor:
        return x

    def step(self, eps: torch.Tensor, t, z_t: torch.Tensor, **_unused) -> _Step:
        t = int(t)
        steps = self.timesteps.tolist()
        x0 = consistency_x0(z_t.float(), eps.float(), torch.full((z_t.shape[0],), t), self.alphas_cumprod,
                            self.sigma_data, self.timestep_scaling)
        k = steps.index(t)
        nxt = renoise(x0, eps.float(), self.alphas_cumprod[steps[k + 1]]) if k + 1 < len(steps) else x0
        return _Step(nxt.to(z_t.dtype), x0.to(z_t.dtype))
