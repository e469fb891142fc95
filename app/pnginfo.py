"""PNG info: a tab's settings restored from the parameters a PNG carries (a studio PNG or an A1111-style one).

Each tab registers its restorable controls by parameter key (`Context.restorable`): the keys are the studio's
metadata keys (pipelines/core/metadata.py), which an A1111 text maps onto ("CFG scale" -> guidance). Dropping a
PNG on the tab's drop box reads its text chunks only (the upload checks of app/uploads.py first; no pixels are
decoded) and sets the controls the tab has: values are converted to each control's type, clamped to its range
with a note, and keys the tab has no control for are named as skipped. `restore_updates` is the same for a
metadata dict from anywhere else (the history gallery).
"""
from __future__ import annotations

import html
import math
import re
from dataclasses import dataclass, field

import gradio as gr

from pipelines.core.errors import InputError
from pipelines.core.metadata import read_metadata, text_name

DROP_LABEL = "Restore settings from a PNG (studio or A1111)"
NO_PARAMETERS = "This PNG carries no generation parameters (neither a studio nor an A1111 'parameters' text)."

# What a tab's control for a key also accepts when the PNG has no value under the key itself, in order: an A1111
# txt2img PNG or a studio PNG of another method still fills the nearest control.
ALIASES = {
    "text_guidance": ("guidance",),
    "instruction": ("prompt",),
    "seed_a": ("seed",),
    "inversion": ("method",),
    "scheduler": ("sampler",),
}
# Keys that describe a result rather than a setting: never reported as skipped.
RESULT_KEYS = frozenset({
    "task", "model", "model_hash", "sampler", "eta", "size", "steps_run", "start_timestep", "source_steps",
    "encode_steps", "mask_fraction", "mask_timestep", "final_handles", "reached", "iterations_run", "start",
    "image_a", "image_b", "seeds", "repeat", "feature_up_block", "supervision_grid", "mutual_attention_layers",
    "handles", "targets", "mask", "normalisation", "lora_hashes", "version", "vae", "vae_hash", "hashes",
})


MAX_LISTED = 12   # skipped settings named in a note; the rest are counted
_MARKDOWN = re.compile(r"([\\`*_{}\[\]()#+!|<>~])")


def shown(value, limit: int = 60) -> str:
    """Text from a PNG as the note shows it: one line, cut to `limit` characters, with HTML and Markdown
    escaped (a hostile key or value must not become a link, an image or markup)."""
    text = " ".join(str(value).split())
    text = text if len(text) <= limit else text[:limit] + "…"
    return _MARKDOWN.sub(r"\\\1", html.escape(text, quote=False))


@dataclass
class TabParams:
    """One tab's restorable controls: {parameter key: component}, in registration order."""
    tab_id: str
    controls: dict
    drop: gr.Image | None = None
    note: gr.Markdown | None = None
    lora: object = None                     # the tab's LoraControls (use, strength, menu), if any
    # {control key: (key, value)}: the control takes `value` whenever `key` is restored (a restored seed fixes it)
    when: dict = field(default_factory=dict)
    translate: object = None                # params -> params, applied before restoring (the tab's own keys)

    def outputs(self) -> list:
        return list(self.controls.values())


def _number(value) -> float | None:
    if isinstance(value, bool):
        return float(value)
    try:
        number = float(str(value).strip()) if not isinstance(value, (int, float)) else float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _truth(value) -> bool | None:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes", "on"):
        return True
    if text in ("false", "0", "no", "off", "none", ""):
        return False
    return None


def _choice(component, value):
    """The choice (its value) a PNG value names: the value or its label, case-insensitively, with "_" read as
    a space ("Euler a" -> euler_a); a value followed by a qualifier also counts ("DDIM (eta 0)" -> ddim)."""
    text = str(value).strip().lower()
    choices = [(str(label).lower(), v, str(v).lower().replace("_", " ")) for label, v in (component.choices or [])]
    for label, v, key in choices:
        if text in (str(v).lower(), label, key):
            return v
    for _, v, key in choices:
        if text.startswith(key + " "):
            return v
    if isinstance(component, gr.Dropdown) and component.allow_custom_value:
        return str(value)
    return None


