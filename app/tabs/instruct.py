"""Instruct (InstructPix2Pix): an image edited by a written instruction, with text and image guidance; or, for a
model with a CoDi model, in Fast (CoDi) mode: 1, 2 or 4 steps, re-run as the instruction or a Fast setting changes."""
from __future__ import annotations

from dataclasses import dataclass

import gradio as gr

from pipelines.codi import DEFAULT_STEPS, MAX_GUIDANCE, MODE, STEPS, CodiParams, codi_guidance
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
STANDARD = "standard"
MODES = [("Standard (InstructPix2Pix)", STANDARD), ("Fast (CoDi)", MODE)]
FAST_INFO = ("Fast: 1, 2 or 4 steps; with an image, the edit re-runs as you type the instruction or change a Fast "
             "setting (with the seed shown)")


def has_codi(model) -> bool:
    return model.codi_config() is not None


def mode_update(model) -> dict:
    """The Mode choice for `model`: Fast (CoDi) only with a CoDi model; otherwise the radio is on Standard,
    disabled, and says why."""
    if has_codi(model):
        return gr.update(interactive=True, info=FAST_INFO)
    return gr.update(value=STANDARD, interactive=False,
                     info=f"Fast (CoDi) needs a CoDi model (a codi/ folder, as the embedded model has); "
                          f"{model.label} has none")


def fast_guidance_update(model) -> dict:
    """The Fast guidance starts at the guidance the model's CoDi model was distilled for (codi.json)."""
    return gr.update(value=codi_guidance(model.codi_config())) if has_codi(model) else gr.skip()


def fast_params(params: dict) -> dict:
    """PNG parameters as the tab's controls take them: a Fast (CoDi) edit's steps and guidance go to the Fast
    controls (not InstructPix2Pix's), and an InstructPix2Pix edit's PNG selects Standard mode."""
    if str(params.get("mode", "")).strip().lower() == MODE:
        guidance = params.get("guidance", params.get("text_guidance"))  # the A1111 text reads CFG scale as sT
        out = {k: v for k, v in params.items() if k not in ("steps", "guidance", "text_guidance")}
        return out | {k: v for k, v in (("fast_steps", params.get("steps")), ("fast_guidance", guidance))
                      if v is not None}
    if params.get("task") == "instruct" and "mode" not in params:
        return {**params, "mode": STANDARD}
    return params


def mode_shown(mode: str) -> tuple:
    """(Standard controls, Fast controls, Standard Edit button, Fast Edit button) visibility for a mode."""
    fast = mode == MODE
    return (gr.update(visible=not fast), gr.update(visible=fast), gr.update(visible=not fast),
            gr.update(visible=fast))


@dataclass
class InstructTab:
    input: gr.Image
    instruction: gr.Textbox


