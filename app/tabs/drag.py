"""The Drag tab (DragDiffusion): upload, paint the editable region, click handle/target points, watch the
drag. UI only: the handlers render the pipeline's events (pipelines/drag/)."""
from __future__ import annotations

from dataclasses import dataclass

import gradio as gr
import numpy as np
from PIL import Image

from pipelines.core.errors import InputError
from pipelines.core.lora import SMOOTH_NAME
from pipelines.drag import DragParams, check_points, draw_points, parse_points
from pipelines.inversion import prepare_image

from .. import downloads, examples, masks, world_note
from ..context import Context
from ..runner import GPU, Outputs
from ..streaming import upload_path
from ..uploads import SafeImage, SafeImageMask

DRAG_HELP = """**1.** Upload an image (or send one from Generate). **2.** Paint the region that may change: the
object and where it goes (nothing painted = the whole image, and no warm start). **3.** Click a handle point (red),
then its target (blue); repeat for more pairs. **4.** Drag. A per-image LoRA is trained first (cached for this image
and settings), then the image is inverted, the handles are pulled towards their targets (previews show where they
are) and the result is denoised with the original's self-attention keys and values. The settings start at the
model's recommended values (each one's note says whether it is the model's or the reference's)."""


# translucent, so the picture stays visible under the region (any alpha > 0 counts as painted: masks.painted)
REGION_PAINT = ("#ff28c8", 0.45)


@dataclass
class DragTab:
    image: gr.Image
    prompt: gr.Textbox
    smooth: gr.Checkbox   # "Use the Smooth LoRA during the drag": its default follows the active model


