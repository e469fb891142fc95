"""Generate: text to image with a live preview of the predicted x0."""
from __future__ import annotations

from dataclasses import dataclass

import gradio as gr

from pipelines.generate import GenerateParams

from .. import downloads, examples
from ..context import Context, steps_slider
from ..runner import GPU, Outputs


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
                    seed = gr.Number(-1, label="Seed (-1 = random)", precision=0, elem_id="gen-seed")
                    steps = steps_slider(30, "gen-steps")
                    guid = gr.Slider(0, 20, value=7.5, step=0.1, label="Guidance")
                with gr.Row():
                    w, h = ctx.size_slider("Width"), ctx.size_slider("Height")
                lora = ctx.lora_controls("gen")
                ctx.restorable("generate", prompt=prompt, negative_prompt=neg, seed=seed, steps=steps, guidance=guid,
                               width=w, height=h, lora=lora)
                with gr.Row():
                    run = gr.Button("Generate", variant="primary", elem_id="gen-run")
                    stop = gr.Button("Stop", variant="stop", elem_id="gen-stop")
                gr.Examples(examples.PROMPTS, [prompt])
            with gr.Column():
                preview = gr.Image(label="Live preview (predicted x0)", format="jpeg", interactive=False, height=320,
                                   elem_id="gen-preview")
                image = gr.Image(label="Result", format="png", type="filepath", interactive=False, height=320,
                                 elem_id="gen-result")
                seed_used = gr.Number(label="Seed used", precision=0, interactive=False)
                status = gr.Markdown("", elem_id="gen-status")
                with gr.Row():
                    send = gr.Button("Send to Invert")
                    send_edit = gr.Button("Send to Edit")
                    send_ip2p = gr.Button("Send to Instruct")
                    send_drag = gr.Button("Send to Drag", elem_id="gen-send-drag")

    out = Outputs(preview=preview, image=image, seed=seed_used, status=status)

    def run_generate(prompt, neg, seed, steps, guidance, w, h, use_lora, strength, lora_adapter=None,
                     request: gr.Request = None):
        def work(session, token):
            p = GenerateParams(prompt, neg or "", seed, steps, guidance, w, h,
                               ctx.lora_name(use_lora, lora_adapter, request), strength)
            # the drag cache keeps the trajectory: dragging the result skips inversion
            yield from ctx.engine(request).generate(p, token, session.preview, trajectories=session.drag_cache)

        def done(ev, session):
            r = ev.result
            session.keep_result("generate", r.image)
            return dict(preview=r.image, image=downloads.result_file(session, r.image, "generate", r.seed), seed=r.seed,
                        status=f"Done · seed {r.seed}")

        yield from ctx.run(request, out, work, done)

    # The LoRA adapter menu is the endpoint's last input (older positional calls keep working; left out, the
    # adapter is the Smooth LoRA's).
    inputs = [prompt, neg, seed, steps, guid, w, h, lora.use, lora.strength, lora.menu]
    event = run.click(run_generate, inputs, out, api_name="generate", **GPU)
    ctx.stop_button(stop, status, [event], api_name="stop", api_visibility="public")
    return GenerateTab(prompt, send, send_edit, send_ip2p, send_drag)
