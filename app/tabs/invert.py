"""Invert: an upload inverted (DDIM, null-text or negative-prompt inversion) and reconstructed, with the
null-text loss curve and reconstruction metrics."""
from __future__ import annotations

from dataclasses import dataclass

import gradio as gr
import pandas as pd

from pipelines.core.events import Kind
from pipelines.inversion import InversionParams

from .. import downloads, examples, world_note
from ..context import Context, LoraControls, inversion_controls, steps_slider
from ..runner import GPU, Outputs
from ..streaming import status_line, upload_path
from ..uploads import SafeImage

LOSS_PLOT_COLUMNS = ("step", "loss")


def loss_frame(losses) -> pd.DataFrame:
    """The null-text loss curve (one value per inversion step, 1-based) as LinePlot data; empty for DDIM."""
    losses = [float(v) for v in (losses or [])]
    return pd.DataFrame({"step": list(range(1, len(losses) + 1)), "loss": losses}, columns=list(LOSS_PLOT_COLUMNS))


def rounded_metrics(metrics: dict, **extra) -> dict:
    out = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in metrics.items()}
    return {**out, **extra}


@dataclass
class InvertTab:
    input: gr.Image
    prompt: gr.Textbox
    method: gr.Radio
    inner: gr.Slider
    steps: gr.Slider
    guidance: gr.Slider
    lora: LoraControls
    send_edit: gr.Button


def build(ctx: Context) -> InvertTab:
    with gr.Tab("Invert", id="invert"):
        with gr.Row():
            with gr.Column():
                image = SafeImage(label="Image", type="filepath", sources=["upload", "clipboard"],
                                  elem_id="inv-input")
                world_note.add(ctx, image, "invert-photo-note")
                prompt = gr.Textbox(label="Prompt describing the image (empty = unconditional)")
                method, inner, force = inversion_controls("inv")
                with gr.Row():
                    steps = steps_slider(50, "inv-steps")
                    guid = gr.Slider(0, 20, value=7.5, step=0.1, label="Reconstruction guidance w",
                                     info="Null-text methods fit their null embeddings to this w")
                inv_g = gr.Slider(0, 20, value=1.0, step=0.1, label="Inversion guidance (DDIM only)",
                                  info="Only DDIM inversion uses it: null-text and negative-prompt "
                                       "inversion always invert at 1")
                lora = ctx.lora_controls("inv")
                ctx.restorable("invert", prompt=prompt, inversion=method, inner_steps=inner, steps=steps, guidance=guid,
                               inversion_guidance=inv_g, lora=lora)
                with gr.Row():
                    run = gr.Button("Invert and reconstruct", variant="primary", elem_id="inv-run")
                    stop = gr.Button("Stop", variant="stop", elem_id="inv-stop")
                status = gr.Markdown("", elem_id="inv-status")
                gr.Examples(examples.IMAGES, [image, prompt])
            with gr.Column():
                preview = gr.Image(label="Live preview", format="jpeg", interactive=False, height=256,
                                   elem_id="inv-preview")
                with gr.Row():
                    source = gr.Image(label="Source (as the model sees it)", format="png", interactive=False,
                                      height=256, elem_id="inv-source")
                    recon = gr.Image(label="Reconstruction", format="png", type="filepath", interactive=False,
                                     height=256, elem_id="inv-result")
                loss = gr.LinePlot(loss_frame([]), x="step", y="loss", title="Null-text loss per step",
                                   x_title="inversion step", y_title="fitted loss", y_axis_format=".1e",
                                   elem_id="inv-loss")
                metrics = gr.JSON(label="Reconstruction metrics (PSNR / SSIM / MSE) and UNet evaluations")
                send_edit = gr.Button("Edit this image (reuses the inversion)")
                ctx.send_row("invert", ["instruct", "diffedit", "sdedit", "drag", "inpaint"], "reconstruction")

    out = Outputs(preview=preview, source=source, reconstruction=recon, loss=loss, metrics=metrics, status=status)

    def run_invert(image, prompt, steps, inv_g, guidance, use_lora, strength, method, inner_steps,
                   force, lora_adapter=None, request: gr.Request = None):
        def work(session, token):
            path = upload_path(image, "an image to invert")
            session.keep_result("invert_input", path)  # a checked upload: "Edit this image" passes it on
            p = InversionParams(prompt or "", steps, inv_g, guidance, ctx.lora_name(use_lora, lora_adapter, request),
                                strength, method=method, inner_steps=inner_steps, force=bool(force))
            yield from ctx.engine(request).invert(path, p, session.inversion_cache, token, session.preview)

        def done(ev, session):
            r = ev.result
            note = " (inversion reused from cache)" if r.cached else ""
            return dict(preview=r.reconstruction.image, source=r.source,
                        reconstruction=downloads.result_file(session, r.reconstruction.image, "invert"),
                        loss=loss_frame(r.losses), metrics=rounded_metrics(r.metrics, method=r.method, cached=r.cached),
                        status=f"Done{note} · {ev.message}")

        def show(ev):
            values = {"status": status_line(ev)}
            if ev.kind is Kind.SOURCE:
                values.update(source=ev.preview, loss=loss_frame([]))  # a new run starts with an empty loss plot
            elif ev.preview is not None:
                values["preview"] = ev.preview
            if ev.kind is Kind.LOSSES:
                values["loss"] = loss_frame(ev.partial)  # null-text fitting streams the curve so far
            return values

        yield from ctx.run(request, out, work, done, show)

    # New inputs are appended after the original seven, so older positional calls keep working.
    inputs = [image, prompt, steps, inv_g, guid, lora.use, lora.strength, method, inner, force, lora.menu]
    event = run.click(run_invert, inputs, out, api_name="invert", preprocess=False, **GPU)
    ctx.stop_button(stop, status, [event])
    return InvertTab(image, prompt, method, inner, steps, guid, lora, send_edit)
