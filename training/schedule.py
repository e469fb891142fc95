"""What every trainer here shares about a run: its set-up (threads, the `accelerate` Accelerator for the device and
precision, output folder, seeds) and its budget-based schedule. A budget (--steps and/or --minutes) is for the WHOLE
run, resumed parts included, so the learning rate follows the same curve whether or not the run was interrupted."""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
from pathlib import Path

import numpy as np
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel


def run_parser(doc: str, *, batch: int, lr: float, warmup: int, checkpoint_every: int, eval_every: int
               ) -> argparse.ArgumentParser:
    """The arguments every trainer takes (output, budget, optimiser basics, seed, resume, cadence, threads,
    device); each trainer adds its own and finishes with `parse_run_args`."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--minutes", type=float, help="total training wall time (whole run)")
    p.add_argument("--steps", type=int, help="total optimizer steps (whole run)")
    p.add_argument("--batch", type=int, default=batch)
    p.add_argument("--lr", type=float, default=lr)
    p.add_argument("--warmup", type=int, default=warmup)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--checkpoint-every", type=int, default=checkpoint_every)
    p.add_argument("--eval-every", type=int, default=eval_every)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu",
                   help="torch device to train on (cpu, cuda, cuda:0, ...); data is made on the CPU and moved, "
                        "random draws stay on the CPU, checkpoints are device-independent. Under `accelerate launch` "
                        "(several GPUs) accelerate places the processes: give --device cuda")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--bf16", action="store_true",
                   help="accelerate's bf16 mixed precision: the networks' forward passes under bfloat16 autocast "
                        "(weights, optimiser and losses stay float32); benchmarks/bench_train_steps.py measures what "
                        "it saves per network")
    return p


@contextlib.contextmanager
def autocast(device, bf16: bool):
    """The forward-pass precision --bf16 asks for on `device`, as a context manager (a no-op without it).

    On the CPU it also sends attention to PyTorch's plain (math) kernel: there the fused flash kernel's backward
    in bfloat16 took 5x its float32 time (a third of a batch-48 UNet step), while these networks' sequences
    (at most 256 latent pixels, 77 tokens) are short enough for the plain one, whose matrix products gain from
    bfloat16 (session 16: UNet step 0.59 -> 0.47 s, InstructPix2Pix 0.25 -> 0.19, text 0.37 -> 0.25)."""
    kind = torch.device(device).type
    plain_attention = sdpa_kernel([SDPBackend.MATH]) if bf16 and kind == "cpu" else contextlib.nullcontext()
    with torch.autocast(kind, dtype=torch.bfloat16, enabled=bool(bf16)), plain_attention:
        yield


@contextlib.contextmanager
def precision(accelerator):
    """`autocast` for a run on accelerate: the Accelerator's mixed precision (--bf16: bfloat16 autocast, the same
    torch.autocast) around a forward pass, and on the CPU under bfloat16 the plain attention kernel, for the reason
    `autocast` gives."""
    bf16 = accelerator.mixed_precision == "bf16"
    plain_attention = sdpa_kernel([SDPBackend.MATH]) if bf16 and accelerator.device.type == "cpu" \
        else contextlib.nullcontext()
    with accelerator.autocast(), plain_attention:
        yield


@contextlib.contextmanager
def own_accelerate_state():
    """accelerate keeps one process-wide state; training/recipe.py (and the tests) run several trainers in one
    process, each with its own precision (the Smooth LoRA trainer too), so each run starts from a fresh one and
    leaves none behind. The process group of a multi-process run stays (no `end_training`): the next trainer
    in the same process joins it again, where a second rendezvous would hang; end_processes() ends it."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    try:
        yield
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()


