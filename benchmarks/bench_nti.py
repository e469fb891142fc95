"""Null-text inversion cost vs quality: our default schedule (nti.FAST) against the paper's (nti.REFERENCE),
plus negative-prompt inversion and plain DDIM inversion, on the embedded model over held-out world images.

    python benchmarks/bench_nti.py                 # 20 held-out images, 50 steps, guidance 7.5
    python benchmarks/bench_nti.py --images 24 --steps 50 --batch 8

Counts every UNet image-evaluation (forward only / forward+backward) and measures reconstruction PSNR against
the source image and against its VAE round trip (the ceiling), then prints the ratios the issue asks for:
default fwd+bwd evaluations / reference (target <= 0.2) and PSNR difference (target within 0.3 dB), and
wall-time ratios, all measured in this one run. Images are inverted in batches (each image still has its own
null embeddings and early stop), the same way for every method.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from pipelines import nti  # noqa: E402
from pipelines.core import ddim  # noqa: E402
from pipelines.core.events import drain, run_to_end  # noqa: E402
from training import evaluation, world  # noqa: E402


def run_method(model, images, prompts, method, guidance, steps, batch):
    """Returns (reconstructed uint8 images, EvalCounter totals, seconds)."""
    unet, cfg = model.unet, model.scheduler_config
    empty = evaluation.embed(model.text_encoder, model.tokenizer, [""])
    outs, fwd, bwd = [], 0, 0
    t0 = time.perf_counter()
    for i in range(0, len(images), batch):
        z0 = evaluation.encode(model.vae, images[i:i + batch])
        cond = evaluation.embed(model.text_encoder, model.tokenizer, prompts[i:i + batch])
        if method == "ddim":
            traj = drain(nti.pivot_trajectory(unet, z0, cond, steps, cfg))
            z = traj[-1]
            for st in ddim.sample(unet, z, cond, empty.expand(len(z0), -1, -1), guidance, steps, cfg):
                z = st.latents
            fwd += len(z0) * steps * 3
        else:
            res = drain(nti.run_inversion(unet, z0, cond, empty, guidance, steps, cfg, method))
            z = res.reconstruction
            fwd, bwd = fwd + res.counter.forward, bwd + res.counter.backward
        outs.append(evaluation.decode(model.vae, z))
    return np.concatenate(outs), {"forward": fwd, "forward_backward": bwd}, time.perf_counter() - t0


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="embedded")
    p.add_argument("--images", type=int, default=20)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--batch", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "nti_bench.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from pipelines.core.models import load_model

    model = run_to_end(load_model(args.model))
    items = evaluation.held_out_scenes(args.images, None, start=40_000)
    images = np.stack([world.render(s) for _, s in items])
    prompts = [t for t, _ in items]
    vae_rt = evaluation.decode(model.vae, evaluation.encode(model.vae, images))
    ceiling = float(np.mean([evaluation.psnr(v, x) for v, x in zip(vae_rt, images)]))
    rows = {}
    for method in ("nti-reference", "nti", "npi", "ddim"):
        out, counts, secs = run_method(model, images, prompts, method, args.guidance, args.steps, args.batch)
        rows[method] = {"psnr": float(np.mean([evaluation.psnr(o, x) for o, x in zip(out, images)])),
                        "psnr_vs_vae": float(np.mean([evaluation.psnr(o, v) for o, v in zip(out, vae_rt)])),
                        "unet_forward_per_image": counts["forward"] / len(images),
                        "unet_forward_backward_per_image": counts["forward_backward"] / len(images),
                        "seconds": secs}
        print(f"{method:>14}: PSNR {rows[method]['psnr']:.3f} dB (vs VAE {rows[method]['psnr_vs_vae']:.2f}), "
              f"fwd {rows[method]['unet_forward_per_image']:.0f} + fwd+bwd "
              f"{rows[method]['unet_forward_backward_per_image']:.1f} per image, {secs:.1f} s", flush=True)
    ref, ours = rows["nti-reference"], rows["nti"]
    summary = {
        "images": len(images), "steps": args.steps, "guidance": args.guidance, "model": model.display_name,
        "threads": torch.get_num_threads(), "vae_ceiling_psnr": ceiling, "methods": rows,
        "default_over_reference_forward_backward": ours["unet_forward_backward_per_image"]
        / max(ref["unet_forward_backward_per_image"], 1e-9),
        "default_minus_reference_psnr": ours["psnr"] - ref["psnr"],
        "default_over_reference_wall": ours["seconds"] / ref["seconds"],
        "npi_over_reference_wall": rows["npi"]["seconds"] / ref["seconds"],
    }
    print(f"\nVAE round-trip ceiling {ceiling:.3f} dB over {len(images)} held-out images, {args.steps} steps, "
          f"w={args.guidance}")
    print(f"default NTI / reference NTI, UNet forward+backward evaluations: "
          f"{summary['default_over_reference_forward_backward']:.3f}  (target <= 0.2)")
    print(f"default NTI - reference NTI, reconstruction PSNR: {summary['default_minus_reference_psnr']:+.3f} dB  "
          f"(target within 0.3 dB)")
    print(f"wall time ratios vs reference: default {summary['default_over_reference_wall']:.3f}, "
          f"NPI {summary['npi_over_reference_wall']:.3f}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(summary, indent=1))
    print(f"wrote {args.json}")
    return summary


if __name__ == "__main__":
    main()
