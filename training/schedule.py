"""What every trainer here shares about a run: its set-up (threads, output folder, seeds) and its
budget-based schedule. A budget (--steps and/or --minutes) is for the WHOLE run, resumed parts included, so
the learning rate follows the same curve whether or not the run was interrupted."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch


def start_run(args) -> tuple[Path, np.random.Generator]:
    """Threads, output folder and seeds from the common arguments; returns (out, numpy generator)."""
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    return out, np.random.default_rng(args.seed)


def progress_of(args, step: int, elapsed: float) -> float:
    """Share of the budget used: the larger of steps/--steps and elapsed/--minutes."""
    parts = []
    if args.steps is not None:
        parts.append(step / args.steps)
    if args.minutes is not None:
        parts.append(elapsed / (60 * args.minutes))
    return max(parts)


def lr_at(args, step: int, progress: float, floor: float) -> float:
    """Linear warm-up over --warmup steps, then cosine decay to `floor` x --lr at the end of the budget."""
    warm = min(1.0, (step + 1) / max(1, args.warmup))
    return args.lr * warm * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))
