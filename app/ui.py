"""The Gradio Blocks studio. UI only: every handler starts a pipeline job and renders its events."""
from __future__ import annotations


import pandas as pd
import gradio as gr

from pipelines.errors import InputError
from pipelines.generate import GenerateParams
from pipelines.interpolation import InterpolationParams
from pipelines.inversion import InversionParams
from pipelines.lora import SMOOTH_LORA_REPO
from pipelines.models import model_choices
from pipelines.stream import PreviewOptions
from pipelines.studio import Studio

from . import examples
from .sessions import SessionRegistry
from .streaming import status_line, stream

GPU = dict(concurrency_id="gpu", concurrency_limit=1)  # one GPU job at a time, across all sessions

EXAMPLE_PROMPTS, EXAMPLE_PAIRS, EXAMPLE_IMAGES = examples.PROMPTS, examples.PAIRS, examples.IMAGES


def build_demo(studio: Studio, sessions: SessionRegistry | None = None) -> gr.Blocks:
    sessions = sessions or SessionRegistry()

    def model_status(m=None) -> str:
        m = m or studio.model
        text = f"**Active model:** {m.display_name}"
        if m.random_weights and "random weights" not in m.label:
            text += " · ⚠️ random weights, for testing"
        if studio.notice and m is studio.model:
            text += f"\n\n{studio.notice}"
        if m.loras:
            text += f"\n\n**Loaded LoRA:** {', '.join(m.loras)}"
        return text

    def lora_name(use_lora: bool):
        if not use_lora:
            return None
        if not studio.model.loras:
            raise InputError("No LoRA is loaded for this model: load the Smooth LoRA (or another LoRA file) "
                             "in the LoRA panel first.")
        return list(studio.model.loras)[-1]

    def size_slider(label: str) -> gr.Slider:
        m = studio.model
        return gr.Slider(m.size_multiple, max(1024, m.resolution), value=m.resolution, step=m.size_multiple, label=label)

    def lora_controls():
        with gr.Row():
            return (gr.Checkbox(False, label="Use LoRA (Smooth LoRA)"),
                    gr.Slider(0, 2, value=1.0, step=0.05, label="LoRA strength"))

    def steps_slider(default: int, elem_id: str | None = None) -> gr.Slider:
        return gr.Slider(1, 150, value=default, step=1, label="Steps", elem_id=elem_id)

    def stopped(n: int, status_index: int):
        def make():
            out = [gr.skip()] * n
            out[status_index] = "Stopped."
            return tuple(out)
        return make

    with gr.Blocks(title="Diffusion Studio", delete_cache=(600, 3600)) as demo:
        gr.Markdown("# Diffusion Studio")
        status_md = gr.Markdown(model_status(), elem_id="model-status")
        with gr.Accordion("Model and LoRA", open=False):
            with gr.Row():
                model_dd = gr.Dropdown(model_choices(), value=studio.model.id, allow_custom_value=True,
                                       label="Model (Hub id, local diffusers folder, or a listed one)", scale=4)
                model_btn = gr.Button("Load model", scale=1)
            with gr.Row():
                lora_src = gr.Textbox(SMOOTH_LORA_REPO, label="LoRA (.safetensors path, or Hub repo[:file])", scale=4)
                lora_btn = gr.Button("Load LoRA", scale=1)
            load_status = gr.Markdown("")
            preview_full = gr.Slider(0, 50, value=0, step=1, elem_id="preview-full-every",
                                     label="Previews: full VAE decode every k steps (0 = fast linear latent preview on every step)")

        with gr.Tabs() as tabs:
            # ---------------------------------------------------------------- Generate
            with gr.Tab("Generate", id="generate"):
                with gr.Row():
                    with gr.Column():
                        g_prompt = gr.Textbox(label="Prompt", lines=2, elem_id="gen-prompt")
                        g_neg = gr.Textbox(label="Negative prompt")
                        with gr.Row():
                            g_seed = gr.Number(-1, label="Seed (-1 = random)", precision=0)
                            g_steps = steps_slider(30, "gen-steps")
                            g_guid = gr.Slider(0, 20, value=7.5, step=0.1, label="Guidance")
                        with gr.Row():
                            g_w, g_h = size_slider("Width"), size_slider("Height")
                        g_lora, g_lora_s = lora_controls()
                        with gr.Row():
                            g_run = gr.Button("Generate", variant="primary", elem_id="gen-run")
                            g_stop = gr.Button("Stop", variant="stop", elem_id="gen-stop")
                        gr.Examples(EXAMPLE_PROMPTS, [g_prompt])
                    with gr.Column():
                        g_preview = gr.Image(label="Live preview (predicted x0)", format="jpeg", interactive=False, height=320, elem_id="gen-preview")
                        g_image = gr.Image(label="Result", format="png", type="filepath", interactive=False, height=320, elem_id="gen-result")
                        g_seed_used = gr.Number(label="Seed used", precision=0, interactive=False)
                        g_status = gr.Markdown("", elem_id="gen-status")
                        g_send = gr.Button("Send to Invert")

            # ---------------------------------------------------------------- Interpolate
            with gr.Tab("Interpolate (seeds)", id="interpolate"):
                with gr.Row():
                    with gr.Column():
                        i_prompt_a = gr.Textbox(label="Prompt A", elem_id="int-prompt-a")
                        i_prompt_b = gr.Textbox(label="Prompt B (optional; empty = prompt A)")
                        i_neg = gr.Textbox(label="Negative prompt")
                        with gr.Row():
                            i_seed_a = gr.Number(0, label="Seed A", precision=0)
                            i_seed_b = gr.Number(1, label="Seed B", precision=0)
                        with gr.Row():
                            i_steps = steps_slider(30)
                            i_guid = gr.Slider(0, 20, value=7.5, step=0.1, label="Guidance")
                        with gr.Row():
                            i_w, i_h = size_slider("Width"), size_slider("Height")
                        i_lora, i_lora_s = lora_controls()
                        i_eta = gr.Slider(0, 1, value=0.5, step=0.01, label="Interpolation ratio eta (scrub me)", elem_id="int-eta")
                        i_frames = gr.Slider(2, 64, value=11, step=1, label="Frames in sequence")
                        with gr.Row():
                            i_run = gr.Button("Render frame", variant="primary", elem_id="int-frame")
                            i_seq = gr.Button("Render sequence", elem_id="int-seq")
                            i_stop = gr.Button("Stop", variant="stop", elem_id="int-stop")
                        gr.Examples(EXAMPLE_PAIRS, [i_prompt_a, i_prompt_b])
                    with gr.Column():
                        i_frame = gr.Image(label="Frame", format="png", type="filepath", interactive=False, height=320, elem_id="int-frame-img")
                        i_status = gr.Markdown("", elem_id="int-status")
                        i_send = gr.Button("Send frame to Invert")
                        i_gallery = gr.Gallery(label="Sequence", columns=6, format="png", elem_id="int-gallery")
                        i_gif = gr.Image(label="Animation (GIF)", type="filepath", interactive=False)
                        i_istd = gr.Number(label="ISTD (std of adjacent-frame L2 distances, pixels in [0,1])", interactive=False)
                        i_plot = gr.LinePlot(x="pair", y="distance", title="Adjacent-frame distances", x_title="frame pair k→k+1", y_title="L2 distance")

            # ---------------------------------------------------------------- Invert
            with gr.Tab("Invert", id="invert"):
                with gr.Row():
                    with gr.Column():
                        v_input = gr.Image(label="Image", type="filepath", sources=["upload", "clipboard"], elem_id="inv-input")
                        v_prompt = gr.Textbox(label="Prompt describing the image (empty = unconditional)")
                        with gr.Row():
                            v_steps = steps_slider(50)
                            v_inv_g = gr.Slider(0, 20, value=1.0, step=0.1, label="Inversion guidance")
                            v_guid = gr.Slider(0, 20, value=1.0, step=0.1, label="Reconstruction guidance w (try 7.5)")
                        v_lora, v_lora_s = lora_controls()
                        with gr.Row():
                            v_run = gr.Button("Invert and reconstruct", variant="primary", elem_id="inv-run")
                            v_stop = gr.Button("Stop", variant="stop")
                        gr.Examples(EXAMPLE_IMAGES, [v_input, v_prompt])
                    with gr.Column():
                        v_preview = gr.Image(label="Live preview", format="jpeg", interactive=False, height=256, elem_id="inv-preview")
                        with gr.Row():
                            v_source = gr.Image(label="Source (as the model sees it)", format="png", interactive=False, height=256, elem_id="inv-source")
                            v_recon = gr.Image(label="Reconstruction", format="png", type="filepath", interactive=False, height=256, elem_id="inv-result")
                        v_metrics = gr.JSON(label="PSNR / SSIM / MSE")
                        v_status = gr.Markdown("", elem_id="inv-status")

        # -------------------------------------------------------------------- handlers
        def run_generate(prompt, neg, seed, steps, guidance, w, h, use_lora, strength, request: gr.Request):
            token = sessions.get(request).new_job()

            def render(ev, final):
                if final:
                    r = ev.result
                    return r.image, r.image, r.seed, f"Done · seed {r.seed}"
                return (ev.preview if ev.preview is not None else gr.skip()), gr.skip(), gr.skip(), status_line(ev)

            def job():
                p = GenerateParams(prompt, neg or "", seed, steps, guidance, w, h, lora_name(use_lora), strength)
                yield from studio.generate(p, token, sessions.get(request).preview)

            yield from stream(job(), render, stopped(4, 3), cancel=token)

        def interp_params(pa, pb, neg, sa, sb, steps, guidance, w, h, use_lora, strength):
            return InterpolationParams(pa, pb or "", neg or "", sa, sb, steps, guidance, w, h, lora_name(use_lora), strength)

        def run_frame(pa, pb, neg, sa, sb, steps, guidance, w, h, use_lora, strength, eta, request: gr.Request):
            session = sessions.get(request)
            token = session.new_job()

            def render(ev, final):
                if final:
                    return ev.result.image, f"Frame at eta={float(eta):.2f} · seeds {ev.result.params['seed_a']} → {ev.result.params['seed_b']}"
                return (ev.preview if ev.preview is not None else gr.skip()), status_line(ev)

            def job():
                p = interp_params(pa, pb, neg, sa, sb, steps, guidance, w, h, use_lora, strength)
                yield from studio.interpolation_frame(p, eta, session.interpolation_cache, token, session.preview)

            yield from stream(job(), render, stopped(2, 1), cancel=token)

        def run_sequence(pa, pb, neg, sa, sb, steps, guidance, w, h, use_lora, strength, n, request: gr.Request):
            session = sessions.get(request)
            token = session.new_job()

            def render(ev, final):
                if final:
                    r = ev.result
                    plot = pd.DataFrame({"pair": list(range(len(r.distances))), "distance": r.distances})
                    return (r.frames[-1], r.frames, r.gif_path, r.istd, plot,
                            f"{len(r.frames)} frames · ISTD {r.istd:.4f}")
                frames = ev.partial if ev.partial is not None else gr.skip()
                return (ev.preview if ev.preview is not None else gr.skip()), frames, gr.skip(), gr.skip(), gr.skip(), status_line(ev)

            def job():
                p = interp_params(pa, pb, neg, sa, sb, steps, guidance, w, h, use_lora, strength)
                yield from studio.interpolation_sequence(p, n, session.interpolation_cache, token, session.preview,
                                                         gif_dir=session.out_dir)

            yield from stream(job(), render, stopped(6, 5), cancel=token)

        def run_invert(image, prompt, steps, inv_g, guidance, use_lora, strength, request: gr.Request):
            session = sessions.get(request)
            token = session.new_job()

            def render(ev, final):
                if final:
                    r = ev.result
                    metrics = {k: round(v, 4) for k, v in r.metrics.items()}
                    note = " (inversion reused from cache)" if r.cached else ""
                    return r.reconstruction.image, r.source, r.reconstruction.image, metrics, f"Done{note} · {ev.message}"
                src = ev.preview if ev.stage == "encoding image" else gr.skip()
                prev = ev.preview if ev.preview is not None and ev.stage != "encoding image" else gr.skip()
                return prev, src, gr.skip(), gr.skip(), status_line(ev)

            def job():
                # Raw (unpreprocessed) upload: our own loader reports corrupt or odd files clearly.
                path = image.get("path") if isinstance(image, dict) else image
                if not path:
                    raise InputError("Please upload an image to invert.")
                p = InversionParams(prompt or "", steps, inv_g, guidance, lora_name(use_lora), strength)
                yield from studio.invert(path, p, session.inversion_cache, token, session.preview)

            yield from stream(job(), render, stopped(5, 4), cancel=token)

        def run_load_model(source):
            # The final event carries the new model; it is rendered before switch_model makes it studio.model.
            def render(ev, final):
                return (model_status(ev.result) if final else gr.skip()), status_line(ev), *sizes(ev.result if final else None)

            def sizes(m):
                if m is None:
                    return [gr.skip()] * 4
                # One dict per slider: Gradio pops "value" from an update dict while postprocessing it, so a
                # shared dict ([upd] * 4) would set the value of the first slider only.
                return [gr.update(minimum=m.size_multiple, maximum=max(1024, m.resolution), step=m.size_multiple,
                                  value=m.resolution) for _ in range(4)]

            yield from stream(studio.switch_model(source), render, lambda: (gr.skip(), "Stopped.", *[gr.skip()] * 4))

        def run_load_lora(source):
            def render(ev, final):
                return (model_status() if final else gr.skip()), status_line(ev)

            yield from stream(studio.load_lora(source), render, lambda: (gr.skip(), "Stopped."))

        def set_preview_mode(k, request: gr.Request):
            k = int(k or 0)
            sessions.get(request).preview = PreviewOptions(every=0 if k else 1, full_decode_every=k)

        preview_full.change(set_preview_mode, [preview_full], None, api_visibility="private")

        def stop(request: gr.Request):
            sessions.get(request).token.cancel()
            # Said here too: Gradio's cancel (cancels=...) usually ends the event before the job's own
            # "Stopped." update is delivered, which would leave the last progress line showing.
            return "Stopped."

        g_inputs = [g_prompt, g_neg, g_seed, g_steps, g_guid, g_w, g_h, g_lora, g_lora_s]
        g_event = g_run.click(run_generate, g_inputs, [g_preview, g_image, g_seed_used, g_status], api_name="generate", **GPU)
        g_stop.click(stop, None, g_status, cancels=[g_event], api_name="stop", queue=False)

        i_common = [i_prompt_a, i_prompt_b, i_neg, i_seed_a, i_seed_b, i_steps, i_guid, i_w, i_h, i_lora, i_lora_s]
        i_event = i_run.click(run_frame, i_common + [i_eta], [i_frame, i_status], api_name="interpolate_frame", **GPU)
        # Scrubbing: render the frame where the slider is released; only the latest position matters.
        i_scrub = i_eta.release(run_frame, i_common + [i_eta], [i_frame, i_status], api_visibility="private",
                                trigger_mode="always_last", **GPU)
        i_seq_event = i_seq.click(run_sequence, i_common + [i_frames],
                                  [i_frame, i_gallery, i_gif, i_istd, i_plot, i_status], api_name="interpolate_sequence", **GPU)
        i_stop.click(stop, None, i_status, cancels=[i_event, i_scrub, i_seq_event], api_visibility="private", queue=False)

        v_event = v_run.click(run_invert, [v_input, v_prompt, v_steps, v_inv_g, v_guid, v_lora, v_lora_s],
                              [v_preview, v_source, v_recon, v_metrics, v_status], api_name="invert",
                              preprocess=False, **GPU)
        v_stop.click(stop, None, v_status, cancels=[v_event], api_visibility="private", queue=False)

        model_btn.click(run_load_model, [model_dd], [status_md, load_status, g_w, g_h, i_w, i_h],
                        api_name="load_model", **GPU)
        lora_btn.click(run_load_lora, [lora_src], [status_md, load_status], api_name="load_lora", **GPU)

        def send_to_invert(image, prompt):
            return image, prompt, gr.Tabs(selected="invert")

        g_send.click(send_to_invert, [g_image, g_prompt], [v_input, v_prompt, tabs], api_visibility="private")
        i_send.click(send_to_invert, [i_frame, i_prompt_a], [v_input, v_prompt, tabs], api_visibility="private")

        demo.load(model_status, None, status_md, api_visibility="private")

        def drop_session(request: gr.Request):
            sessions.drop(request)

        demo.unload(drop_session)
    return demo
