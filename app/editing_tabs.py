"""The instruction, mask and stroke editing tabs: InstructPix2Pix, DiffEdit and SDEdit. UI only: each handler
starts a pipeline job on the studio and renders its events (app/streaming.py)."""
from __future__ import annotations

from dataclasses import dataclass

import gradio as gr
import numpy as np
from PIL import Image

from pipelines.diffedit import DiffEditParams
from pipelines.errors import InputError
from pipelines.limits import get_limits
from pipelines.instruct import SCHEDULERS, InstructParams, recommended_guidance
from pipelines.sdedit import SDEditParams

from . import examples, masks
from .uploads import SafeImage, SafeImageEditor, SafeImageMask
from .streaming import in_progress, shown_preview, status_line, stopped, stream, upload_path

GPU = dict(concurrency_id="gpu", concurrency_limit=1)  # the same queue as every other GPU event
RANDOM_SEED, FIX_SEED = "Randomize seed", "Fix seed"
RANDOM_CFG, FIX_CFG = "Randomize CFG", "Fix CFG"
WORLD_COLOURS = ["#ff0000", "#00a000", "#0000ff", "#ffd700", "#ff8c00", "#800080", "#ff69b4", "#ffffff",
                 "#000000", "#808080"]

INSTRUCT_HELP = """**Tuning.** Edit too weak: lower the image guidance sI or raise the text guidance sT.
Image changes too much: raise sI or lower sT. Try another seed, rephrase the instruction, or use more steps.
sI below 1 still guides (unlike diffusers' pipeline, which then drops all guidance)."""
DIFFEDIT_HELP = """**1. Estimate mask** compares the model's noise predictions for the target and source prompts
(10 noise draws at encode strength 0.5) and shows the region as a translucent layer: paint to add to it,
erase to remove. **2. Apply edit** inverts the image to the encoding ratio r and decodes it with the target
prompt, keeping the inverted image outside the mask. With nothing painted, Apply estimates the mask itself."""
SDEDIT_HELP = """Pick the brush in the canvas toolbar and paint coarse colour strokes on the blank canvas or on an
uploaded picture. **Strength t0**
trades faithfulness for realism: low values stay close to the strokes, high values give cleaner,
more realistic images that follow them less (SDEdit's paper works at 0.3-0.6 on pixel models; SD-class latent
models often need 0.5-0.8). *Keep unpainted regions* repaints only the strokes (masked SDEdit)."""


@dataclass
class EditingTabs:
    instruct_input: gr.Image
    instruct_text: gr.Textbox
    instruct_guidance: list  # [sT slider, sI slider]: a model switch sets them to its recommended scales


