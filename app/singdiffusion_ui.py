"""The Generate tab's "SingDiffusion singular step" checkbox (pipelines/singdiffusion.py) and the Model panel's
field for a module folder.

The checkbox is enabled only when the active model has a SingDiffusion module (its folder's `singdiffusion/`, a
folder given in the Model panel or with --singdiffusion, or $STUDIO_SINGDIFFUSION); otherwise it is unticked and
disabled, and its info says where a module goes. It follows model switches and module loads (ctx.follow_model)."""
from __future__ import annotations

import gradio as gr

from pipelines.singdiffusion import ENV, SUBFOLDER

LABEL = "SingDiffusion singular step"
INFO = ("Starts sampling with the model's SingDiffusion module: one step from pure noise (t = 1) to the first "
        "timestep, so very dark or very bright images come out as asked")


def missing_note(model) -> str:
    return (f"{model.label} has no SingDiffusion module: put one in its folder's {SUBFOLDER}/, or give a module "
            f"folder in 'Model and LoRA' (or with --singdiffusion / ${ENV})")


def availability(model) -> dict:
    """The checkbox on `model`: enabled with the usual info, or unticked and disabled with the reason."""
    if model.singdiffusion_source() is None:
        return gr.update(value=False, interactive=False, info=missing_note(model))
    return gr.update(interactive=True, info=INFO)


def singular_checkbox(ctx, prefix: str) -> gr.Checkbox:
    """The checkbox, following the active model; the tab passes its value to the job."""
    start = availability(ctx.studio.model)
    box = gr.Checkbox(False, label=LABEL, info=start["info"], interactive=start["interactive"],
                      elem_id=f"{prefix}-singular")
    ctx.follow_model(box, availability)
    return box
