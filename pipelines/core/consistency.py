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


def student_eps(unet, adapter, z_t: torch.Tensor, t: torch.Tensor, text: torch.Tensor,
                condition: torch.Tensor) -> torch.Tensor:
    """The student's noise prediction: the adapter (a diffusers ControlNetModel) reads the condition latent and
    its residuals join the UNet's skip connections. `t` is one timestep per sample or a scalar."""
    down, mid = adapter(z_t, t, encoder_hidden_states=text, controlnet_cond=condition, return_dict=False)
    return unet(z_t, t, encoder_hidden_states=text, down_block_additional_residuals=down,
                mid_block_additional_residual=mid).sample
