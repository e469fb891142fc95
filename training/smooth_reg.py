"""Smooth Diffusion's step-wise variation regularization (arXiv 2312.04410, Eq. 9), as a plain function.

For noise eps at timestep t the one-step denoised estimate is x0_hat(eps) = (x_t - sqrt(1-ab) eps_hat) / sqrt(ab),
with x_t = sqrt(ab) x0 + sqrt(1-ab) eps. A random output direction d of unit length, scaled by sqrt(1-ab), is
pulled back through the Jacobian of x0_hat with respect to eps (a vector-Jacobian product, by double backward
through the UNet); the regularizer keeps the per-sample norm of that pull-back close to its running mean, so that
equal steps in the noise give equal steps in the image (StyleGAN2's path-length regularization, moved to the
diffusion step).
"""
from __future__ import annotations

import torch


def denoised(unet, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, states: torch.Tensor,
             alphas_cumprod: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(eps_hat, x0_hat) for noise `eps` added to `x0` at timesteps `t` (one per sample)."""
    ab = alphas_cumprod.to(x0.device)[t].float().view(-1, 1, 1, 1)
    x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * eps
    eps_hat = unet(x_t, t, encoder_hidden_states=states).sample.float()
    return eps_hat, (x_t - (1 - ab).sqrt() * eps_hat) / ab.sqrt()


def output_direction(x0_hat: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """A random direction in x0 space, about unit length (N(0, I) / sqrt(C*H*W)), scaled by sqrt(1 - ab_t)."""
    noise = torch.randn(x0_hat.shape, generator=generator, dtype=torch.float32).to(x0_hat.device)
    ab = alphas_cumprod.to(x0_hat.device)[t].float().view(-1, 1, 1, 1)
    return noise / x0_hat[0].numel() ** 0.5 * (1 - ab).sqrt()


def variation_vjp(x0_hat: torch.Tensor, eps: torch.Tensor, direction: torch.Tensor,
                  create_graph: bool = True) -> torch.Tensor:
    """d<x0_hat, direction>/d eps: the direction pulled back to the noise (eps must require grad).

    With create_graph the result stays differentiable in the network's weights (double backward)."""
    (grad,) = torch.autograd.grad((x0_hat * direction).sum(), eps, create_graph=create_graph)
    return grad


class VariationTarget:
    """The running mean the per-sample variation is pulled towards: a <- a + decay * (mean(v) - a), from 0.

    Kept as plain state (`state_dict` / `load_state_dict`) so a resumed run continues from the same target."""

    def __init__(self, decay: float = 0.01):
        self.decay = float(decay)
        self.value = 0.0
        self.updates = 0

    def penalty(self, variation: torch.Tensor) -> torch.Tensor:
        """mean((v - a_new)^2), where a_new keeps the graph for this step; the stored a is the detached value."""
        a_new = self.value + self.decay * (variation.mean() - self.value)
        self.value = float(a_new.detach())
        self.updates += 1
        return ((variation - a_new) ** 2).mean()

    def state_dict(self) -> dict:
        return {"value": self.value, "decay": self.decay, "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.value, self.decay, self.updates = float(state["value"]), float(state["decay"]), int(state["updates"])


def smooth_losses(unet, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, states: torch.Tensor,
                  alphas_cumprod: torch.Tensor, target: VariationTarget,
                  generator: torch.Generator | None = None, reg_min_t: int = 0) -> dict[str, torch.Tensor]:
    """The training step's losses: epsilon MSE, the variation penalty, and the mean variation (for the log).

    Only samples with t >= reg_min_t enter the penalty and its running mean (0: all, as the paper)."""
    eps = eps.detach().requires_grad_(True)
    eps_hat, x0_hat = denoised(unet, x0, eps, t, states, alphas_cumprod)
    mse = torch.nn.functional.mse_loss(eps_hat, eps.detach())
    grad = variation_vjp(x0_hat, eps, output_direction(x0_hat, t, alphas_cumprod, generator))
    variation = grad.flatten(1).norm(dim=1)
    seen = variation[t.to(variation.device) >= reg_min_t]
    reg = target.penalty(seen) if len(seen) else variation.sum() * 0
    return {"mse": mse, "reg": reg, "variation": variation.detach().mean()}