def _display_scale(source: Image.Image) -> int:
    return max(1, masks.DISPLAY_SIDE // max(source.size))


def points_view(source: Image.Image, points: list) -> Image.Image:
    """The source enlarged for clicking, with handles (red), targets (blue) and arrows drawn at display scale."""
    k = _display_scale(source)
    shown = masks.enlarge_for_display(source)
    pts = [(x * k + (k - 1) / 2, y * k + (k - 1) / 2) for x, y in points]
    return draw_points(shown, pts[0::2], pts[1::2])


def points_text(value) -> str:
    """The clicked points, one pair a line: "1. (12, 30) → (40, 30)"; a handle still waiting shows "→ ?"."""
    try:
        points = clicked_points(value)
    except InputError:
        return ""
    pairs = [points[i:i + 2] for i in range(0, len(points), 2)]
    return "\n".join(f"{k}. ({h[0]}, {h[1]}) → " + (f"({t[0][0]}, {t[0][1]})" if t else "?")
                     for k, (h, *t) in enumerate(pairs, 1))


def clicked_points(value) -> list[list[int]]:
    """The points clicked so far, checked like the drag's own points (an odd count is a handle still waiting
    for its target)."""
    value = value or []
    odd = isinstance(value, (list, tuple)) and len(value) % 2 == 1
    points = parse_points(list(value) + [[0, 0]] if odd else value)
    return [list(p) for p in (points[:-1] if odd else points)]


def build(ctx: Context) -> DragTab:
    def source_of(path, request=None) -> Image.Image:
        return prepare_image(ctx.engine(request).model, upload_path(path, "an image to drag"))

    def rec(cls, name, *args, **kwargs):
        return ctx.recommended_control(cls, "drag", name, *args, **kwargs)

    with gr.Tab("Drag (DragDiffusion)", id="drag"):
        with gr.Row():
            with gr.Column():
                r_image = SafeImage(label="Image", type="filepath", sources=["upload", "clipboard"], height=220,
                                   elem_id="drag-input")
                world_note.add(ctx, r_image, "drag-photo-note")
                r_mask = SafeImageMask(label="Editable region (paint; empty = whole image)", type="numpy",
                                      format="png", sources=[], elem_id="drag-mask",
                                      brush=gr.Brush(colors=[REGION_PAINT], default_color=REGION_PAINT,
                                                     color_mode="fixed", default_size=24))
                r_prompt = gr.Textbox(label="Prompt (optional: describing the image)", elem_id="drag-prompt")
                with gr.Accordion("Drag settings", open=False):
                    with gr.Row():
                        # every setting starts at the active model's recommended value (a model switch moves it)
                        r_lora_steps = rec(gr.Slider, "lora_steps", 0, 300, step=1, label="LoRA steps (0 = no LoRA)",
                                           elem_id="drag-lora-steps")
                        r_lora_rank = rec(gr.Slider, "lora_rank", 1, 64, step=1, label="LoRA rank")
                        r_lora_lr = rec(gr.Number, "lora_lr", label="LoRA learning rate")
                    with gr.Row():
                        r_iters = rec(gr.Slider, "drag_iterations", 1, 300, step=1, label="Drag iterations",
                                      elem_id="drag-iters")
                        r_latent_lr = rec(gr.Number, "latent_lr", label="Latent learning rate")
                        r_lambda = rec(gr.Slider, "mask_weight", 0, 1, step=0.01, label="Mask term lambda")
                    with gr.Row():
                        r_strength = rec(gr.Slider, "inversion_strength", 0.1, 1.0, step=0.02,
                                         label="Inversion strength (of 50 steps)", elem_id="drag-strength")
                        r_block = rec(gr.Slider, "feature_block", 0, 3, step=1, label="Feature block (UNet up block)")
                        r_r1 = rec(gr.Slider, "r1", 0, 5, step=1, label="r1 (supervision patch)")
                        r_r2 = rec(gr.Slider, "r2", 1, 10, step=1, label="r2 (tracking radius)")
                    r_smooth = gr.Checkbox(SMOOTH_NAME in ctx.studio.model.loras,
                                           label="Use the Smooth LoRA during the drag",
                                           info="Ticked when the model has the Smooth LoRA (else load it in "
                                                "'Model and LoRA')", elem_id="drag-smooth")
                    r_warm = rec(gr.Checkbox, "warm_start", label="Warm start: carry the painted region along the drag "
                                                                  "first",
                                 info="The optimisation then only corrects it: far fewer iterations, and colours "
                                      "hold on long drags and small images. Needs a painted region. Keep the LoRA "
                                      "short (40 steps or none): it remembers the old layout.",
                                 elem_id="drag-warm")
                ctx.restorable("drag", prompt=r_prompt, lora_steps=r_lora_steps, lora_rank=r_lora_rank,
                               lora_lr=r_lora_lr, drag_iterations=r_iters, latent_lr=r_latent_lr, mask_weight=r_lambda,
                               inversion_strength=r_strength, feature_block=r_block, r1=r_r1, r2=r_r2,
                               smooth_lora=r_smooth, warm_start=r_warm)
                with gr.Row():
                    r_undo = gr.Button("Undo last point", elem_id="drag-undo")
                    r_clear = gr.Button("Clear points", elem_id="drag-clear")
                    r_run = gr.Button("Drag", variant="primary", elem_id="drag-run")
                    r_stop = gr.Button("Stop", variant="stop", elem_id="drag-stop")
                r_status = gr.Markdown("", elem_id="drag-status")
                gr.Markdown(DRAG_HELP)
                gr.Examples(examples.IMAGES, [r_image, r_prompt])
            with gr.Column():
                r_points_img = gr.Image(label="Click: handle (red), then target (blue)", interactive=False,
                                        format="png", elem_id="drag-points")
                # the points as the `drag` endpoint takes them (a JSON list of [x, y]), kept out of sight; the
                # list below shows them one pair a line
                r_points = gr.JSON([], label="Points (x, y) in model pixels: handle, target, handle, ...",
                                   visible="hidden", elem_id="drag-points-json")
                r_points_list = gr.Textbox("", label="Points (x, y) in model pixels: handle → target",
                                           placeholder="No points yet: click a handle, then its target",
                                           interactive=False, lines=1, max_lines=8, elem_id="drag-points-list")
                r_preview = gr.Image(label="Live preview", format="jpeg", interactive=False, height=256,
                                     elem_id="drag-preview")
                with gr.Row():
                    r_original = gr.Image(label="Original", format="png", interactive=False, height=256)
                    r_result = gr.Image(label="Dragged", format="png", type="filepath", interactive=False,
                                        height=256, elem_id="drag-result")
                ctx.send_row("drag", ["invert", "edit", "instruct", "diffedit", "sdedit", "drag", "inpaint"],
                             "dragged image")

    def on_upload(path, request: gr.Request):
        if not path:
            return None, [], None, ""
        try:
            src = source_of(path, request)
        except InputError as exc:
            raise gr.Error(str(exc), print_exception=False) from None
        shown = masks.enlarge_for_display(src)
        return (np.asarray(shown), [], masks.editor_value(src, None),
                f"Image ready ({src.width}x{src.height} model pixels): click a handle, then its target.")

    def on_click(path, points, evt: gr.SelectData, request: gr.Request):
        if not path:
            raise gr.Error("Upload an image first.", print_exception=False)
        src = source_of(path, request)
        k = _display_scale(src)
        index = evt.index if isinstance(evt.index, (list, tuple)) and len(evt.index) == 2 else None
        if index is None or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in index):
            raise InputError("Click on the image to place a point.")
        x, y = int(index[0]) // k, int(index[1]) // k
        points = clicked_points(points) + [[x, y]]
        kind = "handle" if len(points) % 2 else "target"
        return points_view(src, points), points, f"{kind} at ({x}, {y})" + ("" if kind == "target" else
                                                                           " · now click its target")

    def edit_points(path, points, how, request=None):
        points = clicked_points(points)
        points = points[:-1] if how == "undo" else []
        return (points_view(source_of(path, request), points) if path else None), points, f"{len(points)} point(s)"

    out = Outputs(preview=r_preview, original=r_original, dragged=r_result, status=r_status)

    def run_drag(image, points, mask_value, prompt, lora_steps, lora_rank, lora_lr, iters, latent_lr, lam,
                 strength, block, r1, r2, smooth, warm, request: gr.Request):
        painted = masks.painted(mask_value)

        def work(session, token):
            src = source_of(image, request)
            pts = parse_points(points)  # malformed JSON (a number, a string, odd pairs) -> a clear message
            handles, targets = check_points(pts[0::2], pts[1::2], src.size)
            p = DragParams(handles, targets, prompt or "", lora_steps=lora_steps, lora_rank=lora_rank,
                           lora_lr=lora_lr, drag_iterations=iters, latent_lr=latent_lr, mask_weight=lam,
                           inversion_strength=strength, feature_block=block, r1=r1, r2=r2, smooth_lora=bool(smooth),
                           warm_start=bool(warm))
            yield from ctx.engine(request).drag(src, p, painted, session.drag_cache, token, session.preview)

        def done(ev, session):
            r = ev.result
            t = r.timings
            cached = [k for k, v in r.cached.items() if v]
            note = f" · reused: {', '.join(cached)}" if cached else ""
            region = "" if painted is not None else " · no region painted: the whole image was editable"
            if warm:
                region += (" · warm start" if r.params.get("warm_start") else
                           " (so no warm start: paint the region to carry)")
            return dict(preview=ev.preview, original=r.source,
                        dragged=downloads.result_file(session, r.image.image, "drag"),
                        status=f"Done · LoRA {t.get('lora', 0):.1f} s, inversion {t.get('inversion', 0):.1f} s, "
                               f"drag {t.get('drag', 0):.1f} s, denoise {t.get('denoise', 0):.1f} s{note}{region}")

        yield from ctx.run(request, out, work, done)

    r_points.change(points_text, [r_points], [r_points_list], api_visibility="private", queue=False)
    r_image.change(on_upload, [r_image], [r_points_img, r_points, r_mask, r_status], api_visibility="private",
                   queue=False)
    r_points_img.select(on_click, [r_image, r_points], [r_points_img, r_points, r_status], api_visibility="private",
                        queue=False)

    def undo_point(path, pts, request: gr.Request):
        return edit_points(path, pts, "undo", request)

    def clear_points(path, pts, request: gr.Request):
        return edit_points(path, pts, "clear", request)

    r_undo.click(undo_point, [r_image, r_points],
                 [r_points_img, r_points, r_status], api_visibility="private", queue=False)
    r_clear.click(clear_points, [r_image, r_points],
                  [r_points_img, r_points, r_status], api_visibility="private", queue=False)
    inputs = [r_image, r_points, r_mask, r_prompt, r_lora_steps, r_lora_rank, r_lora_lr, r_iters, r_latent_lr,
              r_lambda, r_strength, r_block, r_r1, r_r2, r_smooth, r_warm]
    # preprocessed (unlike the other image tabs): the mask editor's value must arrive as arrays; the upload was
    # already read by the pipeline's own loader when it changed (on_upload), so a bad file never gets this far
    event = r_run.click(run_drag, inputs, out, api_name="drag", **GPU)
    ctx.stop_button(r_stop, r_status, [event], api_name="drag_stop")
    ctx.drag_smooth.append(r_smooth)  # its default follows the active model (app/tabs/models.py)
    return DragTab(r_image, r_prompt, r_smooth)
