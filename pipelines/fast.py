"""Fast mode for Stable Diffusion 1.5 models: few-step sampling through LCM-LoRA (Luo et al., 2023).

The LCM-LoRA (`latent-consistency/lcm-lora-sdv1-5`, or the local .safetensors file or folder that STUDIO_LCM_LORA
names) is loaded once per model as the adapter "lcm", by the studio's LoRA loader (pipelines/core/lora.py: a Hub id
is first resolved to its file in the local Hugging Face cache, so a Hub id and a local folder take the same path).
Like every loaded LoRA it stays attached but disabled; a fast job switches it on (with the user's LoRA when one is
ticked) only inside `lcm_applied`, which puts the UNet's peft state back on exit, error and cancel.

Sampling is diffusers' LCMScheduler made from the model's scheduler config (a new instance per job: the model's
own scheduler is never touched), run by the studio's one loop (`ddim.sample_scheduled`). LCM re-noises the
predicted x0 between steps with fresh noise; that noise comes from a CPU generator seeded with the seed (which
first draws x_T, as `initial_noise` does), so a seed gives the same image on any device.

LCM-LoRA works with 2-8 steps (4 is the usual choice) and guidance 1-2. At guidance <= 1 there is no classifier-free
guidance: one UNet call per step, and the negative prompt does nothing. The embedded model has no LCM-LoRA (an
SD1.5 LoRA does not fit it); its fast mode is CoDi, in the Instruct tab.
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
import struct
from contextlib import contextmanager
from pathlib import Path

import torch
from diffusers import LCMScheduler
from diffusers.utils.torch_utils import randn_tensor

from .core import ddim
from .core.errors import InputError
from .core.events import CancelToken, Job, Progress
from .core.latents import decode_to_pil, latent_shape
from .core.lora import load_lora
from .core.metadata import with_metadata
from .core.models import EMBEDDED_ID
from .core.peft_state import adapter_configs, adapters_active, peft_state_restored
from .core.results import ImageResult, base_metadata
from .core.stream import PreviewOptions, stream_steps
from .core.text import encode_prompt
from .core.validation import (
    check_number,
    check_prompt,
    check_size,
    check_text_length,
    resolve_seed,
    shown,
    validate_common,
)

log = logging.getLogger(__name__)

LCM_LORA_REPO = "latent-consistency/lcm-lora-sdv1-5"
LCM_LORA_FILE = "pytorch_lora_weights.safetensors"
LCM_ADAPTER = "lcm"
LCM_ENV = "STUDIO_LCM_LORA"      # a local .safetensors file or folder, or another Hub repo[:file]
SAMPLER = "LCM"
DEFAULT_STEPS, MAX_STEPS = 4, 8
DEFAULT_GUIDANCE, MAX_GUIDANCE = 1.0, 2.0
LABEL = "Fast (LCM-LoRA, 4 steps)"
INFO = ("Few-step sampling through LCM-LoRA, for Stable Diffusion 1.5 models: 4 steps (1-8), guidance 1 (0-2). "
        "At guidance ≤ 1 there is no CFG and the negative prompt does nothing.")
EMBEDDED_NOTE = ("The embedded model has no LCM-LoRA (it is made for Stable Diffusion 1.5): its fast mode is "
                 "Fast (CoDi) in the Instruct tab. Load an SD 1.5 model in 'Model and LoRA' for this one.")

_files: dict[str, Path] = {}                      # source -> its resolved local file (Hub lookups once per process)
_hashes: dict[tuple[str, int, int], str] = {}     # (file, size, mtime) -> short hash


# ------------------------------------------------------------------ settings
def fast_note(model) -> str | None:
    """Why fast mode is not offered on `model`, or None when it is."""
    return EMBEDDED_NOTE if model.id == EMBEDDED_ID else None


def check_fast(model, steps, guidance) -> tuple[int, float]:
    """Steps and guidance as fast mode takes them (1-8, 0-2), refusing models without an LCM-LoRA."""
    note = fast_note(model)
    if note:
        raise InputError(note)
    steps = check_number(steps, "Steps", 1, 10**6, integer=True)
    if steps > MAX_STEPS:
        raise InputError(f"Fast mode runs 1 to {MAX_STEPS} steps (LCM-LoRA; {DEFAULT_STEPS} is usual), got {steps}: "
                         f"lower the steps or untick '{LABEL}'.")
    guidance = check_number(guidance, "Guidance", 0, 50)
    if guidance > MAX_GUIDANCE:
        raise InputError(f"Fast mode takes guidance 0 to {MAX_GUIDANCE:g} (LCM-LoRA; 1 = no CFG), got {guidance:g}: "
                         f"lower the guidance or untick '{LABEL}'.")
    return steps, guidance


def uses_cfg(guidance: float) -> bool:
    """Classifier-free guidance only above 1 (as diffusers' pipelines decide); at <= 1 the conditional prediction
    alone, and no negative prompt."""
    return guidance > 1.0


def lcm_scheduler(scheduler_config, steps: int) -> LCMScheduler:
    """A new LCMScheduler from the model's scheduler config with `steps` timesteps set (SD1.5: 4 steps ->
    [999, 759, 499, 259]); the same signature as ddim.make_scheduler."""
    sched = LCMScheduler.from_config(scheduler_config)
    sched.set_timesteps(int(steps))
    return sched


def seeded_noise(model, seed: int, width: int, height: int) -> tuple[torch.Tensor, torch.Generator]:
    """(x_T, the CPU generator that drew it): x_T is `initial_noise`'s for the seed; the generator then supplies
    the scheduler's fresh noise, so the whole run depends on the seed alone, on any device."""
    gen = torch.Generator("cpu").manual_seed(int(seed))
    x = randn_tensor(latent_shape(model, width, height), generator=gen, device=model.device, dtype=model.dtype)
    return x, gen