def end_processes() -> None:
    """At the end of a trainer run as a script (under `accelerate launch`, the process group goes)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def accelerator_for(args):
    """The run's Accelerator: one process on --device, or one of the processes `accelerate launch` started (it
    places them on their GPUs). --bf16 is accelerate's bf16 mixed precision. The learning-rate schedule steps once
    per optimiser step whatever the number of processes, since the budget counts optimiser steps."""
    from accelerate import Accelerator

    device = torch.device(args.device)
    if device.type == "cuda" and device.index is not None and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        torch.cuda.set_device(device.index)  # one process: accelerate's "cuda" is then this GPU
    return Accelerator(cpu=device.type == "cpu", mixed_precision="bf16" if args.bf16 else "no",
                       step_scheduler_with_optimizer=False)


def parse_run_args(p: argparse.ArgumentParser, argv, unless: str | None = None) -> argparse.Namespace:
    """Parses; a budget (--minutes or --steps) is required unless the flag named `unless` is set."""
    args = p.parse_args(argv)
    if args.minutes is None and args.steps is None and not (unless and getattr(args, unless)):
        p.error("give --minutes or --steps")
    refuse_bad_device(p, args.device)
    return args


def refuse_bad_device(p: argparse.ArgumentParser, name: str) -> None:
    """Exits through the parser's usage error when --device `name` cannot be used here."""
    problem = device_problem(name)
    if problem:
        p.error(problem)


def device_problem(name: str) -> str | None:
    """Why --device `name` cannot be used here (None if it can): checked before any work starts."""
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as e:
        return f"--device {name}: not a torch device ({e})"
    if device.type == "cuda":
        if not torch.cuda.is_available():
            build = f"built with CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
            return (f"--device {name}: CUDA is not available here (torch.cuda.is_available() is False; torch "
                    f"{torch.__version__}, {build}); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            return f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here"
    elif device.type == "mps" and not torch.backends.mps.is_available():
        return f"--device {name}: MPS is not available here; use --device cpu"
    elif device.type not in ("cpu", "cuda", "mps"):
        return f"--device {name}: only cpu, cuda[:N] and mps are supported"
    return None


def start_accelerated_run(args):
    """Threads, the Accelerator, output folder and seeds from the common arguments; returns (accelerator, out, numpy
    generator). Every torch draw of the training steps is made on the CPU generator seeded here (and moved to the
    device), so a run draws the same numbers on any device, and resumes from the CPU generator state accelerate's
    checkpoint holds. Each process of a multi-process run seeds both generators with --seed + its index."""
    from accelerate.utils import set_seed

    accelerator = accelerator_for(args)
    torch.set_num_threads(args.threads)  # after it: CPU processes without OMP_NUM_THREADS get accelerate's count
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    set_seed(args.seed, device_specific=True)
    return accelerator, out, np.random.default_rng(args.seed + accelerator.process_index)


def cpu_randn(like: torch.Tensor) -> torch.Tensor:
    """Standard normal noise shaped like `like`, drawn from torch's CPU generator and moved to `like`'s device
    (on the CPU exactly torch.randn_like(like))."""
    return torch.randn(like.shape, dtype=like.dtype).to(like.device)


def progress_of(args, step: int, elapsed: float) -> float:
    """Share of the budget used: the larger of steps/--steps and elapsed/--minutes."""
    parts = []
    if args.steps is not None:
        parts.append(step / args.steps)
    if args.minutes is not None:
        parts.append(elapsed / (60 * args.minutes))
    return max(parts)


def lr_factor(args, step: int, progress: float, floor: float) -> float:
    """Linear warm-up over --warmup steps, then cosine decay to `floor` (times --lr) at the end of the budget."""
    warm = min(1.0, (step + 1) / max(1, args.warmup))
    return warm * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def lr_schedule(optimizer, args, floor: float, run):
    """The learning-rate schedule as a torch LambdaLR (each group's lr times lr_factor), stepped after each optimiser
    step and checkpointed by accelerate. diffusers' get_scheduler has no schedule for it: its cosine decays to zero
    (this one to `floor`) over a step count fixed up front, where a --minutes budget makes progress a matter of wall
    time (progress_of, with the time `run` has spent)."""
    from torch.optim.lr_scheduler import LambdaLR

    return LambdaLR(optimizer, lambda step: lr_factor(args, step, progress_of(args, step, run.seconds()), floor))


def log_row(out: Path, row: dict, bar) -> None:
    """One line of held-out measurements: appended to out/history.jsonl and shown above the progress bar."""
    with (Path(out) / "history.jsonl").open("a") as f:
        f.write(json.dumps(row) + "\n")
    bar.write(json.dumps(row))


def smoothed(running: float | None, value: float, keep: float = 0.98) -> float:
    """Exponential moving average for the progress bar (the first value starts it)."""
    return value if running is None else keep * running + (1 - keep) * value


def after_optimizer_step(args, out: Path, bar, run, look, save, main: bool = True, **shown) -> None:
    """The bookkeeping every trainer does after an optimiser step (`run`: its checkpoint.RunState): the progress bar
    (with `shown`), a held-out row every --eval-every steps (`look()` measures it; the main process only), a
    checkpoint (`save()`, every process) every --checkpoint-every."""
    bar.update(1)
    bar.set_postfix(**shown)
    if main and run.step % args.eval_every == 0:
        log_row(out, {"step": run.step, "minutes": round(run.seconds() / 60, 2), **look()}, bar)
    if run.step % args.checkpoint_every == 0:
        save()


def load_cache(path: Path, key: str, count: int, seed: int, source: str = "") -> dict | None:
    """A cached safetensors dict whose `key` holds `count` items made with `seed` (and, when given, from the
    `source` models, see cache_source), or None (missing, or made for another count, seed or source: the object
    maps and draw weights are recomputed from the seed, so a cache from another seed would pair them with the wrong
    samples; latents from another encoder would be another latent space)."""
    from safetensors import safe_open

    if not Path(path).is_file():
        return None
    with safe_open(str(path), "pt") as f:  # one read: the header's seed and source, then the tensors if they match
        meta = f.metadata() or {}
        if meta.get("seed") != str(seed) or (source and meta.get("source") != source):
            return None
        cached = {name: f.get_tensor(name) for name in f.keys()}
    return cached if len(cached[key]) == count else None


def save_cache(path: Path, tensors: dict, seed: int, source: str = "") -> None:
    """Writes a cache load_cache accepts for `seed` (and `source`)."""
    from safetensors.torch import save_file

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"seed": str(seed), "source": source})


