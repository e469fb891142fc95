"""The Personalize tab (DreamBooth LoRA): 3-5 images of a subject, an identifier and a class word; Train shows
both loss curves and a preview of a token prompt and a class prompt as it goes, Stop leaves the model as it was.
The finished adapter is loaded as `db_<identifier>` (every tab's LoRA menu offers it) and downloadable as
diffusers' LoRA file with its JSON sidecar. UI only: the training is pipelines/dreambooth.py.

Hosted studios: training is switched off. An adapter lives on the model every visitor shares (hosted sessions
choose among preloaded models, app/sessions.py), so one visitor's concept would appear in everyone's menus and
training holds the one GPU for minutes; the tab says so and the endpoint refuses with that message."""
from __future__ import annotations

import shutil
from dataclasses import dataclass

import gradio as gr
import pandas as pd

from pipelines.core.errors import InputError
from pipelines.core.events import Kind
from pipelines.dreambooth import MAX_IMAGES, MIN_IMAGES, DreamBoothParams, adapter_name_of

from ..context import Context
from ..runner import GPU, Outputs
from ..streaming import status_line, upload_path
from ..uploads import SafeImage

HOSTED_OFF = ("Training is switched off on this hosted studio: a personal adapter would change the model that "
              "every visitor shares. Run the studio on your own machine (python app.py) to personalise it.")
HELP = f"""**1.** Upload {MIN_IMAGES}-{MAX_IMAGES} images of one subject, all of one size and framing. **2.** Pick an
identifier: a made-up word such as `sks` (a word the model already knows is refused), and the class word: what the
subject is (`dog`, `mug`; on the embedded world model a world shape such as `circle`). **3.** Train. Each step
learns "a <identifier> <class>" from your images and, with prior preservation, "a <class>" from images the model
itself makes first, so the class keeps its other members. The preview shows a prompt with the identifier (left)
and one without (right). **4.** When done, the adapter `db_<identifier>` is in every tab's LoRA menu: tick the LoRA
checkbox, choose it and put the identifier in the prompt. Download its .safetensors (loads with diffusers'
`load_lora_weights`) and the JSON that says how it was trained."""
LOSS_COLUMNS = ("step", "loss", "curve")


@dataclass
class PersonalizeTab:
    train: object          # the Train event (app/ui.py chains the LoRA menus' refresh after it)
    images: list


def loss_frame(losses: dict | None) -> pd.DataFrame:
    """Both loss curves (instance, prior) as LinePlot data, one row per step and curve."""
    rows = []
    for curve in ("instance", "prior"):
        for i, v in enumerate((losses or {}).get(curve) or [], 1):
            if v == v:  # no NaN rows (training without prior)
                rows.append((i, float(v), curve))
    return pd.DataFrame(rows, columns=list(LOSS_COLUMNS))


def build(ctx: Context) -> PersonalizeTab:
    hosted = ctx.hosting.public
    with gr.Tab("Personalize (DreamBooth)", id="personalize"):
        with gr.Row():
            with gr.Column():
                if hosted:
                    gr.Markdown(HOSTED_OFF, elem_id="db-hosted-note")
                with gr.Row():
                    images = [SafeImage(label=f"Image {i + 1}", type="filepath", sources=["upload", "clipboard"],
                                        height=140, elem_id=f"db-image-{i + 1}") for i in range(MAX_IMAGES)]
                with gr.Row():
                    token = gr.Textbox("sks", label="Identifier (a made-up word)", elem_id="db-token")
                    class_word = gr.Textbox("", label="Class word (what the subject is)", elem_id="db-class")
                with gr.Row():
                    steps = gr.Slider(1, 2000, value=400, step=1, label="Training steps", elem_id="db-steps")
                    prior = gr.Checkbox(True, label="Prior preservation (class images from the model)",
                                        elem_id="db-prior")
                    prior_images = gr.Slider(1, 100, value=8, step=1, label="Class images")
                with gr.Accordion("More settings", open=False):
                    with gr.Row():
                        lr = gr.Number(1e-4, label="Learning rate")
                        rank = gr.Slider(1, 32, value=4, step=1, label="LoRA rank")
                        seed = gr.Number(0, precision=0, label="Seed")
                        preview_every = gr.Slider(0, 500, value=50, step=1, label="Preview every (steps, 0 = none)")
                with gr.Row():
                    run = gr.Button("Train", variant="primary", elem_id="db-run", interactive=not hosted)
                    stop = gr.Button("Stop", variant="stop", elem_id="db-stop")
                status = gr.Markdown("", elem_id="db-status")
                gr.Markdown(HELP)
            with gr.Column():
                preview = gr.Image(label="Preview: with the identifier | without", format="png", interactive=False,
                                   height=200, elem_id="db-preview")
                loss = gr.LinePlot(loss_frame(None), x="step", y="loss", color="curve", title="Training loss",
                                   x_title="step", y_title="MSE", elem_id="db-loss")
                files = gr.File(label="Adapter (.safetensors) and its sidecar (.json)", file_count="multiple",
                                interactive=False, elem_id="db-files")

    out = Outputs(preview=preview, loss=loss, files=files, status=status)

    def run_train(img1, img2, img3, img4, img5, token_text, class_text, n_steps, use_prior, n_class, rate, r, s,
                  every, request: gr.Request = None):
        uploads = [img1, img2, img3, img4, img5]

        def work(session, cancel):
            if hosted:
                raise InputError(HOSTED_OFF)
            paths = [upload_path(v, f"image {i + 1}") for i, v in enumerate(uploads) if v is not None]
            p = DreamBoothParams(token=token_text or "", class_word=class_text or "", steps=n_steps,
                                 prior=bool(use_prior), prior_images=n_class, lr=rate, rank=r,
                                 seed=0 if s is None else s, preview_every=every)
            engine = ctx.engine(request)
            replaced = adapter_name_of(token_text) in engine.model.loras
            try:
                yield from engine.dreambooth(paths, p, cancel)
            finally:
                if replaced:  # cached inversions key on the adapter's name, whose weights may have changed
                    ctx.sessions.clear_inversions()

        def show(ev):
            values = {"status": status_line(ev)}
            if ev.kind is Kind.LOSSES:
                values["loss"] = loss_frame(ev.partial)
            if ev.preview is not None:
                values["preview"] = ev.preview
            return values

        def done(ev, session):
            r = ev.result
            folder = session.out_dir / "dreambooth"
            folder.mkdir(parents=True, exist_ok=True)
            copies = [str(shutil.copy2(path, folder / path.name)) for path in (r.path, r.sidecar)]
            return dict(preview=r.preview, loss=loss_frame(r.losses), files=copies,
                        status=f"Done · {ev.message}")

        yield from ctx.run(request, out, work, done, show)

    inputs = [*images, token, class_word, steps, prior, prior_images, lr, rank, seed, preview_every]
    event = run.click(run_train, inputs, out, api_name="personalize", preprocess=False, **GPU)
    ctx.stop_button(stop, status, [event], api_name="personalize_stop")
    return PersonalizeTab(event, images)


def wire(ctx: Context, tab: PersonalizeTab, active: gr.Markdown) -> None:
    """After training, every tab's LoRA controls and the active model's line show the new adapter (as after a
    LoRA load in 'Model and LoRA'); called once every tab exists."""
    hidden = dict(api_visibility="private", queue=False)

    def refresh(request: gr.Request = None):
        return [ctx.model_status(ctx.engine(request).model), *ctx.lora_updates(request)]

    tab.train.then(refresh, None, [active, *ctx.lora_outputs()], **hidden)
