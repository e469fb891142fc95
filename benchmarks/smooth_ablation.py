#!/usr/bin/env python
"""Smooth LoRA ablation (e.g. the regularisation weight lambda): the base model and each LoRA, on the tuning
held-out prompts that the "smooth" eval rows never use (eval_smooth.TUNING_INTERP_START / TUNING_T2I_START):
seed-interpolation ISTD (pairs of different one-object captions, their own seeds, 11 frames, 50 steps, w 7.5)
and one-object text-to-image quality (background / colour / shape / cell read by the checker). Same measures
as benchmarks/eval_smooth.py. Prints a table and writes JSON.

    python benchmarks/smooth_ablation.py --lora lam0=runs/lam0.safetensors --lora lam1=... --lora lam10=...
    python benchmarks/smooth_ablation.py --pairs 6 --prompts 16     # a quicker, noisier look
    python benchmarks/smooth_ablation.py                            # base against the model's own Smooth LoRA

A LoRA is a .safetensors file (or folder) that pipelines.core.lora.load_lora takes; each is loaded as its NAME, measured
at --strength, then unloaded.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
for path in (ROOT, ROOT / "benchmarks"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import eval_smooth  # noqa: E402

from pipelines.core.events import run_to_end  # noqa: E402
from pipelines.core.lora import SMOOTH_NAME, load_lora  # noqa: E402

T2I_KEYS = ("background", "colour", "shape", "cell")


def measure(model, lora: str | None, pairs, prompts: int, strength: float, frames: int, steps: int) -> dict:
    t0 = time.perf_counter()
    interp = eval_smooth.seed_interpolation(model, pairs, lora, strength, n_frames=frames, steps=steps)
    t2i = eval_smooth.text_to_image(model, prompts, eval_smooth.TUNING_T2I_START, lora, strength, steps)
    return {k: interp[k] for k in ("istd", "mean_distance", "end_distance", "ends_read")} | {
        "t2i": {k: t2i[k] for k in T2I_KEYS}, "istd_per_pair": [p["istd"] for p in interp["per_pair"]],
        "seconds": round(time.perf_counter() - t0, 1)}


def table(results: list[dict]) -> str:
    head = (f"{'LoRA':<14}{'ISTD':>8}{'ratio':>7}{'mean d':>8}{'ends d':>8}{'ends ok':>8}"
            + "".join(f"{k:>11}" for k in T2I_KEYS) + f"{'s':>7}")
    lines = [head, "-" * len(head)]
    for r in results:
        lines.append(f"{r['name']:<14}{r['istd']:>8.3f}{r['istd_ratio']:>7.2f}{r['mean_distance']:>8.2f}"
                     f"{r['end_distance']:>8.2f}{r['ends_read']:>8.2f}"
                     + "".join(f"{r['t2i'][k]:>11.3f}" for k in T2I_KEYS) + f"{r['seconds']:>7.0f}")
    return "\n".join(lines)


def parse_lora(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name.strip() or not path.strip():
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, got {text!r}")
    if name.strip() == "base":
        raise argparse.ArgumentTypeError("'base' names the model without a LoRA")
    return name.strip(), path.strip()


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lora", action="append", type=parse_lora, default=[], metavar="NAME=PATH",
                   help="a LoRA to compare (repeatable); none: the model's own Smooth LoRA")
    p.add_argument("--model", default="embedded")
    p.add_argument("--pairs", type=int, default=12, help="seed-interpolation pairs")
    p.add_argument("--frames", type=int, default=11)
    p.add_argument("--prompts", type=int, default=32, help="text-to-image prompts")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--strength", type=float, default=1.0)
    p.add_argument("--threads", type=int, default=int(os.environ.get("STUDIO_THREADS", "0")) or None)
    p.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "smooth_ablation.json"))
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from pipelines.core.models import load_model

    model = run_to_end(load_model(args.model))
    loras = args.lora
    if not loras:
        if SMOOTH_NAME not in model.loras:
            p.error("the model has no Smooth LoRA of its own: give --lora NAME=PATH")
        loras = [(SMOOTH_NAME, None)]  # already loaded with the model
    pairs = eval_smooth.interpolation_pairs(args.pairs, eval_smooth.TUNING_INTERP_START)
    results = []
    for name, path in [("base", None), *loras]:
        loaded = False
        if path is not None:
            load_lora(model, path, name)
            loaded = True
        try:
            r = measure(model, None if name == "base" else name, pairs, args.prompts, args.strength, args.frames,
                        args.steps)
        finally:
            if loaded:  # unload what this script loaded (a name it replaced is gone either way)
                model.unet.delete_adapters(name)
                model.loras.pop(name, None)
        results.append({"name": name, "path": path or (model.loras.get(name) if name != "base" else None)} | r)
        print(f"[{name}: {r['seconds']:.0f} s, ISTD {r['istd']:.3f}]", file=sys.stderr, flush=True)
    for r in results:
        r["istd_ratio"] = r["istd"] / results[0]["istd"] if results[0]["istd"] else float("nan")
    print(table(results))
    report = {"model": model.display_name, "threads": torch.get_num_threads(),
              "settings": {"pairs": len(pairs), "frames": args.frames, "prompts": args.prompts, "steps": args.steps,
                           "guidance": 7.5, "strength": args.strength,
                           "interp_start": eval_smooth.TUNING_INTERP_START,
                           "t2i_start": eval_smooth.TUNING_T2I_START},
              "results": results}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=1))
    print(f"wrote {args.json}")
    return report


if __name__ == "__main__":
    main()
