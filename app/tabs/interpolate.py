"""Interpolate (seeds): frames between two seeds and prompts, scrubbing, sequences with their smoothness (ISTD),
and the sequence with and without the LoRA."""
from __future__ import annotations

import json
from dataclasses import dataclass

import gradio as gr

from pipelines.core.limits import get_limits
from pipelines.interpolation import InterpolationParams

from .. import downloads, examples
from ..context import Context, steps_slider
from ..runner import GPU, Outputs, progress
from .sequences import compare_cleared, compare_done, compare_progress, comparison_outputs, distance_frame


@dataclass
class InterpolateTab:
    prompt_a: gr.Textbox
    send_invert: gr.Button
    send_edit: gr.Button


def build(ctx: Context) -> InterpolateTab:
    with gr.Tab("Interpolate (seeds)", id="interpolate"):
        with gr.Row():
            with gr.Column():
                prompt_a = gr.Textbox(label="Prompt A", elem_id="int-prompt-a")
                prompt_b = gr.Textbox(label="Prompt B (optional; empty = prompt A)")
                neg = gr.Textbox(label="Negative prompt")
                with gr.Row():
                    seed_a = ctx.seed_controls("interpolate-a", 0, label="Seed A", elem_id="int-seed-a")
                    seed_b = ctx.seed_controls("interpolate-b", 1, label="Seed B", elem_id="int-seed-b")
                with gr.Row():
                    steps = steps_slider(30, "int-steps")
                    guid = gr.Slider(0, 20, value=7.5, step=0.1, label="Guidance")
                with gr.Row():
                    w, h = ctx.size_slider("Width"), ctx.size_slider("Height")
                lora = ctx.lora_controls("int")
                eta = gr.Slider(0, 1, value=0.5, step=0.01, label="Interpolation ratio eta (scrub me)",
                                elem_id="int-eta")
                frames = gr.Slider(2, get_limits().max_frames, value=11, step=1, label="Frames in sequence",
                                   elem_id="int-frames")
                ctx.restorable("interpolate", prompt=prompt_a, prompt_b=prompt_b, negative_prompt=neg, seed_a=seed_a,
                               seed_b=seed_b, steps=steps, guidance=guid, width=w, height=h, lora=lora,
                               interpolation_eta=eta)
                with gr.Row():
                    run = gr.Button("Render frame", variant="primary", elem_id="int-frame")
                    seq = gr.Button("Render sequence", elem_id="int-seq")
                    stop = gr.Button("Stop", variant="stop", elem_id="int-stop")
                cmp = ctx.compare_button("int", lora)
                status = gr.Markdown("", elem_id="int-status")
                gr.Examples(examples.PAIRS, [prompt_a, prompt_b])
            with gr.Column():
                frame = gr.Image(label="Frame", format="png", type="filepath", interactive=False, height=320,
                                 elem_id="int-frame-img")
                with gr.Row():
                    send = gr.Button("Send frame to Invert")
                    send_edit = gr.Button("Send frame to Edit")
                gallery = gr.Gallery(label="Sequence", columns=6, format="png", elem_id="int-gallery")
                gif = gr.Image(label="Animation (GIF)", type="filepath", interactive=False)
                # H.264 / yuv420p MP4 (pipelines/core/video.py): browsers play it inline, Gradio needs no conversion
                mp4 = gr.Video(label="Animation (MP4)", interactive=False, elem_id="int-mp4")
                istd = gr.Number(label="ISTD (std of adjacent-frame L2 distances, pixels in [0,1])", interactive=False)
                plot = gr.LinePlot(x="pair", y="distance", title="Adjacent-frame distances", x_title="frame pair k→k+1",
                                   y_title="L2 distance")
                compared = comparison_outputs("int")

    frame_out = Outputs(frame=frame, status=status)
    seq_out = Outputs(frame=frame, frames=gallery, gif=gif, istd=istd, plot=plot, status=status, mp4=mp4)
    cmp_out = Outputs(**compared, status=status)

    def params(pa, pb, neg, sa, sb, steps, guidance, w, h, use_lora, strength, adapter, request=None):
        return InterpolationParams(pa, pb or "", neg or "", sa, sb, steps, guidance, w, h,
                                   ctx.lora_name(use_lora, adapter, request), strength)

    def run_frame(pa, pb, neg, sa, sb, steps, guidance, w, h, use_lora, strength, eta, lora_adapter=None,
                  request: gr.Request = None):
        def work(session, token):
            p = params(pa, pb, neg, sa, sb, steps, guidance, w, h, use_lora, strength, lora_adapter, request)
            yield from ctx.engine(request).interpolation_frame(p, eta, session.interpolation_cache, token,
                                                               session.preview)

        def done(ev, session):
            session.keep_result("frame", ev.result.image)
            remember_seeds(session, ev.result.params)
            seeds = f"seeds {ev.result.params['seed_a']} → {ev.result.params['seed_b']}"
            return dict(frame=downloads.result_file(session, ev.result.image, "interpolate"),
                        status=f"Frame at eta={float(eta):.2f} · {seeds}")

        yield from ctx.run(request, frame_out, work, done, show=lambda ev: progress(ev, "frame"))

    def remember_seeds(session, params: dict):
        """Seeds A and B as the run used them (a -1 became a random seed), for the "reuse last seed" buttons."""
        ctx.remember_seed(session, "interpolate-a", params.get("seed_a"))
        ctx.remember_seed(session, "interpolate-b", params.get("seed_b"))

    def run_sequence(pa, pb, neg, sa, sb, steps, guidance, w, h, use_lora, strength, n, lora_adapter=None,
                     request: gr.Request = None):
        def work(session, token):
            p = params(pa, pb, neg, sa, sb, steps, guidance, w, h, use_lora, strength, lora_adapter, request)
            yield from ctx.engine(request).interpolation_sequence(p, n, session.interpolation_cache, token,
                                                                  session.preview, gif_dir=session.out_dir)

        def done(ev, session):
            r = ev.result
            session.keep_result("frame", r.frames[-1])
            remember_seeds(session, json.loads(r.frames[-1].info.get("studio") or "{}"))  # the frames' parameters
            files = downloads.result_files(session, r.frames, "interpolate")
            seeds = downloads.seed_label(r.frames[-1])  # the animations are named like the frames
            return dict(frame=files[-1], frames=files,
                        gif=downloads.result_file(session, r.gif_path, "interpolate", seeds), istd=r.istd,
                        plot=distance_frame(r.distances), status=f"{len(r.frames)} frames · ISTD {r.istd:.4f}",
                        mp4=downloads.result_file(session, r.mp4_path, "interpolate", seeds))

        def show(ev):
            values = progress(ev, "frame")
            if ev.partial is not None:
                values["frames"] = ev.partial
            return values

        yield from ctx.run(request, seq_out, work, done, show)

    def run_compare(pa, pb, neg, sa, sb, steps, guidance, w, h, strength, n, lora_adapter=None,
                    request: gr.Request = None):
        def work(session, token):
            p = params(pa, pb, neg, sa, sb, steps, guidance, w, h, True, strength, lora_adapter, request)
            yield from ctx.engine(request).interpolation_compare(p, n, session.interpolation_cache, token,
                                                                 session.preview)

        yield from ctx.run(request, cmp_out, work, compare_done, compare_progress,
                           start=compare_cleared("Comparing: the sequence without the LoRA, then with it ..."))

    # The LoRA adapter menu is each endpoint's last input (older positional calls keep working).
    common = [prompt_a, prompt_b, neg, seed_a, seed_b, steps, guid, w, h, lora.use, lora.strength]
    frame_event = run.click(run_frame, common + [eta, lora.menu], frame_out, api_name="interpolate_frame", **GPU)
    # Scrubbing: render the frame where the slider is released; only the latest position matters.
    scrub = eta.release(run_frame, common + [eta, lora.menu], frame_out, api_visibility="private",
                        trigger_mode="always_last", **GPU)
    seq_event = seq.click(run_sequence, common + [frames, lora.menu], seq_out, api_name="interpolate_sequence",
                          **GPU)
    cmp_event = cmp.click(run_compare, [prompt_a, prompt_b, neg, seed_a, seed_b, steps, guid, w, h, lora.strength,
                                        frames, lora.menu], cmp_out, api_name="interpolate_compare", **GPU)
    ctx.stop_button(stop, status, [frame_event, scrub, seq_event, cmp_event])
    return InterpolateTab(prompt_a, send, send_edit)