def noise_predictor(unet, cond: torch.Tensor, uncond: torch.Tensor | None, guidance: float):
    """eps_fn(x_t, t, k) for the loop: classifier-free guidance when `uncond` is given, else the conditional
    prediction (one UNet call)."""
    def eps(x, t, k):
        return ddim.guided_eps(unet, x, t, cond, uncond, guidance if uncond is not None else 1.0)
    return eps


# ------------------------------------------------------------------ the adapter
def lcm_lora_source() -> str:
    """Where the LCM-LoRA comes from: STUDIO_LCM_LORA, else the Hub's latent-consistency/lcm-lora-sdv1-5."""
    return os.environ.get(LCM_ENV, "").strip() or f"{LCM_LORA_REPO}:{LCM_LORA_FILE}"


def lcm_lora_file(source: str) -> Path:
    """The local .safetensors file of an LCM-LoRA source: a file, a folder (its pytorch_lora_weights.safetensors,
    else its only .safetensors file), or a Hub "owner/name[:file]" from the local Hugging Face cache (downloaded
    when the machine is online). Messages name the file or repo, never the server path."""
    source = (source or "").strip()
    if source in _files and _files[source].is_file():
        return _files[source]
    path = Path(source).expanduser()
    if path.exists():
        if path.is_dir():
            files = sorted(path.glob("*.safetensors"))
            named = [f for f in files if f.name == LCM_LORA_FILE]
            if not named and len(files) != 1:
                raise InputError(f"The LCM-LoRA folder {path.name} holds {len(files) or 'no'} .safetensors files: "
                                 f"name the file in {LCM_ENV}.")
            path = (named or files)[0]
        if path.suffix != ".safetensors":
            raise InputError("Only a .safetensors LCM-LoRA is accepted (pickled .bin/.pt files are never loaded).")
    else:
        repo, _, filename = source.partition(":")
        if source.startswith(("/", ".", "~", "\\")) or not re.fullmatch(r"[\w.-]+/[\w.-]+", repo):
            raise InputError(f"The LCM-LoRA file {path.name} was not found (set {LCM_ENV} to an existing file or "
                             f"folder, or a Hub repo id).")
        from huggingface_hub import hf_hub_download

        try:
            path = Path(hf_hub_download(repo, filename or LCM_LORA_FILE))
        except Exception:  # offline and not cached, no such repo or file ...: the detail goes to the log
            log.warning("could not fetch the LCM-LoRA %r", source, exc_info=True)
            raise InputError(f"Fast mode needs the LCM-LoRA {repo}, which is not in this machine's Hugging Face cache "
                             f"and cannot be downloaded here. Download it once where the Hub is reachable, or set "
                             f"{LCM_ENV} to a local .safetensors file or folder.") from None
    _files[source] = path
    return path


