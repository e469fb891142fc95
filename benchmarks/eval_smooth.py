"""Smooth Diffusion's claims (arXiv 2312.04410) measured on a model without and with its Smooth LoRA (the peft
adapter "smooth" that `pipelines.core.models.load_model` attaches from the model folder's `smooth_lora/`), side by side.
The "smooth" row group of benchmarks/eval_embedded.py is `smooth_rows`; benchmarks/smooth_ablation.py compares
several LoRAs with `seed_interpolation` and `text_to_image` on the tuning ranges below.

Seed interpolation (the paper's ISTD test): pairs of different held-out one-object captions A and B, each pair with
its own two seeds. Frame k of n is at eta = k / (n - 1): x_T = slerp(noise A, noise B, eta), text embedding
lerp(A, B, eta), one "" embedding as the negative, DDIM (eta 0) at guidance 7.5. That is the studio's
`interpolation_sequence` frame for frame (same noise, embeddings, slerp / lerp, DDIM core, decode and rounding), but
the frames of several pairs go through the UNet as one batch. ISTD and the adjacent-frame distances are
`pipelines.interpolation`'s (L2 over the whole image, pixels in [0,1]); the tables give the mean over pairs. A LoRA
that merely froze the picture would also shrink ISTD, so the end frames are checked too: the checker must read
caption A in the first frame and caption B in the last (background, colour, shape and cell), and their distance
is reported.

Run time (2-core machine shared with a training job, 1 thread): --quick 404 s (seed interpolation 90, t2i 35,
inversion 24, recolour 69, real-image interpolation 154, drag 32); the full counts, from the same per-item costs,
about 31 min on 1 thread, so about 18-20 min on 2 (batched generation runs 1.7x faster on 2 threads than on 1).
The batched seed interpolation costs about 1 s per 50-step frame on 1 thread, 0.6 s on 2; the studio's
interpolation_sequence, one frame at a time, about 1.8x that.

Held-out ranges (`evaluation.held_out_scenes` starts; the other groups use 0, 100, 500 and 20_000 to 60_000, and
`held_out_edits` 0 and 500): the eval rows use 70_000 to 86_000 and recolour edits from 3_000; the ablation's tuning
prompts 90_000 and 95_000. Pair k of a range has the noise seeds start + 2k and start + 2k + 1.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from pipelines.core import ddim
from pipelines.core.events import run_to_end
from pipelines.core.image_io import tensor_to_pil
from pipelines.core.latents import decode_latents, initial_noise
from pipelines.core.lora import SMOOTH_NAME, lora_applied
from pipelines.core.text import encode_prompt
from pipelines.core.validation import check_size
from pipelines.interpolation import adjacent_distances, istd, lerp, slerp
from training import evaluation, world

INTERP_START = 70_000       # seed-interpolation pairs
T2I_START = 74_000          # text-to-image prompts
INVERSION_START = 78_000    # DDIM / null-text inversion images
REAL_INTERP_START = 80_000  # real-image interpolation pairs
DRAG_START = 84_000         # drag scenes
EDIT_START = 3_000          # recolour edits (held_out_edits' own range)
TUNING_INTERP_START = 90_000   # smooth_ablation.py
TUNING_T2I_START = 95_000

T2I_TARGETS = {"background": 0.9, "colour": 0.9, "shape": 0.8, "cell": 0.8}  # the "t2i" group's
T2I_NAMES = {"background": "background colour", "colour": "object colour", "shape": "shape",
             "cell": "position (3x3 cell)"}
READ = ("background", "colour", "shape", "cell")  # what an end frame must show of its caption


@dataclass
class Counts:
    """Sample counts of the group (and the DDIM steps and the drag's per-image LoRA steps, which only tests
    lower)."""
    pairs: int = 24
    frames: int = 11
    t2i: int = 100
    inversions: int = 6
    edits: int = 8
    real_pairs: int = 2
    drags: int = 8
    steps: int = 50
    drag_lora_steps: int = 40


FULL = Counts()
QUICK = Counts(pairs=4, t2i=16, inversions=1, edits=1, real_pairs=1, drags=2)


# --------------------------------------------------------------------------------------------- seed interpolation


@dataclass
class Pair:
    prompt_a: str
    scene_a: world.Scene
    prompt_b: str
    scene_b: world.Scene
    seed_a: int
    seed_b: int


def interpolation_pairs(n: int, start: int = INTERP_START) -> list[Pair]:
    """n pairs of held-out one-object scenes with different captions; pair k has seeds start + 2k and + 2k + 1."""
    pairs, items, taken = [], [], 0
    while len(pairs) < n:
        if taken + 2 > len(items):
            items = evaluation.held_out_scenes(len(items) + 2 * n, 1, start=start)
        (ta, sa), (tb, sb) = items[taken], items[taken + 1]
        taken += 2 if ta != tb else 1
        if ta != tb:
            k = len(pairs)
            pairs.append(Pair(ta, sa, tb, sb, start + 2 * k, start + 2 * k + 1))
    return pairs


@torch.no_grad()
def interpolation_frames(model, pairs: list[Pair], n_frames: int = 11, steps: int = 50, guidance: float = 7.5,
                         chunk: int = 22) -> list[list[np.ndarray]]:
    """Each pair's n_frames frames (uint8 HxWx3), as `interpolation_sequence` renders them, `chunk` frames per
    UNet batch. Runs with whatever adapters are active on the model's UNet (see `lora_applied`)."""
    w, h = check_size(model, None, None)
    etas = [k / (n_frames - 1) for k in range(n_frames)]
    uncond = encode_prompt(model, "")
    xs, conds = [], []
    for p in pairs:
        noise_a, noise_b = initial_noise(model, p.seed_a, w, h), initial_noise(model, p.seed_b, w, h)
        cond_a, cond_b = encode_prompt(model, p.prompt_a), encode_prompt(model, p.prompt_b)
        for eta in etas:
            xs.append(slerp(noise_a, noise_b, eta))
            conds.append(lerp(cond_a, cond_b, eta))
    images = []
    for i in range(0, len(xs), chunk):
        x, cond = torch.cat(xs[i:i + chunk]), torch.cat(conds[i:i + chunk])
        for state in ddim.sample(model.unet, x, cond, uncond.expand(len(x), -1, -1), guidance, steps,
                                 model.scheduler_config):
            x = state.latents
        images += [np.asarray(tensor_to_pil(im)) for im in decode_latents(model, x)]
    return [images[k * n_frames:(k + 1) * n_frames] for k in range(len(pairs))]


