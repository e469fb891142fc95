"""LoRA adapters on the shared UNet: the Smooth LoRA (legacy attention-processor key names) and any
diffusers / peft / kohya LoRA file.

Loaded adapters stay attached but disabled; a job switches one on only inside `lora_applied`, which
switches it off again on exit (also on error and cancel), so the base output is restored exactly.
Safetensors only: LoRA files are never unpickled.
"""
from __future__ import annotations

import re
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file

from .errors import InputError

SMOOTH_LORA_REPO = "shi-labs/smooth-diffusion-lora"
SMOOTH_LORA_FILE = "smooth_lora.safetensors"
SMOOTH_NAME = "smooth"


def read_lora_file(source: str) -> dict[str, torch.Tensor]:
    """A local .safetensors file, or a Hub repo id ("owner/name" or "owner/name:file.safetensors")."""
    source = (source or "").strip()
    if not source:
        raise InputError("No LoRA given: type a .safetensors path or a Hub repo id.")
    path = Path(source).expanduser()
    if not path.exists():
        if source.startswith(("/", ".", "~")) or source.endswith((".safetensors", ".bin", ".pt")):
            raise InputError(f"LoRA file not found: {source}")
        repo, _, filename = source.partition(":")
        if repo.count("/") != 1:
            raise InputError(f"LoRA {source!r} is neither an existing file nor a Hub repo id.")
        from huggingface_hub import hf_hub_download

        try:
            path = Path(hf_hub_download(repo, filename or SMOOTH_LORA_FILE))
        except Exception as exc:  # noqa: BLE001 - offline, missing repo or file
            raise InputError(f"Could not fetch LoRA {source!r}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}") from exc
    if path.is_dir():
        candidates = sorted(path.glob("*.safetensors"))
        if not candidates:
            raise InputError(f"No .safetensors file in {path}.")
        path = candidates[0]
    if path.suffix != ".safetensors":
        raise InputError("Only .safetensors LoRA files are accepted (pickled .bin/.pt files are never loaded).")
    try:
        return load_file(str(path))
    except Exception as exc:  # noqa: BLE001
        raise InputError(f"{path.name} is not a readable safetensors file: {exc}") from exc


def to_unet_state_dict(state_dict: dict[str, torch.Tensor]) -> tuple[dict, str | None, dict | None]:
    """Normalises key formats to something `unet.load_lora_adapter` takes: returns (dict, prefix, alphas).

    diffusers' pipeline-level loader silently loads nothing from legacy attn-procs files (no "unet."
    prefix), so we pick the prefix ourselves; diffusers then converts `to_q_lora.down` -> `to_q.lora_A`."""
    from diffusers import StableDiffusionPipeline

    sd = {re.sub(r"^base_model\.model\.", "", k): v for k, v in state_dict.items()}  # raw peft files
    sd, alphas = StableDiffusionPipeline.lora_state_dict(sd)  # converts kohya / A1111 formats
    if any(k.startswith("unet.") for k in sd):
        sd = {k: v for k, v in sd.items() if k.startswith("unet.")}
        return sd, "unet", alphas
    if any(k.startswith(("text_encoder.", "lora_te")) for k in sd) and not any(
        k.startswith(("down_blocks", "mid_block", "up_blocks")) for k in sd
    ):
        raise InputError("This LoRA file has no UNet weights (text-encoder only).")
    return sd, None, alphas


def load_lora(model, source: str, name: str | None = None) -> str:
    """Loads a LoRA onto the model's UNet (disabled until applied); returns its adapter name."""
    unet = model.unet
    name = name or re.sub(r"\W+", "_", Path(source.split(":")[-1]).stem or "lora")
    sd, prefix, alphas = to_unet_state_dict(read_lora_file(source))
    if not any("lora" in k.lower() for k in sd):  # diffusers fails on these with an opaque IndexError
        raise InputError(f"No UNet LoRA weights were found in {source!r}.")
    if name in getattr(unet, "peft_config", {}):
        unet.delete_adapters(name)
        model.loras.pop(name, None)  # never leave a name that refers to a deleted adapter
    before = _lora_param_count(unet)
    try:
        unet.load_lora_adapter(sd, prefix=prefix, network_alphas=alphas, adapter_name=name)
    except Exception as exc:  # noqa: BLE001 - shape mismatch with this UNet, unknown keys ...
        if name in getattr(unet, "peft_config", {}):
            unet.delete_adapters(name)  # no half-loaded adapter stays behind
        raise InputError(f"LoRA {source!r} does not fit this model's UNet: {str(exc).splitlines()[0][:200]}") from exc
    finally:
        if hasattr(unet, "peft_config"):
            unet.disable_lora()
    if name not in getattr(unet, "peft_config", {}) or _lora_param_count(unet) == before:
        raise InputError(f"No UNet LoRA weights were found in {source!r}.")
    unet.to(model.device, model.dtype)
    model.loras[name] = source
    return name


def _lora_param_count(unet) -> int:
    return sum(p.numel() for n, p in unet.named_parameters() if "lora_" in n)


@contextmanager
def lora_applied(model, name: str | None, strength: float = 1.0):
    """Switches one adapter on at `strength` for the duration of a job; always switches it off again."""
    if not name:
        yield
        return
    unet = model.unet
    if name not in model.loras:
        raise InputError(f"LoRA {name!r} is not loaded for this model; load it first.")
    try:
        unet.enable_lora()
        unet.set_adapters([name], [float(strength)])
        yield
    finally:
        unet.disable_lora()
