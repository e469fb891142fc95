"""Is an object's shape still in the VAE's latent? A small CNN probe on the 8x8 latent window around the object.

    python training/probe_latent_shape.py --vae assets/model/vae      # ~4 min on one CPU thread
    python training/probe_latent_shape.py --generated 100             # + latents the UNet generates (~3 min more)

Trains on one-object training-split scenes, reports shape accuracy on held-out ones, overall and per size. If
the probe reads the shape where decode(encode(render)) loses it (`train_vae.shape_round_trip`), the decoder is
what blurs corners away, and a better decoder on the same (frozen) encoder fixes it without retraining the UNets.

--generated N: the same probe on the latents the model's UNet generates for N held-out one-object prompts (50
DDIM steps, guidance 7.5; window at the object the checker finds, else at the caption's centre), beside the
checker's shape read on their decoded images: how much of text-to-image's shape error is the decoder's.
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
    factor = len(images[0]) // z.shape[-1]
    out = [window_at(zi, s.objects[0].centre, factor) for zi, s in zip(z, scenes)]
    labels = torch.tensor([world.SHAPES.index(s.objects[0].shape) for s in scenes])
    return torch.stack(out), labels, [s.objects[0].size for s in scenes]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vae", default=str(ROOT / "assets" / "model" / "vae"))
    p.add_argument("--train", type=int, default=6000)
    p.add_argument("--test", type=int, default=800)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--generated", type=int, default=0, help="also probe this many generated latents")
    p.add_argument("--model", default=str(ROOT / "assets" / "model"), help="for --generated: unet, text encoder")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(args.vae).eval()
    train = [s for _, _, s in world.dataset(0, 3 * args.train, 64, split="train") if len(s.objects) == 1]
    x, y, _ = windows(vae, train[:args.train])
    xt, yt, sizes = windows(vae, [s for _, s in evaluation.held_out_scenes(args.test, 1)])
    net = nn.Sequential(nn.Conv2d(4, 64, 3, padding=1), nn.SiLU(), nn.Conv2d(64, 64, 3, padding=1), nn.SiLU(),
                        nn.Flatten(), nn.Linear(64 * WINDOW * WINDOW, 128), nn.SiLU(),
                        nn.Linear(128, len(world.SHAPES)))
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
    if args.generated:
        report |= probe_generated(net, vae, Path(args.model), args.generated)
    print(json.dumps(report))
    return report


def window_at(z: torch.Tensor, centre, factor: int) -> torch.Tensor:
    """The WINDOW x WINDOW latent window of one (4, h, w) latent around an image-pixel centre (zero padded)."""
    half = WINDOW // 2
    lx, ly = (round((c + 0.5) / factor - 0.5) + half for c in centre)
    return F.pad(z, (half,) * 4)[:, ly - half:ly + half, lx - half:lx + half]


@torch.no_grad()
def probe_generated(net, vae, model_folder: Path, count: int) -> dict:
    from pipelines.core.events import run_to_end
    from pipelines.core.models import load_model

    m = run_to_end(load_model(str(model_folder)))
    items = evaluation.held_out_scenes(count, 1)
    z = evaluation.generate_latents(m.unet, m.text_encoder, m.tokenizer, [t for t, _ in items], range(count),
                                    7.5, 50, m.scheduler_config)
    images = evaluation.decode(vae, z)
    probe_hits, checker_hits = [], []
    for zi, image, (_, scene) in zip(z, images, items):
        obj = scene.objects[0]
        found = evaluation.nearest(evaluation.check(image)["objects"], obj.centre)
        window = window_at(zi, found["centre"] if found else obj.centre, len(image) // zi.shape[-1])
        probe_hits.append(world.SHAPES[int(net(window[None]).argmax())] == obj.shape)
        checker_hits.append(found is not None and found["shape"] == obj.shape)
    return {"generated": count, "generated_probe": float(np.mean(probe_hits)),
            "generated_checker": float(np.mean(checker_hits))}


if __name__ == "__main__":
    main()