def short_hash(path: Path) -> str:
    """The first 12 hex digits of the SHA-256 of a .safetensors file's tensor data (after its header): the hash
    AUTOMATIC1111 writes under "Lora hashes" for a safetensors LoRA."""
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key not in _hashes:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            (header,) = struct.unpack("<Q", f.read(8))
            f.seek(8 + header)
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        _hashes[key] = digest.hexdigest()[:12]
    return _hashes[key]


def ensure_lcm_lora(model, source: str | None = None) -> str:
    """Loads the LCM-LoRA onto `model` as the adapter "lcm" (disabled until applied) unless that file is loaded
    already; returns its short hash. Nothing stays half-loaded when it fails (load_lora's guarantee)."""
    note = fast_note(model)
    if note:
        raise InputError(note)
    path = lcm_lora_file(source or lcm_lora_source())
    if model.loras.get(LCM_ADAPTER) != str(path) or LCM_ADAPTER not in adapter_configs(model.unet):
        try:
            load_lora(model, str(path), LCM_ADAPTER)
        except InputError as exc:
            raise InputError(f"Fast mode could not load its LCM-LoRA: {exc}") from None
    return short_hash(path)


@contextmanager
def lcm_applied(model, lora: str | None = None, strength: float = 1.0):
    """The LCM-LoRA switched on at full strength (and the user's LoRA `lora` at `strength`, when given) for the
    duration of a job; the UNet's adapters, flags, scales and grads are put back however the block exits."""
    if LCM_ADAPTER not in model.loras:
        raise InputError("The LCM-LoRA is not loaded for this model (ensure_lcm_lora first).")
    weights = {LCM_ADAPTER: 1.0}
    if lora:
        if not isinstance(lora, str) or lora not in model.loras:
            raise InputError(f"LoRA {shown(lora)} is not loaded for this model; load it first.")
        if lora != LCM_ADAPTER:
            weights[lora] = float(strength)
    with peft_state_restored(model.unet), adapters_active(model.unet, weights):
        yield


def fast_metadata(lcm_hash: str) -> dict:
    """What a fast result adds to its PNG parameters (over base_metadata): the sampler, the mode and the
    LCM-LoRA's hash ("Sampler: LCM, Fast: True, Lora hashes: "lcm: ..."" in the A1111 text)."""
    return {"sampler": SAMPLER, "fast": True, "lora_hashes": f"{LCM_ADAPTER}: {lcm_hash}"}


# ------------------------------------------------------------------ text to image
def fast_generate(model, p, cancel: CancelToken | None = None, preview: PreviewOptions | None = None) -> Job:
    """Text to image with the LCM-LoRA: `p` is a GenerateParams (its steps and guidance in fast mode's ranges).
    The same events as `generate` (steps + 1 of them, the last with an ImageResult)."""
    prompt = check_prompt(p.prompt)
    steps, guidance, strength = validate_common(model, p.steps, p.guidance, p.lora_strength)
    steps, guidance = check_fast(model, steps, guidance)
    negative = check_text_length(p.negative_prompt or "", "negative prompt")
    width, height = check_size(model, p.width, p.height)
    seed = resolve_seed(p.seed)
    total = steps + 1
    yield Progress("loading the LCM-LoRA", 0, total, message=f"seed {seed}")
    lcm_hash = ensure_lcm_lora(model)
    yield Progress("encoding prompt", 0, total, message=f"seed {seed}")
    cond = encode_prompt(model, prompt)
    uncond = encode_prompt(model, negative) if uses_cfg(guidance) else None
    x_T, gen = seeded_noise(model, seed, width, height)
    sched = lcm_scheduler(model.scheduler_config, steps)
    with lcm_applied(model, p.lora, strength):
        states = ddim.sample_scheduled(noise_predictor(model.unet, cond, uncond, guidance), x_T, sched, cancel,
                                       generator=gen)
        x0 = yield from stream_steps(model, states, "sampling (LCM)", 0, total, preview)
    image = decode_to_pil(model, x0)
    meta = {"prompt": prompt, "negative_prompt": negative, "task": "generate", "seed": seed, "steps": steps,
            "guidance": guidance, "size": f"{width}x{height}", **base_metadata(model, p.lora, strength),
            **fast_metadata(lcm_hash)}
    result = ImageResult(with_metadata(image, meta), seed, meta)
    yield Progress("done", total, total, preview=result.image, result=result, message=f"seed {seed} · LCM")
