"""The whole embedded-model recipe as one command: every stage of `training/README.md`, in order, each with its
optimiser-step budget (the comments at STAGES say where each comes from), then the assembled folder.

    python training/recipe.py --out training/runs/recipe                  # CPU, 2 threads (see training/README.md)
    python training/recipe.py --out training/runs/recipe --device cuda    # the GPU budget is 20 minutes
    python training/recipe.py --out /tmp/r --dry-run                      # print the stages' commands

Budgets are in steps, not minutes, so a GPU run does the same optimisation as the CPU recipe (the trainers draw
every random number on the CPU, so it also draws the same batches). Each finished stage leaves
`recipe_done.json` (its wall time) in its folder and is skipped when the command is run again; an interrupted
stage resumes from its checkpoint. A running stage writes its wall time so far to `recipe_partial.json` every
30 s, so the time an interrupted attempt spent (redone steps included) is added when it resumes: a recipe run
split over several sessions is still timed in full. `recipe_timings.json` in --out sums the wall time per stage,
which is the number the issue's budget is about.
`--scale 0.01 --tiny` runs every stage on tiny networks and data (the test does), to check that each stage finds
what the one before it wrote.
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from training.schedule import end_processes, refuse_bad_device  # noqa: E402


@dataclass(frozen=True)
class Stage:
    name: str            # also the stage's folder under --out
    module: str          # training.<module>.main(argv)
    args: tuple          # "{out}" stands for --out
    steps: int = 0       # optimiser steps (0: not a trainer)
    tiny: tuple = field(default=())  # extra arguments for a --tiny run

    def argv(self, out: Path, scale: float, device: str, threads: int, tiny: bool, resume: bool) -> list[str]:
        argv = [a.replace("{out}", str(out)) for a in self.args]
        if self.module == "assemble":
            return argv
        argv += ["--threads", str(threads), "--device", device, "--no-progress"]
        if self.steps:
            steps = max(1, round(self.steps * scale))
            argv += ["--out", str(out / self.name), "--steps", str(steps)]
            # a quick look costs many steps' time (sampling): four per stage are enough to watch a run
            argv += ["--eval-every", str(max(1, steps // 4)), "--checkpoint-every", str(CHECKPOINT_EVERY)]
            argv += ["--resume"] if resume else []
        return argv + (list(self.tiny) if tiny else [])


CHECKPOINT_EVERY = 500  # steps; at most a few minutes are lost to an interruption
# bfloat16 autocast (on the CPU with the plain attention kernel, training/schedule.precision) in every trainer, each
# checked against float32 on the same draws, one thread per run. Session 15: VAE stage 1, 2000 steps: world PSNR
# 29.1 vs 28.6 dB, 1.22x faster. Session 16: UNet from scratch, 1500 steps: loss 0.0106 vs 0.0106, 1.55x;
# InstructPix2Pix, 1500 steps continuing the committed UNet: eval edits equal to 0.01 dB (background kept objects
# 25.00 vs 25.00 dB, recolour 0.85 vs 0.85), 1.36x; text encoder, 700 steps: the same held-out fact accuracies
_BF16 = ("--bf16",)
_QUIET = ("--eval-every", "100000", "--checkpoint-every", "1")
_TINY_UNET = ("--tiny", "--samples", "48", "--batch", "4", *_QUIET)
_TINY_INSTRUCT = ("--samples", "16", "--batch", "4", "--eval-edits", "1", *_QUIET)
_TINY_VAE = ("--tiny", "--batch", "4", "--eval-world", "16", *_QUIET)
_SLOWER = ("--lr", "1e-4", "--warmup", "50")  # the UNet continuations' rate
_DECODER = (*_BF16, "--freeze-encoder", "--photo-fraction", "0.1", "--edge-weight", "1")
_INSTRUCT = (*_BF16, "--base", "{out}/unet_hard/model", "--batch", "16", "--samples", "16000", "--seed", "2",
             "--object-weight", "10", "--oversample", "background=5", "--input-lr-mult", "3")

# the continuations train on stage `unet`'s scenes, so they read its latent cache instead of encoding them again
_UNET_OBJECTS = (*_BF16, "--vae", "{out}/vae/vae", "--text-encoder", "{out}/text", "--data-dir", "{out}/unet/data",
                 "--object-weight", "4", "--high-t-share", "0.25", *_SLOWER)

# The Smooth LoRA stage: rank 8, lambda 1 and the EMA decay 0.01 are the paper's; batch 32 under bfloat16 autocast
# and the rate are this CPU's (see training/README.md, "Smooth LoRA")
SMOOTH_LORA = ("--mixed-precision", "bf16", "--batch", "32", "--lr", "5e-4", "--rank", "8", "--lambda-reg", "1")
SMOOTH_LORA_STEPS = 2000
# The SingDiffusion module: the UNet's layout at half its widths, from random weights (400-step pilots on the
# embedded model: the UNet's own weights as a start learned far slower; half widths take half the step time), lr
# 1e-3, batch 32 under bfloat16 autocast
SINGDIFFUSION = (*_BF16, "--channels", "32,64,64", "--init", "random", "--batch", "32", "--lr", "1e-3")
SINGDIFFUSION_STEPS = 3000
# PE-CoDi (only the adapter trains; the UNet stays the text-to-image one): 10-minute pilots on the embedded model
# reached PSNR outside the edit ~15 dB with --mode pe against ~10 with --mode full; lr 1e-3 over 4e-4 (19.3 vs
# 18.3 dB at 3600 steps). Batch 16 on the instruct stage's cached triplets.
CODI = (*_BF16, "--mode", "pe", "--lr", "1e-3", "--seed", "2", "--batch", "16")
CODI_STEPS = 8100
# The 9-channel inpainting UNet (training/train_inpaint.py) from the finished base UNet: the instruct stage's batch,
# rate and conv_in multiple (its zeroed inputs stall without one), hole cells weighted 3, a fifth removal pairs, gray
# backgrounds drawn twice as often, on 10000 cached (scene, mask) samples
INPAINT = (*_BF16, "--batch", "16", "--lr", "3e-4", "--warmup", "100", "--input-lr-mult", "3", "--hole-weight", "3",
           "--remove-share", "0.2", "--gray-factor", "2", "--samples", "10000")
INPAINT_STEPS = 5000

# Step budgets: the committed weights' (training/README.md tells how they were really made), except the ones
# session 17 cut to fit the 3-hour budget (the decoder, the UNets, InstructPix2Pix; each checked, see below).
STAGES = (
    Stage("vae", "train_vae", _BF16, 2000, _TINY_VAE),
    # the decoder alone, with the worst-pixels term from its first step (session 17: 2200 steps from the recipe's
    # stage 1 reach world PSNR 31.1 dB and round-trip shape 0.98; the two decoder stages it replaces took 4245)
    Stage("vae_dec", "train_vae", ("--init-from", "{out}/vae/vae", *_DECODER, "--worst-weight", "1",
                                   "--lr", "2e-4", "--warmup", "50"), 2200, _TINY_VAE),
    Stage("text", "train_text", _BF16, 700, ("--tiny", "--batch", "4", *_QUIET)),
    # The three UNet stages at 0.62 of the steps the committed UNet received (6510, 2078, 1903), run from scratch in
    # session 17 on the committed VAE encoder and text encoder: eval text-to-image (100 one-object prompts)
    # background 1.0, colour 0.92, shape 0.81, cell 0.95 against targets 0.9 / 0.9 / 0.8 / 0.8 (the committed UNet:
    # 1.0 / 1.0 / 0.86 / 0.99), for 35 fewer minutes of optimiser steps on 2 threads
    Stage("unet", "train_unet", (*_BF16, "--vae", "{out}/vae/vae", "--text-encoder", "{out}/text"), 4036, _TINY_UNET),
    Stage("unet_objects", "train_unet", ("--init-unet", "{out}/unet/model/unet", *_UNET_OBJECTS), 1288, _TINY_UNET),
    Stage("unet_hard", "train_unet", ("--init-unet", "{out}/unet_objects/model/unet", *_UNET_OBJECTS,
                                      "--oversample", "star=3,small-square=2"), 1180, _TINY_UNET),
    # InstructPix2Pix from the finished base UNet in batches of 16 (a third of the step time of 48, and more
    # progress per minute), on 16000 triplets with background edits drawn 5x and the objects' latent pixels
    # weighted 10 (the kept objects' colour drifts otherwise), in one cosine schedule. Session 17: these 16000 steps
    # scored better on the eval edits (recolour 0.875, kept objects of background edits 25.6 dB) than the 22089 of
    # the three stages they replace (this stage at 11850 steps, then two continuations at 1e-4: 0.85, 25.1 dB)
    Stage("instruct", "train_instruct", (*_INSTRUCT, "--lr", "3e-4", "--warmup", "100"), 16000, _TINY_INSTRUCT),
    # The studio folder takes stage vae_dec's decoder. The decoder stage on UNet-made latents (refined_latents.py,
    # then train_vae.py --refined, 11 min) left out in session 19: session 18's run meets every eval target without
    # it (text-to-image background 0.95, colour 0.97, shape 0.84, cell 0.98; recolour 0.825, kept objects of
    # background edits 26.2 dB; world PSNR 31.0 dB), and the whole recipe then took 174 min of the 180
    Stage("assemble", "assemble", ("--base", "{out}/unet_hard/model", "--vae", "{out}/vae_dec/vae",
                                   "--instruct", "{out}/instruct/unet", "--instruct-guidance", "3,2",
                                   "--out", "{out}/model")),
    # Smooth Diffusion's LoRA on the finished model (training/train_smooth_lora.py), exported into the studio
    # folder's smooth_lora/, where the studio loads it as adapter "smooth". SMOOTH_LORA says where its settings
    # come from.
    Stage("smooth_lora", "train_smooth_lora", ("--base", "{out}/model", "--export", "{out}/model/smooth_lora",
                                               *SMOOTH_LORA), SMOOTH_LORA_STEPS,
          ("--batch", "2", "--world-samples", "8", "--checkpoint-every", "1")),
    # SingDiffusion's t = 1 module on the finished model (training/train_singdiffusion.py), on stage unet's cached
    # latents, exported into the studio folder's singdiffusion/. SINGDIFFUSION says where its settings come from.
    Stage("singdiffusion", "train_singdiffusion", ("--base", "{out}/model", "--data-dir", "{out}/unet/data",
                                                   "--export", "{out}/model/singdiffusion", *SINGDIFFUSION),
          SINGDIFFUSION_STEPS, ("--samples", "48", "--batch", "4", "--eval-scenes", "4", *_QUIET)),
    # CoDi few-step editing (training/train_codi.py): an adapter distilled on the instruct stage's edit triplets,
    # exported into the studio folder's codi/. CODI says where its settings come from.
    Stage("codi", "train_codi", ("--base", "{out}/model", "--data-dir", "{out}/instruct/data",
                                 "--export", "{out}/model/codi", *CODI), CODI_STEPS, _TINY_INSTRUCT),
    # The inpainting UNet, exported into the studio folder's unet_inpaint/ (float16, with inpaint.json). INPAINT
    # says where its settings come from.
    Stage("inpaint", "train_inpaint", ("--base", "{out}/model", "--export", "{out}/model/unet_inpaint", *INPAINT),
          INPAINT_STEPS, ("--samples", "16", "--batch", "4", "--eval-count", "1", "--eval-steps", "2", *_QUIET)),
)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="one folder per stage goes here; the studio folder is <out>/model")
    p.add_argument("--device", default="cpu", help="torch device for every stage (cpu, cuda, cuda:N)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads for every stage")
    p.add_argument("--scale", type=float, default=1.0, help="multiply every step budget (at least 1 step each)")
    p.add_argument("--tiny", action="store_true", help="tiny networks and data (for the test)")
    p.add_argument("--only", default="", help="comma-separated stage names to run (default: all, in order)")
    p.add_argument("--dry-run", action="store_true", help="print each stage's command and exit")
    args = p.parse_args(argv)
    args.only = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in args.only if n not in {s.name for s in STAGES}]
    if unknown:
        p.error(f"--only: unknown stage(s) {', '.join(unknown)}; stages: {', '.join(s.name for s in STAGES)}")
    if args.scale <= 0:
        p.error("--scale must be positive")
    if not args.dry_run:
        refuse_bad_device(p, args.device)
    return args


class _StageClock:
    """Wall time of one stage over all its attempts: earlier attempts' time comes from `recipe_partial.json`,
    which a daemon thread rewrites every `every` seconds while this attempt runs (a killed process loses at most
    that much). The time is summed beat by beat and a gap longer than two beats counts as two: a process frozen
    between sessions (the machine suspended) is not charged for the hours it did not run."""

    def __init__(self, folder: Path, resume: bool, every: float = 30.0):
        self.path, self.every = folder / "recipe_partial.json", every
        # only a resumed attempt inherits time: without a checkpoint the stage starts over, and so does its clock
        self.earlier = json.loads(self.path.read_text())["seconds"] if resume and self.path.exists() else 0.0
        self.counted, self.last = 0.0, time.monotonic()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True)

    def seconds(self) -> float:
        with self._lock:
            now = time.monotonic()
            self.counted += min(now - self.last, 2 * self.every)
            self.last = now
            return self.earlier + self.counted

    def _write(self):
        self.path.write_text(json.dumps({"seconds": self.seconds()}))

    def _beat(self):
        while not self._stop.wait(self.every):
            self._write()

    def __enter__(self):
        self._write()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        if exc[0] is None:
            self.path.unlink(missing_ok=True)
        else:
            self._write()  # the stage failed or was interrupted: a resumed attempt adds this time
        return False


def main(argv=None) -> dict:
    args = parse_args(argv)
    out = Path(args.out)
    chosen = [s for s in STAGES if not args.only or s.name in args.only]
    timings_path = out / "recipe_timings.json"
    timings = json.loads(timings_path.read_text()) if timings_path.exists() else {}
    for stage in chosen:
        folder = out / stage.name
        done = folder / "recipe_done.json"
        resume = stage.steps > 0 and (folder / "checkpoint").exists()
        argv = stage.argv(out, args.scale, args.device, args.threads, args.tiny, resume)
        if args.dry_run:
            print(f"python training/{stage.module}.py " + " ".join(argv))
            continue
        if done.exists():
            print(f"[recipe] {stage.name}: done before ({json.loads(done.read_text())['seconds']:.0f} s), skipped")
            continue
        print(f"[recipe] {stage.name}: python training/{stage.module}.py {' '.join(argv)}", flush=True)
        folder.mkdir(parents=True, exist_ok=True)
        with _StageClock(folder, resume) as clock:
            importlib.import_module(f"training.{stage.module}").main(argv)
            timings[stage.name] = clock.seconds()  # the stage's time ends when its trainer returns
        done.write_text(json.dumps({"seconds": timings[stage.name], "resumed": resume,
                                    "earlier_attempts_seconds": clock.earlier, "argv": argv}, indent=1))
        timings_path.write_text(json.dumps(timings, indent=1))
    total = sum(timings.values())
    if not args.dry_run:
        print(f"[recipe] total {total / 60:.1f} min over {len(timings)} stages ({args.device})")
    return {"timings": timings, "total_seconds": total}


if __name__ == "__main__":
    main()
    end_processes()  # under accelerate launch: the stages share one process group
