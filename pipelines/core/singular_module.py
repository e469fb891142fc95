"""The SingDiffusion module itself (pipelines/singdiffusion.py has the method): a timestep-free
UNet2DConditionModel in the official layout, where it is found, and how it is loaded and checked.

A module folder holds `config.json` (a UNet2DConditionModel config) and `diffusion_pytorch_model.safetensors`.
Every ResnetBlock2D of the module has no time projection and no time-embedding norm, so no time embedding reaches
its features; only time-conditioning keys may be missing from or unexpected in its weights.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .errors import InputError

SUBFOLDER = "singdiffusion"            # a model folder's own module: <model>/singdiffusion/
ENV = "STUDIO_SINGDIFFUSION"           # a module folder for models without their own
CONFIG = "config.json"
WEIGHTS = "diffusion_pytorch_model.safetensors"
PICKLED = "diffusion_pytorch_model.bin"
PLACEHOLDER_T = 1                      # the timestep the module is called with (it ignores it), as officially
# State-dict keys of time conditioning: with every ResnetBlock2D's time_emb_proj removed, nothing these layers
# compute reaches the output, so a file may have them or not. Any other missing or unexpected key is an error.
TIME_KEYS = ("time_emb_proj.",)
TIME_PREFIXES = ("time_embedding.", "add_embedding.", "class_embedding.")


def is_time_key(key: str) -> bool:
    return any(part in key for part in TIME_KEYS) or key.startswith(TIME_PREFIXES)


def remove_time_conditioning(unet):
    """The official surgery: every ResnetBlock2D without its time projection and time-embedding norm (the block
    then only normalises: no time embedding reaches the features). Returns `unet`."""
    from diffusers.models.resnet import ResnetBlock2D

    for block in unet.modules():
        if isinstance(block, ResnetBlock2D):
            block.time_emb_proj = None
            block.time_embedding_norm = None
    return unet


def module_from_config(config: dict):
    """A timestep-free module of the layout `config` describes (randomly initialised)."""
    from diffusers import UNet2DConditionModel

    return remove_time_conditioning(UNet2DConditionModel.from_config(config))


def check_keys(missing, unexpected, where: str = "the module") -> None:
    """Only time-conditioning keys may be missing or unexpected (see TIME_KEYS): else a clear error."""
    bad_missing = [k for k in missing if not is_time_key(k)]
    bad_unexpected = [k for k in unexpected if not is_time_key(k)]
    if bad_missing or bad_unexpected:
        parts = []
        if bad_missing:
            parts.append(f"{len(bad_missing)} missing (e.g. {', '.join(bad_missing[:3])})")
        if bad_unexpected:
            parts.append(f"{len(bad_unexpected)} unexpected (e.g. {', '.join(bad_unexpected[:3])})")
        raise InputError(f"The weights of {where} do not fit its config.json: {'; '.join(parts)} keys. Only time "
                         f"conditioning keys (time_emb_proj, time_embedding) may differ.")


def load_state_checked(module, state: dict, where: str = "the module") -> None:
    """Loads `state` into `module` (non-strict), refusing anything but time-conditioning key differences."""
    own = module.state_dict()
    wrong = [k for k, v in state.items() if k in own and tuple(v.shape) != tuple(own[k].shape)
             and not is_time_key(k)]
    if wrong:
        k = wrong[0]
        raise InputError(f"The weights of {where} do not fit its config.json: {len(wrong)} tensors of another shape "
                         f"(e.g. {k}: {tuple(state[k].shape)} for {tuple(own[k].shape)}).")
    state = {k: v for k, v in state.items() if k not in own or tuple(v.shape) == tuple(own[k].shape)}
    missing, unexpected = module.load_state_dict(state, strict=False)
    check_keys(missing, unexpected, where)


def read_config(folder: Path) -> dict:
    path = Path(folder) / CONFIG
    if not path.is_file():
        raise InputError(f"No SingDiffusion module in {shown_path(folder)}: it needs {CONFIG} and {WEIGHTS}.")
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeError, json.JSONDecodeError) as exc:
        raise InputError(f"The SingDiffusion {CONFIG} in {shown_path(folder)} is not valid JSON.") from exc
    if not isinstance(config, dict) or config.get("_class_name", "UNet2DConditionModel") != "UNet2DConditionModel":
        raise InputError(f"The SingDiffusion {CONFIG} in {shown_path(folder)} does not describe a "
                         f"UNet2DConditionModel.")
    return config


def shown_path(folder) -> str:
    """A folder as messages name it: its last two parts, never a whole server path."""
    parts = Path(str(folder)).parts
    return "/".join(parts[-2:]) if parts else str(folder)


def load_module(folder, device=None, dtype=None, expect_channels: int | None = None,
                expect_text_dim: int | None = None):
    """The module in `folder` (config.json + diffusion_pytorch_model.safetensors), time conditioning removed,
    eval mode, no gradients, on `device` in `dtype`. With `expect_*` given, a module that does not fit the model
    (latent channels, text-state width) is refused with a clear message."""
    from safetensors.torch import load_file

    folder = Path(folder)
    config = read_config(folder)
    weights = folder / WEIGHTS
    if not weights.is_file():
        hint = (f" It has the official pickled {PICKLED}: convert it with `python -m pipelines.singdiffusion_convert "
                f"{PICKLED} <folder>`." if (folder / PICKLED).is_file() else "")
        raise InputError(f"No {WEIGHTS} in {shown_path(folder)}.{hint}")
    if expect_channels is not None and (int(config.get("in_channels", 4)) != expect_channels
                                        or int(config.get("out_channels", 4)) != expect_channels):
        raise InputError(f"The SingDiffusion module in {shown_path(folder)} works on {config.get('in_channels')}-"
                         f"channel latents; this model's have {expect_channels}.")
    if expect_text_dim is not None and int(config.get("cross_attention_dim", -1)) != expect_text_dim:
        raise InputError(f"The SingDiffusion module in {shown_path(folder)} reads {config.get('cross_attention_dim')}"
                         f"-wide text states; this model's text encoder gives {expect_text_dim}.")
    try:
        module = module_from_config(config)
        state = load_file(str(weights))
    except InputError:
        raise
    except Exception as exc:  # noqa: BLE001 - a damaged file or config becomes one clear message
        raise InputError(f"The SingDiffusion module in {shown_path(folder)} could not be read "
                         f"({type(exc).__name__}).") from exc
    load_state_checked(module, state, f"the SingDiffusion module in {shown_path(folder)}")
    # nn.Module.to: diffusers' own .to warns about dtype casts that concern only its from_pretrained
    module = torch.nn.Module.to(module, device=device or "cpu", dtype=dtype or torch.float32)
    return module.eval().requires_grad_(False)


def save_module(module, folder, dtype: torch.dtype | None = None) -> Path:
    """Writes `module` as config.json + diffusion_pytorch_model.safetensors (optionally cast, e.g. float16)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = {k: v for k, v in dict(module.config).items() if not k.startswith("_")}
    config = {"_class_name": "UNet2DConditionModel", **config}
    (folder / CONFIG).write_text(json.dumps(config, indent=1, default=list))
    state = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().contiguous().cpu()
             for k, v in module.state_dict().items()}
    save_file(state, str(folder / WEIGHTS), metadata={"format": "pt"})
    return folder