def ends_read(first: np.ndarray, last: np.ndarray, pair: Pair) -> list[bool]:
    """Whether the checker reads caption A in the first frame and caption B in the last."""
    return [all(evaluation.score_generation(im, scene)[k] for k in READ)
            for im, scene in ((first, pair.scene_a), (last, pair.scene_b))]


def seed_interpolation(model, pairs: list[Pair], lora: str | None = None, strength: float = 1.0, n_frames: int = 11,
                       steps: int = 50, guidance: float = 7.5, keep_frames: bool = False) -> dict:
    """Mean over pairs of ISTD, mean adjacent-frame distance and end-frame distance, and the share of end frames
    that show their caption, without (lora None) or with an adapter at `strength`."""
    with lora_applied(model, lora, strength):
        frames = interpolation_frames(model, pairs, n_frames, steps, guidance)
    per_pair = []
    for pair, seq in zip(pairs, frames):
        d = adjacent_distances(seq)
        per_pair.append({"istd": istd(seq), "mean_distance": float(d.mean()),
                         "end_distance": float(adjacent_distances([seq[0], seq[-1]])[0]),
                         "ends_read": ends_read(seq[0], seq[-1], pair)})
    out = {k: float(np.mean([p[k] for p in per_pair])) for k in ("istd", "mean_distance", "end_distance")}
    out |= {"ends_read": float(np.mean([p["ends_read"] for p in per_pair])), "n": len(pairs), "per_pair": per_pair}
    return out | ({"frames": frames} if keep_frames else {})


def text_to_image(model, count: int, start: int = T2I_START, lora: str | None = None, strength: float = 1.0,
                  steps: int = 50) -> dict:
    """`evaluation.text_to_image_accuracy` on one-object held-out captions, with an adapter switched on or not."""
    m = model
    with lora_applied(model, lora, strength):
        return evaluation.text_to_image_accuracy(m.unet, m.text_encoder, m.tokenizer, m.vae, m.scheduler_config,
                                                 count=count, n_objects=1, steps=steps, start=start)


# --------------------------------------------------------------------------------------------- other tasks