def build_editing_tabs(studio, sessions, stop, engine=None) -> EditingTabs:
    """Adds the three tabs inside the caller's gr.Tabs and wires their events; `stop` is the studio's Stop
    handler (cancels the session's job); `engine(request)` is the studio the request's session runs on."""
    engine = engine or (lambda request: studio)

    def model_image(img: Image.Image, request) -> Image.Image:
        return masks.shrink_display(img, engine(request).model.resolution)

    # ---------------------------------------------------------------------------- InstructPix2Pix
    with gr.Tab("Instruct (InstructPix2Pix)", id="instruct"):
        with gr.Row():
            with gr.Column():
                n_input = SafeImage(label="Image", type="filepath", sources=["upload", "clipboard"],
                                   elem_id="ip2p-input")
                n_text = gr.Textbox(label="Edit instruction", placeholder="e.g. make the background blue",
                                    elem_id="ip2p-instruction")
                with gr.Row():
                    n_steps = gr.Slider(1, get_limits().max_steps, value=min(50, get_limits().max_steps), step=1, label="Steps")
                    n_sched = gr.Radio([(label, key) for key, label in SCHEDULERS.items()], value="euler_a",
                                       label="Sampler")
                with gr.Row():
                    n_seed_mode = gr.Radio([FIX_SEED, RANDOM_SEED], value=RANDOM_SEED, label="Seed mode")
                    n_seed = gr.Number(1371, label="Seed", precision=0, elem_id="ip2p-seed")
                with gr.Row():
                    n_cfg_mode = gr.Radio([FIX_CFG, RANDOM_CFG], value=FIX_CFG, label="CFG mode",
                                          info="Randomize: within 20% of the model's recommended sT and sI "
                                               "(6-9 and 1.2-1.8 for SD-sized IP2P weights)")
                    text_g, image_g = recommended_guidance(studio.model)
                    n_text_g = gr.Slider(0, 20, value=text_g, step=0.05, label="Text guidance sT",
                                         info="Starts at the loaded model's recommended value",
                                         elem_id="ip2p-text-guidance")
                    n_image_g = gr.Slider(0, 5, value=image_g, step=0.05, label="Image guidance sI",
                                          elem_id="ip2p-image-guidance")
                with gr.Row():
                    n_run = gr.Button("Edit", variant="primary", elem_id="ip2p-run")
                    n_stop = gr.Button("Stop", variant="stop", elem_id="ip2p-stop")
                    n_reuse = gr.Button("Use result as input", elem_id="ip2p-reuse")
                gr.Markdown(INSTRUCT_HELP)
                gr.Examples(examples.INSTRUCTIONS, [n_input, n_text])
            with gr.Column():
                n_preview = gr.Image(label="Live preview", format="jpeg", interactive=False, height=256,
                                     elem_id="ip2p-preview")
                n_result = gr.Image(label="Edited", format="png", type="filepath", interactive=False, height=256,
                                    elem_id="ip2p-result")
                n_status = gr.Markdown("", elem_id="ip2p-status")

    # ---------------------------------------------------------------------------- DiffEdit
    with gr.Tab("DiffEdit (mask)", id="diffedit"):
        with gr.Row():
            with gr.Column():
                # PNG, not the default WebP: a lossy alpha channel would grow the mask by its artefacts
                d_editor = SafeImageMask(label="Image and mask (paint to add, erase to remove)", type="numpy", format="png",
                                        sources=["upload", "clipboard"], elem_id="diffedit-editor",
                                        brush=gr.Brush(colors=["#ff28c8"], color_mode="fixed", default_size=24))
                d_target = gr.Textbox(label="Target prompt (what the edited image shows)", elem_id="diffedit-target")
                d_source = gr.Textbox(label="Source prompt (what the image shows; optional)",
                                      elem_id="diffedit-source")
                with gr.Row():
                    d_threshold = gr.Slider(0, 1, value=0.5, step=0.01, label="Mask threshold",
                                            info="On the normalised difference map (paper: 0.5); higher = smaller mask")
                    d_ratio = gr.Slider(0, 1, value=0.8, step=0.01, label="Encoding ratio r",
                                        info="How far the image is inverted before decoding (more = bigger change)")
                with gr.Accordion("Mask estimate and sampling", open=False):
                    with gr.Row():
                        d_mask_strength = gr.Slider(0.05, 0.95, value=0.5, step=0.05, label="Mask encode strength")
                        d_draws = gr.Slider(1, 32, value=10, step=1, label="Noise draws")
                        d_seed = gr.Number(0, label="Mask noise seed (-1 = random)", precision=0)
                    with gr.Row():
                        d_steps = gr.Slider(1, get_limits().max_steps, value=min(50, get_limits().max_steps), step=1, label="Steps")
                        d_guid = gr.Slider(0, 20, value=7.5, step=0.1, label="Guidance")
                with gr.Row():
                    d_mask_btn = gr.Button("1. Estimate mask", elem_id="diffedit-mask")
                    d_run = gr.Button("2. Apply edit", variant="primary", elem_id="diffedit-run")
                    d_stop = gr.Button("Stop", variant="stop", elem_id="diffedit-stop")
                gr.Markdown(DIFFEDIT_HELP)
                gr.Examples(examples.DIFFEDITS, [d_editor, d_target, d_source], elem_id="diffedit-examples")
            with gr.Column():
                d_preview = gr.Image(label="Live preview", format="jpeg", interactive=False, height=256,
                                     elem_id="diffedit-preview")
                d_result = gr.Image(label="Edited", format="png", type="filepath", interactive=False, height=256,
                                    elem_id="diffedit-result")
                with gr.Row():
                    d_heat = gr.Image(label="Difference map (normalised)", format="png", interactive=False,
                                      height=180, elem_id="diffedit-heat")
                    d_used = gr.Image(label="Mask used", format="png", interactive=False, height=180,
                                      elem_id="diffedit-used")
                d_status = gr.Markdown("", elem_id="diffedit-status")

    # ---------------------------------------------------------------------------- SDEdit
    with gr.Tab("SDEdit (strokes)", id="sdedit"):
        with gr.Row():
            with gr.Column():
                s_canvas = SafeImageEditor(label="Canvas: paint strokes on the blank canvas or on an uploaded image",
                                          type="numpy", image_mode="RGBA", format="png", sources=["upload", "clipboard"],
                                          canvas_size=(masks.DISPLAY_SIDE, masks.DISPLAY_SIDE),
                                          brush=gr.Brush(colors=WORLD_COLOURS, default_size=32),
                                          elem_id="sdedit-canvas")
                s_prompt = gr.Textbox(label="Prompt", elem_id="sdedit-prompt")
                s_neg = gr.Textbox(label="Negative prompt")
                s_strength = gr.Slider(0.3, 0.9, value=0.6, step=0.01, label="Strength t0",
                                       info="Low: faithful to the strokes · high: realistic, less faithful",
                                       elem_id="sdedit-strength")
                with gr.Row():
                    s_steps = gr.Slider(1, get_limits().max_steps, value=min(50, get_limits().max_steps), step=1, label="Steps (full schedule)")
                    s_guid = gr.Slider(0, 20, value=7.5, step=0.1, label="Guidance")
                with gr.Row():
                    s_seed = gr.Number(-1, label="Seed (-1 = random)", precision=0)
                    s_repeats = gr.Slider(1, 8, value=1, step=1, label="Repeats N (candidates)")
                    s_keep = gr.Checkbox(False, label="Keep unpainted regions (masked SDEdit)")
                with gr.Row():
                    s_run = gr.Button("Generate", variant="primary", elem_id="sdedit-run")
                    s_stop = gr.Button("Stop", variant="stop", elem_id="sdedit-stop")
                gr.Markdown(SDEDIT_HELP)
                gr.Examples(examples.SDEDITS, [s_canvas, s_prompt, s_strength])
            with gr.Column():
                s_preview = gr.Image(label="Live preview", format="jpeg", interactive=False, height=256,
                                     elem_id="sdedit-preview")
                s_gallery = gr.Gallery(label="Results (pick one)", columns=4, format="png", elem_id="sdedit-gallery")
                s_status = gr.Markdown("", elem_id="sdedit-status")

    # ---------------------------------------------------------------------------- handlers
    def run_instruct(image, instruction, steps, seed_mode, seed, cfg_mode, text_g, image_g, scheduler,
                     request: gr.Request):
        session = sessions.get(request)
        token = session.new_job()

        def render(ev, final):
            if final:
                r = ev.result
                session.keep_result("instruct", r.edited.image)
                return (ev.preview, r.edited.image, r.params["seed"], r.params["text_guidance"],
                        r.params["image_guidance"], f"Done · {ev.message}")
            return in_progress(ev, 4)

        def job():
            path = upload_path(image, "an image to edit")
            p = InstructParams(instruction or "", text_g, image_g, steps, seed, scheduler,
                               randomize_seed=seed_mode == RANDOM_SEED, randomize_cfg=cfg_mode == RANDOM_CFG)
            yield from engine(request).instruct(path, p, token, session.preview)

        yield from stream(job(), render, stopped(6, 5), cancel=token)

    def diffedit_params(target, source, threshold, ratio, mask_strength, draws, seed, steps, guidance):
        return DiffEditParams(target or "", source or "", threshold, mask_strength, draws, ratio, steps, guidance,
                              seed)

    def editor_picture(editor, request) -> Image.Image:
        return model_image(masks.require_picture(masks.background(editor), "an image to edit"), request)

    def run_diffedit_mask(editor, target, source, threshold, ratio, mask_strength, draws, seed, steps, guidance,
                          request: gr.Request):
        settings = (target, source, threshold, ratio, mask_strength, draws, seed, steps, guidance)
        session = sessions.get(request)
        token = session.new_job()

        def render(ev, final):
            if final:
                m = ev.result
                heat = Image.fromarray((np.clip(m.heat, 0, 1) * 255).astype(np.uint8))
                share = 100 * float(m.mask.mean())
                return (masks.editor_value(m.source, m.mask), masks.enlarge_for_display(heat),
                        f"Mask estimated: {share:.0f}% of the image. Paint or erase on it, then Apply edit.")
            return gr.skip(), gr.skip(), status_line(ev)

        def job():
            yield from engine(request).diffedit_mask(editor_picture(editor, request), diffedit_params(*settings), token, session.preview)

        yield from stream(job(), render, stopped(3, 2), cancel=token)

    def run_diffedit(editor, target, source, threshold, ratio, mask_strength, draws, seed, steps, guidance,
                     request: gr.Request):
        settings = (target, source, threshold, ratio, mask_strength, draws, seed, steps, guidance)
        session = sessions.get(request)
        token = session.new_job()
        hand_mask = masks.painted(editor)

        def render(ev, final):
            if final:
                r = ev.result
                how = "your mask" if hand_mask is not None else "an estimated mask (nothing was painted)"
                note = " · inversion reused" if r.cached else ""
                return (ev.preview, r.edited.image, masks.enlarge_for_display(r.overlay),
                        f"Done with {how}: {100 * float(r.mask.mean()):.0f}% of the image{note}")
            return in_progress(ev, 2)

        def job():
            yield from engine(request).diffedit(editor_picture(editor, request), diffedit_params(*settings), hand_mask,
                                       session.diffedit_cache, token, session.preview)

        yield from stream(job(), render, stopped(4, 3), cancel=token)

    def run_sdedit(canvas, prompt, neg, strength, steps, guidance, seed, repeats, keep, request: gr.Request):
        session = sessions.get(request)
        token = session.new_job()

        def render(ev, final):
            if final:
                r = ev.result
                gallery = [(im.image, f"seed {im.seed}") for im in r.images]
                return (ev.preview, gallery, f"Done · {len(r.images)} candidate(s) · {r.params['steps_run']} "
                                             f"steps from t={r.params['start_timestep']}")
            done = [(im.image, f"seed {im.seed}") for im in ev.partial] if ev.partial is not None else gr.skip()
            return shown_preview(ev), done, status_line(ev)

        def job():
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
            yield from engine(request).sdedit(model_image(guide, request), p, mask, token, session.preview)

        yield from stream(job(), render, stopped(3, 2), cancel=token)

    n_inputs = [n_input, n_text, n_steps, n_seed_mode, n_seed, n_cfg_mode, n_text_g, n_image_g, n_sched]
    n_event = n_run.click(run_instruct, n_inputs, [n_preview, n_result, n_seed, n_text_g, n_image_g, n_status],
                          api_name="instruct", preprocess=False, **GPU)
    n_stop.click(stop, None, n_status, cancels=[n_event], api_name="instruct_stop", api_visibility="private",
                 queue=False)  # named: the bare name "stop" belongs to the Generate tab's public endpoint
    def reuse_result(request: gr.Request):
        """The last edit this session made becomes the input (kept server-side, never a client's path)."""
        session = sessions.peek(request)
        path = session.handoff_png("instruct") if session is not None else None
        if path is None:
            raise InputError("There is no edited image to reuse yet.")
        return path

    n_reuse.click(reuse_result, None, [n_input], api_visibility="private", queue=False)

    d_settings = [d_target, d_source, d_threshold, d_ratio, d_mask_strength, d_draws, d_seed, d_steps, d_guid]
    d_mask_event = d_mask_btn.click(run_diffedit_mask, [d_editor] + d_settings, [d_editor, d_heat, d_status],
                                    api_name="diffedit_mask", **GPU)
    d_event = d_run.click(run_diffedit, [d_editor] + d_settings, [d_preview, d_result, d_used, d_status],
                          api_name="diffedit", **GPU)
    d_stop.click(stop, None, d_status, cancels=[d_mask_event, d_event], api_name="diffedit_stop",
                 api_visibility="private", queue=False)

    s_inputs = [s_canvas, s_prompt, s_neg, s_strength, s_steps, s_guid, s_seed, s_repeats, s_keep]
    s_event = s_run.click(run_sdedit, s_inputs, [s_preview, s_gallery, s_status], api_name="sdedit", **GPU)
    s_stop.click(stop, None, s_status, cancels=[s_event], api_name="sdedit_stop", api_visibility="private",
                 queue=False)
    return EditingTabs(n_input, n_text, [n_text_g, n_image_g])