def add_data_dir(p: argparse.ArgumentParser) -> None:
    """--data-dir for the trainers that cache latents (data_dir reads it)."""
    p.add_argument("--data-dir", help="folder of the cached latents (default: <out>/data); stages that train on the "
                   "same samples share one (a cache made by another VAE encoder, tokenizer, seed or count is rebuilt)")


def data_dir(args) -> Path:
    """The latent cache folder: --data-dir, or <out>/data."""
    return Path(args.data_dir) if args.data_dir else Path(args.out) / "data"


def cache_source(vae, tokenizer) -> str:
    """A short hash of what a latent cache depends on besides its seed and count: the VAE encoder's weights and the
    tokenizer's vocabulary. Stages that share a cache folder (--data-dir) reuse it only when both match."""
    import hashlib

    digest = hashlib.sha1()
    for name, tensor in sorted((*vae.encoder.state_dict().items(), *vae.quant_conv.state_dict().items())):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().numpy().tobytes())
    digest.update(repr(sorted(tokenizer.get_vocab().items())).encode())
    return digest.hexdigest()[:16]


def parse_factors(text: str, allowed, what: str) -> dict[str, float]:
    """'a=3,b=2' -> {'a': 3.0, 'b': 2.0} for --oversample; `allowed(name)` says whether a name is valid and `what`
    describes valid parts in the error."""
    factors = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, value = part.partition("=")
        try:
            factor = float(value)
        except ValueError:
            factor = None
        if not allowed(name) or factor is None or factor <= 0:
            raise ValueError(f"--oversample: {part!r} is not {what}")
        factors[name] = factor
    return factors
