"""Convert the official SingDiffusion release (a pickled `diffusion_pytorch_model.bin` beside its `config.json`) to
the safetensors module folder the studio loads:

    python -m pipelines.singdiffusion_convert SingDiffusion/diffusion_pytorch_model.bin OUT_DIR

The pickle is read with `torch.load(weights_only=True)`, which rebuilds tensors and plain containers only and
refuses any other object, so no code in the file can run. The weights are checked against the config (only time
conditioning keys may differ, pipelines/singdiffusion.py) before OUT_DIR gets `config.json` and
`diffusion_pytorch_model.safetensors`. Put OUT_DIR in a model folder as `singdiffusion/`, or give it to the studio
(Model panel, `--singdiffusion`, or $STUDIO_SINGDIFFUSION).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from .core.errors import InputError
from .singdiffusion import CONFIG, WEIGHTS, load_state_checked, module_from_config, read_config


def read_pickled_state(path: Path) -> dict:
    """The state dict of a pickled checkpoint, tensors only (weights_only=True: nothing else is unpickled)."""
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any refusal (a non-tensor object, a damaged file) is one message
        raise InputError(f"{path.name} could not be read as a tensor-only checkpoint ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0][:200] if str(exc) else ''}).") from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InputError(f"{path.name} does not hold a state dict of tensors.")
    return state


def _read_json(path: Path) -> dict:
    try:
        cfg = json.loads(path.read_text())
    except (OSError, UnicodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path} is not valid JSON.") from exc
    if not isinstance(cfg, dict):
        raise InputError(f"{path} does not hold a UNet config.")
    return cfg


def convert(src, out_dir, config=None, dtype: torch.dtype | None = None) -> dict:
    """Converts `src` (the .bin) with the config.json beside it (or `config`, a path) into `out_dir`; returns a
    report (parameters, keys left out). `dtype` casts floating tensors (e.g. torch.float16); default: as stored."""
    from safetensors.torch import save_file

    src, out_dir = Path(src), Path(out_dir)
    if not src.is_file():
        raise InputError(f"{src} does not exist.")
    config_path = Path(config) if config is not None else src.parent / CONFIG
    if not config_path.is_file():
        raise InputError(f"No {CONFIG} at {config_path}: the release has one beside the weights (or give --config).")
    cfg = read_config(config_path.parent) if config_path.name == CONFIG else _read_json(config_path)
    state = read_pickled_state(src)
    module = module_from_config(cfg)
    load_state_checked(module, state, src.name)  # refuses anything but time-conditioning key differences
    kept = set(module.state_dict())
    dropped = sorted(k for k in state if k not in kept)
    tensors = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).contiguous()
               for k, v in state.items() if k in kept}
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / WEIGHTS), metadata={"format": "pt", "converted_from": src.name})
    (out_dir / CONFIG).write_text(json.dumps(cfg, indent=1))
    return {"out": str(out_dir), "tensors": len(tensors), "parameters": sum(v.numel() for v in tensors.values()),
            "dropped_keys": dropped}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipelines.singdiffusion_convert", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="the official diffusion_pytorch_model.bin")
    p.add_argument("out_dir", help="folder to write config.json and diffusion_pytorch_model.safetensors into")
    p.add_argument("--config", help="its config.json (default: the one beside SRC)")
    p.add_argument("--fp16", action="store_true", help="store the weights as float16 (half the size)")
    args = p.parse_args(argv)
    try:
        report = convert(args.src, args.out_dir, args.config, torch.float16 if args.fp16 else None)
    except InputError as exc:
        print(f"singdiffusion_convert: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
