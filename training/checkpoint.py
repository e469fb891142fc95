"""Crash-safe training checkpoints, written and read by accelerate (`Accelerator.save_state` / `load_state`).

A checkpoint folder is what `save_state` writes: each prepared model's weights (`model.safetensors`,
`model_1.safetensors`, ... in the order the trainer prepared them), the optimizer (`optimizer.bin`), the learning-rate
schedule (`scheduler.bin`), each process's random generators (`random_states_<i>.pkl`: Python, numpy, torch CPU and
CUDA) and the objects the trainer registered with `register_for_checkpointing` (`custom_checkpoint_<i>.pkl`: the
run's step, time and batch generators (RunState), EMA weights), plus `state.json`, a readable summary (step, time,
arguments, learning rates, which model file holds which network) that resuming does not need. The .bin and .pkl
files are torch.save pickles: resume only from checkpoints you made.

The folder is written beside the last one and swapped in, so a stop mid-write never leaves a broken checkpoint.
Checkpoints are device-independent: weights and optimizer states load onto the CPU and follow their parameters onto
theirs, so a run started with `--device cuda` resumes with `--device cpu` and vice versa.
"""
from __future__ import annotations

import json
import shutil
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np


@contextmanager
def swapped_in(final: Path):
    """Yields an empty side folder to write an export into; when the block ends without error it replaces
    `final`, so a stop mid-write never leaves a half-written model folder (on error the side folder stays)."""
    final = Path(final)
    partial = final.with_name(final.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    yield partial
    shutil.rmtree(final, ignore_errors=True)
    partial.rename(final)


class RunState:
    """What `save_state` does not hold by itself: the optimiser step, the wall time spent (a --minutes budget and the
    learning-rate schedule read it), the smoothed figures the progress bar shows, and the numpy generator each
    process draws its batches from (all processes' states are kept; a process resumes with its own)."""

    def __init__(self, rng: np.random.Generator, process_index: int = 0):
        self.step, self.elapsed, self.running = 0, 0.0, {}
        self.rng, self.process_index = rng, process_index
        self._start: float | None = None

    def begin(self) -> None:
        """The clock starts (again): seconds() counts on from the time spent before a resume."""
        self._start = time.time() - self.elapsed

    def seconds(self) -> float:
        return self.elapsed if self._start is None else time.time() - self._start

    def state_dict(self) -> dict:
        from accelerate.utils import gather_object

        return {"step": self.step, "elapsed_s": self.seconds(), "running": dict(self.running),
                "numpy_rng": gather_object([self.rng.bit_generator.state])}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.elapsed, self.running = int(state["step"]), float(state["elapsed_s"]), dict(state["running"])
        if self.process_index < len(state["numpy_rng"]):  # resumed on more processes: the new ones keep their seed
            self.rng.bit_generator.state = state["numpy_rng"][self.process_index]


def save_state(accelerator, out: Path, summary: dict) -> None:
    """accelerator.save_state into out/checkpoint (via a side folder), with `summary` as its state.json. Every
    process calls it."""
    final, partial, old = out / "checkpoint", out / "checkpoint.partial", out / "checkpoint.old"
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (partial / "state.json").write_text(json.dumps(summary, default=list))
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
        partial.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def load_state(accelerator, out: Path) -> None:
    """accelerator.load_state from out/checkpoint (or checkpoint.old, when a stop fell between the two renames)."""
    folder = out / "checkpoint"
    if not folder.is_dir() and (out / "checkpoint.old").is_dir():
        folder = out / "checkpoint.old"
    if (folder / "optimizer.safetensors").is_file():
        raise SystemExit(f"--resume: {folder} was written by the trainers before they moved onto accelerate "
                         "(optimizer.safetensors); resume it with that version, or start the run again")
    if not (folder / "optimizer.bin").is_file():
        raise FileNotFoundError(f"--resume: no checkpoint in {out}")
    accelerator.load_state(str(folder))


def summary(run: RunState, args, optimizer, models: list[str], **extra) -> dict:
    """state.json: a readable note of the checkpoint (resuming reads accelerate's files, not this)."""
    return {"step": run.step, "elapsed_s": run.seconds(), "args": vars(args), "running": run.running,
            "lr": [group["lr"] for group in optimizer.param_groups],
            "models": {name: f"model{'_' + str(i) if i else ''}.safetensors" for i, name in enumerate(models)},
            **extra}
