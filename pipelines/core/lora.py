"""LoRA adapters on the shared UNet: the Smooth LoRA (legacy attention-processor key names) and any
diffusers / peft / kohya LoRA file.

Loaded adapters stay attached but disabled; a job switches one on only inside `lora_applied`, which
switches it off again on exit (also on error and cancel), so the base output is restored exactly.
Safetensors only: LoRA files are never unpickled.
"""
from __future__ import annotations

import logging
import re
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file

from .errors import InputError
from .limits import Limits, get_limits
from .peft_state import quiet_peft, unwrap_unused_layers
from .validation import shown

log = logging.getLogger(__name__)

SMOOTH_LORA_REPO = "shi-labs/smooth-diffusion-lora"
SMOOTH_LORA_FILE = "smooth_lora.safetensors"
SMOOTH_NAME = "smooth"
MAX_LOADED_LORAS = Limits.max_loras   # the default; get_limits().max_loras is what is enforced
NAME_LENGTH = 64
DRAG_ADAPTER = "drag_image"   # the drag's temporary per-image LoRA (pipelines/drag/lora.py)
# Names the studio itself uses: the drag's per-image adapter (created and deleted by every drag), peft's default
# adapter, and the "none" that metadata and menus write for no LoRA. peft also stores adapters as keys of torch
# ModuleDicts, which refuse keys that are attributes ("to", "eval", "forward", ...): see is_reserved.
RESERVED_NAMES = frozenset({DRAG_ADAPTER, "default", "none"})
_MODULE_DICT, _PARAM_DICT = torch.nn.ModuleDict(), torch.nn.ParameterDict()
_NO_SOURCE = "No LoRA given: type a .safetensors path or a Hub repo id."
_FILE_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")


def is_reserved(name: str) -> bool:
    return name.lower() in RESERVED_NAMES or hasattr(_MODULE_DICT, name) or hasattr(_PARAM_DICT, name)


def _clean(name: str) -> str:
    """[A-Za-z0-9_]{1,64}: the characters peft, menus and metadata all take."""
    return re.sub(r"[^A-Za-z0-9_]+", "_", str(name)).strip("_")[:NAME_LENGTH] or "lora"


def adapter_name(source: str, name: str | None = None) -> str:
    """The name a LoRA loads under: `name` if given, else its file's (or Hub repo's) stem; sanitised by _clean.
    A reserved name given explicitly is refused; one derived from a file name gets a "_lora" suffix instead."""
    if name is not None and str(name).strip():
        clean = _clean(name)
        if is_reserved(clean):
            raise InputError(f"The LoRA name {clean!r} is reserved for the studio's own use: choose another name.")
        return clean
    clean = _clean(Path((source or "").split(":")[-1]).stem or "lora")
    return clean[:NAME_LENGTH - 5] + "_lora" if is_reserved(clean) else clean


def _is_path_like(source: str) -> bool:
    return source.startswith(("/", ".", "~", "\\")) or source.lower().endswith(_FILE_SUFFIXES)


def _existing(source: str) -> Path | None:
    """The local file or folder `source` names, or None (also for names no filesystem call takes)."""
    try:
        path = Path(source).expanduser()
        return path if path.exists() else None
    except (OSError, RuntimeError, ValueError):  # a name too long, an unknown ~user, a NUL byte
        return None


def display_name(source: str) -> str:
    """How messages name a LoRA source: a Hub id as typed, a file or folder by its own name only (never the
    server path it lives at)."""
    source = (source or "").strip()
    repo = source.partition(":")[0]
    if not _is_path_like(source) and repo.count("/") == 1 and _existing(source) is None:
        label = source
    else:
        label = Path(source).name or "the LoRA"
    return label if len(label) <= 100 else label[:97] + "..."


