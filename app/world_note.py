"""The note under an image input when a photo is uploaded while the embedded model is active: that model only
knows its synthetic world, so without the note a photo's shapes-world result comes with no word of why."""
from __future__ import annotations

import logging

import gradio as gr
import numpy as np
from PIL import Image

from pipelines.core.errors import InputError
from pipelines.core.image_io import load_rgb
from pipelines.core.models import EMBEDDED_ID
from pipelines.core.world_check import looks_like_world

log = logging.getLogger(__name__)
PHOTO_NOTE = ("⚠️ The embedded model only knows its synthetic shapes world; photos come out as shapes. "
              "Load an SD1.5 model in 'Model and LoRA' for photos.")


def picture_of(value) -> Image.Image | None:
    """The uploaded picture of an Image (a path, array or PIL image) or an editor value (its background)."""
    if isinstance(value, dict):
        value = next((value[k] for k in ("background", "composite") if value.get(k) is not None), None)
    if value is None or (isinstance(value, np.ndarray) and value.size == 0):
        return None
    return load_rgb(value)  # the upload's own checks: bytes, formats, pixels, aspect ratio


def note_for(model, value) -> str:
    """PHOTO_NOTE when `model` is the embedded one and the picture does not look like its world, else ""."""
    if getattr(model, "id", None) != EMBEDDED_ID:
        return ""
    picture = picture_of(value)
    return "" if picture is None or looks_like_world(picture) else PHOTO_NOTE


def add(ctx, image, elem_id: str) -> gr.Markdown:
    """A note under `image` (place the call right after it), set on each upload and cleared with the image."""
    note = gr.Markdown("", elem_id=elem_id)

    def check(value, request: gr.Request):
        try:
            return note_for(ctx.engine(request).model, value)
        except InputError:  # a bad upload: the run says what is wrong with it
            return ""

    image.upload(check, image, note, show_progress="hidden", api_visibility="private")
    image.clear(lambda: "", None, note, queue=False, show_progress="hidden", api_visibility="private")
    return note
