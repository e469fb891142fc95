"""Edit (text): a real image edited by its prompt, by a prompt switch at threshold r or by Prompt-to-Prompt
(attention replace, refine, reweight, local blend), on its cached inversion."""
from __future__ import annotations

from dataclasses import dataclass

import gradio as gr

from pipelines.edit import EditParams
from pipelines.inversion import METHODS as INVERSION_METHODS
from pipelines.p2p import MODES as P2P_MODES
from pipelines.p2p import P2PSettings

from .. import downloads, examples, world_note
from ..context import Context, LoraControls, inversion_controls, steps_slider
from ..runner import GPU, Outputs
from ..streaming import upload_path
from ..uploads import SafeImage


@dataclass
class EditTab:
    input: gr.Image
    source_prompt: gr.Textbox
    inversion: gr.Radio
    inner: gr.Slider
    steps: gr.Slider
    guidance: gr.Slider
    lora: LoraControls


def build(ctx: Context) -> EditTab:
    with gr.Tab("Edit (text)", id="edit"):
        with gr.Row():
            with gr.Column():
                image = SafeImage(label="Image", type="filepath", sources=["upload", "clipboard"],
                                  elem_id="edit-input")
                world_note.add(ctx, image, "edit-photo-note")
                src = gr.Textbox(label="Source prompt (describing the image)", elem_id="edit-source-prompt")
                tgt = gr.Textbox(label="Target prompt (describing the edit)", elem_id="edit-target-prompt")
                method = gr.Radio([("Threshold r (prompt switch)", "threshold"), ("Prompt-to-Prompt", "p2p")],
                                  value="threshold", label="Edit method", elem_id="edit-method")
                r = gr.Slider(0, 1, value=0.8, step=0.05, label="Threshold r", elem_id="edit-r",
                              info="Source prompt while t > T·r, target prompt after (0 = reconstruction)")
                inv, inner, force = inversion_controls("edit-inv", EditParams.inversion)
                with gr.Row():
                    steps = steps_slider(50, "edit-steps")
                    guid = gr.Slider(0, 20, value=7.5, step=0.1, label="Guidance")
                lora = ctx.lora_controls("edit")
                with gr.Accordion("Prompt-to-Prompt", open=False) as p2p:
                    mode = gr.Radio(list(P2P_MODES), value="replace", label="Mode",
                                    info="replace: swap words one for one · refine: add or change words · "
                                         "reweight: only scale words' attention")
                    with gr.Row():
                        cross = gr.Slider(0, 1, value=0.8, step=0.05, label="Cross-attention replace steps")
                        self_ = gr.Slider(0, 1, value=0.4, step=0.05, label="Self-attention replace steps")
                    with gr.Row():
                        rw_words = gr.Textbox(label="Re-weight words (of the target prompt, comma-separated)")
                        rw_scale = gr.Slider(-5, 10, value=2.0, step=0.1, label="Re-weight scale")
                    with gr.Row():
                        blend = gr.Textbox(label="Local blend words (comma-separated; empty = off)")
                        blend_t = gr.Slider(0.05, 0.95, value=P2PSettings.blend_threshold, step=0.05,
                                            label="Blend threshold",
                                            info="On the words' attention maps rescaled to [0, 1] "
                                                 "(min to max); higher = tighter region")
                        blend_keep = gr.Checkbox(value=P2PSettings.keep_background,
                                                 label="Keep the input outside the blend region",
                                                 info="The decoder spreads the edit over the whole image; "
                                                      "this pastes the input back outside the region")
                ctx.restorable("edit", source_prompt=src, prompt=tgt, edit_method=method, r=r, inversion=inv,
                               inner_steps=inner, steps=steps, guidance=guid, lora=lora, p2p_mode=mode,
                               cross_replace_steps=cross, self_replace_steps=self_, reweight_words=rw_words,
                               reweight_scale=rw_scale, blend_words=blend, blend_threshold=blend_t,
                               keep_background=blend_keep)
                with gr.Row():
                    run = gr.Button("Edit", variant="primary", elem_id="edit-run")
                    stop = gr.Button("Stop", variant="stop", elem_id="edit-stop")
                status = gr.Markdown("", elem_id="edit-status")
                gr.Examples(examples.EDITS, [image, src, tgt])
            with gr.Column():
                preview = gr.Image(label="Live preview", format="jpeg", interactive=False, height=256,
                                   elem_id="edit-preview")
                edited = gr.Image(label="Edited", format="png", type="filepath", interactive=False, height=256,
                                  elem_id="edit-result")
                with gr.Row():
                    recon = gr.Image(label="Source reconstruction", format="png", interactive=False, height=200,
                                     elem_id="edit-recon")
                    mask = gr.Image(label="Local blend mask", format="png", interactive=False, height=200,
                                    elem_id="edit-mask")
                ctx.send_row("edit", ["invert", "edit", "instruct", "diffedit", "sdedit", "drag", "inpaint"],
                             "edited image")

    out = Outputs(preview=preview, edited=edited, reconstruction=recon, mask=mask, status=status)

    def run_edit(image, source_prompt, target_prompt, method, r, inversion, inner_steps, force, steps, guidance,
                 use_lora, strength, p2p_mode, cross_replace_steps, self_replace_steps, reweight_words,
                 reweight_scale, blend_words, blend_threshold, blend_keep, lora_adapter=None,
                 request: gr.Request = None):
        def work(session, token):
            path = upload_path(image, "an image to edit")
            settings = P2PSettings(mode=p2p_mode, cross_replace_steps=cross_replace_steps,
                                   self_replace_steps=self_replace_steps, reweight_words=reweight_words or "",
                                   reweight_scale=reweight_scale, blend_words=blend_words or "",
                                   blend_threshold=blend_threshold, keep_background=bool(blend_keep))
            p = EditParams(source_prompt or "", target_prompt or "", method, r, steps, guidance, inversion,
                           inner_steps, bool(force), ctx.lora_name(use_lora, lora_adapter, request), strength,
                           settings)
            yield from ctx.engine(request).edit(path, p, session.inversion_cache, token, session.preview)

        def done(ev, session):
            res = ev.result
            note = " (inversion reused from cache)" if res.cached else ""
            what = (f"threshold r={res.params['r']:g}" if res.params["edit_method"] == "threshold"
                    else f"Prompt-to-Prompt ({res.params['p2p_mode']})")
            return dict(preview=res.edited.image, edited=downloads.result_file(session, res.edited.image, "edit"),
                        reconstruction=res.reconstruction,
                        mask=res.mask, status=f"Done{note} · {what} · {INVERSION_METHODS[res.params['inversion']]}")

        yield from ctx.run(request, out, work, done)

    inputs = [image, src, tgt, method, r, inv, inner, force, steps, guid, lora.use, lora.strength, mode, cross,
              self_, rw_words, rw_scale, blend, blend_t, blend_keep, lora.menu]
    event = run.click(run_edit, inputs, out, api_name="edit", preprocess=False, **GPU)
    ctx.stop_button(stop, status, [event])

    def edit_method_changed(method):
        p2p_chosen = method == "p2p"
        return gr.update(visible=not p2p_chosen), gr.update(open=p2p_chosen)

    method.change(edit_method_changed, [method], [r, p2p], api_visibility="private", queue=False)
    return EditTab(image, src, inv, inner, steps, guid, lora)
