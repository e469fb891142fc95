"""Interpolate (real images): two uploads inverted, then frames between their inversions; the second
interpolation mode, as its own tab next to the seeds one (same controls and outputs)."""
from __future__ import annotations

import gradio as gr

from pipelines.core.events import Kind
from pipelines.core.limits import get_limits
from pipelines.real_interpolation import RealInterpolationParams

from .. import downloads, examples, world_note
from ..context import Context, inversion_controls, steps_slider
from ..runner import GPU, Outputs, progress
from ..streaming import upload_path
from ..uploads import SafeImage
from .sequences import compare_cleared, compare_done, compare_progress, comparison_outputs, distance_frame


def build(ctx: Context) -> None:
    with gr.Tab("Interpolate (real images)", id="interpolate-images"):
        with gr.Row():
            with gr.Column():
                with gr.Row():
                    image_a = SafeImage(label="Image A", type="filepath", sources=["upload", "clipboard"],
                                        height=200, elem_id="rint-image-a")
                    world_note.add(ctx, image_a, "rint-photo-note-a")
                    image_b = SafeImage(label="Image B", type="filepath", sources=["upload", "clipboard"],
                                        height=200, elem_id="rint-image-b")
                    world_note.add(ctx, image_b, "rint-photo-note-b")
                prompt_a = gr.Textbox(label="Prompt A (describing image A)", elem_id="rint-prompt-a")
                prompt_b = gr.Textbox(label="Prompt B (describing image B; empty = prompt A)")
                method, inner, force = inversion_controls("rint")
                with gr.Row():
                    steps = steps_slider(50, "rint-steps")
                    guid = gr.Slider(0, 20, value=7.5, step=0.1, label="Guidance")
                lora = ctx.lora_controls("rint")
                eta = gr.Slider(0, 1, value=0.5, step=0.01, label="Interpolation ratio eta (scrub me)",
                                elem_id="rint-eta")
                frames = gr.Slider(2, get_limits().max_frames, value=11, step=1, label="Frames in sequence",
                                   elem_id="rint-frames")
                ctx.restorable("interpolate-images", prompt=prompt_a, prompt_b=prompt_b, inversion=method,
                               inner_steps=inner, steps=steps, guidance=guid, lora=lora, interpolation_eta=eta)
                with gr.Row():
                    run = gr.Button("Render frame", variant="primary", elem_id="rint-frame")
                    seq = gr.Button("Render sequence", elem_id="rint-seq")
                    stop = gr.Button("Stop", variant="stop", elem_id="rint-stop")
                cmp = ctx.compare_button("rint", lora)
                status = gr.Markdown("", elem_id="rint-status")
                gr.Examples(examples.IMAGE_PAIRS, [image_a, image_b, prompt_a, prompt_b])
            with gr.Column():
                frame = gr.Image(label="Frame", format="png", type="filepath", interactive=False, height=320,
                                 elem_id="rint-frame-img")
                gallery = gr.Gallery(label="Sequence", columns=6, format="png", elem_id="rint-gallery")
                gif = gr.Image(label="Animation (GIF)", type="filepath", interactive=False)
                mp4 = gr.Video(label="Animation (MP4)", interactive=False, elem_id="rint-mp4")
                istd = gr.Number(label="ISTD (std of adjacent-frame L2 distances, pixels in [0,1])",
                                 interactive=False)
                plot = gr.LinePlot(x="pair", y="distance", title="Adjacent-frame distances",
                                   x_title="frame pair k→k+1", y_title="L2 distance")
                compared = comparison_outputs("rint")

    frame_out = Outputs(frame=frame, status=status)
    seq_out = Outputs(frame=frame, frames=gallery, gif=gif, mp4=mp4, istd=istd, plot=plot, status=status)
    cmp_out = Outputs(**compared, status=status)

    def params(pa, pb, inversion, inner_steps, force, steps, guidance, use_lora, strength, adapter, request=None):
        return RealInterpolationParams(pa or "", pb or "", steps, guidance, inversion, inner_steps, bool(force),
                                       ctx.lora_name(use_lora, adapter, request), strength)

    def uploads(image_a, image_b):
        return upload_path(image_a, "image A"), upload_path(image_b, "image B")

    def run_real_frame(image_a, image_b, prompt_a, prompt_b, inversion, inner_steps, force, steps, guidance,
                       use_lora, strength, eta, lora_adapter=None, request: gr.Request = None):
        def work(session, token):
            a, b = uploads(image_a, image_b)
            p = params(prompt_a, prompt_b, inversion, inner_steps, force, steps, guidance, use_lora, strength,
                       lora_adapter, request)
            yield from ctx.engine(request).real_interpolation_frame(a, b, p, eta, session.inversion_cache, token,
                                                                    session.preview)

        def done(ev, session):
            note = " (inversion reused from cache)" if ev.cached else ""
            return dict(frame=downloads.result_file(session, ev.result.image, "interpolate_images"),
                        status=f"Frame at eta={float(eta):.2f}{note}")

        yield from ctx.run(request, frame_out, work, done, show=lambda ev: progress(ev, "frame"))

    def run_real_sequence(image_a, image_b, prompt_a, prompt_b, inversion, inner_steps, force, steps, guidance,
                          use_lora, strength, n, lora_adapter=None, request: gr.Request = None):
        def work(session, token):
            a, b = uploads(image_a, image_b)
            p = params(prompt_a, prompt_b, inversion, inner_steps, force, steps, guidance, use_lora, strength,
                       lora_adapter, request)
            yield from ctx.engine(request).real_interpolation_sequence(a, b, p, n, session.inversion_cache, token,
                                                                       session.preview, gif_dir=session.out_dir)

        def done(ev, session):
            r = ev.result
            files = downloads.result_files(session, r.frames, "interpolate_images")
            return dict(frame=files[-1], frames=files,
                        gif=downloads.result_file(session, r.gif_path, "interpolate_images"),
                        mp4=downloads.result_file(session, r.mp4_path, "interpolate_images"), istd=r.istd,
                        plot=distance_frame(r.distances), status=f"{len(r.frames)} frames · ISTD {r.istd:.4f}")

        def show(ev):
            # partial: the loss curve while fitting null-text, then the frames rendered so far
            values = progress(ev, "frame")
            if ev.kind is Kind.FRAMES:
                values["frames"] = ev.partial
            return values

        yield from ctx.run(request, seq_out, work, done, show)

    def run_real_compare(image_a, image_b, prompt_a, prompt_b, inversion, inner_steps, force, steps, guidance,
                         strength, n, lora_adapter=None, request: gr.Request = None):
        def work(session, token):
            a, b = uploads(image_a, image_b)
            p = params(prompt_a, prompt_b, inversion, inner_steps, force, steps, guidance, True, strength,
                       lora_adapter, request)
            yield from ctx.engine(request).real_interpolation_compare(a, b, p, n, session.inversion_cache, token,
                                                                      session.preview)

        yield from ctx.run(request, cmp_out, work, compare_done, compare_progress,
                           start=compare_cleared("Comparing: inverting and rendering without the LoRA, then with "
                                                 "it ..."))

    # Raw uploads (preprocess=False) so the pipeline's loader reports unreadable files itself.
    common = [image_a, image_b, prompt_a, prompt_b, method, inner, force, steps, guid, lora.use, lora.strength]
    frame_event = run.click(run_real_frame, common + [eta, lora.menu], frame_out,
                            api_name="interpolate_images_frame", preprocess=False, **GPU)
    scrub = eta.release(run_real_frame, common + [eta, lora.menu], frame_out, api_visibility="private",
                        trigger_mode="always_last", preprocess=False, **GPU)
    seq_event = seq.click(run_real_sequence, common + [frames, lora.menu], seq_out,
                          api_name="interpolate_images_sequence", preprocess=False, **GPU)
    cmp_event = cmp.click(run_real_compare, [image_a, image_b, prompt_a, prompt_b, method, inner, force, steps, guid,
                                             lora.strength, frames, lora.menu], cmp_out,
                          api_name="interpolate_images_compare", preprocess=False, **GPU)
    ctx.stop_button(stop, status, [frame_event, scrub, seq_event, cmp_event])
