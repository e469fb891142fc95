"""The Gradio Blocks studio. UI only: every handler starts a pipeline job and renders its events."""
from __future__ import annotations


import pandas as pd
import gradio as gr

from pipelines.edit import EditParams
from pipelines.errors import InputError
from pipelines.events import Kind
from pipelines.generate import GenerateParams
from pipelines.interpolation import ComparisonFrames, InterpolationParams, LoraComparison, comparison_labels
from pipelines.instruct import recommended_guidance
from pipelines.limits import get_limits
from pipelines.inversion import METHODS as INVERSION_METHODS, InversionParams
from pipelines.p2p import MODES as P2P_MODES, P2PSettings
from pipelines.lora import SMOOTH_LORA_FILE, SMOOTH_LORA_REPO, SMOOTH_NAME
from pipelines.models import model_choices
from pipelines.real_interpolation import RealInterpolationParams
from pipelines.stream import PreviewOptions
from pipelines.studio import Studio

from . import examples
from .drag_tab import build_drag_tab
from .editing_tabs import build_editing_tabs
from .guard import harden
from .hosting import Hosting
from .sessions import SessionRegistry
from .uploads import SafeImage
from .streaming import in_progress, shown_preview, status_line, stopped, stream, upload_path

GPU = dict(concurrency_id="gpu", concurrency_limit=1)  # one GPU job at a time, across all sessions

EXAMPLE_PROMPTS, EXAMPLE_PAIRS, EXAMPLE_IMAGES = examples.PROMPTS, examples.PAIRS, examples.IMAGES
EXAMPLE_EDITS, EXAMPLE_IMAGE_PAIRS = examples.EDITS, examples.IMAGE_PAIRS
LOSS_PLOT_COLUMNS = ("step", "loss")
COMPARE_PLOT_COLUMNS = ("pair", "distance", "series")
SMOOTH_LABEL = "Use the Smooth LoRA"
COMPARE_SMOOTH_LABEL = "Compare with and without the Smooth LoRA"


def loss_frame(losses) -> pd.DataFrame:
    """The null-text loss curve (one value per inversion step, 1-based) as LinePlot data; empty for DDIM."""
    losses = [float(v) for v in (losses or [])]
    return pd.DataFrame({"step": list(range(1, len(losses) + 1)), "loss": losses}, columns=list(LOSS_PLOT_COLUMNS))


def distance_frame(distances) -> pd.DataFrame:
    return pd.DataFrame({"pair": list(range(len(distances))), "distance": list(distances)})


def comparison_frame(r: LoraComparison | None) -> pd.DataFrame:
    """Both sequences' adjacent-frame distances as one LinePlot table, a `series` column telling them apart."""
    rows = []
    if r is not None:
        for label, seq in zip(comparison_labels(r.lora, r.strength), (r.without, r.with_lora)):
            rows += [(k, float(d), label) for k, d in enumerate(seq.distances)]
    return pd.DataFrame(rows, columns=list(COMPARE_PLOT_COLUMNS))


# ------------------------------------------------------------------ which LoRA the LoRA controls apply
def default_adapter(model) -> str | None:
    """What the adapter menu starts on: the Smooth LoRA when the model has it, else the last adapter loaded."""
    if SMOOTH_NAME in model.loras:
        return SMOOTH_NAME
    return list(model.loras)[-1] if model.loras else None


def use_label(adapter: str | None) -> str:
    """The checkbox says which adapter it applies."""
    return SMOOTH_LABEL if not adapter or adapter == SMOOTH_NAME else f"Use the LoRA '{adapter}'"


def compare_label(adapter: str | None) -> str:
    return COMPARE_SMOOTH_LABEL if not adapter or adapter == SMOOTH_NAME else f"Compare with and without '{adapter}'"


def adapter_menu_visible(model) -> bool:
    """The menu is only needed when there is something other than the Smooth LoRA to choose."""
    return any(name != SMOOTH_NAME for name in model.loras)


def lora_control_updates(model, n_controls: int, n_compare: int, n_drag: int) -> list:
    """After a model or LoRA load (and on page load): every tab's checkbox and adapter menu back to the model's
    defaults (ticked when it has the Smooth LoRA), the compare buttons' labels, the Drag tab's Smooth checkbox.
    One dict per component: Gradio pops keys from update dicts, so they must not be shared."""
    adapter = default_adapter(model)
    smooth = SMOOTH_NAME in model.loras
    out = []
    for _ in range(n_controls):
        out.append(gr.update(value=smooth, label=use_label(adapter)))
        out.append(gr.update(choices=list(model.loras), value=adapter, visible=adapter_menu_visible(model)))
    out += [gr.update(value=compare_label(adapter)) for _ in range(n_compare)]
    out += [gr.update(value=smooth) for _ in range(n_drag)]
    return out


def rounded_metrics(metrics: dict, **extra) -> dict:
    out = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in metrics.items()}
    return {**out, **extra}


