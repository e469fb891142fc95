"""Crash-safe training checkpoints: safetensors for tensors, JSON for everything else (never pickle).

A checkpoint folder holds one `<name>.safetensors` per module state dict, `optimizer.safetensors` (flat
optimizer state) and `state.json` (step, elapsed time, rng states, args, optimizer hyper-parameters). It is
written to a side folder and swapped in, so a stop mid-write never leaves a broken checkpoint.

Checkpoints are device-independent: tensors are saved from the CPU, module state dicts load onto the CPU (a
module's `load_state_dict` copies them onto its own device) and optimizer states follow their parameters onto
theirs, so a run started with `--device cuda` resumes with `--device cpu` and vice versa.
"""
from __future__ import annotations

import json
import shutil
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file


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


def flatten_optimizer(opt: torch.optim.Optimizer) -> tuple[dict, dict]:
    sd = opt.state_dict()
    tensors = {f"state.{i}.{k}": v.detach().to("cpu", copy=True).contiguous() if torch.is_tensor(v)
               else torch.tensor(v) for i, st in sd["state"].items() for k, v in st.items()}
    return tensors, {"param_groups": sd["param_groups"]}


def unflatten_optimizer(tensors: dict, meta: dict) -> dict:
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        _, i, k = key.split(".", 2)
        state.setdefault(int(i), {})[k] = v
    return {"state": state, "param_groups": meta["param_groups"]}


def save(out: Path, modules: dict[str, dict], opt: torch.optim.Optimizer, rng: np.random.Generator,
         state: dict) -> None:
    """modules: name -> state dict. state: JSON-able extras (step, elapsed_s, args, ...)."""
    final, partial, old = out / "checkpoint", out / "checkpoint.partial", out / "checkpoint.old"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    for name, sd in modules.items():
        save_file({k: v.detach().cpu().contiguous() for k, v in sd.items()}, partial / f"{name}.safetensors")
    opt_tensors, opt_meta = flatten_optimizer(opt)
    save_file(opt_tensors, partial / "optimizer.safetensors")
    full = {**state, "numpy_rng": rng.bit_generator.state, "torch_rng": torch.get_rng_state().tolist(),
            "optimizer": opt_meta}
    (partial / "state.json").write_text(json.dumps(full, default=list))
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    partial.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def load(out: Path, opt: torch.optim.Optimizer | None, rng: np.random.Generator) -> tuple[dict, dict[str, dict]]:
    """Restores optimizer (unless None; see load_optimizer) and rng states in place; returns
    (state, name -> module state dict)."""
    folder = out / "checkpoint"
    if not folder.is_dir() and (out / "checkpoint.old").is_dir():  # stopped between the two renames
        folder = out / "checkpoint.old"
    if not (folder / "state.json").is_file():
        raise FileNotFoundError(f"--resume: no checkpoint in {out}")
    state = json.loads((folder / "state.json").read_text())
    modules = {f.stem: load_file(f) for f in folder.glob("*.safetensors") if f.stem != "optimizer"}
    if opt is not None:
        load_optimizer(out, opt, state)
    rng.bit_generator.state = state["numpy_rng"]
    torch.set_rng_state(torch.tensor(state["torch_rng"], dtype=torch.uint8))
    return state, modules


def load_optimizer(out: Path, opt: torch.optim.Optimizer, state: dict) -> None:
    """Restores the optimizer saved beside `state`. Its tensors load on the CPU; torch's load_state_dict moves
    each state (AdamW's exp_avg, exp_avg_sq) onto its parameter's device and dtype, and keeps `step` on the
    CPU as a non-fused, non-capturable AdamW keeps it: so build the optimizer on the already-moved modules."""
    folder = out / "checkpoint" if (out / "checkpoint").is_dir() else out / "checkpoint.old"
    opt.load_state_dict(unflatten_optimizer(load_file(folder / "optimizer.safetensors"), state["optimizer"]))
