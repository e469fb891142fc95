#!/usr/bin/env python
"""DragDiffusion benchmark and success eval.

    python benchmarks/bench_drag.py                    # timings per phase on the embedded model (CPU), table
    python benchmarks/bench_drag.py --json out.json    # the same, also as JSON
    python benchmarks/bench_drag.py --eval 6           # drag success on 6 held-out one-object scenes
    python benchmarks/bench_drag.py --full-size        # 512x512, SD1.5-architecture UNet with random weights:
                                                       # time and peak memory (meant for a GPU; on the CPU use
                                                       # tiny counts, e.g. --lora-steps 2 --iterations 2 --steps 4)

Timings: one drag = LoRA training + DDIM inversion + latent optimisation + denoising with mutual self-attention
(`DragResult.timings`, CUDA-synchronised at phase boundaries), first cold (nothing cached), then the same drag
again (LoRA and inversion come from the cache). The defaults are the reference's (80 LoRA steps, 80 drag
iterations, 0.7 of 50 steps); every count can be lowered for a quick look. The drag stops early when the handles
reach their targets, so the drag phase reports the iterations it ran.

Peak memory: CUDA's max_memory_allocated over the cold drag (after reset_peak_memory_stats); on the CPU the peak
RSS growth of this process, sampled every 2 ms by a thread.

Eval (`drag_success`, also importable by benchmarks/eval_embedded.py): held-out one-object scenes; the object's
centre is dragged to a target 10-25% of the image size away in a random direction (the object stays inside the
image); the editable region is the object's footprint at the start and at the target, grown by 3 px. Success:
the checker finds an object of the same colour whose centre is within 10% of the image size of the target.
PSNR is measured against the input outside the editable region. Also reported: the share of the asked
displacement the object made, success ignoring colour, and (baseline) whether the object survives the LoRA +
inversion + denoising round trip with no drag at all.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from pipelines.core.cache import LRUCache  # noqa: E402
from pipelines.core.events import run_to_end  # noqa: E402
from pipelines.drag import DragParams, drag  # noqa: E402

PHASES = ("lora", "inversion", "drag", "denoise")


# --------------------------------------------------------------------------------------------- eval

def _target_for(obj, size: int, rng: np.random.Generator, lo: float = 0.10, hi: float = 0.25):
    """A target 10-25% of the image away from the object's centre, with the whole object still inside."""
    cx, cy = obj.centre
    for _ in range(1000):
        d = rng.uniform(lo, hi) * size
        a = rng.uniform(0, 2 * math.pi)
        tx, ty = cx + d * math.cos(a), cy + d * math.sin(a)
        if obj.radius <= tx <= size - 1 - obj.radius and obj.radius <= ty <= size - 1 - obj.radius:
            return (float(tx), float(ty))
    return None


def _editable(scene, target, grow: int = 3) -> np.ndarray:
    import cv2

    foot = scene.footprint(0).astype(np.uint8)
    cx, cy = scene.objects[0].centre
    shift = np.float32([[1, 0, target[0] - cx], [0, 1, target[1] - cy]])
    moved = cv2.warpAffine(foot, shift, foot.shape[::-1], flags=cv2.INTER_NEAREST)
    both = np.maximum(foot, moved)
    return cv2.dilate(both, np.ones((2 * grow + 1, 2 * grow + 1), np.uint8)).astype(bool)


def psnr_outside(a: np.ndarray, b: np.ndarray, region: np.ndarray) -> float:
    keep = ~region
    err = np.mean((a[keep].astype(np.float64) - b[keep].astype(np.float64)) ** 2) / 255.0 ** 2
    return float("inf") if err == 0 else 10 * math.log10(1 / err)


def _found(out: np.ndarray, colour: str, where) -> tuple[dict | None, dict | None]:
    """(nearest detected object of that colour, nearest of any colour) to `where`."""
    from training.checker import check

    objects = check(out)["objects"]
    near = lambda objs: min(objs, key=lambda o: math.dist(o["centre"], where), default=None)  # noqa: E731
    return near([o for o in objects if o["colour"] == colour]), near(objects)


def drag_success(model, n: int = 6, start: int = 0, seed: int = 0, tolerance: float = 0.10, log=None,
                 baseline: bool = True, **overrides) -> dict:
    """Drags the object of n held-out one-object scenes (DragParams defaults unless overridden, e.g.
    latent_lr=0.03); returns {"success", "moved", "psnr_outside", "success_and_psnr", "success_any_colour",
    "reconstruction_found", "n", "cases": [...], "settings"}. With `baseline`, each scene is first run with no drag
    iteration (same LoRA and inversion, from the cache): whether the checker still finds the object where it was
    bounds what any drag can score on this model."""
    return drag_success_many(model, {"": overrides}, n, start, seed, tolerance, log, baseline)[""]


