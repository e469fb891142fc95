"""The "Fast (LCM-LoRA, 4 steps)" checkbox of the Generate and SDEdit tabs (pipelines/fast.py).

Ticking it moves the tab's steps and guidance sliders to LCM-LoRA's ranges and values (1-8 steps, 4; guidance 0-2,
1.0); unticking puts the tab's usual ones back. A restored PNG (or the History) that sets the checkbox only moves
the ranges, so its own steps and guidance stay. On a model without an LCM-LoRA (the embedded model) the checkbox
is disabled and its info says why; it follows model switches (ctx.follow_model)."""
from __future__ import annotations

import gradio as gr

from pipelines.core.limits import get_limits
from pipelines.fast import DEFAULT_GUIDANCE, DEFAULT_STEPS, INFO, LABEL, MAX_GUIDANCE, MAX_STEPS, fast_note

GUIDANCE_MAX = 20   # the tabs' usual guidance slider: 0-20


def availability(model) -> dict:
    """The checkbox on `model`: enabled with the usual info, or unticked and disabled with the reason."""
    note = fast_note(model)
    if note:
        return gr.update(value=False, interactive=False, info=note)
    return gr.update(interactive=True, info=INFO)


def ranges(on: bool) -> tuple[dict, dict]:
    """Steps and guidance slider ranges for fast mode on or off (values untouched)."""
    if on:
        return gr.update(minimum=1, maximum=MAX_STEPS), gr.update(minimum=0, maximum=MAX_GUIDANCE)
    return gr.update(minimum=1, maximum=get_limits().max_steps), gr.update(minimum=0, maximum=GUIDANCE_MAX)


def switched(on: bool, steps: int, guidance: float) -> tuple[dict, dict]:
    """What a user's tick or untick does: the ranges and the mode's starting values (`steps` and `guidance` are
    the tab's usual values, for unticking)."""
    steps_range, guidance_range = ranges(on)
    steps_value, guidance_value = (DEFAULT_STEPS, DEFAULT_GUIDANCE) if on else (min(steps, get_limits().max_steps),
                                                                                 guidance)
    return {**steps_range, "value": steps_value}, {**guidance_range, "value": guidance_value}


def fast_checkbox(ctx, prefix: str, steps: gr.Slider, guidance: gr.Slider, usual_steps: int,
                  usual_guidance: float) -> gr.Checkbox:
    """The checkbox, wired to the tab's `steps` and `guidance` sliders; the tab passes its value to the job."""
    start = availability(ctx.studio.model)
    box = gr.Checkbox(False, label=LABEL, info=start["info"], interactive=start["interactive"],
                      elem_id=f"{prefix}-fast")
    ctx.follow_model(box, availability)

    def ticked(on, request: gr.Request = None):
        note = fast_note(ctx.engine(request).model)
        if on and note:  # a page built before a model switch: refuse here too
            return gr.update(value=False, interactive=False, info=note), gr.skip(), gr.skip()
        return (gr.skip(), *switched(bool(on), usual_steps, usual_guidance))

    def moved(on):
        return ranges(bool(on))

    hidden = dict(queue=False, api_visibility="private", show_progress="hidden")
    box.input(ticked, [box], [box, steps, guidance], **hidden)
    box.change(moved, [box], [steps, guidance], **hidden)
    return box