def build(ctx: Context) -> InstructTab:
    model = ctx.studio.model
    with gr.Tab("Instruct (InstructPix2Pix)", id="instruct"):
        with gr.Row():
            with gr.Column():
                image = SafeImage(label="Image", type="filepath", sources=["upload", "clipboard"],
                                  elem_id="ip2p-input")
                world_note.add(ctx, image, "ip2p-photo-note")
                text = gr.Textbox(label="Edit instruction", placeholder="e.g. make the background blue",
                                  elem_id="ip2p-instruction")
                mode = gr.Radio(MODES, value=STANDARD, label="Mode", elem_id="ip2p-mode",
                                **{k: v for k, v in mode_update(model).items() if k in ("interactive", "info")})
                ctx.follow_model(mode, mode_update)
                with gr.Group(visible=False, elem_id="ip2p-fast") as fast_box:
                    with gr.Row():
                        fast_steps = gr.Radio(list(STEPS), value=DEFAULT_STEPS, label="Fast steps",
                                              elem_id="ip2p-fast-steps")
                        fast_g = gr.Slider(0, MAX_GUIDANCE, value=codi_guidance(model.codi_config()), step=0.05,
                                           label="Fast text guidance",
                                           info="Starts at the CoDi model's own; 1 = no guidance (one UNet pass "
                                                "per step)", elem_id="ip2p-fast-guidance")
                        ctx.follow_model(fast_g, fast_guidance_update)
                with gr.Group(elem_id="ip2p-standard") as standard_box:
                    with gr.Row():
                        steps = gr.Slider(1, get_limits().max_steps, value=min(50, get_limits().max_steps), step=1,
                                          label="Steps", elem_id="ip2p-steps")
                        sched = gr.Radio([(label, key) for key, label in SCHEDULERS.items()], value="euler_a",
                                         label="Sampler")
                    with gr.Row():
                        cfg_mode = gr.Radio([FIX_CFG, RANDOM_CFG], value=FIX_CFG, label="CFG mode",
                                            info="Randomize: within 20% of the model's recommended sT and sI "
                                                 "(6-9 and 1.2-1.8 for SD-sized IP2P weights)")
                        text_g, image_g = recommended_guidance(model)
                        text_g = gr.Slider(0, 20, value=text_g, step=0.05, label="Text guidance sT",
                                           info="Starts at the loaded model's recommended value",
                                           elem_id="ip2p-text-guidance")
                        image_g = gr.Slider(0, 5, value=image_g, step=0.05, label="Image guidance sI",
                                            elem_id="ip2p-image-guidance")
                        ctx.guidance += [text_g, image_g]  # a model switch sets them to its recommended scales
                with gr.Row():
                    seed_mode = gr.Radio([FIX_SEED, RANDOM_SEED], value=RANDOM_SEED, label="Seed mode",
                                         elem_id="ip2p-seed-mode")
                    seed = gr.Number(1371, label="Seed", precision=0, elem_id="ip2p-seed")
                ctx.restorable("instruct", instruction=text, steps=steps, scheduler=sched, seed=seed,
                               text_guidance=text_g, image_guidance=image_g, mode=mode, fast_steps=fast_steps,
                               fast_guidance=fast_g, translate=fast_params,
                               when={"seed": (seed_mode, FIX_SEED), "text_guidance": (cfg_mode, FIX_CFG)})
                with gr.Row():
                    run = gr.Button("Edit", variant="primary", elem_id="ip2p-run")
                    run_fast = gr.Button("Edit", variant="primary", visible=False, elem_id="ip2p-run-fast")
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
                ctx.send_row("instruct", ["invert", "edit", "diffedit", "sdedit", "drag", "inpaint"], "edited image")

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

    # Fast (CoDi): its own endpoint, and live re-runs that keep the last result shown until the new one is there
    fast_out = Outputs(preview=preview, edited=result, seed=seed, guidance=fast_g, status=status)
    live_out = Outputs(preview=preview, edited=result, seed=seed, guidance=fast_g, status=status)
    live_out.keep("edited", "preview")

    def fast_job(outputs, image, instruction, steps, seed, guidance, request):
        def work(session, token):
            path = upload_path(image, "an image to edit")
            yield from ctx.engine(request).instruct_fast(path, CodiParams(instruction or "", steps, guidance, seed),
                                                         token, session.preview)

        def done(ev, session):
            r = ev.result
            session.keep_result("instruct", r.edited.image)
            return dict(preview=ev.preview, edited=downloads.result_file(session, r.edited.image, "instruct"),
                        seed=r.params["seed"], guidance=r.params["guidance"], status=f"Done · {ev.message}")

        return ctx.run(request, outputs, work, done)

    def run_instruct_fast(image, instruction, steps, seed_mode, seed, guidance, request: gr.Request):
        yield from fast_job(fast_out, image, instruction, steps, -1 if seed_mode == RANDOM_SEED else seed, guidance,
                            request)

    def live_ticket(mode, image, instruction, ticket):
        """The live re-run's gate: a new ticket, which starts the re-run, only in Fast mode with an image and an
        instruction. The image is checked like every other handler's (a client may send anything here)."""
        if image:
            upload_path(image, "an image to edit")
        if mode != MODE or not image or not (instruction or "").strip():
            return gr.skip()
        return (ticket or 0) + 1

    def rerun_fast(image, instruction, steps, seed, guidance, request: gr.Request):
        """The live re-run, with the seed shown: only the changed setting changes the picture."""
        yield from fast_job(live_out, image, instruction, steps, seed, guidance, request)

    inputs = [image, text, steps, seed_mode, seed, cfg_mode, text_g, image_g, sched]
    event = run.click(run_instruct, inputs, out, api_name="instruct", preprocess=False, **GPU)
    fast_event = run_fast.click(run_instruct_fast, [image, text, fast_steps, seed_mode, seed, fast_g], fast_out,
                                api_name="instruct_fast", preprocess=False, **GPU)
    # live re-runs: typing (each change; while an edit runs, only the latest change waits) or a Fast setting
    # released passes the gate, whose new ticket starts the edit. The gate is queued (the page hears of a State's
    # change from queued events only) but outside the GPU group, so it never waits for a job.
    ticket = gr.State(0)
    gate = dict(api_visibility="private", preprocess=False, trigger_mode="always_last")
    for trigger in (text.change, fast_steps.input, fast_g.release):
        trigger(live_ticket, [mode, image, text, ticket], [ticket], **gate)
    live_events = [ticket.change(rerun_fast, [image, text, fast_steps, seed, fast_g], live_out,
                                 api_visibility="private", preprocess=False, trigger_mode="always_last", **GPU)]
    mode.change(mode_shown, [mode], [standard_box, fast_box, run, run_fast], queue=False, api_visibility="private")
    # named: the bare name "stop" belongs to the Generate tab's public endpoint
    ctx.stop_button(stop, status, [event, fast_event, *live_events], api_name="instruct_stop")

    def reuse_result(request: gr.Request):
        """The last edit this session made becomes the input (kept server-side, never a client's path)."""
        session = ctx.sessions.peek(request)
        path = session.handoff_png("instruct") if session is not None else None
        if path is None:
            raise InputError("There is no edited image to reuse yet.")
        return path

    reuse.click(reuse_result, None, [image], api_visibility="private", queue=False)
    return InstructTab(image, text)