def convert(component, name: str, value) -> tuple[object, str | None]:
    """`value` as `component` takes it, and a note when it was clamped or could not be used (value None)."""
    if isinstance(component, gr.Checkbox):
        truth = _truth(value)
        return (truth, None) if truth is not None else (None, f"{name}: '{shown(value)}' is not yes/no")
    if isinstance(component, (gr.Radio, gr.Dropdown)):
        chosen = _choice(component, value)
        return (chosen, None) if chosen is not None else (None, f"{name}: '{shown(value)}' is not one of its choices")
    if isinstance(component, (gr.Slider, gr.Number)):
        number = _number(value)
        if number is None:
            return None, f"{name}: '{shown(value)}' is not a number"
        lo, hi = getattr(component, "minimum", None), getattr(component, "maximum", None)
        note = None
        if (lo is not None and number < lo) or (hi is not None and number > hi):
            clamped = min(max(number, lo if lo is not None else number), hi if hi is not None else number)
            note = f"{name}: {shown(value)} is outside {lo}-{hi}, set to {clamped:g}"
            number = clamped
        integral = (isinstance(component, gr.Number) and component.precision == 0) or (
            isinstance(component, gr.Slider) and float(component.step).is_integer()
            and float(component.minimum).is_integer())
        if integral and isinstance(component, gr.Slider) and component.step > 1:
            # on the slider's grid (a width of 100 on a slider in steps of 8 is 96 or 104)
            step, low = int(component.step), int(component.minimum)
            snapped = min(low + round((number - low) / step) * step, int(component.maximum))
            if snapped != round(number) and note is None:
                note = f"{name}: {shown(value)} is not a multiple of {step}, set to {snapped}"
            number = snapped
        return (int(round(number)) if integral else number), note
    return str(value), None  # a Textbox


def _size(params: dict) -> tuple[str, str] | None:
    size = params.get("size")
    if size is None:
        return None
    parts = str(size).lower().replace(" ", "").split("x")
    return (parts[0], parts[1]) if len(parts) == 2 else None


def lookup(params: dict, key: str):
    """The PNG's value for a control's key (its own, or an alias's), with the key it came from."""
    for candidate in (key, *ALIASES.get(key, ())):
        if candidate in params and params[candidate] is not None:
            return params[candidate], candidate
    if key in ("width", "height"):
        size = _size(params)
        if size is not None:
            return size[0 if key == "width" else 1], "size"
    return None, None


def restore_values(tab: TabParams, params: dict, loaded_loras=()) -> tuple[dict, str]:
    """{key: value} for the tab's controls the PNG sets, and the note saying what was restored, clamped or
    skipped."""
    values, used, problems = {}, set(), []
    no_lora = str(params.get("lora", "none")).strip().lower() in ("", "none")
    for key, component in tab.controls.items():
        if key in ("use_lora", "lora_adapter") or key in tab.when or (key == "lora_strength" and no_lora):
            continue  # the LoRA's strength is kept when the PNG used none
        raw, source = lookup(params, key)
        if source is None:
            continue
        used.add(source)
        value, note = convert(component, text_name(key), raw)
        if note:
            problems.append(note)
        if value is not None:
            values[key] = value
    for key, (source, value) in tab.when.items():
        if source in values:
            values[key] = value
    if no_lora:
        used.update(("lora", "lora_strength"))  # no LoRA was used: nothing to report where a tab has none
    if tab.lora is not None and "lora" in params:
        used.add("lora")
        name = str(params["lora"]).strip()
        if name.lower() in ("", "none"):
            values["use_lora"] = False
        elif name in loaded_loras:
            values["use_lora"], values["lora_adapter"] = True, name
        else:
            values["use_lora"] = False
            problems.append(f"LoRA '{shown(name)}' is not loaded (load it in 'Model and LoRA', then tick it)")
    if "width" in tab.controls:
        used.add("size")
    skipped = [shown(text_name(k)) for k in params
               if k not in used and k not in RESULT_KEYS and (params[k] or k not in ("prompt", "negative_prompt"))]
    if len(skipped) > MAX_LISTED:
        skipped = skipped[:MAX_LISTED] + [f"and {len(skipped) - MAX_LISTED} more"]
    restored = [text_name(k) if k not in ("use_lora", "lora_adapter") else "LoRA" for k in values
                if k not in tab.when]
    restored = list(dict.fromkeys(restored))
    if not restored:
        note = "Nothing in this PNG's parameters applies to this tab."
    else:
        note = f"Restored: {', '.join(restored)}."
    if problems:
        note += " " + "; ".join(problems) + "."
    if skipped:
        note += f" Skipped (not on this tab): {', '.join(skipped)}."
    return values, note


def restore_updates(tab: TabParams, params: dict, loaded_loras=()) -> tuple[list, str]:
    """One update per registered control (gr.skip() for those the params leave alone), and the note."""
    if not isinstance(params, dict) or not params:
        return [gr.skip() for _ in tab.controls], NO_PARAMETERS
    if tab.translate is not None:
        params = tab.translate(params)
    values, note = restore_values(tab, params, loaded_loras)
    return [gr.update(value=values[k]) if k in values else gr.skip() for k in tab.controls], note


def read_upload(path: str) -> dict:
    """The parameters of a PNG the client uploaded, from its text chunks only; InputError with the message to
    show when it has none or they cannot be read. `path` is what client_path (app/uploads.py) returned."""
    params = read_metadata(path)
    if not params:
        raise InputError(NO_PARAMETERS)
    return params
