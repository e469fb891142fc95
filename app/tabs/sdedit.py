"""SDEdit (strokes): coarse colour strokes (on a blank canvas or a picture) turned into realistic images."""
from __future__ import annotations

import gradio as gr

from pipelines.core.errors import InputError
from pipelines.core.limits import get_limits
from pipelines.sdedit import SDEditParams

from .. import downloads, examples, masks
from ..context import Context
from ..runner import GPU, Outputs, progress
from ..uploads import SafeImageEditor

WORLD_COLOURS = ["#ff0000", "#00a000", "#0000ff", "#ffd700", "#ff8c00", "#800080", "#ff69b4", "#ffffff",
                 "#000000", "#808080"]
SDEDIT_HELP = """Pick the brush in the canvas toolbar and paint coarse colour strokes on the blank canvas or on an
uploaded picture. **Strength t0**
trades faithfulness for realism: low values stay close to the strokes, high values give cleaner,
more realistic images that follow them less (SDEdit's paper works at 0.3-0.6 on pixel models; SD-class latent
models often need 0.5-0.8). *Keep unpainted regions* repaints only the strokes (masked SDEdit)."""


def build(ctx: Context) -> None:
    with gr.Tab("SDEdit (strokes)", id="sdedit"):
        with gr.Row():
            with gr.Column():
                canvas = SafeImageEditor(label="Canvas: paint strokes on the blank canvas or on an uploaded image",
                                         type="numpy", image_mode="RGBA", format="png",
                                         sources=["upload", "clipboard"],
                                         canvas_size=(masks.DISPLAY_SIDE, masks.DISPLAY_SIDE),
                                         brush=gr.Brush(colors=WORLD_COLOURS, default_size=32),
                                         elem_id="sdedit-canvas")
                prompt = gr.Textbox(label="Prompt", elem_id="sdedit-prompt")
                neg = gr.Textbox(label="Negative prompt")
                strength = gr.Slider(0.3, 0.9, value=0.6, step=0.01, label="Strength t0",
                                     info="Low: faithful to the strokes · high: realistic, less faithful",
                                     elem_id="sdedit-strength")
                with gr.Row():
                    steps = gr.Slider(1, get_limits().max_steps, value=min(50, get_limits().max_steps), step=1,
                                      label="Steps (full schedule)", elem_id="sdedit-steps")
                    guid = gr.Slider(0, 20, value=7.5, step=0.1, label="Guidance")
                with gr.Row():
                    seed = gr.Number(-1, label="Seed (-1 = random)", precision=0, elem_id="sdedit-seed")
                    repeats = gr.Slider(1, 8, value=1, step=1, label="Repeats N (candidates)", elem_id="sdedit-repeats")
                    keep = gr.Checkbox(False, label="Keep unpainted regions (masked SDEdit)")
                ctx.restorable("sdedit", prompt=prompt, negative_prompt=neg, strength=strength, steps=steps,
                               guidance=guid, seed=seed, repeats=repeats, masked=keep)
                with gr.Row():
                    run = gr.Button("Generate", variant="primary", elem_id="sdedit-run")
                    stop = gr.Button("Stop", variant="stop", elem_id="sdedit-stop")
                status = gr.Markdown("", elem_id="sdedit-status")
                gr.Markdown(SDEDIT_HELP)
                gr.Examples(examples.SDEDITS, [canvas, prompt, strength])
            with gr.Column():
                preview = gr.Image(label="Live preview", format="jpeg", interactive=False, height=256,
                                   elem_id="sdedit-preview")
                gallery = gr.Gallery(label="Results (pick one)", columns=4, format="png", elem_id="sdedit-gallery")
                ctx.send_row("sdedit", ["invert", "edit", "instruct", "diffedit", "sdedit", "drag"], "picked result")

    ctx.receiver("sdedit", canvas, prompt, kind="editor")  # "Send to SDEdit" (app/sending.py)
    out = Outputs(preview=preview, candidates=gallery, status=status)

    def run_sdedit(canvas, prompt, neg, strength, steps, guidance, seed, repeats, keep, request: gr.Request):
        def work(session, token):
            guide = masks.composite(canvas)
            if guide is None:
                raise InputError("The canvas is blank: paint some strokes or upload an image first.")
            mask = None
            if keep:
                mask = masks.painted(canvas)
                if mask is None:
                    raise InputError("Nothing is painted, so nothing would change: paint strokes where the image "
                                     "should change, or untick 'Keep unpainted regions'.")
            p = SDEditParams(prompt or "", neg or "", strength, steps, guidance, seed, repeats)
            picture = masks.shrink_display(guide, ctx.engine(request).model.resolution)
            yield from ctx.engine(request).sdedit(picture, p, mask, token, session.preview)

        def done(ev, session):
            r = ev.result
            files = downloads.result_files(session, [im.image for im in r.images], "sdedit",
                                           [im.seed for im in r.images])
            return dict(preview=ev.preview, candidates=[(f, f"seed {im.seed}") for f, im in zip(files, r.images)],
                        status=f"Done · {len(r.images)} candidate(s) · {r.params['steps_run']} steps from "
                               f"t={r.params['start_timestep']}")

        def show(ev):
            values = progress(ev)
            if ev.partial is not None:  # the candidates done so far
                values["candidates"] = [(im.image, f"seed {im.seed}") for im in ev.partial]
            return values

        yield from ctx.run(request, out, work, done, show)

    inputs = [canvas, prompt, neg, strength, steps, guid, seed, repeats, keep]
    event = run.click(run_sdedit, inputs, out, api_name="sdedit", **GPU)
    ctx.stop_button(stop, status, [event], api_name="sdedit_stop")
