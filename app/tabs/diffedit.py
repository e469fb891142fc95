"""DiffEdit (mask): the edit region estimated from the model's noise predictions for two prompts, painted
over by hand if wanted, then the image decoded with the target prompt inside it."""
from __future__ import annotations

import gradio as gr
import numpy as np
from PIL import Image

from pipelines.core.image_io import load_rgb
from pipelines.core.limits import get_limits
from pipelines.diffedit import DiffEditParams

from .. import downloads, examples, masks, world_note
from ..context import Context
from ..runner import GPU, Outputs
from ..uploads import SafeImageMask

DIFFEDIT_HELP = """**1. Estimate mask** compares the model's noise predictions for the target and source prompts
(10 noise draws at encode strength 0.5) and shows the region as a translucent layer: paint to add to it,
erase to remove. **2. Apply edit** inverts the image to the encoding ratio r and decodes it with the target
prompt, keeping the inverted image outside the mask. With nothing painted, Apply estimates the mask itself."""


def show_enlarged(value):
    """A small picture uploaded or pasted into the editor comes back enlarged once, so the brush, the estimate's
    layer and the zoom are the same before and after Estimate (examples and "Send to" arrive enlarged)."""
    shown = masks.display_value(value)
    return gr.skip() if shown is None else shown


def build(ctx: Context) -> None:
    with gr.Tab("DiffEdit (mask)", id="diffedit"):
        with gr.Row():
            with gr.Column():
                # PNG, not the default WebP: a lossy alpha channel would grow the mask by its artefacts. The
                # canvas size is the one masks.editor_value lays its mask layer out for; the brush paints in the
                # estimated mask's own translucent colour
                editor = SafeImageMask(label="Image and mask (paint to add, erase to remove)", type="numpy",
                                       format="png", sources=["upload", "clipboard"], elem_id="diffedit-editor",
                                       canvas_size=masks.EDITOR_CANVAS,
                                       brush=gr.Brush(colors=[masks.OVERLAY_BRUSH], color_mode="fixed",
                                                      default_size=24),
                                       eraser=gr.Eraser(default_size=24))
                # registered before the photo note's queued check: the page runs an event's listeners one after
                # another, each to its end, so behind that check (queued after an Estimate job) the enlargement
                # of the pre-Estimate picture would land after the estimate and replace its layer with none
                editor.upload(show_enlarged, editor, editor, queue=False, show_progress="hidden",
                              api_visibility="private")
                world_note.add(ctx, editor, "diffedit-photo-note")
                target = gr.Textbox(label="Target prompt (what the edited image shows)", elem_id="diffedit-target")
                source = gr.Textbox(label="Source prompt (what the image shows; optional)",
                                    elem_id="diffedit-source")
                with gr.Row():
                    threshold = gr.Slider(0, 1, value=0.5, step=0.01, label="Mask threshold",
                                          info="On the normalised difference map (paper: 0.5); higher = smaller mask")
                    ratio = gr.Slider(0, 1, value=0.8, step=0.01, label="Encoding ratio r",
                                      info="How far the image is inverted before decoding (more = bigger change)")
                with gr.Accordion("Mask estimate and sampling", open=False):
                    with gr.Row():
                        mask_strength = gr.Slider(0.05, 0.95, value=0.5, step=0.05, label="Mask encode strength")
                        draws = gr.Slider(1, 32, value=10, step=1, label="Noise draws", elem_id="diffedit-draws")
                        seed = ctx.seed_controls("diffedit", 0, label="Mask noise seed (-1 = random)",
                                                 elem_id="diffedit-seed")
                    with gr.Row():
                        steps = gr.Slider(1, get_limits().max_steps, value=min(50, get_limits().max_steps), step=1,
                                          label="Steps", elem_id="diffedit-steps")
                        guid = gr.Slider(0, 20, value=7.5, step=0.1, label="Guidance")
                ctx.restorable("diffedit", prompt=target, source_prompt=source, threshold=threshold, encode_ratio=ratio,
                               mask_strength=mask_strength, mask_draws=draws, seed=seed, steps=steps, guidance=guid)
                with gr.Row():
                    mask_btn = gr.Button("1. Estimate mask", elem_id="diffedit-mask")
                    run = gr.Button("2. Apply edit", variant="primary", elem_id="diffedit-run")
                    stop = gr.Button("Stop", variant="stop", elem_id="diffedit-stop")
                status = gr.Markdown("", elem_id="diffedit-status")
                gr.Markdown(DIFFEDIT_HELP)
                # each example's picture as an editor value already enlarged, as "Send to" sends one: a small one
                # would be enlarged by the upload event, and the editor fires that event again with the small
                # picture while an Estimate's value loads, so the enlargement could replace the estimate's layer
                shown = [[masks.editor_value(load_rgb(path), None), *rest] for path, *rest in examples.DIFFEDITS]
                gr.Examples(shown, [editor, target, source], elem_id="diffedit-examples")
            with gr.Column():
                preview = gr.Image(label="Live preview", format="jpeg", interactive=False, height=256,
                                   elem_id="diffedit-preview")
                result = gr.Image(label="Edited", format="png", type="filepath", interactive=False, height=256,
                                  elem_id="diffedit-result")
                with gr.Row():
                    heat = gr.Image(label="Difference map (normalised)", format="png", interactive=False,
                                    height=180, elem_id="diffedit-heat")
                    used = gr.Image(label="Mask used", format="png", interactive=False, height=180,
                                    elem_id="diffedit-used")
                ctx.send_row("diffedit", ["invert", "edit", "instruct", "diffedit", "sdedit", "drag", "inpaint"],
                             "edited image")

    ctx.receiver("diffedit", editor, source, kind="editor")  # "Send to DiffEdit" (app/sending.py)
    mask_out = Outputs(editor=editor, heat=heat, status=status)
    edit_out = Outputs(preview=preview, edited=result, mask=used, status=status)

    def params(target, source, threshold, ratio, mask_strength, draws, seed, steps, guidance):
        return DiffEditParams(target or "", source or "", threshold, mask_strength, draws, ratio, steps, guidance,
                              seed)

    def editor_picture(editor, request) -> Image.Image:
        picture = masks.require_picture(masks.background(editor), "an image to edit")
        return masks.shrink_display(picture, ctx.engine(request).model.resolution)

    def run_diffedit_mask(editor, target, source, threshold, ratio, mask_strength, draws, seed, steps, guidance,
                          request: gr.Request):
        settings = (target, source, threshold, ratio, mask_strength, draws, seed, steps, guidance)

        def work(session, token):
            yield from ctx.engine(request).diffedit_mask(editor_picture(editor, request), params(*settings), token,
                                                         session.preview)

        def done(ev, session):
            m = ev.result
            heat = Image.fromarray((np.clip(m.heat, 0, 1) * 255).astype(np.uint8))
            share = 100 * float(m.mask.mean())
            ctx.remember_seed(session, "diffedit", m.params.get("seed"))
            # the editor's own picture, untouched (its size and zoom stay), with the estimate as its one layer
            return dict(editor=masks.editor_value(masks.background(editor), m.mask),
                        heat=masks.enlarge_for_display(heat),
                        status=f"Mask estimated: {share:.0f}% of the image. Paint or erase on it, then Apply edit.")

        yield from ctx.run(request, mask_out, work, done)

    def run_diffedit(editor, target, source, threshold, ratio, mask_strength, draws, seed, steps, guidance,
                     request: gr.Request):
        settings = (target, source, threshold, ratio, mask_strength, draws, seed, steps, guidance)
        hand_mask = masks.painted(editor)

        def work(session, token):
            yield from ctx.engine(request).diffedit(editor_picture(editor, request), params(*settings), hand_mask,
                                                    session.diffedit_cache, token, session.preview)

        def done(ev, session):
            r = ev.result
            how = "your mask" if hand_mask is not None else "an estimated mask (nothing was painted)"
            note = " · inversion reused" if r.cached else ""
            session.keep_result("diffedit", r.edited.image)  # what "Send to" passes on
            return dict(preview=ev.preview, edited=downloads.result_file(session, r.edited.image, "diffedit"),
                        mask=masks.enlarge_for_display(r.overlay),
                        status=f"Done with {how}: {100 * float(r.mask.mean()):.0f}% of the image{note}")

        yield from ctx.run(request, edit_out, work, done)

    settings = [target, source, threshold, ratio, mask_strength, draws, seed, steps, guid]
    mask_event = mask_btn.click(run_diffedit_mask, [editor] + settings, mask_out, api_name="diffedit_mask", **GPU)
    event = run.click(run_diffedit, [editor] + settings, edit_out, api_name="diffedit", **GPU)
    ctx.stop_button(stop, status, [mask_event, event], api_name="diffedit_stop")
