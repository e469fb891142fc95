"""DragDiffusion's identity-preserving LoRA: a peft adapter on the UNet's attention projections, trained for a
few steps on the one image with its prompt. The drag adds it inside `peft_state_restored`
(pipelines/core/peft_state.py), which removes it again however the drag ends. Trained adapters are cached as
peft state dicts.
"""
from __future__ import annotations

from collections.abc import Generator

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from peft import LoraConfig, get_peft_model_state_dict, set_peft_model_state_dict

from ..core.events import CancelToken, Progress
from ..core.image_io import pil_to_tensor
from ..core.lora import DRAG_ADAPTER as ADAPTER
from ..core.peft_state import adapter_configs, freeze_lora, quiet_peft

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]   # every attention projection, self and cross (as the reference)
BATCH = 4                                        # the reference's LoRA batch (copies of the one image)
WEIGHT_DECAY = 1e-2                              # AdamW, as the reference


def add_adapter(unet, rank: int, state_dict: dict | None = None, seed: int = 0) -> list[torch.nn.Parameter]:
    """Adds the per-image adapter (fp32 weights, so that fp16 UNets train it stably), optionally loading cached
    weights; returns its parameters. peft draws the initial lora_A from torch's global generator: it is seeded
    here (and the global state put back), so the same seed trains the same LoRA."""
    if ADAPTER in adapter_configs(unet):
        unet.delete_adapters(ADAPTER)
    device = next(unet.parameters()).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), quiet_peft():
        torch.manual_seed(int(seed))
        unet.add_adapter(LoraConfig(r=int(rank), lora_alpha=int(rank), init_lora_weights="gaussian",
                                    target_modules=TARGETS), ADAPTER)
    params = [p for n, p in unet.named_parameters() if f".{ADAPTER}." in n]
    for p in params:
        p.data = p.data.float()
    if state_dict is not None:
        result = set_peft_model_state_dict(unet, state_dict, adapter_name=ADAPTER)
        unexpected = getattr(result, "unexpected_keys", None) or []
        if unexpected:
            raise RuntimeError(f"cached LoRA does not fit the UNet: {unexpected[:3]}")
    return params


def adapter_state(unet) -> dict[str, torch.Tensor]:
    """The per-image adapter's weights as a CPU state dict (what the cache keeps)."""
    return {k: v.detach().to("cpu", copy=True) for k, v in
            get_peft_model_state_dict(unet, adapter_name=ADAPTER).items()}


def train_lora(model, source, cond: torch.Tensor, others: dict[str, float], steps: int, lr: float, seed: int,
               cancel: CancelToken | None, offset: int, total: int) -> Generator[Progress, None, list[float]]:
    """Fine-tunes the (already added) per-image adapter: each step a batch of BATCH posterior samples of the
    image, noised at random timesteps, with the standard noise-prediction loss (v-prediction models: v).
    `others` are adapters (e.g. the Smooth LoRA) that stay on, frozen, while it trains. Returns the losses."""
    unet, vae = model.unet, model.vae
    names = {ADAPTER: 1.0, **others}
    unet.enable_lora()
    unet.set_adapters(list(names), list(names.values()))
    freeze_lora(unet)
    params = [p for n, p in unet.named_parameters() if f".{ADAPTER}." in n]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=WEIGHT_DECAY)
    fp16 = model.device.type == "cuda" and model.dtype == torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=fp16)
    noise_sched = DDPMScheduler.from_config(model.scheduler_config)
    prediction = noise_sched.config.prediction_type
    gen = torch.Generator("cpu").manual_seed(int(seed))
    with torch.no_grad():
        x = pil_to_tensor(source).to(model.device, next(vae.parameters()).dtype)
        post = vae.encode(x).latent_dist
        mean, std = post.mean.float(), post.std.float()
    sf = vae.config.scaling_factor
    batch_cond = cond.expand(BATCH, -1, -1)
    losses = []
    try:
        for step in range(int(steps)):
            if cancel is not None:
                cancel.check()
            # a fresh posterior sample per item: the reference's vae.encode(...).sample(), without re-encoding
            z = (mean + std * torch.randn((BATCH, *mean.shape[1:]), generator=gen).to(mean.device)) * sf
            noise = torch.randn(z.shape, generator=gen).to(z.device)
            t = torch.randint(0, noise_sched.config.num_train_timesteps, (BATCH,), generator=gen).to(z.device)
            z_t = noise_sched.add_noise(z, noise, t)
            with torch.enable_grad():
                pred = unet(z_t.to(model.dtype), t, encoder_hidden_states=batch_cond).sample.float()
                target = noise if prediction == "epsilon" else noise_sched.get_velocity(z, noise, t)
                loss = F.mse_loss(pred, target)
                scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            yield Progress("training LoRA", offset + step + 1, total,
                           message=f"LoRA step {step + 1}/{steps}: loss {losses[-1]:.4f}")
    finally:
        for p in params:
            p.grad = None
            p.requires_grad_(False)
        unet.disable_lora()
    return losses
