#!/usr/bin/env python
"""What one optimiser step of each embedded-model trainer costs here, and what that predicts for the recipe.

    python benchmarks/bench_train_steps.py                   # CPU, 2 threads (as training/recipe.py runs)
    python benchmarks/bench_train_steps.py --device cuda     # a GPU: the recipe's 20-minute budget, before a run
    python benchmarks/bench_train_steps.py --threads 1 --steps 3

Each stage of `training/recipe.py` is parsed with its own trainer's argument parser (so its batch size and
whether it freezes the VAE encoder are the recipe's), and the networks are built from `assets/model`'s configs
with random weights: VAE on 64x64 images, text encoder on 77-token captions, UNet and InstructPix2Pix UNet on
16x16 latents with the frozen text encoder's states (computed once, as the trainers look them up). Each distinct
(network, batch, frozen encoder) is timed for --steps steps after two warm-up steps, in float32 and under bfloat16
autocast, in this one process; the FLOPs of one step come from torch's FlopCounterMode. The prediction is each
stage's step budget times its step time in the precision the stage trains in (its --bf16): it leaves out latent
caching, quick looks, checkpoints and model exports, so a real run takes longer.
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from training import recipe  # noqa: E402
from training.schedule import autocast  # noqa: E402

MODEL = ROOT / "assets" / "model"
LATENT = 16  # 64x64 world images, VAE factor 4
CPU_BUDGET_MIN, GPU_BUDGET_MIN = 180, 20  # issue 3's budgets for the whole recipe
SMOOTH_BUDGET_MIN = 60  # the Smooth LoRA stage's own CPU budget (issue 29), outside the base model's


def stage_args(stage: recipe.Stage, device: str, threads: int) -> argparse.Namespace:
    """The stage's arguments as its trainer parses them (batch size, --freeze-encoder, ...)."""
    argv = stage.argv(Path("/nonexistent/recipe"), 1.0, device, threads, tiny=False, resume=False)
    return importlib.import_module(f"training.{stage.module}").parse_args(argv)


def step_fn(kind: str, batch: int, freeze_encoder: bool, device: torch.device):
    """(network, step): one training step of `kind` ('vae', 'text', 'unet', 'instruct', 'smooth') on random data;
    'smooth' is the Smooth LoRA's step: the LoRA on the frozen UNet, its loss with the double backward."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    text_config = CLIPTextConfig.from_pretrained(MODEL / "text_encoder")
    gen = torch.Generator().manual_seed(0)
    if kind == "vae":
        net = AutoencoderKL.from_config(AutoencoderKL.load_config(MODEL / "vae")).to(device).train()
        x = (torch.rand(batch, 3, 64, 64, generator=gen) * 2 - 1).to(device)

        def loss_of():
            with torch.set_grad_enabled(not freeze_encoder):
                z = net.encode(x).latent_dist.sample()
            y = net.decode(z).sample
            return (y - x).abs().mean() + F.mse_loss(y, x)
    elif kind == "text":
        net = CLIPTextModel(text_config).to(device).train()
        ids = torch.randint(0, text_config.vocab_size, (batch, 77), generator=gen).to(device)

        def loss_of():
            return net(ids)[0].pow(2).mean()
    else:
        folder = MODEL / ("unet_instruct" if kind == "instruct" else "unet")
        net = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder)).to(device).train()
        encoder = CLIPTextModel(text_config).to(device).eval().requires_grad_(False)
        ids = torch.randint(0, text_config.vocab_size, (batch, 77), generator=gen).to(device)
        x = torch.randn(batch, net.config.in_channels, LATENT, LATENT, generator=gen).to(device)
        t = torch.randint(0, 1000, (batch,), generator=gen).to(device)

        with torch.no_grad():  # the trainers look frozen text states up (training/text_states.py)
            states = encoder(ids)[0]

        def loss_of():
            return (net(x, t, encoder_hidden_states=states).sample.float() - x[:, :4]).pow(2).mean()

        if kind == "smooth":
            from torch.nn.attention import SDPBackend, sdpa_kernel

            from training.smooth_reg import VariationTarget, smooth_losses
            from training.train_smooth_lora import add_smooth_lora

            net.requires_grad_(False)
            add_smooth_lora(net, 8)
            alphas = torch.linspace(0.999, 0.005, 1000)
            target = VariationTarget()

            def loss_of():  # the fused attention kernels have no double backward
                with sdpa_kernel([SDPBackend.MATH]):
                    losses = smooth_losses(net, x, torch.randn_like(x), t, states, alphas, target)
                return losses["mse"] + losses["reg"]

    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-5)

    def step(bf16: bool):
        with autocast(device, bf16):  # the trainers' own precision context
            loss = loss_of()
        opt.zero_grad(set_to_none=True)
        loss.float().backward()
        opt.step()
    return net, step


def seconds_per_step(step, bf16: bool, steps: int, device: torch.device) -> float:
    for _ in range(2):
        step(bf16)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step(bf16)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def flops_per_step(step) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step(False)
    return float(counter.get_total_flops())


def network_of(stage: recipe.Stage) -> str | None:
    """The network a stage's steps are timed on; None for a stage this benchmark does not time (singdiffusion)."""
    return {"train_vae": "vae", "train_text": "text", "train_unet": "unet", "train_instruct": "instruct",
            "train_smooth_lora": "smooth"}.get(stage.module)


