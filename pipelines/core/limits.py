"""Per-job caps for a public server: every job checks its inputs against these before any expensive work (loading a
model tensor, decoding an image, a UNet call).

`get_limits()` is what the pipelines read at call time; the app sets them once at start-up, typically
`set_limits(Limits.from_env())`, and passes `max_upload_bytes` to Gradio's `max_file_size`. Importing this module
never reads the environment, so tests and scripts see the defaults unless they set limits themselves.
"""
from __future__ import annotations

import math
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields, replace

MB = 1024 * 1024  # Gradio's FileSize.MB, so "40 MB" means the same on both sides


@dataclass(frozen=True)
class Limits:
    max_steps: int = 150                 # sampling / inversion steps of any job
    max_side: int = 1024                 # width and height of generated images (px)
    max_pixels: int = 16_000_000         # decoded upload pixels (checked on the header, before decoding)
    max_upload_bytes: int = 40 * MB      # one uploaded file
    max_aspect: float = 8.0              # long side / short side of an upload
    max_frames: int = 64                 # frames of an interpolation sequence
    max_drag_iterations: int = 300       # drag optimisation iterations
    max_lora_steps: int = 300            # the drag's per-image LoRA training steps
    max_lora_rank: int = 256             # the drag's per-image LoRA rank
    max_points: int = 16                 # drag handle/target pairs
    max_repeats: int = 8                 # SDEdit candidates per job
    max_batch_count: int = 8             # Generate's images per job (batch count)
    max_mask_draws: int = 64             # DiffEdit noise draws
    max_inner_steps: int = 50            # null-text inversion iterations per step
    max_loras: int = 8                   # LoRA adapters loaded on a model at once
    max_prompt_chars: int = 2000         # one prompt (CLIP reads 77 tokens; tokenizing 2 MB takes seconds)

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or value <= 0:
                raise ValueError(f"Limit {f.name} must be a positive number, got {value!r}.")
            if f.type == "int":
                if int(value) != value:
                    raise ValueError(f"Limit {f.name} must be a whole number, got {value!r}.")
                object.__setattr__(self, f.name, int(value))  # 150.0 -> 150, so messages read "150"
        if self.max_aspect < 1:
            raise ValueError(f"Limit max_aspect must be at least 1, got {self.max_aspect!r}.")

    @classmethod
    def from_env(cls, environ=None) -> Limits:
        """The defaults, overridden by STUDIO_MAX_STEPS, STUDIO_MAX_SIDE, STUDIO_MAX_PIXELS, STUDIO_MAX_UPLOAD_MB,
        STUDIO_MAX_ASPECT, STUDIO_MAX_FRAMES, ... (see env_names()); a bad value is a ValueError naming its
        variable, so a misconfigured server fails at start-up rather than on some later job."""
        env = os.environ if environ is None else environ
        values = {}
        for name, (var, scale) in env_names().items():
            raw = env.get(var)
            if raw is None or not raw.strip():
                continue
            values[name] = _parse(var, raw, scale, integer=_field_type(name) == "int")
            try:
                replace(cls(), **{name: values[name]})  # field rules (e.g. max_aspect >= 1), named by variable
            except ValueError as exc:
                raise ValueError(f"{var}: {exc}") from None
        return replace(cls(), **values)


def env_names() -> dict[str, tuple[str, int]]:
    """Field -> (environment variable, multiplier from the variable's unit to the field's)."""
    out = {f.name: (f"STUDIO_{f.name.upper()}", 1) for f in fields(Limits)}
    out["max_upload_bytes"] = ("STUDIO_MAX_UPLOAD_MB", MB)
    return out


def _field_type(name: str) -> str:
    return next(f.type for f in fields(Limits) if f.name == name)


def _parse(var: str, raw: str, scale: int, integer: bool):
    try:
        value = float(raw.strip()) * scale
    except ValueError:
        raise ValueError(f"{var} must be a number, got {raw!r}.") from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{var} must be a positive number, got {raw!r}.")
    if integer:
        if scale == 1 and value != int(value):
            raise ValueError(f"{var} must be a whole number, got {raw!r}.")
        return int(value)  # a fractional MB still gives whole bytes
    return value


_lock = threading.Lock()
_current = Limits()


def get_limits() -> Limits:
    """The limits in force (an immutable object: read it once per check)."""
    return _current


def set_limits(limits: Limits) -> Limits:
    """Replaces the limits for every later job; returns the previous ones. Jobs already past their checks are not
    affected (they read the limits once, at the start)."""
    global _current
    if not isinstance(limits, Limits):
        raise TypeError(f"set_limits takes a Limits, got {type(limits).__name__}")
    with _lock:
        previous, _current = _current, limits
    return previous


@contextmanager
def limits_set(**changes) -> Iterator[Limits]:
    """Temporarily changed limits (tests, benchmarks): `with limits_set(max_steps=10): ...`."""
    previous = set_limits(replace(get_limits(), **changes))
    try:
        yield get_limits()
    finally:
        set_limits(previous)
