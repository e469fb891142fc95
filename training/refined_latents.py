"""Latents as the UNet leaves them, paired with the images they should decode to, for the decoder stage.

    python training/refined_latents.py --model assets/model --out training/runs/refined.safetensors --count 1024

The decoder is trained on encoder latents, but at sampling time it decodes what the UNet made, which sits a
little off the encoder's manifold: measured on 100 held-out prompts, a probe read the prompt's shape from the
generated latents 77% of the time while the checker read it from their decoded images 38% of the time. So,
SDEdit-style, each training scene's latent is noised to a random strength and denoised again by the UNet with
its caption; the result keeps the scene's layout (and so still has the scene's render as its target) but
carries the UNet's own artefacts. `train_vae.py --refined FILE` mixes these pairs into decoder training.

Scenes come from the training split only (seeds from --seed-base up). Output: one safetensors file with
`latents` (N, 4, h, w) float16 in the UNet's (scaled) units and `images` (N, H, W, 3) uint8 renders.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from tqdm import tqdm

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from pipelines.core import ddim  # noqa: E402
from training import evaluation, world  # noqa: E402
from training.schedule import refuse_bad_device  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(ROOT / "assets" / "model"), help="folder with unet, text encoder, vae")
    p.add_argument("--out", required=True)
    p.add_argument("--count", type=int, default=1024)
    p.add_argument("--seed-base", type=int, default=600_000, help="first training-split scene seed")
    p.add_argument("--strength", type=float, nargs=2, default=(0.3, 0.8),
                   help="range of the share of the DDIM schedule re-run (drawn per scene)")
    p.add_argument("--steps", type=int, default=20, help="DDIM steps of the full schedule")
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu", help="torch device for the UNet and VAE (float32 on any device; the "
                   "noise is still drawn on the CPU, so a CUDA run refines the same scenes from the same noise)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    refuse_bad_device(p, args.device)
    return args


@torch.no_grad()
def refine(model, images: np.ndarray, captions: list[str], start_index: int, steps: int, guidance: float,
           generator: torch.Generator) -> torch.Tensor:
    """Encode, noise to timesteps[start_index], denoise with the captions: (B, 4, h, w) scaled latents."""
    z0 = evaluation.encode(model.vae, images).to(model.unet.device)
    sched = ddim.make_scheduler(model.scheduler_config, steps)
    noise = torch.randn(z0.shape, generator=generator).to(z0.device)
    x = sched.add_noise(z0, noise, sched.timesteps[start_index].reshape(1))
    return evaluation.denoise(model.unet, model.text_encoder, model.tokenizer, captions, x, guidance, steps,
                              model.scheduler_config, start_index)


def main(argv=None) -> dict:
    from pipelines.core.events import run_to_end
    from pipelines.core.models import load_model

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    # the studio's loader (any SD-format folder of this world), in float32 so CPU and GPU runs agree closely
    model = run_to_end(load_model(args.model, torch.device(args.device), torch.float32))
    generator = torch.Generator().manual_seed(args.seed_base)
    rng = np.random.default_rng(args.seed_base)
    items = world.dataset(args.seed_base, args.count, 64, split="train")
    latents, images, done = [], [], 0
    bar = tqdm(total=args.count, disable=args.no_progress, desc="refining latents")
    while done < args.count:
        chunk = [item for _, item in zip(range(min(args.batch, args.count - done)), items)]
        ims = np.stack([im for im, _, _ in chunk])
        strength = rng.uniform(*args.strength)
        start = min(args.steps - 1, int(round(args.steps * (1 - strength))))
        latents.append(refine(model, ims, [t for _, t, _ in chunk], start, args.steps, args.guidance,
                              generator).half().cpu())
        images.append(torch.from_numpy(ims))
        done += len(chunk)
        bar.update(len(chunk))
    bar.close()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({"latents": torch.cat(latents).contiguous(), "images": torch.cat(images).contiguous()}, out)
    report = {"out": str(out), "count": args.count, "strength": list(args.strength), "steps": args.steps}
    print(json.dumps(report), flush=True)
    return report


if __name__ == "__main__":
    main()
