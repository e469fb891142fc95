"""SDEdit (strokes): coarse colour strokes (on a blank canvas or a picture) turned into realistic images."""
from __future__ import annotations

import gradio as gr
from PIL import Image

from pipelines.core.errors import InputError
from pipelines.core.limits import get_limits
from pipelines.sdedit import SDEditParams

from .. import downloads, examples, masks, world_note
from ..context import Context
from ..fast_mode import fast_checkbox
from ..runner import GPU, Outputs, progress
from ..uploads import SafeImageEditor

WORLD_COLOURS = ["#ff0000", "#00a000", "#0000ff", "#ffd700", "#ff8c00", "#800080", "#ff69b4", "#ffffff",
                 "#000000", "#808080"]
SDEDIT_HELP = """Pick the brush in the canvas toolbar and paint coarse colour strokes on the blank canvas or on an
uploaded picture. **Strength t0**
trades faithfulness for realism: low values stay close to the strokes, high values give cleaner,
more realistic images that follow them less (SDEdit's paper works at 0.3-0.6 on pixel models; SD-class latent
models often need 0.5-0.8). *Keep unpainted regions* repaints only the strokes (masked SDEdit). *Fast* (Stable
Diffusion 1.5 models) samples with LCM-LoRA: of its 1-8 steps, int(steps x strength) run (4 steps at strength 0.5
run 2), and at least one must."""


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
                world_note.add(ctx, canvas, "sdedit-photo-note")
                prompt = gr.Textbox(label="Prompt", elem_id="sdedit-prompt")
                neg = gr.Textbox(label="Negative prompt")
                strength = ctx.recommended_control(gr.Slider, "sdedit", "strength", 0.3, 0.9, step=0.01,
                                                   label="Strength t0", elem_id="sdedit-strength",
                                                   info="Low: faithful to the strokes · high: realistic, less faithful")
                with gr.Row():
                    steps = gr.Slider(1, get_limits().max_steps, value=min(50, get_limits().max_steps), step=1,
                                      label="Steps (full schedule)", elem_id="sdedit-steps")
                    guid = gr.Slider(0, 20, value=7.5, step=0.1, label="Guidance")
                with gr.Row():
                    seed = ctx.seed_controls("sdedit", -1, elem_id="sdedit-seed")
                    repeats = gr.Slider(1, 8, value=1, step=1, label="Repeats N (candidates)", elem_id="sdedit-repeats")
                    keep = gr.Checkbox(False, label="Keep unpainted regions (masked SDEdit)")
                fast = fast_checkbox(ctx, "sdedit", steps, guid, min(50, get_limits().max_steps), 7.5)
                ctx.restorable("sdedit", prompt=prompt, negative_prompt=neg, strength=strength, steps=steps,
                               guidance=guid, seed=seed, repeats=repeats, masked=keep, fast=fast)
                with gr.Row():
                    run = gr.Button("Generate", variant="primary", elem_id="sdedit-run")
                    stop = gr.Button("Stop", variant="stop", elem_id="sdedit-stop")
                status = gr.Markdown("", elem_id="sdedit-status")
                gr.Markdown(SDEDIT_HELP)
                gr.Examples(examples.SDEDITS, [canvas, prompt, strength])
            with gr.Column():
                preview = gr.Image(label="Live preview", format="jpeg", interactive=False, height=256,
                                   elem_id="sdedit-preview")
                # a click picks a candidate (no lightbox): it becomes the chosen result below
                gallery = gr.Gallery(label="Results (click one to pick it)", columns=4, format="png",
                                     allow_preview=False, elem_id="sdedit-gallery")
                chosen = gr.Image(label="Chosen result", type="filepath", format="png", interactive=False, height=256,
                                  elem_id="sdedit-chosen")
                made = gr.State([])  # this run's candidate files, server-side: a pick is an index into them
                ctx.send_row("sdedit", ["invert", "edit", "instruct", "diffedit", "sdedit", "drag", "inpaint"],
                             "picked result")

    ctx.receiver("sdedit", canvas, prompt, kind="editor")  # "Send to SDEdit" (app/sending.py)
    out = Outputs(preview=preview, candidates=gallery, chosen=chosen, made=made, status=status)

    def run_sdedit(canvas, prompt, neg, strength, steps, guidance, seed, repeats, keep, fast=False,
                   request: gr.Request = None):
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
            p = SDEditParams(prompt or "", neg or "", strength, steps, guidance, seed, repeats, fast=bool(fast))
            picture = masks.shrink_display(guide, ctx.engine(request).model.resolution)
            yield from ctx.engine(request).sdedit(picture, p, mask, token, session.preview)

        def done(ev, session):
            r = ev.result
            ctx.remember_seed(session, "sdedit", r.images[0].seed)  # the candidates' seeds count up from it
            files = downloads.result_files(session, [im.image for im in r.images], "sdedit",
                                           [im.seed for im in r.images])
            session.keep_result("sdedit", r.images[0].image)  # the first is chosen until another is picked
            pick_note = " · click one to pick it" if len(files) > 1 else ""
            return dict(preview=ev.preview, candidates=[(f, f"seed {im.seed}") for f, im in zip(files, r.images)],
                        chosen=files[0], made=files,
                        status=f"Done · {len(r.images)} candidate(s) · {r.params['steps_run']} steps from "
                               f"t={r.params['start_timestep']}{pick_note}")

        def show(ev):
            values = progress(ev)
            if ev.partial is not None:  # the candidates done so far
                values["candidates"] = [(im.image, f"seed {im.seed}") for im in ev.partial]
            return values

        yield from ctx.run(request, out, work, done, show, start={"made": []})

    def pick(files, evt: gr.SelectData, request: gr.Request):
        """The clicked candidate becomes the result: shown as chosen and kept for "Send to" (by its index into
        what this session's run made, never a path from the page)."""
        index = evt.index
        files = files if isinstance(files, list) else []
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(files):
            raise InputError("Pick a candidate once the run has finished.")
        session = ctx.sessions.peek(request)
        try:
            with Image.open(files[index]) as png:
                png.load()
                picked = png.copy()
        except OSError:
            raise InputError("That candidate is no longer kept: generate again.") from None
        if session is not None:
            session.keep_result("sdedit", picked)
        return files[index]

    gallery.select(pick, [made], [chosen], queue=False, show_progress="hidden", api_visibility="private")
    inputs = [canvas, prompt, neg, strength, steps, guid, seed, repeats, keep, fast]  # new inputs are appended
    event = run.click(run_sdedit, inputs, out, api_name="sdedit", **GPU)
    ctx.stop_button(stop, status, [event], api_name="sdedit_stop")
