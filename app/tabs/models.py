"""The "Model and LoRA" panel above the tabs: load a model or a LoRA (hosted: pick from the allow-lists), unload
a LoRA, the preview mode; after every load (and on page load) the controls that follow the active model are
updated in every tab. Two steps: `build` lays the panel out before the tabs, `wire` connects it once every tab
exists (its events update their controls)."""
from __future__ import annotations

from dataclasses import dataclass

import gradio as gr

from pipelines.core.errors import InputError
from pipelines.core.lora import SMOOTH_LORA_REPO
from pipelines.core.models import model_choices
from pipelines.core.stream import PreviewOptions
from pipelines.instruct import recommended_guidance

from ..context import Context, compare_label, use_label
from ..runner import GPU, Outputs, render_job


@dataclass
class ModelPanel:
    active: gr.Markdown        # the active model, above the panel
    model: gr.Dropdown
    load_model: gr.Button
    lora: gr.Component         # hosted: a menu of the offered LoRAs; else a free source text
    load_lora: gr.Button
    unload_lora: gr.Button
    message: gr.Markdown
    singdiffusion: gr.Textbox | None = None        # a SingDiffusion module folder (local studios only)
    load_singdiffusion: gr.Button | None = None


def build(ctx: Context) -> ModelPanel:
    studio, hosting = ctx.studio, ctx.hosting
    active = gr.Markdown(ctx.model_status(), elem_id="model-status")
    with gr.Accordion("Model and LoRA", open=False):
        with gr.Row():
            if hosting.public:  # only the host's allow-listed models
                model = gr.Dropdown(hosting.models, value=studio.model.id, label="Model", scale=4)
            else:
                model = gr.Dropdown(model_choices(), value=studio.model.id, allow_custom_value=True,
                                    label="Model (Hub id, local diffusers folder, or a listed one)", scale=4)
            load_model = gr.Button("Load model", scale=1)
        with gr.Row():
            if hosting.public:
                lora = gr.Dropdown(list(hosting.loras), value=next(iter(hosting.loras), None),
                                   label="LoRA (offered by this studio)", scale=4, elem_id="lora-source")
            else:
                lora = gr.Textbox(SMOOTH_LORA_REPO, scale=4, elem_id="lora-source",
                                  label="LoRA (.safetensors path, or Hub repo[:file]; to unload: its adapter name)")
            load_lora = gr.Button("Load LoRA", scale=1, elem_id="lora-load")
            unload_lora = gr.Button("Unload LoRA", scale=1, elem_id="lora-unload", visible=not hosting.public)
        singdiffusion = load_singdiffusion = None
        if not hosting.public:  # a local folder of the server: not offered to visitors of a hosted studio
            with gr.Row():
                singdiffusion = gr.Textbox("", scale=4, elem_id="singdiffusion-source",
                                           label="SingDiffusion module (local folder: config.json + "
                                                 "diffusion_pytorch_model.safetensors)")
                load_singdiffusion = gr.Button("Load module", scale=1, elem_id="singdiffusion-load")
        message = gr.Markdown("", elem_id="load-status")
        preview_full = gr.Slider(0, 50, value=0, step=1, elem_id="preview-full-every",
                                 label="Previews: full VAE decode every k steps (0 = fast linear latent preview on "
                                       "every step)")

    def set_preview_mode(k, request: gr.Request):
        k = int(k or 0)
        ctx.sessions.get(request).preview = PreviewOptions(every=0 if k else 1, full_decode_every=k)

    preview_full.change(set_preview_mode, [preview_full], None, api_visibility="private")
    return ModelPanel(active, model, load_model, lora, load_lora, unload_lora, message, singdiffusion,
                      load_singdiffusion)