def inversion_psnr(model, count: int, lora: str | None, steps: int = 50) -> dict:
    """Reconstruction PSNR at w 7.5 of DDIM inversion (inverted at w 1) and of the studio's (fast) null-text
    inversion, each with the adapter on for inversion and reconstruction alike; and the VAE-only bound."""
    from PIL import Image

    from pipelines.inversion import InversionParams, invert_and_reconstruct

    out = {"ddim": [], "nti": [], "vae": []}
    for text, scene in evaluation.held_out_scenes(count, None, start=INVERSION_START):
        image = Image.fromarray(world.render(scene))
        for method in ("ddim", "nti"):
            p = InversionParams(prompt=text, steps=steps, inversion_guidance=1.0, guidance=7.5, lora=lora,
                                method=method)
            res = run_to_end(invert_and_reconstruct(model, image, p))
            out[method].append(res.metrics["psnr"])
        out["vae"].append(res.metrics.get("vae_psnr", float("nan")))
    return {k: float(np.nanmean(v)) for k, v in out.items()} | {"n": count}


def recolour_edits(model, count: int, steps: int = 50) -> dict[str, dict]:
    """Threshold-r recolour edits (r 0.8 on the paper-schedule null-text inversion), without and with the LoRA."""
    from eval_embedded import recolour_prompts, score_text_edits

    base = dict(method="threshold", r=0.8, inversion="nti-reference", steps=steps)
    scores = score_text_edits(model, recolour_prompts(count, start=EDIT_START),
                              {"without": base, "with": dict(base, lora=SMOOTH_NAME)})
    return {name: {"success": float(np.mean([x["success"] for x in s])),
                   "psnr_outside": float(np.nanmean([x["psnr_outside"] for x in s])), "n": len(s)}
            for name, s in scores.items()}


def real_interpolation_istd(model, pairs: int, lora: str | None, n_frames: int = 11, steps: int = 50) -> float:
    """Mean ISTD of real-image interpolations between held-out renders (dual fast NTI, shared nulls, w 7.5)."""
    from PIL import Image

    from pipelines.real_interpolation import RealInterpolationParams, real_interpolation_sequence

    items = evaluation.held_out_scenes(2 * pairs, 1, start=REAL_INTERP_START)
    values = []
    for (ta, sa), (tb, sb) in zip(items[0::2], items[1::2]):
        p = RealInterpolationParams(ta, tb, steps=steps, guidance=7.5, inversion="nti", lora=lora)
        res = run_to_end(real_interpolation_sequence(model, Image.fromarray(world.render(sa)),
                                                     Image.fromarray(world.render(sb)), p, n_frames=n_frames))
        values.append(res.istd)
    return float(np.mean(values))


def drag_results(model, count: int, steps: int = 50, lora_steps: int = 40) -> dict[str, dict]:
    """Drag success on held-out scenes with the drag group's best setting, without and with the Smooth LoRA
    (DragParams.smooth_lora: the per-image LoRA trains on top of it and the whole drag runs with it)."""
    from bench_drag import drag_success_many
    from eval_embedded import DRAG_TUNED

    # the drag group's best setting: tuned + warm start, per-image LoRA 40 steps
    settings = dict(DRAG_TUNED, warm_start=True, lora_steps=lora_steps, steps=steps)
    return drag_success_many(model, {"without": settings, "with": dict(settings, smooth_lora=True)}, count,
                             start=DRAG_START)


# --------------------------------------------------------------------------------------------- rows