def drag_success_many(model, configs: dict[str, dict], n: int = 6, start: int = 0, seed: int = 0,
                      tolerance: float = 0.10, log=None, baseline: bool = False) -> dict[str, dict]:
    """drag_success for several settings on the same scenes and targets: {name: overrides} -> {name: result}.
    Each scene's LoRA and inversion are shared by the settings that agree on them (one cache per scene)."""
    from PIL import Image

    from training import world
    from training.evaluation import held_out_scenes

    rng = np.random.default_rng(seed)
    cases: dict[str, list] = {name: [] for name in configs}
    for k, (caption, scene) in enumerate(held_out_scenes(n, 1, start=start)):
        obj, size = scene.objects[0], scene.size
        target = _target_for(obj, size, rng)
        if target is None:
            continue
        image = world.render(scene)
        region = _editable(scene, target)
        cache = LRUCache(8)
        for name, overrides in configs.items():
            p = DragParams([obj.centre], [target], caption, **overrides)
            recon_found = None
            if baseline:
                still = run_to_end(drag(model, Image.fromarray(image), replace(p, drag_iterations=0), region, cache))
                same, _ = _found(np.asarray(still.image.image.convert("RGB")), obj.colour, obj.centre)
                recon_found = same is not None and math.dist(same["centre"], obj.centre) <= tolerance * size
            t0 = time.perf_counter()
            res = run_to_end(drag(model, Image.fromarray(image), p, region, cache))
            case = _score(res, image, region, obj, target, size, tolerance, caption)
            case.update(reconstruction_found=recon_found, seconds=round(time.perf_counter() - t0, 1))
            cases[name].append(case)
            if log:
                log(f"  {k + 1}/{n}{' ' + name if name else ''} {caption!r}: error {case['error']:.3f} of the image "
                    f"(any colour {min(case['error_any_colour'], 9):.3f}; round trip finds it: {recon_found}) "
                    f"({'ok' if case['success'] else 'MISS'}), moved {case['moved']:.2f} of the way, "
                    f"PSNR outside {case['psnr_outside']:.1f} dB, {case['iterations']} it, {case['seconds']} s")
    return {name: _summary(cases[name], baseline, {**configs[name], "tolerance": tolerance, "seed": seed})
            for name in configs}


def _score(res, image, region, obj, target, size, tolerance, caption) -> dict:
    out = np.asarray(res.image.image.convert("RGB"))
    best, anything = _found(out, obj.colour, target)
    err = math.dist(best["centre"], target) / size if best is not None else float("inf")
    err_any = math.dist(anything["centre"], target) / size if anything is not None else float("inf")
    # how much of the asked displacement the object made (1 = all of it), so that short drags that barely
    # move the object are not mistaken for good ones
    d = np.subtract(target, obj.centre)
    moved = float(np.dot(np.subtract(best["centre"], obj.centre), d) / np.dot(d, d)) if best is not None else 0.0
    return {
        "caption": caption, "handle": [round(c, 1) for c in obj.centre], "target": [round(c, 1) for c in target],
        "distance": round(math.dist(obj.centre, target) / size, 3),
        "found": [round(c, 1) for c in best["centre"]] if best is not None else None,
        "error": round(err, 3), "error_any_colour": round(err_any, 3), "success": bool(err <= tolerance),
        "moved": round(moved, 2), "success_any_colour": bool(err_any <= tolerance),
        "psnr_outside": round(psnr_outside(out, image, region), 2),
        "tracked": [[round(c, 1) for c in h] for h in res.handles], "reached": res.params["reached"],
        "iterations": res.params["iterations_run"],
    }


def _summary(cases: list[dict], baseline: bool, settings: dict) -> dict:
    mean = lambda key: float(np.mean([c[key] for c in cases])) if cases else float("nan")  # noqa: E731
    return {
        "success": mean("success"), "moved": mean("moved"), "success_any_colour": mean("success_any_colour"),
        "reconstruction_found": float(np.mean([bool(c["reconstruction_found"]) for c in cases]))
        if cases and baseline else None,
        "psnr_outside": mean("psnr_outside"),
        "success_and_psnr": float(np.mean([c["success"] and c["psnr_outside"] >= 22 for c in cases])) if cases
        else float("nan"),
        "iterations": mean("iterations"),
        "n": len(cases), "cases": cases, "settings": settings,
    }


# --------------------------------------------------------------------------------------------- timing

class PeakRSS:
    """Peak resident-set growth of this process over a block (CPU), sampled by a thread."""

    def __init__(self) -> None:
        self.peak = self.start = 0
        self._stop = threading.Event()

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self):
        self.start = self.peak = self._rss()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, self._rss())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())


