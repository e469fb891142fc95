"""Is an object's shape still in the VAE's latent? A small CNN probe on the 8x8 latent window around the object.

    python training/probe_latent_shape.py --vae assets/model/vae      # ~4 min on one CPU thread

Trains on one-object training-split scenes, reports shape accuracy on held-out ones, overall and per size. If
the probe reads the shape where decode(encode(render)) loses it (`train_vae.shape_round_trip`), the decoder is
what blurs corners away, and a better decoder on the same (frozen) encoder fixes it without retraining the UNets.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from training import evaluation, world  # noqa: E402

WINDOW = 8  # latent pixels around the object's centre (an object spans at most 7 at factor 4)


def windows(vae, scenes: list) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """(latent windows (N, 4, 8, 8), shape labels, sizes) of one-object scenes."""
    images = np.stack([world.render(s) for s in scenes])
    z = torch.cat([evaluation.encode(vae, images[i:i + 256]) for i in range(0, len(images), 256)])
    half, factor = WINDOW // 2, len(images[0]) // z.shape[-1]
    z = F.pad(z, (half,) * 4)
    out = []
    for zi, s in zip(z, scenes):
        cx, cy = s.objects[0].centre
        lx, ly = (round((c + 0.5) / factor - 0.5) + half for c in (cx, cy))
        out.append(zi[:, ly - half:ly + half, lx - half:lx + half])
    labels = torch.tensor([world.SHAPES.index(s.objects[0].shape) for s in scenes])
    return torch.stack(out), labels, [s.objects[0].size for s in scenes]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vae", default=str(ROOT / "assets" / "model" / "vae"))
    p.add_argument("--train", type=int, default=6000)
    p.add_argument("--test", type=int, default=800)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(args.vae).eval()
    train = [s for _, _, s in world.dataset(0, 3 * args.train, 64, split="train") if len(s.objects) == 1]
    x, y, _ = windows(vae, train[:args.train])
    xt, yt, sizes = windows(vae, [s for _, s in evaluation.held_out_scenes(args.test, 1)])
    net = nn.Sequential(nn.Conv2d(4, 64, 3, padding=1), nn.SiLU(), nn.Conv2d(64, 64, 3, padding=1), nn.SiLU(),
                        nn.Flatten(), nn.Linear(64 * WINDOW * WINDOW, 128), nn.SiLU(), nn.Linear(128, len(world.SHAPES)))
    opt = torch.optim.AdamW(net.parameters(), 1e-3)
    for _ in range(args.epochs):
        for idx in torch.randperm(len(x)).split(128):
            loss = F.cross_entropy(net(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        hit = (net(xt).argmax(1) == yt).float()
    small = torch.tensor([s == "small" for s in sizes])
    report = {"vae": args.vae, "accuracy": float(hit.mean()), "small": float(hit[small].mean()),
              "large": float(hit[~small].mean()), "test": len(hit), "train": len(x)}
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