def smooth_rows(ctx, counts: Counts | None = None, log: Callable[[str], None] | None = None) -> list:
    """The "smooth" row group: every measure without and with adapter "smooth" (at strength 1). `ctx` is
    eval_embedded's Context; counts default to FULL, or QUICK with --quick."""
    from eval_embedded import Row

    model = ctx.model
    if SMOOTH_NAME not in model.loras:
        return [Row("smooth", "Smooth LoRA loaded (adapter 'smooth')", 0.0, ">= 1",
                    note="no smooth_lora/*smooth*.safetensors in the model folder: nothing to compare")]
    c = counts or (QUICK if ctx.quick else FULL)
    t0 = time.perf_counter()
    say = log or (lambda _msg: None)

    def log(msg):
        say(f"{msg} [{time.perf_counter() - t0:.0f} s]")

    rows = []

    def pair(group, metric, without, with_, target_with="", unit="", n=None, note=""):
        rows.append(Row(group, f"{metric}, base", float(without), "", unit, n))
        rows.append(Row(group, f"{metric}, Smooth LoRA", float(with_), target_with, unit, n, note))

    g = "smooth seed interp"
    pairs = interpolation_pairs(c.pairs)
    a = seed_interpolation(model, pairs, None, n_frames=c.frames, steps=c.steps)
    b = seed_interpolation(model, pairs, SMOOTH_NAME, n_frames=c.frames, steps=c.steps)
    log(f"seed interpolation: ISTD {a['istd']:.3f} -> {b['istd']:.3f}")
    frames = f"{c.frames}-frame"
    pair(g, f"ISTD, {frames} seed interpolation", a["istd"], b["istd"], n=c.pairs,
         note=f"pixels in [0,1], {c.steps} steps, w 7.5; lower is smoother")
    rows.append(Row(g, "ISTD ratio, Smooth LoRA / base", b["istd"] / a["istd"] if a["istd"] else float("nan"),
                    "<= 0.5", "", c.pairs, "paper (SD1.5, COCO): 38.63 -> 16.54, 0.43x"))
    cv = [r["istd"] / r["mean_distance"] if r["mean_distance"] else float("nan") for r in (a, b)]
    pair(g, "mean adjacent-frame distance", a["mean_distance"], b["mean_distance"], n=c.pairs,
         note=f"ISTD / this (scale-free unevenness): {cv[0]:.3f} -> {cv[1]:.3f}")
    pair(g, "end frames read as their caption", a["ends_read"], b["ends_read"], f">= {a['ends_read'] - 0.05:.3f}",
         n=2 * c.pairs, note="not frozen: base - 0.05 (background, colour, shape, cell at eta 0 and 1)")
    pair(g, "distance between the end frames", a["end_distance"], b["end_distance"], n=c.pairs,
         note=f"with / without {b['end_distance'] / a['end_distance']:.2f}" if a["end_distance"] else "")

    g = "smooth t2i"
    a = text_to_image(model, c.t2i, steps=c.steps)
    b = text_to_image(model, c.t2i, lora=SMOOTH_NAME, steps=c.steps)
    log(f"t2i: {a} -> {b}")
    for key, name in T2I_NAMES.items():
        bound = max(T2I_TARGETS[key], a[key] - 0.05)
        pair(g, name, a[key], b[key], f">= {bound:.3f}", n=c.t2i,
             note=f"1 object; the t2i target {T2I_TARGETS[key]:g} and base - 0.05")

    g = "smooth inversion"
    a = inversion_psnr(model, c.inversions, None, c.steps)
    b = inversion_psnr(model, c.inversions, SMOOTH_NAME, c.steps)
    log(f"inversion: {a} -> {b}")
    pair(g, "DDIM inversion PSNR, w 7.5", a["ddim"], b["ddim"], unit="dB", n=c.inversions,
         note="inverted at w 1, caption as prompt")
    pair(g, "null-text inversion (fast) PSNR, w 7.5", a["nti"], b["nti"], unit="dB", n=c.inversions,
         note="paper (SD1.5, NTI): 25.74 dB with the LoRA")
    rows.append(Row(g, "VAE-only round trip PSNR", a["vae"], "", "dB", c.inversions, "the bound (paper 25.98 dB)"))

    g = "smooth recolour"
    e = recolour_edits(model, c.edits, c.steps)
    log(f"recolour: {e}")
    n = e["without"]["n"]
    pair(g, "threshold r 0.8: success", e["without"]["success"], e["with"]["success"],
         f">= {e['without']['success']:.3f}", n=n, note="checker reads the new colour (shape, cell kept); >= base")
    pair(g, "threshold r 0.8: PSNR outside the object", e["without"]["psnr_outside"], e["with"]["psnr_outside"],
         ">= 25", "dB", n, "NTI paper schedule; object region grown 2 px")

    g = "smooth real interp"
    a = real_interpolation_istd(model, c.real_pairs, None, c.frames, c.steps)
    b = real_interpolation_istd(model, c.real_pairs, SMOOTH_NAME, c.frames, c.steps)
    log(f"real interpolation: ISTD {a:.3f} -> {b:.3f}")
    pair(g, f"ISTD, {frames} real-image interpolation", a, b, n=c.real_pairs, note="dual fast NTI, w 7.5")

    g = "smooth drag"
    d = drag_results(model, c.drags, c.steps, c.drag_lora_steps)
    log(f"drag: {d['without']['success']} -> {d['with']['success']}")
    n = d["without"]["n"]
    name = f"tuned + warm start, LoRA {c.drag_lora_steps}"
    pair(g, f"{name}: success", d["without"]["success"], d["with"]["success"], n=n,
         note="object found within 10% of the image size of the target; per-image LoRA on the Smooth LoRA")
    pair(g, f"{name}: PSNR outside", d["without"]["psnr_outside"], d["with"]["psnr_outside"],
         unit="dB", n=n)
    return rows