def _scene_image(size: int):
    """A held-out world scene (embedded model) or, at other sizes, the same scene resized."""
    from PIL import Image

    from training import world
    from training.evaluation import held_out_scenes

    caption, scene = held_out_scenes(1, 1)[0]
    img = Image.fromarray(world.render(scene))
    k = size / scene.size
    obj = scene.objects[0]
    handle = (obj.centre[0] * k, obj.centre[1] * k)
    target = (min(size - 1.0, handle[0] + 0.15 * size), handle[1])
    return (img if size == scene.size else img.resize((size, size), Image.BICUBIC)), caption, handle, target


def time_drag(model, p: DragParams, image, cache: LRUCache, memory: bool) -> dict:
    on_cuda = model.device.type == "cuda"
    if on_cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    mem = PeakRSS() if (memory and not on_cuda) else None
    if mem:
        mem.__enter__()
    try:
        res = run_to_end(drag(model, image, p, cache=cache))
    finally:
        if mem:
            mem.__exit__(None, None, None)
    if on_cuda:
        torch.cuda.synchronize()
    out = {**{k: res.timings[k] for k in PHASES}, "total": time.perf_counter() - t0,
           "iterations_run": res.params["iterations_run"], "cached": res.cached}
    if on_cuda:
        out["peak_mem_mb"] = torch.cuda.max_memory_allocated() / 2**20
        out["peak_mem_over_start_mb"] = (torch.cuda.max_memory_allocated() - base) / 2**20
    elif mem:
        out["peak_rss_growth_mb"] = (mem.peak - mem.start) / 2**20
    return out


def table(rows: list[tuple[str, dict]]) -> str:
    head = f"{'run':<32}" + "".join(f"{k:>11}" for k in (*PHASES, "total")) + f"{'iters':>7}{'peak MB':>10}"
    lines = [head, "-" * len(head)]
    for name, r in rows:
        mem = r.get("peak_mem_mb", r.get("peak_rss_growth_mb"))
        lines.append(f"{name:<32}" + "".join(f"{r[k]:>10.2f}s" for k in (*PHASES, "total"))
                     + f"{r['iterations_run']:>7}" + (f"{mem:>10.0f}" if mem is not None else f"{'':>10}"))
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--full-size", action="store_true", help="512x512 SD1.5-architecture UNet, random weights")
    ap.add_argument("--device", default=None, help="cpu / cuda (default: the studio's pick)")
    ap.add_argument("--lora-steps", type=int, default=80)
    ap.add_argument("--iterations", type=int, default=80)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--strength", type=float, default=0.7)
    ap.add_argument("--latent-lr", type=float, default=0.01)
    ap.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                    help="any other DragParams field, e.g. --set r1=2 --set mutual_attention_layer=6")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (0 = torch's default)")
    ap.add_argument("--eval", type=int, default=0, metavar="N", help="success eval on N held-out scenes")
    ap.add_argument("--start", type=int, default=0, help="eval: first held-out seed offset")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    device = torch.device(args.device) if args.device else None
    settings = dict(lora_steps=args.lora_steps, drag_iterations=args.iterations, steps=args.steps,
                    inversion_strength=args.strength, latent_lr=args.latent_lr)
    for item in args.set:
        name, _, value = item.partition("=")
        try:
            settings[name.strip()] = json.loads(value)
        except ValueError:
            settings[name.strip()] = value
    report: dict = {"settings": settings}
    t_load = time.perf_counter()
    if args.full_size:
        from benchmarks.bench_sampling import build_sd15_random_model

        model = build_sd15_random_model(device)
    else:
        from pipelines.core.models import load_model

        model = run_to_end(load_model(args.model, device=device))
    report["model"] = model.display_name
    print(f"model {model.display_name} ready in {time.perf_counter() - t_load:.1f} s; torch threads "
          f"{torch.get_num_threads()}", flush=True)

    if args.eval:
        print(f"drag success on {args.eval} held-out one-object scenes ({settings})", flush=True)
        ev = drag_success(model, args.eval, start=args.start, log=lambda s: print(s, flush=True), **settings)
        report["eval"] = ev
        print(f"success {ev['success']:.2f} (target >= 0.70), PSNR outside the region {ev['psnr_outside']:.1f} dB "
              f"(target >= 22), both {ev['success_and_psnr']:.2f}, mean share of the displacement made "
              f"{ev['moved']:.2f}; any colour {ev['success_any_colour']:.2f}; the object survives the round trip "
              f"without dragging in {ev['reconstruction_found']}; n={ev['n']}")
    else:
        size = model.resolution
        image, caption, handle, target = _scene_image(size)
        p = DragParams([handle], [target], caption, **settings)
        cache = LRUCache(8)
        rows = [("cold (nothing cached)", time_drag(model, p, image, cache, memory=True)),
                ("warm (LoRA + inversion cached)", time_drag(model, p, image, cache, memory=False))]
        report["timings"] = dict(rows)
        report["size"] = size
        print(f"{size}x{size}, {settings}")
        print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, default=str))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
