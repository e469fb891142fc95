"""Per-model recommended settings: what a method's parameters should start at on a given model.

A model folder's studio_model.json may hold a "recommended" section, one entry per method, naming parameters of
that method's params dataclass and the values that work on this model (measured: benchmarks/RESULTS.md):

    "recommended": {"drag": {"lora_steps": 40, "warm_start": true, ...}, "sdedit": {"strength": 0.3}}

`recommended(model, method)` is the method's reference defaults (its dataclass defaults, the papers' settings)
overlaid with the model's entries; models without a section (e.g. SD1.5 from the Hub) get the reference
defaults. Unknown names and values of the wrong type are ignored, so a bad file never breaks a method.
InstructPix2Pix's scales keep their own entry ("instruct_guidance", read by pipelines/instruct.py).
"""
from __future__ import annotations

import dataclasses
import math

from .drag import DragParams
from .inpaint import InpaintParams
from .sdedit import SDEditParams

SECTION = "recommended"
# the methods a folder may recommend settings for
METHODS = {"drag": DragParams, "sdedit": SDEditParams, "inpaint": InpaintParams}


def reference(method: str) -> dict:
    """The method's reference defaults: every field of its params dataclass with a number or bool default."""
    cls = METHODS[method]
    return {f.name: f.default for f in dataclasses.fields(cls)
            if isinstance(f.default, (bool, int, float)) and f.default is not None}


def _typed(value, default):
    """`value` as the type of `default`, or None when it is not one (bools only as bools, ints only integral)."""
    if isinstance(default, bool):
        return value if isinstance(value, bool) else None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    if isinstance(default, int):
        return int(value) if float(value).is_integer() else None
    return float(value)


def overrides(model, method: str) -> dict:
    """The entries the model's folder recommends for `method` (only known parameters with well-typed values)."""
    info = getattr(model, "info", None) or {}
    section = info.get(SECTION) if isinstance(info, dict) else None
    entry = section.get(method) if isinstance(section, dict) else None
    if not isinstance(entry, dict):
        return {}
    defaults = reference(method)
    out = {}
    for name, value in entry.items():
        if name in defaults:
            typed = _typed(value, defaults[name])
            if typed is not None:
                out[name] = typed
    return out


def recommended(model, method: str) -> dict:
    """{parameter: value} for `method` on `model`: the reference defaults, overlaid with the model's own."""
    return {**reference(method), **overrides(model, method)}


def recommended_params(model, method: str, **values):
    """The method's params dataclass at `model`'s recommended settings; `values` (the handles, a prompt, any
    setting the caller chooses) win: `recommended_params(studio.model, "drag", handles=[...], targets=[...])`."""
    return METHODS[method](**{**recommended(model, method), **values})


def source_note(model, method: str, name: str) -> str:
    """Where a control's starting value comes from, for its info text."""
    return f"recommended for {model.label}" if name in overrides(model, method) else "reference default"
