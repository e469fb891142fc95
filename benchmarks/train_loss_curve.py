#!/usr/bin/env python
"""Short training runs of the embedded-model trainers on their tiny test configurations, and their loss curves
against a recorded reference: a change to a trainer's loop (e.g. moving it onto `accelerate`) must leave what it
learns within run-to-run noise.

    python benchmarks/train_loss_curve.py                       # compare every stage with the reference
    python benchmarks/train_loss_curve.py --stages vae,unet     # some stages
    python benchmarks/train_loss_curve.py --write --seeds 0,1,2,3,4   # record the reference (before a change)

Each stage runs its trainer's `main` for --steps optimiser steps, fixed seed, one thread, short warm-up (so the
cosine decay to the floor happens within the run), checkpoints and quick looks off; the loss of every step is read
where it is backpropagated (`Tensor.backward`, which `accelerator.backward` calls too). The UNet and
InstructPix2Pix stages train on latents of the tiny test model's VAE (`pipelines.core.tiny_model`, built from seed 0).

The comparison (`compare`): for each stage, the mean loss of the last K steps of the run with seed 0 must be within
TOLERANCE_SIGMAS standard deviations, over the reference seeds, of that mean from the reference's seed 0; the same
for the mean of the first K steps (so a curve that starts or learns differently shows). The reference seeds' spread
is what another draw order costs; a same-seed rerun of the reference code gave the same curve to the bit.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

REFERENCE = ROOT / "benchmarks" / "results" / "train_loss_reference.json"
STEPS, K = 60, 20
TOLERANCE_SIGMAS = 3.0
QUIET = ["--threads", "1", "--no-progress", "--checkpoint-every", "100000", "--eval-every", "100000"]

# stage -> (trainer module, its arguments; "{tiny}" is the tiny test model's folder)
STAGES: dict[str, tuple[str, list[str]]] = {
    # the tiny VAE learns slowly: batch 8 at 3e-3 makes its 60-step drop (0.11) larger than at the defaults (0.05)
    "vae": ("train_vae", ["--tiny", "--batch", "8", "--lr", "3e-3", "--eval-world", "8", "--scale-images", "16",
                          "--warmup", "10"]),
    "vae_bf16": ("train_vae", ["--tiny", "--batch", "8", "--lr", "3e-3", "--eval-world", "8", "--scale-images", "16",
                               "--warmup", "10", "--bf16"]),
    "unet": ("train_unet", ["--tiny", "--batch", "4", "--samples", "48", "--vae", "{tiny}/vae", "--warmup", "10"]),
    "unet_bf16": ("train_unet", ["--tiny", "--batch", "4", "--samples", "48", "--vae", "{tiny}/vae", "--warmup", "10",
                                 "--bf16"]),
    "text": ("train_text", ["--tiny", "--batch", "32", "--warmup", "10"]),
    "instruct": ("train_instruct", ["--batch", "4", "--samples", "16", "--base", "{tiny}", "--eval-edits", "1",
                                    "--warmup", "10"]),
}


@contextlib.contextmanager
def recorded_losses():
    """Yields a list that every scalar `Tensor.backward()` call appends its value to."""
    losses: list[float] = []
    original = torch.Tensor.backward

    def backward(self, *args, **kwargs):
        if self.numel() == 1:
            losses.append(float(self.detach().float()))
        return original(self, *args, **kwargs)

    torch.Tensor.backward = backward
    try:
        yield losses
    finally:
        torch.Tensor.backward = original


def tiny_model(folder: Path) -> Path:
    from pipelines.core.tiny_model import build_tiny_model

    if not (folder / "model_index.json").is_file():
        build_tiny_model(folder, seed=0)
    return folder


def loss_history(stage: str, seed: int, work: Path, steps: int = STEPS, tiny: Path | None = None) -> list[float]:
    """The per-step training losses of `stage` (a key of STAGES) for `seed`, run in a fresh folder under `work`
    (`tiny`: the tiny test model's folder if already built, e.g. the tests' tiny_model.folder)."""
    import importlib

    module, argv = STAGES[stage]
    if tiny is None and any("{tiny}" in a for a in argv):
        tiny = tiny_model(work / "tiny")
    argv = [a.replace("{tiny}", str(tiny)) for a in argv]
    out = work / f"{stage}_seed{seed}"
    trainer = importlib.import_module(f"training.{module}")
    with torch.random.fork_rng(), recorded_losses() as losses:
        trainer.main(["--out", str(out), "--steps", str(steps), "--seed", str(seed), *argv, *QUIET])
    if len(losses) != steps:
        raise RuntimeError(f"{stage}: {len(losses)} losses recorded for {steps} steps")
    return losses


def head_tail(losses: list[float], k: int = K) -> tuple[float, float]:
    return statistics.fmean(losses[:k]), statistics.fmean(losses[-k:])


def record(stages, seeds, work: Path) -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = ""
    report = {"commit": commit, "torch": torch.__version__, "steps": STEPS, "k": K, "threads": 1,
              "tolerance_sigmas": TOLERANCE_SIGMAS, "stages": {}}
    for stage in stages:
        runs = {}
        for seed in seeds:
            start = time.time()
            runs[str(seed)] = loss_history(stage, seed, work)
            print(f"{stage} seed {seed}: first/last {K} mean {head_tail(runs[str(seed)])} "
                  f"({time.time() - start:.1f} s)", flush=True)
        heads, tails = zip(*(head_tail(v) for v in runs.values()), strict=True)
        report["stages"][stage] = {
            "trainer": STAGES[stage][0], "argv": STAGES[stage][1], "commit": commit, "losses": runs,
            "first_k_mean": dict(zip(runs, heads, strict=True)), "last_k_mean": dict(zip(runs, tails, strict=True)),
            "first_k_sd_over_seeds": statistics.stdev(heads) if len(heads) > 1 else None,
            "last_k_sd_over_seeds": statistics.stdev(tails) if len(tails) > 1 else None}
    return report


def compare(stage: str, losses: list[float], reference: dict | None = None) -> dict:
    """How far `losses` (seed 0) are from the reference's seed-0 curve; `ok` when the first-K and last-K means are
    each within TOLERANCE_SIGMAS sd over the reference seeds."""
    ref = (reference or json.loads(REFERENCE.read_text()))["stages"][stage]
    base = ref["losses"]["0"]
    head, tail = head_tail(losses)
    ref_head, ref_tail = head_tail(base)
    tol_head = TOLERANCE_SIGMAS * ref["first_k_sd_over_seeds"]
    tol_tail = TOLERANCE_SIGMAS * ref["last_k_sd_over_seeds"]
    diffs = [abs(a - b) for a, b in zip(losses, base, strict=True)]
    return {"stage": stage, "first_k_mean": head, "reference_first_k_mean": ref_head, "first_k_tolerance": tol_head,
            "last_k_mean": tail, "reference_last_k_mean": ref_tail, "last_k_tolerance": tol_tail,
            "max_step_abs_diff": max(diffs), "identical_steps": sum(d == 0 for d in diffs), "steps": len(losses),
            "ok": abs(head - ref_head) <= tol_head and abs(tail - ref_tail) <= tol_tail}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stages", default=",".join(STAGES))
    p.add_argument("--seeds", default="0,1,2,3,4", help="with --write: the seeds recorded")
    p.add_argument("--write", action="store_true", help=f"record the reference into {REFERENCE.relative_to(ROOT)}")
    p.add_argument("--json", help="also write the comparison here")
    args = p.parse_args(argv)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    with tempfile.TemporaryDirectory() as tmp:
        if args.write:
            report = record(stages, [int(s) for s in args.seeds.split(",")], Path(tmp))
            if REFERENCE.exists():  # other stages keep their recorded curves
                kept = json.loads(REFERENCE.read_text())
                report["stages"] = {**kept["stages"], **report["stages"]}
            REFERENCE.write_text(json.dumps(report, indent=1))
            return report
        rows = [compare(stage, loss_history(stage, 0, Path(tmp))) for stage in stages]
    for r in rows:
        print(f"{r['stage']:<10} first {K}: {r['first_k_mean']:.4f} vs {r['reference_first_k_mean']:.4f} "
              f"(tol {r['first_k_tolerance']:.4f})  last {K}: {r['last_k_mean']:.4f} "
              f"vs {r['reference_last_k_mean']:.4f} (tol {r['last_k_tolerance']:.4f})  "
              f"max step diff {r['max_step_abs_diff']:.2e}, "
              f"{r['identical_steps']}/{r['steps']} steps identical  {'ok' if r['ok'] else 'OUT OF TOLERANCE'}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    if not all(r["ok"] for r in rows):
        raise SystemExit(1)
    return {"rows": rows}


if __name__ == "__main__":
    main()
