"""Instruct (InstructPix2Pix): an image edited by a written instruction, with text and image guidance."""
from __future__ import annotations

from dataclasses import dataclass

import gradio as gr

from pipelines.core.errors import InputError
from pipelines.core.limits import get_limits
from pipelines.instruct import SCHEDULERS, InstructParams, recommended_guidance

from .. import downloads, examples, world_note
from ..context import Context
from ..runner import GPU, Outputs
from ..streaming import upload_path
from ..uploads import SafeImage

RANDOM_SEED, FIX_SEED = "Randomize seed", "Fix seed"
RANDOM_CFG, FIX_CFG = "Randomize CFG", "Fix CFG"
INSTRUCT_HELP = """**Tuning.** Edit too weak: lower the image guidance sI or raise the text guidance sT.
Image changes too much: raise sI or lower sT. Try another seed, rephrase the instruction, or use more steps.
sI below 1 still guides (unlike diffusers' pipeline, which then drops all guidance)."""


@dataclass
class InstructTab:
    input: gr.Image
    instruction: gr.Textbox


def build(ctx: Context) -> InstructTab:
    with gr.Tab("Instruct (InstructPix2Pix)", id="instruct"):
        with gr.Row():
            with gr.Column():
                image = SafeImage(label="Image", type="filepath", sources=["upload", "clipboard"],
                                  elem_id="ip2p-input")
                world_note.add(ctx, image, "ip2p-photo-note")
                text = gr.Textbox(label="Edit instruction", placeholder="e.g. make the background blue",
                                  elem_id="ip2p-instruction")
                with gr.Row():
                    steps = gr.Slider(1, get_limits().max_steps, value=min(50, get_limits().max_steps), step=1,
                                      label="Steps", elem_id="ip2p-steps")
                    sched = gr.Radio([(label, key) for key, label in SCHEDULERS.items()], value="euler_a",
                                     label="Sampler")
                with gr.Row():
                    seed_mode = gr.Radio([FIX_SEED, RANDOM_SEED], value=RANDOM_SEED, label="Seed mode",
                                         elem_id="ip2p-seed-mode")
                    seed = gr.Number(1371, label="Seed", precision=0, elem_id="ip2p-seed")
                with gr.Row():
                    cfg_mode = gr.Radio([FIX_CFG, RANDOM_CFG], value=FIX_CFG, label="CFG mode",
                                        info="Randomize: within 20% of the model's recommended sT and sI "
                                             "(6-9 and 1.2-1.8 for SD-sized IP2P weights)")
                    text_g, image_g = recommended_guidance(ctx.studio.model)
                    text_g = gr.Slider(0, 20, value=text_g, step=0.05, label="Text guidance sT",
                                       info="Starts at the loaded model's recommended value",
                                       elem_id="ip2p-text-guidance")
                    image_g = gr.Slider(0, 5, value=image_g, step=0.05, label="Image guidance sI",
                                        elem_id="ip2p-image-guidance")
                    ctx.guidance += [text_g, image_g]  # a model switch sets them to its recommended scales
                ctx.restorable("instruct", instruction=text, steps=steps, scheduler=sched, seed=seed,
                               text_guidance=text_g, image_guidance=image_g,
                               when={"seed": (seed_mode, FIX_SEED), "text_guidance": (cfg_mode, FIX_CFG)})
                with gr.Row():
                    run = gr.Button("Edit", variant="primary", elem_id="ip2p-run")
                    stop = gr.Button("Stop", variant="stop", elem_id="ip2p-stop")
                    reuse = gr.Button("Use result as input", elem_id="ip2p-reuse")
                status = gr.Markdown("", elem_id="ip2p-status")
                gr.Markdown(INSTRUCT_HELP)
                gr.Examples(examples.INSTRUCTIONS, [image, text])
            with gr.Column():
                preview = gr.Image(label="Live preview", format="jpeg", interactive=False, height=256,
                                   elem_id="ip2p-preview")
                result = gr.Image(label="Edited", format="png", type="filepath", interactive=False, height=256,
                                  elem_id="ip2p-result")
                ctx.send_row("instruct", ["invert", "edit", "diffedit", "sdedit", "drag"], "edited image")

    out = Outputs(preview=preview, edited=result, seed=seed, text_guidance=text_g, image_guidance=image_g,
                  status=status)

    def run_instruct(image, instruction, steps, seed_mode, seed, cfg_mode, text_g, image_g, scheduler,
                     request: gr.Request):
        def work(session, token):
            path = upload_path(image, "an image to edit")
            p = InstructParams(instruction or "", text_g, image_g, steps, seed, scheduler,
                               randomize_seed=seed_mode == RANDOM_SEED, randomize_cfg=cfg_mode == RANDOM_CFG)
            yield from ctx.engine(request).instruct(path, p, token, session.preview)

        def done(ev, session):
            r = ev.result
            session.keep_result("instruct", r.edited.image)
            return dict(preview=ev.preview, edited=downloads.result_file(session, r.edited.image, "instruct"),
                        seed=r.params["seed"],
                        text_guidance=r.params["text_guidance"], image_guidance=r.params["image_guidance"],
                        status=f"Done · {ev.message}")

        yield from ctx.run(request, out, work, done)

    inputs = [image, text, steps, seed_mode, seed, cfg_mode, text_g, image_g, sched]
    event = run.click(run_instruct, inputs, out, api_name="instruct", preprocess=False, **GPU)
    # named: the bare name "stop" belongs to the Generate tab's public endpoint
    ctx.stop_button(stop, status, [event], api_name="instruct_stop")

    def reuse_result(request: gr.Request):
        """The last edit this session made becomes the input (kept server-side, never a client's path)."""
        session = ctx.sessions.peek(request)
        path = session.handoff_png("instruct") if session is not None else None
        if path is None:
            raise InputError("There is no edited image to reuse yet.")
        return path

    reuse.click(reuse_result, None, [image], api_visibility="private", queue=False)
    return InstructTab(image, text)