def trains_in_bf16(a: argparse.Namespace) -> bool:
    return bool(getattr(a, "bf16", False)) or getattr(a, "mixed_precision", "no") == "bf16"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2, help="CPU threads (training/recipe.py's default is 2)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per network and precision")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    stages = [s for s in recipe.STAGES if s.steps and network_of(s)]  # the timed trainers (assembly has no steps)
    keys = {}
    for stage in stages:
        a = stage_args(stage, args.device, args.threads)
        keys[stage.name] = (network_of(stage), a.batch, bool(getattr(a, "freeze_encoder", False)))

    measured = {}
    print(f"{'network':<9} {'batch':>5} {'frozen enc':>10} {'fp32 s/step':>11} {'bf16 s/step':>11} "
          f"{'fp32/bf16':>9} {'GFLOP/step':>10} {'GFLOP/s':>8}")
    for key in dict.fromkeys(keys.values()):
        _, step = step_fn(*key, device)
        fp32 = seconds_per_step(step, False, args.steps, device)
        bf16 = seconds_per_step(step, True, args.steps, device)
        gflop = flops_per_step(step) / 1e9
        measured[key] = {"fp32_s": fp32, "bf16_s": bf16, "gflop": gflop}
        print(f"{key[0]:<9} {key[1]:>5} {str(key[2]):>10} {fp32:>11.3f} {bf16:>11.3f} {fp32 / bf16:>9.2f} "
              f"{gflop:>10.1f} {gflop / fp32:>8.1f}")

    bf16 = {s.name: trains_in_bf16(stage_args(s, args.device, args.threads)) for s in stages}
    minutes = {s.name: s.steps * measured[keys[s.name]]["bf16_s" if bf16[s.name] else "fp32_s"] / 60 for s in stages}
    smooth = {n: m for n, m in minutes.items() if keys[n][0] == "smooth"}  # its own budget
    total = sum(m for n, m in minutes.items() if n not in smooth)
    budget = GPU_BUDGET_MIN if device.type == "cuda" else CPU_BUDGET_MIN
    print()
    for s in stages:
        print(f"{s.name:<22} {s.steps:>6} steps  {minutes[s.name]:>7.1f} min  {'bf16' if bf16[s.name] else 'fp32'}")
    print(f"{'optimiser steps only':<22} {sum(s.steps for s in stages if s.name not in smooth):>6} steps  "
          f"{total:>7.1f} min = {total / budget:.2f} x the {budget}-minute budget ({args.device}, {args.threads} "
          f"threads; the base model's stages)")
    for name, m in smooth.items():
        print(f"{name:<22} {m:>20.1f} min = {m / SMOOTH_BUDGET_MIN:.2f} x its own "
              f"{SMOOTH_BUDGET_MIN}-minute CPU budget")
    report = {"device": args.device, "threads": args.threads, "stage_minutes": minutes, "stage_bf16": bf16,
              "total_minutes": total, "budget_minutes": budget, "smooth_lora_minutes": smooth,
              "networks": [{"network": k[0], "batch": k[1], "frozen_encoder": k[2], **v} for k, v in measured.items()]}
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