def build_demo(studio: Studio, sessions: SessionRegistry | None = None, hosting: Hosting | None = None) -> gr.Blocks:
    """The studio's Blocks. `hosting` (app/hosting.py) says whether it is public and what its allow-lists hold;
    by default it is local, with every model and LoRA source allowed."""
    sessions = SessionRegistry() if sessions is None else sessions
    hosting = hosting or Hosting()

    def engine(request) -> Studio:
        """The studio as this session sees it: a hosted session runs on the allow-listed model it chose."""
        if hosting.public:
            session = sessions.peek(request)
            chosen = studio.pool.get(session.model_id) if session is not None and session.model_id else None
            if chosen is not None:
                return studio.with_model(chosen)
        return studio

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

    def lora_name(use_lora: bool, adapter: str | None = None, request=None):
        """The adapter a job applies: none when unticked; else the one chosen in the adapter menu, which is the
        Smooth LoRA ("smooth") unless another was chosen (also for API calls that do not send the menu)."""
        if not use_lora:
            return None
        m = engine(request).model
        name = (adapter or "").strip() or SMOOTH_NAME
        if name in m.loras:
            return name
        loaded = f" Loaded: {', '.join(repr(n) for n in m.loras)} (choose one in the LoRA adapter menu)." if m.loras else ""
        if name == SMOOTH_NAME:
            raise InputError(f"The Smooth LoRA is not loaded for {m.label}: load it in 'Model and LoRA' (the Hub repo "
                             f"{SMOOTH_LORA_REPO}, or a {SMOOTH_LORA_FILE} file), or untick "
                             f"'{SMOOTH_LABEL}'.{loaded}")
        raise InputError(f"LoRA {name!r} is not loaded for {m.label}: load it in 'Model and LoRA' first.{loaded}")

    def size_slider(label: str) -> gr.Slider:
        m = studio.model
        return gr.Slider(m.size_multiple, max(1024, m.resolution), value=m.resolution, step=m.size_multiple, label=label)

    lora_checkboxes, lora_menus = [], []

    def lora_controls(prefix: str):
        """Use-LoRA checkbox (ticked when the model has the Smooth LoRA), strength, and the adapter menu (shown
        when an adapter other than the Smooth LoRA is loaded); the checkbox's label names the adapter."""
        m = studio.model
        adapter = default_adapter(m)
        with gr.Row():
            use = gr.Checkbox(SMOOTH_NAME in m.loras, label=use_label(adapter), elem_id=f"{prefix}-use-lora")
            strength = gr.Slider(0, 2, value=1.0, step=0.05, label="LoRA strength")
            menu = gr.Dropdown(list(m.loras), value=adapter, allow_custom_value=True, label="LoRA adapter",
                               info="Which loaded adapter the checkbox applies", visible=adapter_menu_visible(m),
                               elem_id=f"{prefix}-lora-adapter")
        lora_checkboxes.append(use)
        lora_menus.append(menu)
        return use, strength, menu

    def steps_slider(default: int, elem_id: str | None = None) -> gr.Slider:
        top = get_limits().max_steps  # the server refuses more, so the slider stops there
        return gr.Slider(1, top, value=min(default, top), step=1, label="Steps", elem_id=elem_id)

    def inversion_controls(prefix: str, default: str = "nti"):
        """Inversion method, null-text inner iterations and the re-invert flag (Invert, Edit, real interpolation)."""
        method = gr.Radio([(label, key) for key, label in INVERSION_METHODS.items()], value=default,
                          label="Inversion method", elem_id=f"{prefix}-method")
        with gr.Row():
            inner = gr.Slider(1, 20, value=10, step=1, label="Inner iterations (NTI)",
                              info="Most optimisation iterations per step (null-text methods only)")
            force = gr.Checkbox(False, label="Re-invert (ignore cached inversion)")
        return method, inner, force

    compare_buttons = []

    def compare_controls(prefix: str):
        """The comparison's button (its label names the adapter) and outputs: both sequences side by side, their
        ISTDs and ratio, and both distance curves in one plot."""
        button = gr.Button(compare_label(default_adapter(studio.model)), elem_id=f"{prefix}-compare")
        compare_buttons.append(button)
        return button

    def comparison_outputs(prefix: str):
        gr.Markdown("**With and without the LoRA** (same endpoints and settings)")
        with gr.Row():
            without = gr.Gallery(label="Without the LoRA", columns=4, format="png", height=240,
                                 elem_id=f"{prefix}-compare-without")
            with_lora = gr.Gallery(label="With the LoRA", columns=4, format="png", height=240,
                                   elem_id=f"{prefix}-compare-with")
        with gr.Row():
            istd_off = gr.Number(label="ISTD without the LoRA", interactive=False)
            istd_on = gr.Number(label="ISTD with the LoRA", interactive=False)
            ratio = gr.Number(label="ISTD ratio (with / without; below 1 = smoother)", interactive=False)
        plot = gr.LinePlot(comparison_frame(None), x="pair", y="distance", color="series",
                           title="Adjacent-frame distances, without and with the LoRA", x_title="frame pair k→k+1",
                           y_title="L2 distance", elem_id=f"{prefix}-compare-plot")
        return without, with_lora, plot, istd_off, istd_on, ratio

    def stop(request: gr.Request):
        session = sessions.peek(request)  # only the caller's own job; an unknown hash creates nothing
        if session is not None:
            session.token.cancel()
        # Said here too: Gradio's cancel (cancels=...) usually ends the event before the job's own
        # "Stopped." update is delivered, which would leave the last progress line showing.
        return "Stopped."

    with gr.Blocks(title="Diffusion Studio", delete_cache=(600, 3600)) as demo:
        gr.Markdown("# Diffusion Studio")
        status_md = gr.Markdown(model_status(), elem_id="model-status")
        with gr.Accordion("Model and LoRA", open=False):
            with gr.Row():
                if hosting.public:  # only the host's allow-listed models
                    model_dd = gr.Dropdown(hosting.models, value=studio.model.id, label="Model", scale=4)
                else:
                    model_dd = gr.Dropdown(model_choices(), value=studio.model.id, allow_custom_value=True,
                                           label="Model (Hub id, local diffusers folder, or a listed one)", scale=4)
                model_btn = gr.Button("Load model", scale=1)
            with gr.Row():
                if hosting.public:
                    lora_src = gr.Dropdown(list(hosting.loras), value=next(iter(hosting.loras), None),
                                           label="LoRA (offered by this studio)", scale=4, elem_id="lora-source")
                else:
                    lora_src = gr.Textbox(SMOOTH_LORA_REPO, scale=4, elem_id="lora-source",
                                          label="LoRA (.safetensors path, or Hub repo[:file]; to unload: its "
                                                "adapter name)")
                lora_btn = gr.Button("Load LoRA", scale=1, elem_id="lora-load")
                lora_unload = gr.Button("Unload LoRA", scale=1, elem_id="lora-unload", visible=not hosting.public)
            load_status = gr.Markdown("", elem_id="load-status")
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
                        g_lora, g_lora_s, g_adapter = lora_controls("gen")
                        with gr.Row():
                            g_run = gr.Button("Generate", variant="primary", elem_id="gen-run")
                            g_stop = gr.Button("Stop", variant="stop", elem_id="gen-stop")
                        gr.Examples(EXAMPLE_PROMPTS, [g_prompt])
                    with gr.Column():
                        g_preview = gr.Image(label="Live preview (predicted x0)", format="jpeg", interactive=False, height=320, elem_id="gen-preview")
                        g_image = gr.Image(label="Result", format="png", type="filepath", interactive=False, height=320, elem_id="gen-result")
                        g_seed_used = gr.Number(label="Seed used", precision=0, interactive=False)
                        g_status = gr.Markdown("", elem_id="gen-status")
                        with gr.Row():
                            g_send = gr.Button("Send to Invert")
                            g_send_edit = gr.Button("Send to Edit")
                            g_send_ip2p = gr.Button("Send to Instruct")
                            g_send_drag = gr.Button("Send to Drag", elem_id="gen-send-drag")

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
                            i_steps = steps_slider(30, "int-steps")
                            i_guid = gr.Slider(0, 20, value=7.5, step=0.1, label="Guidance")
                        with gr.Row():
                            i_w, i_h = size_slider("Width"), size_slider("Height")
                        i_lora, i_lora_s, i_adapter = lora_controls("int")
                        i_eta = gr.Slider(0, 1, value=0.5, step=0.01, label="Interpolation ratio eta (scrub me)", elem_id="int-eta")
                        i_frames = gr.Slider(2, get_limits().max_frames, value=11, step=1, label="Frames in sequence", elem_id="int-frames")
                        with gr.Row():
                            i_run = gr.Button("Render frame", variant="primary", elem_id="int-frame")
                            i_seq = gr.Button("Render sequence", elem_id="int-seq")
                            i_stop = gr.Button("Stop", variant="stop", elem_id="int-stop")
                        i_cmp = compare_controls("int")
                        gr.Examples(EXAMPLE_PAIRS, [i_prompt_a, i_prompt_b])
                    with gr.Column():
                        i_frame = gr.Image(label="Frame", format="png", type="filepath", interactive=False, height=320, elem_id="int-frame-img")
                        i_status = gr.Markdown("", elem_id="int-status")
                        with gr.Row():
                            i_send = gr.Button("Send frame to Invert")
                            i_send_edit = gr.Button("Send frame to Edit")
                        i_gallery = gr.Gallery(label="Sequence", columns=6, format="png", elem_id="int-gallery")
                        i_gif = gr.Image(label="Animation (GIF)", type="filepath", interactive=False)
                        # H.264 / yuv420p MP4 (pipelines/video.py): browsers play it inline, Gradio needs no conversion
                        i_mp4 = gr.Video(label="Animation (MP4)", interactive=False, elem_id="int-mp4")
                        i_istd = gr.Number(label="ISTD (std of adjacent-frame L2 distances, pixels in [0,1])", interactive=False)
                        i_plot = gr.LinePlot(x="pair", y="distance", title="Adjacent-frame distances", x_title="frame pair k→k+1", y_title="L2 distance")
                        i_cmp_out = comparison_outputs("int")

            # ---------------------------------------------------------------- Interpolate real images
            # The second interpolation mode, as its own tab next to the seeds one (same controls and outputs).
            with gr.Tab("Interpolate (real images)", id="interpolate-images"):
                with gr.Row():
                    with gr.Column():
                        with gr.Row():
                            r_image_a = SafeImage(label="Image A", type="filepath", sources=["upload", "clipboard"],
                                                 height=200, elem_id="rint-image-a")
                            r_image_b = SafeImage(label="Image B", type="filepath", sources=["upload", "clipboard"],
                                                 height=200, elem_id="rint-image-b")
                        r_prompt_a = gr.Textbox(label="Prompt A (describing image A)", elem_id="rint-prompt-a")
                        r_prompt_b = gr.Textbox(label="Prompt B (describing image B; empty = prompt A)")
                        r_method, r_inner, r_force = inversion_controls("rint")
                        with gr.Row():
                            r_steps = steps_slider(50)
                            r_guid = gr.Slider(0, 20, value=7.5, step=0.1, label="Guidance")
                        r_lora, r_lora_s, r_adapter = lora_controls("rint")
                        r_eta = gr.Slider(0, 1, value=0.5, step=0.01, label="Interpolation ratio eta (scrub me)",
                                          elem_id="rint-eta")
                        r_frames = gr.Slider(2, get_limits().max_frames, value=11, step=1, label="Frames in sequence")
                        with gr.Row():
                            r_run = gr.Button("Render frame", variant="primary", elem_id="rint-frame")
                            r_seq = gr.Button("Render sequence", elem_id="rint-seq")
                            r_stop = gr.Button("Stop", variant="stop", elem_id="rint-stop")
                        r_cmp = compare_controls("rint")
                        gr.Examples(EXAMPLE_IMAGE_PAIRS, [r_image_a, r_image_b, r_prompt_a, r_prompt_b])
                    with gr.Column():
                        r_frame = gr.Image(label="Frame", format="png", type="filepath", interactive=False, height=320,
                                           elem_id="rint-frame-img")
                        r_status = gr.Markdown("", elem_id="rint-status")
                        r_gallery = gr.Gallery(label="Sequence", columns=6, format="png", elem_id="rint-gallery")
                        r_gif = gr.Image(label="Animation (GIF)", type="filepath", interactive=False)
                        r_mp4 = gr.Video(label="Animation (MP4)", interactive=False, elem_id="rint-mp4")
                        r_istd = gr.Number(label="ISTD (std of adjacent-frame L2 distances, pixels in [0,1])",
                                           interactive=False)
                        r_plot = gr.LinePlot(x="pair", y="distance", title="Adjacent-frame distances",
                                             x_title="frame pair k→k+1", y_title="L2 distance")
                        r_cmp_out = comparison_outputs("rint")

            # ---------------------------------------------------------------- Invert
            with gr.Tab("Invert", id="invert"):
                with gr.Row():
                    with gr.Column():
                        v_input = SafeImage(label="Image", type="filepath", sources=["upload", "clipboard"], elem_id="inv-input")
                        v_prompt = gr.Textbox(label="Prompt describing the image (empty = unconditional)")
                        v_method, v_inner, v_force = inversion_controls("inv")
                        with gr.Row():
                            v_steps = steps_slider(50)
                            v_guid = gr.Slider(0, 20, value=7.5, step=0.1, label="Reconstruction guidance w",
                                               info="Null-text methods fit their null embeddings to this w")
                        v_inv_g = gr.Slider(0, 20, value=1.0, step=0.1, label="Inversion guidance (DDIM only)",
                                            info="Only DDIM inversion uses it: null-text and negative-prompt "
                                                 "inversion always invert at 1")
                        v_lora, v_lora_s, v_adapter = lora_controls("inv")
                        with gr.Row():
                            v_run = gr.Button("Invert and reconstruct", variant="primary", elem_id="inv-run")
                            v_stop = gr.Button("Stop", variant="stop", elem_id="inv-stop")
                        gr.Examples(EXAMPLE_IMAGES, [v_input, v_prompt])
                    with gr.Column():
                        v_preview = gr.Image(label="Live preview", format="jpeg", interactive=False, height=256, elem_id="inv-preview")
                        with gr.Row():
                            v_source = gr.Image(label="Source (as the model sees it)", format="png", interactive=False, height=256, elem_id="inv-source")
                            v_recon = gr.Image(label="Reconstruction", format="png", type="filepath", interactive=False, height=256, elem_id="inv-result")
                        v_loss = gr.LinePlot(loss_frame([]), x="step", y="loss", title="Null-text loss per step",
                                             x_title="inversion step", y_title="fitted loss", y_axis_format=".1e",
                                             elem_id="inv-loss")
                        v_metrics = gr.JSON(label="Reconstruction metrics (PSNR / SSIM / MSE) and UNet evaluations")
                        v_status = gr.Markdown("", elem_id="inv-status")
                        v_send_edit = gr.Button("Edit this image (reuses the inversion)")

            # ---------------------------------------------------------------- Edit (text)
            with gr.Tab("Edit (text)", id="edit"):
                with gr.Row():
                    with gr.Column():
                        e_input = SafeImage(label="Image", type="filepath", sources=["upload", "clipboard"], elem_id="edit-input")
                        e_src = gr.Textbox(label="Source prompt (describing the image)", elem_id="edit-source-prompt")
                        e_tgt = gr.Textbox(label="Target prompt (describing the edit)", elem_id="edit-target-prompt")
                        e_method = gr.Radio([("Threshold r (prompt switch)", "threshold"), ("Prompt-to-Prompt", "p2p")],
                                            value="threshold", label="Edit method", elem_id="edit-method")
                        e_r = gr.Slider(0, 1, value=0.8, step=0.05, label="Threshold r",
                                        info="Source prompt while t > T·r, target prompt after (0 = reconstruction)")
                        e_inv, e_inner, e_force = inversion_controls("edit", EditParams.inversion)
                        with gr.Row():
                            e_steps = steps_slider(50)
                            e_guid = gr.Slider(0, 20, value=7.5, step=0.1, label="Guidance")
                        e_lora, e_lora_s, e_adapter = lora_controls("edit")
                        with gr.Accordion("Prompt-to-Prompt", open=False) as e_p2p:
                            e_mode = gr.Radio(list(P2P_MODES), value="replace", label="Mode",
                                              info="replace: swap words one for one · refine: add or change words · "
                                                   "reweight: only scale words' attention")
                            with gr.Row():
                                e_cross = gr.Slider(0, 1, value=0.8, step=0.05, label="Cross-attention replace steps")
                                e_self = gr.Slider(0, 1, value=0.4, step=0.05, label="Self-attention replace steps")
                            with gr.Row():
                                e_rw_words = gr.Textbox(label="Re-weight words (of the target prompt, comma-separated)")
                                e_rw_scale = gr.Slider(-5, 10, value=2.0, step=0.1, label="Re-weight scale")
                            with gr.Row():
                                e_blend = gr.Textbox(label="Local blend words (comma-separated; empty = off)")
                                e_blend_t = gr.Slider(0.05, 0.95, value=P2PSettings.blend_threshold, step=0.05, label="Blend threshold",
                                                      info="On the words' attention maps rescaled to [0, 1] "
                                                           "(min to max); higher = tighter region")
                                e_blend_keep = gr.Checkbox(value=P2PSettings.keep_background,
                                                           label="Keep the input outside the blend region",
                                                           info="The decoder spreads the edit over the whole image; "
                                                                "this pastes the input back outside the region")
                        with gr.Row():
                            e_run = gr.Button("Edit", variant="primary", elem_id="edit-run")
                            e_stop = gr.Button("Stop", variant="stop", elem_id="edit-stop")
                        gr.Examples(EXAMPLE_EDITS, [e_input, e_src, e_tgt])
                    with gr.Column():
                        e_preview = gr.Image(label="Live preview", format="jpeg", interactive=False, height=256, elem_id="edit-preview")
                        e_image = gr.Image(label="Edited", format="png", type="filepath", interactive=False, height=256, elem_id="edit-result")
                        with gr.Row():
                            e_recon = gr.Image(label="Source reconstruction", format="png", interactive=False, height=200, elem_id="edit-recon")
                            e_mask = gr.Image(label="Local blend mask", format="png", interactive=False, height=200, elem_id="edit-mask")
                        e_status = gr.Markdown("", elem_id="edit-status")

            editing = build_editing_tabs(studio, sessions, stop, engine)
            dragging = build_drag_tab(studio, sessions, stop, engine)

        # -------------------------------------------------------------------- handlers
        def run_generate(prompt, neg, seed, steps, guidance, w, h, use_lora, strength, lora_adapter=None,
                         request: gr.Request = None):
            session = sessions.get(request)
            token = session.new_job()

            def render(ev, final):
                if final:
                    r = ev.result
                    session.keep_result("generate", r.image)
                    return r.image, r.image, r.seed, f"Done · seed {r.seed}"
                return in_progress(ev, 2)

            def job():
                p = GenerateParams(prompt, neg or "", seed, steps, guidance, w, h,
                                   lora_name(use_lora, lora_adapter, request), strength)
                # the drag cache keeps the trajectory: dragging the result skips inversion
                yield from engine(request).generate(p, token, session.preview, trajectories=session.drag_cache)

            yield from stream(job(), render, stopped(4, 3), cancel=token)

        def interp_params(pa, pb, neg, sa, sb, steps, guidance, w, h, use_lora, strength, adapter, request=None):
            return InterpolationParams(pa, pb or "", neg or "", sa, sb, steps, guidance, w, h,
                                       lora_name(use_lora, adapter, request), strength)

        def run_frame(pa, pb, neg, sa, sb, steps, guidance, w, h, use_lora, strength, eta, lora_adapter=None,
                      request: gr.Request = None):
            session = sessions.get(request)
            token = session.new_job()

            def render(ev, final):
                if final:
                    session.keep_result("frame", ev.result.image)
                    return ev.result.image, f"Frame at eta={float(eta):.2f} · seeds {ev.result.params['seed_a']} → {ev.result.params['seed_b']}"
                return in_progress(ev, 0)

            def job():
                p = interp_params(pa, pb, neg, sa, sb, steps, guidance, w, h, use_lora, strength, lora_adapter, request)
                yield from engine(request).interpolation_frame(p, eta, session.interpolation_cache, token, session.preview)

            yield from stream(job(), render, stopped(2, 1), cancel=token)

        def run_sequence(pa, pb, neg, sa, sb, steps, guidance, w, h, use_lora, strength, n, lora_adapter=None,
                         request: gr.Request = None):
            session = sessions.get(request)
            token = session.new_job()

            def render(ev, final):
                if final:
                    r = ev.result
                    session.keep_result("frame", r.frames[-1])
                    return (r.frames[-1], r.frames, r.gif_path, r.istd, distance_frame(r.distances),
                            f"{len(r.frames)} frames · ISTD {r.istd:.4f}", r.mp4_path)
                frames = ev.partial if ev.partial is not None else gr.skip()
                return (shown_preview(ev), frames, gr.skip(), gr.skip(), gr.skip(),
                        status_line(ev), gr.skip())

            def job():
                p = interp_params(pa, pb, neg, sa, sb, steps, guidance, w, h, use_lora, strength, lora_adapter, request)
                yield from engine(request).interpolation_sequence(p, n, session.interpolation_cache, token, session.preview,
                                                         gif_dir=session.out_dir)

            yield from stream(job(), render, stopped(7, 5), cancel=token)

        def compare_render(ev, final):
            """(without gallery, with gallery, plot, ISTD without, ISTD with, ratio, status) of a comparison."""
            if final:
                r = ev.result
                ratio = r.istd_ratio
                ratio_text = f" · ratio {ratio:.3f}" if ratio is not None else ""
                return (r.without.frames, r.with_lora.frames, comparison_frame(r), r.without.istd, r.with_lora.istd,
                        ratio, f"{len(r.without.frames)} frames each · ISTD {r.without.istd:.4f} without, "
                               f"{r.with_lora.istd:.4f} with {r.lora}{ratio_text}")
            part = ev.partial if isinstance(ev.partial, ComparisonFrames) else None
            return (part.frames if part is not None and not part.with_lora else gr.skip(),
                    part.frames if part is not None and part.with_lora else gr.skip(),
                    *[gr.skip()] * 4, status_line(ev))

        def compare_cleared(status: str) -> tuple:
            """A comparison starts from empty outputs: nothing of an earlier one stays next to a stopped or
            failed new one."""
            return [], [], comparison_frame(None), None, None, None, status

        def run_compare(pa, pb, neg, sa, sb, steps, guidance, w, h, strength, n, lora_adapter=None,
                        request: gr.Request = None):
            session = sessions.get(request)
            token = session.new_job()
            yield compare_cleared("Comparing: the sequence without the LoRA, then with it ...")

            def job():
                p = interp_params(pa, pb, neg, sa, sb, steps, guidance, w, h, True, strength, lora_adapter, request)
                yield from engine(request).interpolation_compare(p, n, session.interpolation_cache, token, session.preview)

            yield from stream(job(), compare_render, stopped(7, 6), cancel=token)

        def run_invert(image, prompt, steps, inv_g, guidance, use_lora, strength, method, inner_steps,
                       force, lora_adapter=None, request: gr.Request = None):
            session = sessions.get(request)
            token = session.new_job()

            def render(ev, final):
                if final:
                    r = ev.result
                    metrics = rounded_metrics(r.metrics, method=r.method, cached=r.cached)
                    note = " (inversion reused from cache)" if r.cached else ""
                    return (r.reconstruction.image, r.source, r.reconstruction.image, loss_frame(r.losses), metrics,
                            f"Done{note} · {ev.message}")
                src = ev.preview if ev.kind is Kind.SOURCE else gr.skip()
                prev = ev.preview if ev.preview is not None and ev.kind is not Kind.SOURCE else gr.skip()
                # a new run starts with an empty loss plot; null-text fitting streams the curve so far
                plot = (loss_frame(ev.partial) if ev.kind is Kind.LOSSES
                        else loss_frame([]) if ev.kind is Kind.SOURCE else gr.skip())
                return prev, src, gr.skip(), plot, gr.skip(), status_line(ev)

            def job():
                path = upload_path(image, "an image to invert")
                session.keep_result("invert_input", path)  # a checked upload: "Edit this image" passes it on
                p = InversionParams(prompt or "", steps, inv_g, guidance, lora_name(use_lora, lora_adapter, request), strength,
                                    method=method, inner_steps=inner_steps, force=bool(force))
                yield from engine(request).invert(path, p, session.inversion_cache, token, session.preview)

            yield from stream(job(), render, stopped(6, 5), cancel=token)

        def run_edit(image, source_prompt, target_prompt, method, r, inversion, inner_steps, force, steps, guidance,
                     use_lora, strength, p2p_mode, cross_replace_steps, self_replace_steps, reweight_words,
                     reweight_scale, blend_words, blend_threshold, blend_keep, lora_adapter=None,
                     request: gr.Request = None):
            session = sessions.get(request)
            token = session.new_job()

            def render(ev, final):
                if final:
                    res = ev.result
                    note = " (inversion reused from cache)" if res.cached else ""
                    what = (f"threshold r={res.params['r']:g}" if res.params["edit_method"] == "threshold"
                            else f"Prompt-to-Prompt ({res.params['p2p_mode']})")
                    return (res.edited.image, res.edited.image, res.reconstruction, res.mask,
                            f"Done{note} · {what} · {INVERSION_METHODS[res.params['inversion']]}")
                return in_progress(ev, 3)

            def job():
                path = upload_path(image, "an image to edit")
                settings = P2PSettings(mode=p2p_mode, cross_replace_steps=cross_replace_steps,
                                       self_replace_steps=self_replace_steps, reweight_words=reweight_words or "",
                                       reweight_scale=reweight_scale, blend_words=blend_words or "",
                                       blend_threshold=blend_threshold, keep_background=bool(blend_keep))
                p = EditParams(source_prompt or "", target_prompt or "", method, r, steps, guidance, inversion,
                               inner_steps, bool(force), lora_name(use_lora, lora_adapter, request), strength, settings)
                yield from engine(request).edit(path, p, session.inversion_cache, token, session.preview)

            yield from stream(job(), render, stopped(5, 4), cancel=token)

        def real_params(pa, pb, inversion, inner_steps, force, steps, guidance, use_lora, strength, adapter, request=None):
            return RealInterpolationParams(pa or "", pb or "", steps, guidance, inversion, inner_steps, bool(force),
                                           lora_name(use_lora, adapter, request), strength)

        def run_real_frame(image_a, image_b, prompt_a, prompt_b, inversion, inner_steps, force, steps, guidance,
                           use_lora, strength, eta, lora_adapter=None, request: gr.Request = None):
            session = sessions.get(request)
            token = session.new_job()

            def render(ev, final):
                if final:
                    note = " (inversion reused from cache)" if ev.cached else ""
                    return ev.result.image, f"Frame at eta={float(eta):.2f}{note}"
                return in_progress(ev, 0)

            def job():
                a, b = upload_path(image_a, "image A"), upload_path(image_b, "image B")
                p = real_params(prompt_a, prompt_b, inversion, inner_steps, force, steps, guidance, use_lora, strength,
                                lora_adapter, request)
                yield from engine(request).real_interpolation_frame(a, b, p, eta, session.inversion_cache, token, session.preview)

            yield from stream(job(), render, stopped(2, 1), cancel=token)

        def run_real_sequence(image_a, image_b, prompt_a, prompt_b, inversion, inner_steps, force, steps, guidance,
                              use_lora, strength, n, lora_adapter=None, request: gr.Request = None):
            session = sessions.get(request)
            token = session.new_job()

            def render(ev, final):
                if final:
                    r = ev.result
                    return (r.frames[-1], r.frames, r.gif_path, r.mp4_path, r.istd, distance_frame(r.distances),
                            f"{len(r.frames)} frames · ISTD {r.istd:.4f}")
                # partial: the loss curve while fitting null-text, then the frames rendered so far
                frames = ev.partial if ev.kind is Kind.FRAMES else gr.skip()
                return (shown_preview(ev), frames, gr.skip(), gr.skip(), gr.skip(),
                        gr.skip(), status_line(ev))

            def job():
                a, b = upload_path(image_a, "image A"), upload_path(image_b, "image B")
                p = real_params(prompt_a, prompt_b, inversion, inner_steps, force, steps, guidance, use_lora, strength,
                                lora_adapter, request)
                yield from engine(request).real_interpolation_sequence(a, b, p, n, session.inversion_cache, token,
                                                              session.preview, gif_dir=session.out_dir)

            yield from stream(job(), render, stopped(7, 6), cancel=token)

        def run_real_compare(image_a, image_b, prompt_a, prompt_b, inversion, inner_steps, force, steps, guidance,
                             strength, n, lora_adapter=None, request: gr.Request = None):
            session = sessions.get(request)
            token = session.new_job()
            yield compare_cleared("Comparing: inverting and rendering without the LoRA, then with it ...")

            def job():
                a, b = upload_path(image_a, "image A"), upload_path(image_b, "image B")
                p = real_params(prompt_a, prompt_b, inversion, inner_steps, force, steps, guidance, True, strength,
                                lora_adapter, request)
                yield from engine(request).real_interpolation_compare(a, b, p, n, session.inversion_cache, token,
                                                             session.preview)

            yield from stream(job(), compare_render, stopped(7, 6), cancel=token)

        def model_sizes(m):
            if m is None:
                return [gr.skip()] * 6
            # One dict per slider: Gradio pops "value" from an update dict while postprocessing it, so a
            # shared dict ([upd] * 4) would set the value of the first slider only.
            return [gr.update(minimum=m.size_multiple, maximum=max(1024, m.resolution), step=m.size_multiple,
                              value=m.resolution) for _ in range(4)] + \
                [gr.update(value=v) for v in recommended_guidance(m)]

        def run_load_model(source, request: gr.Request = None):
            if hosting.public:
                # hosted: the session picks one of the preloaded allow-listed models; nobody else is affected
                source = hosting.check_model(source)
                model = studio.pool.get(source)
                if model is None:
                    raise InputError(f"The model {source!r} is not available right now.")
                sessions.get(request).model_id = source
                yield model_status(model), f"Using {model.display_name} in this session.", *model_sizes(model)
                return

            # The final event carries the new model; it is rendered before switch_model makes it studio.model.
            def render(ev, final):
                return (model_status(ev.result) if final else gr.skip()), status_line(ev), \
                    *model_sizes(ev.result if final else None)

            yield from stream(studio.switch_model(source), render, lambda: (gr.skip(), "Stopped.", *[gr.skip()] * 6))

        def run_load_lora(source, request: gr.Request = None):
            if hosting.public:
                # hosted: allow-listed LoRAs are loaded at start and applied per request by name (disabled
                # otherwise), so "loading" one only says how to use it
                name = (source or "").strip()
                hosting.check_lora(name)
                if name not in engine(request).model.loras:
                    raise InputError(f"The LoRA {name!r} is not available for this model.")
                yield model_status(engine(request).model), (f"LoRA {name!r} is ready: tick the LoRA checkbox and "
                                                            f"choose it in the LoRA adapter menu.")
                return
            loaded = []

            def render(ev, final):
                if final:
                    loaded.append(ev.result)
                return (model_status() if final else gr.skip()), status_line(ev)

            # The Smooth LoRA loads as "smooth" (Studio.load_lora), so loading it again replaces that adapter.
            before = set(studio.model.loras)
            try:
                yield from stream(studio.load_lora(source), render, lambda: (gr.skip(), "Stopped."))
            finally:
                # Cached inversions key on an adapter's name: forget them when a name got other weights (or none)
                if before & (set(loaded) | (before - set(studio.model.loras))):
                    sessions.clear_inversions()

        def run_unload_lora(name, request: gr.Request = None):
            if hosting.public:
                raise InputError("LoRAs are chosen by the host of this studio and cannot be unloaded here.")
            name = (name or "").strip()

            def render(ev, final):
                return (model_status() if final else gr.skip()), status_line(ev)

            try:
                yield from stream(studio.unload_lora(name), render, lambda: (gr.skip(), "Stopped."))
            finally:
                sessions.clear_inversions()

        def refresh_lora_controls(request: gr.Request = None):
            return lora_control_updates(engine(request).model, len(lora_checkboxes), len(compare_buttons), 1)

        def adapter_chosen(adapter):
            return gr.update(label=use_label(adapter))

        def adapter_chosen_compare(adapter):
            return gr.update(label=use_label(adapter)), gr.update(value=compare_label(adapter))

        def set_preview_mode(k, request: gr.Request):
            k = int(k or 0)
            sessions.get(request).preview = PreviewOptions(every=0 if k else 1, full_decode_every=k)

        preview_full.change(set_preview_mode, [preview_full], None, api_visibility="private")

        # The LoRA adapter menus are the last input of each endpoint (older positional calls keep working; left
        # out, the adapter is the Smooth LoRA's).
        g_inputs = [g_prompt, g_neg, g_seed, g_steps, g_guid, g_w, g_h, g_lora, g_lora_s, g_adapter]
        g_event = g_run.click(run_generate, g_inputs, [g_preview, g_image, g_seed_used, g_status], api_name="generate", **GPU)
        g_stop.click(stop, None, g_status, cancels=[g_event], api_name="stop", queue=False)

        i_common = [i_prompt_a, i_prompt_b, i_neg, i_seed_a, i_seed_b, i_steps, i_guid, i_w, i_h, i_lora, i_lora_s]
        i_event = i_run.click(run_frame, i_common + [i_eta, i_adapter], [i_frame, i_status], api_name="interpolate_frame",
                              **GPU)
        # Scrubbing: render the frame where the slider is released; only the latest position matters.
        i_scrub = i_eta.release(run_frame, i_common + [i_eta, i_adapter], [i_frame, i_status], api_visibility="private",
                                trigger_mode="always_last", **GPU)
        i_seq_event = i_seq.click(run_sequence, i_common + [i_frames, i_adapter],
                                  [i_frame, i_gallery, i_gif, i_istd, i_plot, i_status, i_mp4],
                                  api_name="interpolate_sequence", **GPU)
        i_cmp_event = i_cmp.click(run_compare, [i_prompt_a, i_prompt_b, i_neg, i_seed_a, i_seed_b, i_steps, i_guid, i_w,
                                                i_h, i_lora_s, i_frames, i_adapter], [*i_cmp_out, i_status],
                                  api_name="interpolate_compare", **GPU)
        i_stop.click(stop, None, i_status, cancels=[i_event, i_scrub, i_seq_event, i_cmp_event],
                     api_visibility="private", queue=False)

        # Real images: raw uploads (preprocess=False) so the pipeline's loader reports unreadable files itself.
        r_common = [r_image_a, r_image_b, r_prompt_a, r_prompt_b, r_method, r_inner, r_force, r_steps, r_guid,
                    r_lora, r_lora_s]
        r_event = r_run.click(run_real_frame, r_common + [r_eta, r_adapter], [r_frame, r_status],
                              api_name="interpolate_images_frame", preprocess=False, **GPU)
        r_scrub = r_eta.release(run_real_frame, r_common + [r_eta, r_adapter], [r_frame, r_status],
                                api_visibility="private", trigger_mode="always_last", preprocess=False, **GPU)
        r_seq_event = r_seq.click(run_real_sequence, r_common + [r_frames, r_adapter],
                                  [r_frame, r_gallery, r_gif, r_mp4, r_istd, r_plot, r_status],
                                  api_name="interpolate_images_sequence", preprocess=False, **GPU)
        r_cmp_event = r_cmp.click(run_real_compare, [r_image_a, r_image_b, r_prompt_a, r_prompt_b, r_method, r_inner,
                                                     r_force, r_steps, r_guid, r_lora_s, r_frames, r_adapter],
                                  [*r_cmp_out, r_status], api_name="interpolate_images_compare", preprocess=False,
                                  **GPU)
        r_stop.click(stop, None, r_status, cancels=[r_event, r_scrub, r_seq_event, r_cmp_event],
                     api_visibility="private", queue=False)

        # New inputs are appended after the original seven, so older positional calls keep working.
        v_event = v_run.click(run_invert, [v_input, v_prompt, v_steps, v_inv_g, v_guid, v_lora, v_lora_s,
                                           v_method, v_inner, v_force, v_adapter],
                              [v_preview, v_source, v_recon, v_loss, v_metrics, v_status], api_name="invert",
                              preprocess=False, **GPU)
        v_stop.click(stop, None, v_status, cancels=[v_event], api_visibility="private", queue=False)

        e_inputs = [e_input, e_src, e_tgt, e_method, e_r, e_inv, e_inner, e_force, e_steps, e_guid, e_lora, e_lora_s,
                    e_mode, e_cross, e_self, e_rw_words, e_rw_scale, e_blend, e_blend_t, e_blend_keep, e_adapter]
        e_event = e_run.click(run_edit, e_inputs, [e_preview, e_image, e_recon, e_mask, e_status], api_name="edit",
                              preprocess=False, **GPU)
        e_stop.click(stop, None, e_status, cancels=[e_event], api_visibility="private", queue=False)

        def edit_method_changed(method):
            p2p = method == "p2p"
            return gr.update(visible=not p2p), gr.update(open=p2p)

        e_method.change(edit_method_changed, [e_method], [e_r, e_p2p], api_visibility="private", queue=False)

        # After a load (and on page load), every LoRA control shows the active model's adapters and defaults;
        # chained, so the endpoints' outputs stay as they were.
        lora_outputs = [c for pair in zip(lora_checkboxes, lora_menus) for c in pair] + compare_buttons + \
            [dragging.smooth]
        model_btn.click(run_load_model, [model_dd], [status_md, load_status, g_w, g_h, i_w, i_h,
                                                     *editing.instruct_guidance],
                        api_name="load_model", **GPU).then(refresh_lora_controls, None, lora_outputs,
                                                            api_visibility="private", queue=False)
        lora_btn.click(run_load_lora, [lora_src], [status_md, load_status], api_name="load_lora",
                       **GPU).then(refresh_lora_controls, None, lora_outputs, api_visibility="private", queue=False)
        lora_unload.click(run_unload_lora, [lora_src], [status_md, load_status], api_name="unload_lora",
                          **GPU).then(refresh_lora_controls, None, lora_outputs, api_visibility="private", queue=False)
        for use, menu in zip(lora_checkboxes, lora_menus):
            if menu is i_adapter or menu is r_adapter:
                button = i_cmp if menu is i_adapter else r_cmp
                menu.input(adapter_chosen_compare, [menu], [use, button], api_visibility="private", queue=False)
            else:
                menu.input(adapter_chosen, [menu], [use], api_visibility="private", queue=False)

        # Hand-offs between tabs pass what this session made (server-side), never a path the client sends.
        def kept(request, key: str, what: str) -> str:
            session = sessions.peek(request)
            path = session.handoff_png(key) if session is not None else None
            if path is None:
                raise InputError(f"There is no {what} to send yet.")
            return path

        def send_kept(key: str, what: str, tab: str):
            def send(prompt, request: gr.Request):
                return kept(request, key, what), prompt, gr.Tabs(selected=tab)
            return send

        def send_generated_to_instruct(request: gr.Request):
            return kept(request, "generate", "generated image"), gr.Tabs(selected="instruct")

        hidden = dict(api_visibility="private")
        g_send.click(send_kept("generate", "generated image", "invert"), [g_prompt], [v_input, v_prompt, tabs], **hidden)
        i_send.click(send_kept("frame", "frame", "invert"), [i_prompt_a], [v_input, v_prompt, tabs], **hidden)
        g_send_edit.click(send_kept("generate", "generated image", "edit"), [g_prompt], [e_input, e_src, tabs],
                          **hidden)
        g_send_ip2p.click(send_generated_to_instruct, None, [editing.instruct_input, tabs], **hidden)
        # the PNG as generated (lossless, model size): the drag pipeline recognises it and reuses its trajectory
        g_send_drag.click(send_kept("generate", "generated image", "drag"), [g_prompt],
                          [dragging.image, dragging.prompt, tabs], **hidden)
        i_send_edit.click(send_kept("frame", "frame", "edit"), [i_prompt_a], [e_input, e_src, tabs], **hidden)

        def invert_to_edit(prompt, method, inner, steps, guidance, use_lora, strength, adapter, request: gr.Request):
            # the inverted image and the same inversion settings, so the edit reuses the cached inversion
            return (kept(request, "invert_input", "inverted image"), prompt, method, inner, steps, guidance,
                    gr.update(value=use_lora, label=use_label(adapter)), strength, adapter, gr.Tabs(selected="edit"))

        v_send_edit.click(invert_to_edit, [v_prompt, v_method, v_inner, v_steps, v_guid, v_lora, v_lora_s, v_adapter],
                          [e_input, e_src, e_inv, e_inner, e_steps, e_guid, e_lora, e_lora_s, e_adapter, tabs],
                          **hidden)

        def page_status(request: gr.Request):
            return model_status(engine(request).model)

        demo.load(page_status, None, status_md, api_visibility="private")
        # the model may have changed since this page was built (another session loaded one)
        demo.load(refresh_lora_controls, None, lora_outputs, api_visibility="private", queue=False)

        def drop_session(request: gr.Request):
            sessions.drop(request)

        demo.unload(drop_session)
    harden(demo, sessions)
    return demo
