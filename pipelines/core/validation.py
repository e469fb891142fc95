"""Range checks for user-supplied numbers and text; every failure is an InputError with a UI-ready message."""
from __future__ import annotations

import math
import random

from .errors import InputError
from .limits import get_limits

MAX_SEED = 2**32 - 1


def check_prompt(prompt, what: str = "prompt") -> str:
    text = check_text_length("" if prompt is None else str(prompt), what)
    if not text.strip():
        raise InputError(f"Please enter a {what}: it is empty.")
    return text.strip()


def check_text_length(text: str, what: str = "prompt") -> str:
    """Any prompt (negative and empty ones too) is capped before it is tokenized."""
    limit = get_limits().max_prompt_chars
    if len(text) > limit:
        raise InputError(f"The {what} is too long ({len(text)} characters; the limit is {limit}).")
    return text


def shown(value, limit: int = 40) -> str:
    """repr(value) cut to `limit` characters: messages echo what was sent, never a megabyte of it."""
    try:
        text = repr(value)
    except ValueError:  # an int past Python's digit limit for str()
        return "an integer too long to show"
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _as_float(value) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError, OverflowError):  # OverflowError: an int too large for a float
        return None


def check_number(value, name: str, lo: float, hi: float, integer: bool = False):
    x = _as_float(value)
    if x is None:
        raise InputError(f"{name} must be a number, got {shown(value)}.")
    if math.isnan(x) or x < lo or x > hi:
        raise InputError(f"{name} must be between {lo:g} and {hi:g}, got {shown(value)}.")
    if integer:
        if x != int(x):
            raise InputError(f"{name} must be a whole number, got {shown(value)}.")
        return int(x)
    return x


def resolve_seed(seed) -> int:
    """-1 (or empty) means a fresh random seed; the seed actually used is returned so it can be shown."""
    if seed is None or seed == "" or _as_float(seed) == -1:
        return random.randrange(MAX_SEED)
    return check_number(seed, "Seed", 0, MAX_SEED, integer=True)


def check_size(model, width, height) -> tuple[int, int]:
    """Width/height default to the model's native resolution and must be multiples of its size step."""
    step = model.size_multiple
    max_side = get_limits().max_side
    out = []
    for name, v in (("Width", width), ("Height", height)):
        if v is None or v == "" or v == 0:
            out.append(model.resolution)
            continue
        v = check_number(v, name, step, max_side, integer=True)
        if v % step:
            raise InputError(f"{name} must be a multiple of {step} for this model, got {v}.")
        out.append(v)
    return out[0], out[1]


def validate_common(model, steps, guidance, lora_strength):
    """Steps, guidance and LoRA strength as every text-to-image-UNet task takes them; refuses InstructPix2Pix models."""
    if model.is_instruct:
        raise InputError(f"{model.label} is an InstructPix2Pix model (its UNet needs an input image): use the "
                         "Instruct tab, or load a text-to-image model for this.")
    if model.is_inpaint:
        raise InputError(f"{model.label} is an inpainting model (its UNet needs a mask and a masked image): use the "
                         "Inpaint tab, or load a text-to-image model for this.")
    steps = check_number(steps, "Steps", 1, get_limits().max_steps, integer=True)
    guidance = check_number(guidance, "Guidance", 0, 50)
    strength = check_number(lora_strength, "LoRA strength", -2, 4)
    return steps, guidance, strength
