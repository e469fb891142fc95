"""ZeroGPU (Hugging Face's shared-GPU Spaces): every GPU event runs inside `spaces.GPU` with a duration estimated
from its own arguments (steps, frames, iterations, size); anywhere else the handler runs unchanged.

The handlers are generators that yield after every UNet call, so Stop (which closes the generator) ends a ZeroGPU
task within about one step. A ZeroGPU task runs in a forked worker: its arguments and yields are pickled (plain
values, images and tables here) and what it stores in the session stays in the worker.
"""
from __future__ import annotations

import inspect
import math
import os

MIN_DURATION = 20          # s: model warm-up and encode/decode around the steps
MAX_DURATION = 600         # s: longer requests are refused by ZeroGPU ("illegal duration")
SECONDS_PER_UNET_CALL = 0.12   # one SD1.5 UNet call at 512x512 on a ZeroGPU slice, with margin
# handler parameter names that multiply the work, and how many UNet calls each unit costs
_WORK = {"steps": 2.0, "lora_steps": 1.5, "iters": 1.0, "n": 1.0, "repeats": 1.0, "draws": 1.0, "inner_steps": 1.0}


def on_zero_gpu() -> bool:
    return os.environ.get("SPACES_ZERO_GPU", "").lower() in ("1", "true")


def _number(value, default: float) -> float:
    try:
        x = float(value)
    except (TypeError, ValueError):
        return default
    return x if math.isfinite(x) and x > 0 else default


def estimate_duration(fn, args: tuple, kwargs: dict) -> int:
    """Seconds to request for fn(*args, **kwargs): UNet calls implied by its work parameters, scaled by the
    image area against 512x512, within [MIN_DURATION, MAX_DURATION]."""
    try:
        bound = inspect.signature(fn).bind_partial(*args, **kwargs).arguments
    except TypeError:
        bound = {}
    steps = _number(bound.get("steps"), 50)
    calls = steps * _WORK["steps"]
    for name in ("lora_steps", "iters"):
        calls += _number(bound.get(name), 0) * _WORK[name]
    for name in ("n", "repeats", "draws"):  # frames, candidates, noise draws: each a pass of the steps
        if name in bound:
            calls *= max(1.0, _number(bound.get(name), 1))
    if "inner_steps" in bound and bound.get("inversion", bound.get("method")) in ("nti", "nti_fast"):
        calls += steps * _number(bound.get("inner_steps"), 10)
    area = _number(bound.get("w"), 512) * _number(bound.get("h"), 512) / (512 * 512)
    seconds = MIN_DURATION + calls * SECONDS_PER_UNET_CALL * max(area, 0.25)
    return int(min(MAX_DURATION, max(MIN_DURATION, math.ceil(seconds))))


def on_gpu(fn):
    """fn inside `spaces.GPU(duration=...)` on ZeroGPU; fn itself elsewhere."""
    if not on_zero_gpu():
        return fn
    import spaces

    def duration(*args, **kwargs):
        return estimate_duration(fn, args, kwargs)

    return spaces.GPU(duration=duration)(fn)