def wire(ctx: Context, panel: ModelPanel, demo: gr.Blocks) -> None:
    studio, sessions, hosting = ctx.studio, ctx.sessions, ctx.hosting
    # `status` is the load message (Stop and progress lines go there); `active` the active model's description
    model_out = Outputs(active=panel.active, status=panel.message, sizes=ctx.sizes, guidance=ctx.guidance)
    lora_out = Outputs(active=panel.active, status=panel.message)

    def model_sizes(m) -> dict:
        """The size sliders' range and default, and the recommended guidance, of model m (updates, not values: the
        endpoint has always returned them so). One dict per slider: Gradio pops "value" from an update dict while
        postprocessing it, so a shared one would set the first slider only."""
        return dict(sizes=[gr.update(minimum=m.size_multiple, maximum=max(1024, m.resolution), step=m.size_multiple,
                                     value=m.resolution) for _ in ctx.sizes],
                    guidance=[gr.update(value=v) for v in recommended_guidance(m)])

    def run_load_model(source, request: gr.Request = None):
        if hosting.public:
            # hosted: the session picks one of the preloaded allow-listed models; nobody else is affected
            source = hosting.check_model(source)
            model = studio.pool.get(source)
            if model is None:
                raise InputError(f"The model {source!r} is not available right now.")
            sessions.get(request).model_id = source
            yield model_out(active=ctx.model_status(model), status=f"Using {model.display_name} in this session.",
                            **model_sizes(model))
            return

        # The final event carries the new model; it is rendered before switch_model makes it studio.model.
        def done(ev):
            return dict(active=ctx.model_status(ev.result), status=ev.message, **model_sizes(ev.result))

        yield from render_job(studio.switch_model(source), model_out, done)

    def run_load_lora(source, request: gr.Request = None):
        if hosting.public:
            # hosted: allow-listed LoRAs are loaded at start and applied per request by name (disabled
            # otherwise), so "loading" one only says how to use it
            name = (source or "").strip()
            hosting.check_lora(name)
            if name not in ctx.engine(request).model.loras:
                raise InputError(f"The LoRA {name!r} is not available for this model.")
            yield lora_out(active=ctx.model_status(ctx.engine(request).model),
                           status=f"LoRA {name!r} is ready: tick the LoRA checkbox and choose it in the LoRA "
                                   f"adapter menu.")
            return
        loaded = []

        def done(ev):
            loaded.append(ev.result)
            return dict(active=ctx.model_status(), status=ev.message)

        # The Smooth LoRA loads as "smooth" (Studio.load_lora), so loading it again replaces that adapter.
        before = set(studio.model.loras)
        try:
            yield from render_job(studio.load_lora(source), lora_out, done)
        finally:
            # Cached inversions key on an adapter's name: forget them when a name got other weights (or none)
            if before & (set(loaded) | (before - set(studio.model.loras))):
                sessions.clear_inversions()

    def run_unload_lora(name, request: gr.Request = None):
        if hosting.public:
            raise InputError("LoRAs are chosen by the host of this studio and cannot be unloaded here.")
        name = (name or "").strip()

        def done(ev):
            return dict(active=ctx.model_status(), status=ev.message)

        try:
            yield from render_job(studio.unload_lora(name), lora_out, done)
        finally:
            sessions.clear_inversions()

    def refresh_lora_controls(request: gr.Request = None):
        return ctx.lora_updates(request)

    # After a load (and on page load), every LoRA control shows the active model's adapters and defaults;
    # chained, so the endpoints' outputs stay as they were.
    lora_controls = ctx.lora_outputs()
    hidden = dict(api_visibility="private", queue=False)
    # the controls that start at the model's recommended settings (drag, SDEdit) move to the new model's
    recommended = ctx.recommended_outputs()

    def refresh_recommended(request: gr.Request = None):
        return ctx.recommended_updates(request)

    panel.load_model.click(run_load_model, [panel.model], model_out, api_name="load_model",
                           **GPU).then(refresh_lora_controls, None, lora_controls,
                                       **hidden).then(refresh_recommended, None, recommended, **hidden)
    panel.load_lora.click(run_load_lora, [panel.lora], lora_out, api_name="load_lora",
                          **GPU).then(refresh_lora_controls, None, lora_controls, **hidden)
    panel.unload_lora.click(run_unload_lora, [panel.lora], lora_out, api_name="unload_lora",
                            **GPU).then(refresh_lora_controls, None, lora_controls, **hidden)

    def run_load_singdiffusion(source, request: gr.Request = None):
        def done(ev):
            return dict(active=ctx.model_status(), status=ev.message)

        yield from render_job(studio.load_singdiffusion(source), lora_out, done)

    if panel.load_singdiffusion is not None:  # the Generate tab's checkbox follows (ctx.follow_model)
        panel.load_singdiffusion.click(run_load_singdiffusion, [panel.singdiffusion], lora_out,
                                       api_name="load_singdiffusion", **GPU).then(refresh_recommended, None,
                                                                                  recommended, **hidden)

    def adapter_chosen(adapter):
        return gr.update(label=use_label(adapter))

    def adapter_chosen_compare(adapter):
        return gr.update(label=use_label(adapter)), gr.update(value=compare_label(adapter))

    for lora in ctx.loras:
        if lora.compare is not None:
            lora.menu.input(adapter_chosen_compare, [lora.menu], [lora.use, lora.compare], **hidden)
        else:
            lora.menu.input(adapter_chosen, [lora.menu], [lora.use], **hidden)

    def page_status(request: gr.Request):
        return ctx.model_status(ctx.engine(request).model)

    demo.load(page_status, None, panel.active, api_visibility="private")
    # the model may have changed since this page was built (another session loaded one)
    demo.load(refresh_lora_controls, None, lora_controls, **hidden)
    demo.load(refresh_recommended, None, recommended, **hidden)
