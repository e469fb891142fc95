"""Generate: text to image with a live preview of the predicted x0."""
from __future__ import annotations

from dataclasses import dataclass

import gradio as gr

from pipelines.core.events import Kind
from pipelines.core.limits import get_limits
from pipelines.generate import GenerateParams

from .. import downloads, examples
from ..context import Context, snapped_sizes, steps_slider
from ..fast_mode import fast_checkbox
from ..runner import GPU, Outputs, progress
from ..singdiffusion_ui import singular_checkbox


@dataclass
class GenerateTab:
    prompt: gr.Textbox
    send_invert: gr.Button
    send_edit: gr.Button
    send_instruct: gr.Button
    send_drag: gr.Button


def build(ctx: Context) -> GenerateTab:
    with gr.Tab("Generate", id="generate"):
        with gr.Row():
            with gr.Column():
                prompt = gr.Textbox(label="Prompt", lines=2, elem_id="gen-prompt")
                neg = gr.Textbox(label="Negative prompt")
                with gr.Row():
                    seed = ctx.seed_controls("generate", -1, elem_id="gen-seed")
                    steps = steps_slider(30, "gen-steps")
                    guid = gr.Slider(0, 20, value=7.5, step=0.1, label="Guidance")
                with gr.Row():
                    w, h = ctx.size_slider("Width", "gen-width"), ctx.size_slider("Height", "gen-height")
                    batch = gr.Slider(1, get_limits().max_batch_count, value=1, step=1, label="Batch count",
                                      info="Images per run, seeds seed, seed+1, ...", elem_id="gen-batch")
                lora = ctx.lora_controls("gen")
                fast = fast_checkbox(ctx, "gen", steps, guid, 30, 7.5)
                singular = singular_checkbox(ctx, "gen")
                ctx.restorable("generate", prompt=prompt, negative_prompt=neg, seed=seed, steps=steps, guidance=guid,
                               width=w, height=h, lora=lora, fast=fast, singular_step=singular)
                with gr.Row():
                    run = gr.Button("Generate", variant="primary", elem_id="gen-run")
                    stop = gr.Button("Stop", variant="stop", elem_id="gen-stop")
                    api_only = gr.Button(visible=False)  # carries the API's /generate (below)
                status = gr.Markdown("", elem_id="gen-status")
                gr.Examples(examples.PROMPTS, [prompt])
            with gr.Column():
                preview = gr.Image(label="Live preview (predicted x0)", format="jpeg", interactive=False, height=320,
                                   elem_id="gen-preview")
                image = gr.Image(label="Result", format="png", type="filepath", interactive=False, height=320,
                                 elem_id="gen-result")
                seed_used = gr.Number(label="Seed used", precision=0, interactive=False, elem_id="gen-seed-used")
                batch_gallery = gr.Gallery(label="Batch (each image as it finishes)", columns=4, height="auto",
                                           format="png", interactive=False, visible=False, elem_id="gen-batch-gallery")
                with gr.Row():
                    send = gr.Button("Send to Invert")
                    send_edit = gr.Button("Send to Edit")
                    send_ip2p = gr.Button("Send to Instruct")
                    send_drag = gr.Button("Send to Drag", elem_id="gen-send-drag")
                ctx.send_row("generate", ["inpaint"], "generated image")  # wired by app/sending.py

    # The /generate endpoint keeps its four outputs and its errors (a width of 100 is refused, as in the Python
    # API and the CLI); the page's button snaps typed sizes and also streams the batch into the gallery.
    api_out = Outputs(preview=preview, image=image, seed=seed_used, status=status)
    page_out = Outputs(preview=preview, image=image, seed=seed_used, status=status, batch=batch_gallery)

    def generate_handler(out: Outputs, page: bool):
        def run_generate(prompt, neg, seed, steps, guidance, w, h, use_lora, strength, lora_adapter=None,
                         batch_count=1, fast=False, singular_step=False, request: gr.Request = None):
            note = ""
            if page:  # a typed width of 100 runs at the model's nearest multiple, and the status says so
                w, h, snapped = snapped_sizes(ctx.engine(request).model, w, h)
                note = f" · {snapped}" if snapped else ""
            try:
                gallery = page and float(batch_count) > 1
            except (TypeError, ValueError):  # the job refuses it with its own message
                gallery = False

            def work(session, token):
                p = GenerateParams(prompt, neg or "", seed, steps, guidance, w, h,
                                   ctx.lora_name(use_lora, lora_adapter, request), strength, fast=bool(fast),
                                   singular_step=bool(singular_step))
                # the drag cache keeps the trajectory: dragging the result skips inversion
                yield from ctx.engine(request).generate_batch(p, batch_count, token, session.preview,
                                                              trajectories=session.drag_cache)

            def batch_items(results):
                return [(r.image, f"seed {r.seed}") for r in results]

            def show(ev):
                values = progress(ev)
                values["status"] += note
                if ev.kind is Kind.RESULTS:  # an image of the batch finished: it shows until the next one does
                    values.update(image=ev.preview, seed=ev.partial[-1].seed)
                    if gallery:
                        values["batch"] = gr.update(value=batch_items(ev.partial), visible=True)
                return values

            def done(ev, session):
                r = ev.result
                session.keep_result("generate", r.image)
                ctx.remember_seed(session, "generate", ev.partial[0].seed if ev.partial else r.seed)
                seeds = f"seeds {ev.partial[0].seed}–{r.seed}" if len(ev.partial or []) > 1 else f"seed {r.seed}"
                values = dict(preview=r.image, image=downloads.result_file(session, r.image, "generate", r.seed),
                              seed=r.seed, status=f"Done · {seeds}{note}")
                if page and gallery:
                    # the batch as named files too: each downloads as generate_seed<seed>_<time>_<n>.png
                    files = downloads.result_files(session, [x.image for x in ev.partial], "generate",
                                                   [x.seed for x in ev.partial])
                    values["batch"] = gr.update(value=[(f, f"seed {x.seed}") for f, x in zip(files, ev.partial)],
                                                visible=True)
                elif page:
                    values["batch"] = gr.update(value=None, visible=False)
                return values

            yield from ctx.run(request, out, work, done, show)
        return run_generate

    # New inputs are appended (the LoRA adapter menu, the batch count, Fast, then the singular step), so older
    # positional calls keep working; left out, the adapter is the Smooth LoRA's, the batch one image, the sampler
    # DDIM and no singular step.
    inputs = [prompt, neg, seed, steps, guid, w, h, lora.use, lora.strength, lora.menu, batch, fast, singular]
    event = run.click(generate_handler(page_out, page=True), inputs, page_out, api_visibility="private", **GPU)
    # the API's /generate: the same job without the gallery output
    api_event = api_only.click(generate_handler(api_out, page=False), inputs, api_out, api_name="generate", **GPU)
    ctx.stop_button(stop, status, [event, api_event], api_name="stop", api_visibility="public")
    return GenerateTab(prompt, send, send_edit, send_ip2p, send_drag)
