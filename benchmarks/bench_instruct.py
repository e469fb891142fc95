#!/usr/bin/env python
"""InstructPix2Pix benchmark: our `instruct_edit` (shared sampling loop + a live preview every step) against
diffusers' StableDiffusionInstructPix2PixPipeline on the very same components, scheduler, seed and settings.

    python benchmarks/bench_instruct.py [--model embedded|tiny-random] [--steps 50] [--rounds 7] [--threads 1]

Each round runs both, alternating which goes first; the reported ratio is the median of the per-round (paired)
ratios, so a noisy shared machine's drifts cancel. One warm-up round is not counted. UNet calls are counted
with a forward hook on both sides (same work, checked), and the final latents are compared (the pipelines'
equality test asserts 1e-4; here the largest difference is printed). Target: ratio <= 1.05.
The script always exits 0; the PASS/FAIL line is information.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from pipelines.core.events import run_to_end  # noqa: E402
from pipelines.core.models import load_model  # noqa: E402
from pipelines.core.stream import PreviewOptions  # noqa: E402
from pipelines.instruct import InstructParams, instruct_edit, prepare_input  # noqa: E402

TARGET = 1.05
IMAGE = ROOT / "assets" / "examples" / "blue_triangle_centre.png"
INSTRUCTION = "make the triangle red"


def diffusers_pipe(model):
    from diffusers import EulerAncestralDiscreteScheduler, StableDiffusionInstructPix2PixPipeline

    pipe = StableDiffusionInstructPix2PixPipeline(
        vae=model.vae, text_encoder=model.text_encoder, tokenizer=model.tokenizer, unet=model.instruct_unet(),
        scheduler=EulerAncestralDiscreteScheduler.from_config(model.scheduler_config),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (0 = torch's default)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = run_to_end(load_model(args.model))
    unet = model.instruct_unet()
    pipe = diffusers_pipe(model)
    source = prepare_input(model, IMAGE)
    seed = 1371
    calls = {"n": 0}
    unet.register_forward_hook(lambda *_: calls.__setitem__("n", calls["n"] + 1))

    def sync():
        if model.device.type == "cuda":
            torch.cuda.synchronize()

    def ours():
        p = InstructParams(INSTRUCTION, steps=args.steps, seed=seed)
        r = run_to_end(instruct_edit(model, source, p, preview=PreviewOptions(every=1)))
        return r.latents, r.edited.image

    def theirs():
        out = pipe(INSTRUCTION, image=source, num_inference_steps=args.steps, guidance_scale=7.5,
                   image_guidance_scale=1.5, generator=torch.Generator("cpu").manual_seed(seed), output_type="latent")
        lat = out.images
        image = pipe.image_processor.postprocess(pipe.vae.decode(lat / pipe.vae.config.scaling_factor).sample)[0]
        return lat, image

    def timed(fn):
        calls["n"] = 0
        sync()
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = fn()
        sync()
        return time.perf_counter() - t0, calls["n"], out

    timed(ours), timed(theirs)  # warm-up
    ratios, t_ours, t_theirs = [], [], []
    for r in range(args.rounds):
        order = (ours, theirs) if r % 2 == 0 else (theirs, ours)
        res = {fn: timed(fn) for fn in order}
        (a, n_a, (lat_a, _)), (b, n_b, (lat_b, _)) = res[ours], res[theirs]
        ratios.append(a / b)
        t_ours.append(a)
        t_theirs.append(b)
    diff = float((lat_a.float() - lat_b.float()).abs().max())
    report = {"model": model.display_name, "steps": args.steps, "size": f"{source.width}x{source.height}",
              "rounds": args.rounds, "threads": torch.get_num_threads(),
              "ours_median_s": round(statistics.median(t_ours), 4),
              "diffusers_median_s": round(statistics.median(t_theirs), 4),
              "paired_ratio_median": round(statistics.median(ratios), 4),
              "paired_ratio_min": round(min(ratios), 4), "paired_ratio_max": round(max(ratios), 4),
              "unet_calls_ours": n_a, "unet_calls_diffusers": n_b, "max_latent_diff": diff}
    for k, v in report.items():
        print(f"{k:>22}: {v}")
    verdict = "PASS" if report["paired_ratio_median"] <= TARGET else "FAIL"
    print(f"{verdict}: ours / diffusers = {report['paired_ratio_median']:.3f} (target <= {TARGET}), "
          f"previews every step on our side")
    return report


if __name__ == "__main__":
    main()