def read_lora_file(source: str) -> dict[str, torch.Tensor]:
    """A local .safetensors file, or a Hub repo id ("owner/name" or "owner/name:file.safetensors"). Messages name
    the file (not its folder) or the repo id; the underlying error goes to the log."""
    source = (source or "").strip()
    if not source:
        raise InputError(_NO_SOURCE)
    label = display_name(source)
    path = _existing(source)
    if path is None:
        if _is_path_like(source):
            raise InputError(f"LoRA file not found: {label}.")
        repo, _, filename = source.partition(":")
        if repo.count("/") != 1:
            raise InputError(f"LoRA {label!r} is neither an existing file nor a Hub repo id.")
        from huggingface_hub import hf_hub_download

        try:
            path = Path(hf_hub_download(repo, filename or SMOOTH_LORA_FILE))
        except Exception:  # offline, missing repo or file, ...: the detail goes to the log
            log.warning("could not fetch LoRA %r", source, exc_info=True)
            raise InputError(f"Could not fetch LoRA {label!r} from the Hub (offline, or no such repo or file).") \
                from None
    if path.is_dir():
        candidates = sorted(path.glob("*.safetensors"))
        if not candidates:
            raise InputError(f"No .safetensors file in {path.name or 'that folder'}.")
        path = candidates[0]
    if path.suffix != ".safetensors":
        raise InputError("Only .safetensors LoRA files are accepted (pickled .bin/.pt files are never loaded).")
    try:
        return load_file(str(path))
    except Exception:  # safetensors raises several types on a corrupt header
        log.warning("LoRA file %s is not readable", path, exc_info=True)
        raise InputError(f"{path.name} is not a readable safetensors file.") from None


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
    """Loads a LoRA onto the model's UNet (disabled until applied); returns its adapter name (see adapter_name).
    A reserved name, or one more LoRA than the limit allows, is refused before the file is read; loading a name
    that is already loaded replaces that adapter."""
    source = str(source or "").strip()
    if not source:
        raise InputError(_NO_SOURCE)
    name = adapter_name(source, name)
    _check_room(model, name)
    label = display_name(source)
    unet = model.unet
    sd, prefix, alphas = _unet_weights(source, label)
    if not any("lora" in k.lower() for k in sd):  # diffusers fails on these with an opaque IndexError
        raise InputError(f"No UNet LoRA weights were found in {label}.")
    if name in model.loras or name in _adapters(unet):
        _delete(unet, name)
        model.loras.pop(name, None)  # never leave a name that refers to a deleted adapter
    before = _lora_param_count(unet)
    try:
        unet.load_lora_adapter(sd, prefix=prefix, network_alphas=alphas, adapter_name=name)
    except Exception:  # shape mismatch with this UNet, unknown keys ...
        log.warning("LoRA %r does not fit the UNet of %s", source, model.id, exc_info=True)
        _delete(unet, name)  # no half-loaded adapter stays behind
        raise InputError(f"LoRA {label} does not fit this model's UNet (made for another model?).") from None
    finally:
        if _adapters(unet):
            unet.disable_lora()
    if name not in _adapters(unet) or _lora_param_count(unet) == before:
        _delete(unet, name)
        raise InputError(f"No UNet LoRA weights were found in {label}.")
    unet.to(model.device, model.dtype)
    model.loras[name] = source
    return name


def unload_lora(model, name: str) -> str:
    """Deletes a loaded adapter (and unwraps the layers only it used); returns its name. The UNet then computes
    exactly what it computed without it: the base output once no adapter is left."""
    name = "" if name is None else str(name).strip()
    if name not in model.loras:
        loaded = f" (loaded: {', '.join(model.loras)})" if model.loras else ""
        raise InputError(f"LoRA {shown(name)} is not loaded for this model{loaded}.")
    _delete(model.unet, name)
    model.loras.pop(name)
    return name


def _check_room(model, name: str) -> None:
    cap = get_limits().max_loras
    if name not in model.loras and len(model.loras) >= cap:
        raise InputError(f"{len(model.loras)} LoRAs are loaded, the most allowed: unload one "
                         f"({', '.join(model.loras)}) before loading another.")


def _unet_weights(source: str, label: str) -> tuple[dict, str | None, dict | None]:
    """read_lora_file + to_unet_state_dict; a file diffusers' converters choke on is an InputError too."""
    state_dict = read_lora_file(source)
    try:
        return to_unet_state_dict(state_dict)
    except InputError:
        raise
    except Exception:  # converters raise many types on unexpected keys
        log.warning("LoRA %r could not be converted", source, exc_info=True)
        raise InputError(f"{label} is not a LoRA file this studio can read.") from None


def _adapters(unet) -> dict:
    return getattr(unet, "peft_config", None) or {}


def _delete(unet, name: str) -> None:
    if name in _adapters(unet):
        with quiet_peft():
            unet.delete_adapters(name)
    unwrap_unused_layers(unet)


def _lora_param_count(unet) -> int:
    return sum(p.numel() for n, p in unet.named_parameters() if "lora_" in n)


@contextmanager
def lora_applied(model, name: str | None, strength: float = 1.0):
    """Switches one adapter on at `strength` for the duration of a job; always switches it off again."""
    if not name:
        yield
        return
    unet = model.unet
    if not isinstance(name, str) or name not in model.loras:  # a list from a client would not even hash
        raise InputError(f"LoRA {shown(name)} is not loaded for this model; load it first.")
    try:
        unet.enable_lora()
        unet.set_adapters([name], [float(strength)])
        yield
    finally:
        unet.disable_lora()
