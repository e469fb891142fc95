"""Train the project's own small KL autoencoder (diffusers AutoencoderKL, 4 latent channels, factor 4).

    python training/train_vae.py --out training/runs/vae --minutes 40
    python training/train_vae.py --out training/runs/vae --minutes 40 --resume   # continue after a stop
    python training/train_vae.py --out training/runs/vae_dec --init-from training/runs/vae/vae \
        --freeze-encoder --minutes 40 --edge-weight 1     # stage 2: sharpen the decoder, latents unchanged

Stage 2 is what SD did for its ft-MSE decoder: the encoder (and so every latent, and the scaling factor)
stays exactly as stage 1 left it, so the UNet can train on stage-1 latents while the decoder improves.

--steps / --minutes are the budget of the WHOLE run (resumed parts included), so the learning-rate
schedule is the same whether or not the run was interrupted. The run is an `accelerate` one (Accelerator,
save_state / load_state checkpoints, --bf16 as its bf16 mixed precision): `accelerate launch --multi_gpu
--num_processes N training/train_vae.py ... --device cuda` trains on N GPUs, each drawing its own batches.
`--device cuda` trains on a GPU (batches are made on the CPU and moved); checkpoints are device-independent.

Writes into --out:
  checkpoint/   accelerate's save_state folder (model.safetensors, optimizer.bin, scheduler.bin, random states,
                custom_checkpoint_0.pkl: step, time, batch generators) and state.json (a readable summary)
  history.jsonl PSNR on held-out data as training goes
  vae/          the diffusers folder (safetensors), with a data-derived scaling_factor
  vae_eval.json held-out world and photo PSNR;  latent_rgb.json  the latent preview fit
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # runnable as a script from anywhere
    sys.path.insert(0, str(ROOT))

from training import checkpoint, data  # noqa: E402
from training.schedule import (  # noqa: E402
    after_optimizer_step,
    autocast,
    cpu_randn,
    end_processes,
    lr_schedule,
    own_accelerate_state,
    parse_run_args,
    precision,
    progress_of,
    run_parser,
    smoothed,
    start_accelerated_run,
)

# Chosen by measurement on a 2-core CPU: 2.7M params, 10.8 MB fp32, ~1.1 s per step at batch 16.
# (64,128,128) took 2.3x as long per step, layers_per_block=2 1.25x and 13.9 MB.
ARCH = dict(block_out_channels=(32, 64, 128), layers_per_block=1, norm_num_groups=32)
TINY_ARCH = dict(block_out_channels=(8, 16, 16), layers_per_block=1, norm_num_groups=8)  # tests only


def arch_of(args) -> dict:
    return getattr(args, "arch", None) or (TINY_ARCH if args.tiny else ARCH)


def build_vae(arch: dict):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=64,
        down_block_types=("DownEncoderBlock2D",) * 3,  # 2 downsamples: factor 4
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=tuple(arch["block_out_channels"]), layers_per_block=arch["layers_per_block"],
        norm_num_groups=arch["norm_num_groups"],
    )


def parse_args(argv=None) -> argparse.Namespace:
    p = run_parser(__doc__, batch=16, lr=1e-3, warmup=100, checkpoint_every=200, eval_every=200)
    p.add_argument("--init-from", help="start from this diffusers vae folder (its architecture is kept)")
    p.add_argument("--freeze-encoder", action="store_true",
                   help="train the decoder only; latents and scaling factor stay those of --init-from")
    p.add_argument("--deepen", action="store_true",
                   help="with --init-from: one more ResNet layer per block, added as an identity (zeroed last "
                        "conv), so the VAE starts out computing exactly what --init-from did")
    p.add_argument("--refined", help="a refined_latents.py file: (UNet-made latent, render) pairs the decoder also "
                   "learns from (with --freeze-encoder), so it decodes what sampling produces, not only "
                   "encoder latents")
    p.add_argument("--refined-share", type=float, default=0.25, help="refined pairs per batch, as a share of --batch")
    p.add_argument("--photo-fraction", type=float, default=0.25)
    p.add_argument("--kl-weight", type=float, default=1e-6)
    p.add_argument("--edge-weight", type=float, default=0.0, help="L1 on image gradients (sharp world edges)")
    p.add_argument("--worst-weight", type=float, default=0.0,
                   help="L1 on each image's worst --worst-fraction of pixels: a rounded-off corner is a few "
                        "pixels of full-contrast error, which the mean losses barely see")
    p.add_argument("--worst-fraction", type=float, default=0.02)
    p.add_argument("--anchor-weight", type=float, default=0.0,
                   help="with --init-from: MSE between the posterior means and the initial encoder's (in scaled "
                        "latent units), so a fine-tuned encoder keeps the latent space the UNets were trained on")
    p.add_argument("--eval-world", type=int, default=256, help="held-out world images in the final eval")
    p.add_argument("--scale-images", type=int, default=384, help="training images for the scaling factor")
    p.add_argument("--tiny", action="store_true", help="a tiny model and evaluation, for tests")
    return parse_run_args(p, argv)


def deepened(vae):
    """`vae` with layers_per_block + 1. AutoencoderKL shares that setting between encoder and decoder, so both
    grow; each new layer is a same-width ResNet block whose last conv is zero, i.e. the identity, so encoder
    latents (which the UNets were trained on) and decoder outputs are unchanged until training moves them."""
    cfg = dict(vae.config)
    arch = dict(block_out_channels=cfg["block_out_channels"], layers_per_block=cfg["layers_per_block"] + 1,
                norm_num_groups=cfg["norm_num_groups"])
    new = build_vae(arch)
    new.register_to_config(scaling_factor=cfg["scaling_factor"])
    missing, unexpected = new.load_state_dict(vae.state_dict(), strict=False)
    assert not unexpected, unexpected
    for name in {m.rsplit(".conv2.", 1)[0] for m in missing if ".conv2." in m}:
        conv = new.get_submodule(name).conv2
        torch.nn.init.zeros_(conv.weight)
        torch.nn.init.zeros_(conv.bias)
    return new


# --------------------------------------------------------------------------------------------- metrics


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    return ((x.clamp(-1, 1) + 1) * 127.5).round()


def psnr_per_image(recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """PSNR in dB of 8-bit images, as a saved PNG would score."""
    mse = ((to_uint8(recon) - to_uint8(target)) ** 2).mean(dim=(1, 2, 3)).clamp_min(1e-10)
    return 10 * torch.log10(255.0 ** 2 / mse)


@torch.no_grad()
def reconstruct(vae, images: torch.Tensor, chunk: int = 32) -> torch.Tensor:
    """Encode + decode (posterior mean) on the VAE's device, chunk by chunk; back on the images' device."""
    out = [vae.decode(vae.encode(images[i:i + chunk].to(vae.device)).latent_dist.mean).sample.to(images.device)
           for i in range(0, len(images), chunk)]
    return torch.cat(out)


@torch.no_grad()
def shape_round_trip(vae, count: int = 64) -> float:
    """Share of held-out one-object renders whose shape the checker still reads after encode + decode: the
    ceiling on text-to-image shape accuracy (a blurry VAE turns small squares and stars into blobs)."""
    from training import evaluation, world

    items = evaluation.held_out_scenes(count, 1)
    renders = np.stack([world.render(s) for _, s in items])
    trips = evaluation.decode(vae, evaluation.encode(vae, renders))
    hits = []
    for image, (_, scene) in zip(trips, items):
        found = evaluation.nearest(evaluation.check(image)["objects"], scene.objects[0].centre)
        hits.append(found is not None and found["shape"] == scene.objects[0].shape)
    return float(np.mean(hits))


@torch.no_grad()
def evaluate(vae, world_images: torch.Tensor, photo_images: torch.Tensor, shapes: int = 64) -> dict:
    was_training = vae.training
    vae.eval()
    w = psnr_per_image(reconstruct(vae, world_images), world_images)
    p = psnr_per_image(reconstruct(vae, photo_images), photo_images)
    shape = shape_round_trip(vae, shapes)
    vae.train(was_training)
    return {"world_psnr": round(float(w.mean()), 3), "world_psnr_p10": round(float(w.quantile(0.1)), 3),
            "world_psnr_min": round(float(w.min()), 3), "world_images": len(w),
            "photo_psnr": round(float(p.mean()), 3), "photo_psnr_min": round(float(p.min()), 3),
            "photo_images": len(p), "shape_round_trip": round(shape, 3), "shape_scenes": shapes}


# --------------------------------------------------------------------------------------------- training


LR_FLOOR = 0.02  # cosine decay to 2% of --lr


def loss_fn(vae, x: torch.Tensor, args, anchor=None, refined=None, forward_precision=None
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """`refined`, optional: (unscaled latents, their target images) decoded beside the batch; its images join
    the reconstruction terms (the KL and anchor terms are about the encoder and leave them out).
    `forward_precision()`: the context of the encoder and decoder passes (default: --bf16's autocast on
    --device; the trainer passes its Accelerator's, schedule.precision)."""
    forward_precision = forward_precision or (lambda: autocast(args.device, args.bf16))
    with torch.set_grad_enabled(not args.freeze_encoder), forward_precision():
        posterior = vae.encode(x).latent_dist
    if posterior.parameters.dtype != torch.float32:  # under --bf16: the sample, KL and anchor terms stay float32
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        posterior = DiagonalGaussianDistribution(posterior.parameters.float())
    # posterior.sample() as diffusers draws it, but always from the CPU generator (then moved): the same
    # numbers on any device, and a resumed run goes on from the CPU rng state its checkpoint holds
    z = posterior.mean + posterior.std * cpu_randn(posterior.mean)
    if refined is not None:
        z, x = torch.cat([z, refined[0]]), torch.cat([x, refined[1]])
    with forward_precision():
        y = vae.decode(z).sample.float()
    loss = (y - x).abs().mean() + F.mse_loss(y, x)
    if anchor is not None and args.anchor_weight:
        with torch.no_grad():
            old = anchor.encode(x).latent_dist.mean
        scale = anchor.config.scaling_factor
        loss = loss + args.anchor_weight * F.mse_loss(posterior.mean * scale, old * scale)
    # SD's LDM weighs KL 1e-6 against a per-pixel SUM of reconstruction error; our terms are per-pixel
    # means, so divide the per-image KL sum by the pixel count to keep SD's (tiny) balance.
    loss = loss + args.kl_weight * posterior.kl().mean() / x[0].numel()
    if args.edge_weight:
        loss = loss + args.edge_weight * (
            (y.diff(dim=-1) - x.diff(dim=-1)).abs().mean() + (y.diff(dim=-2) - x.diff(dim=-2)).abs().mean())
    if args.worst_weight:
        loss = loss + args.worst_weight * worst_pixels_l1(y, x, args.worst_fraction)
    return loss, y[:len(posterior.mean)]


class Objective(torch.nn.Module):
    """The VAE with loss_fn as its forward, the module accelerate prepares: under several processes its gradients are
    averaged through DistributedDataParallel, which needs the loss computed inside the wrapped module's forward
    (encode and decode are not forward). Precision is loss_fn's: the Accelerator's autocast around the encoder and
    decoder passes only (prepare's autocast of the whole forward is switched off), the rest in float32 as before."""

    def __init__(self, vae, args, anchor=None, forward_precision=None):
        super().__init__()
        self.vae, self.args, self.forward_precision = vae, args, forward_precision
        self._anchor = [anchor]  # frozen and not a submodule: neither trained, checkpointed nor wrapped

    def forward(self, x: torch.Tensor, refined=None) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.autocast(x.device.type, enabled=False):
            return loss_fn(self.vae, x, self.args, self._anchor[0], refined, self.forward_precision)


def worst_pixels_l1(y: torch.Tensor, x: torch.Tensor, fraction: float) -> torch.Tensor:
    """Mean L1 (summed over channels) of the `fraction` worst pixels of each image."""
    err = (y - x).abs().sum(1).flatten(1)
    k = max(1, round(fraction * err.shape[1]))
    return err.topk(k, dim=1).values.mean()


@torch.no_grad()
def scaling_factor(vae, args) -> float:
    """1 / std of posterior means over mixed training images, as SD's 0.18215 was derived."""
    rng = np.random.default_rng(args.seed + 12345)  # its own stream: training draws stay the same
    images = data.mixed_batch(rng, args.scale_images, args.photo_fraction)
    vae.eval()
    z = torch.cat([vae.encode(images[i:i + 64].to(vae.device)).latent_dist.mean for i in range(0, len(images), 64)])
    return float(1.0 / z.std())


def export(out: Path, vae, args, world_eval, photo_eval, step: int, elapsed: float) -> dict:
    from pipelines.core.previews import fit_previewer

    vae.eval()
    if not args.freeze_encoder:  # a frozen encoder keeps its latents, so the factor must not move either
        vae.register_to_config(scaling_factor=scaling_factor(vae, args))
    final = out / "vae"
    with checkpoint.swapped_in(final) as partial:
        vae.save_pretrained(partial, safe_serialization=True)
    fit_previewer(vae).save(out)
    size = sum(f.stat().st_size for f in final.glob("*.safetensors"))
    report = {"step": step, "train_minutes": round(elapsed / 60, 2),
              **evaluate(vae, world_eval, photo_eval, 8 if args.tiny else 128),
              "scaling_factor": float(vae.config.scaling_factor),
              "params": sum(p.numel() for p in vae.parameters()), "safetensors_mb": round(size / 1e6, 2),
              "arch": {k: list(v) if isinstance(v, tuple) else v for k, v in arch_of(args).items()},
              "photo_sources": {k: {"source": s, "licence": licence} for k, (s, licence) in data.PHOTOS.items()}}
    (out / "vae_eval.json").write_text(json.dumps(report, indent=1))
    return report


def main(argv=None) -> dict:
    args = parse_args(argv)
    with own_accelerate_state():
        return _train(args)


def _train(args) -> dict:
    accelerator, out, rng = start_accelerated_run(args)
    device = accelerator.device
    main_process = accelerator.is_main_process
    if args.init_from:
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(args.init_from)
        if args.deepen:
            vae = deepened(vae)
        cfg = vae.config
        args.arch = dict(block_out_channels=list(cfg.block_out_channels), layers_per_block=cfg.layers_per_block,
                         norm_num_groups=cfg.norm_num_groups)
    else:
        vae = build_vae(arch_of(args))
    anchor = None
    if args.anchor_weight and args.init_from and not args.freeze_encoder:
        from diffusers import AutoencoderKL

        anchor = AutoencoderKL.from_pretrained(args.init_from).eval().requires_grad_(False).to(device)
    if args.freeze_encoder:
        vae.encoder.requires_grad_(False)
        vae.quant_conv.requires_grad_(False)
    trained = [p for p in vae.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trained, lr=args.lr, weight_decay=0.01)
    run = checkpoint.RunState(rng, accelerator.process_index)
    run.running = {"psnr": None}
    objective = Objective(vae, args, anchor, lambda: precision(accelerator))
    objective, opt, lr = accelerator.prepare(objective, opt, lr_schedule(opt, args, LR_FLOOR, run))
    accelerator.register_for_checkpointing(run)
    if args.resume:
        checkpoint.load_state(accelerator, out)
    eval_world = 32 if args.tiny else 64  # a quick look during training; the final eval uses --eval-world
    world_eval, photo_eval = data.world_eval_set(args.eval_world), data.photo_eval_set()
    refined = None
    if args.refined:
        if not args.freeze_encoder:
            raise SystemExit("--refined needs --freeze-encoder: its latents belong to the current encoder")
        from safetensors.torch import load_file

        refined = load_file(args.refined)
        refined = (refined["latents"].float() / vae.config.scaling_factor, data.to_tensor(refined["images"].numpy()))
    n_refined = round(args.batch * args.refined_share) if refined else 0
    objective.train()

    def save():
        checkpoint.save_state(accelerator, out, checkpoint.summary(run, args, opt, ["vae"], arch=arch_of(args),
                                                             running_psnr=run.running["psnr"]))

    def look():
        return {**evaluate(vae, world_eval[:eval_world], photo_eval, 8 if args.tiny else 64),
                "train_psnr_running": round(run.running["psnr"], 3)}

    bar = tqdm(total=args.steps, initial=run.step, disable=args.no_progress or not main_process, dynamic_ncols=True)
    run.begin()
    while progress_of(args, run.step, run.seconds()) < 1.0:
        x = data.mixed_batch(rng, args.batch - n_refined, args.photo_fraction).to(device)
        extra = None
        if n_refined:
            pick = torch.from_numpy(rng.integers(0, len(refined[0]), n_refined))
            extra = (refined[0][pick].to(device), refined[1][pick].to(device))
        loss, y = objective(x, extra)
        opt.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(trained, 1.0)
        opt.step()
        lr.step()
        run.step += 1
        batch_psnr = float(accelerator.gather(psnr_per_image(y.detach(), x).mean()[None]).mean())
        run.running["psnr"] = smoothed(run.running["psnr"], batch_psnr, keep=0.95)
        after_optimizer_step(args, out, bar, run, look, save, main_process, loss=f"{loss.item():.4f}",
                   psnr=f"{run.running['psnr']:.2f}", lr=f"{opt.param_groups[0]['lr']:.1e}")
    bar.close()
    save()
    report = {}
    if main_process:
        report = export(out, vae, args, world_eval, photo_eval, run.step, run.seconds())
        print(json.dumps({k: v for k, v in report.items() if k != "photo_sources"}), flush=True)
    accelerator.wait_for_everyone()
    return report


if __name__ == "__main__":
    main()
    end_processes()
