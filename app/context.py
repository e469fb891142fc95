"""What every tab shares: the studio and which model a request runs on, the sessions, the hosting settings, the
job runner, the hand-off store, and the controls that follow the active model (sizes, LoRA controls) so the
model panel can update them in every tab."""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import gradio as gr

from pipelines.core.errors import InputError
from pipelines.core.limits import get_limits
from pipelines.core.lora import SMOOTH_LORA_FILE, SMOOTH_LORA_REPO, SMOOTH_NAME
from pipelines.inversion import METHODS as INVERSION_METHODS
from pipelines.recommended import recommended, source_note
from pipelines.studio import Studio

from . import pnginfo, runner
from .hosting import Hosting
from .sessions import SessionRegistry
from .uploads import SafeImage, client_path

SMOOTH_LABEL = "Use the Smooth LoRA"
COMPARE_SMOOTH_LABEL = "Compare with and without the Smooth LoRA"


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


SEND_LABELS = {"generate": "Generate", "invert": "Invert", "edit": "Edit", "instruct": "Instruct",
               "diffedit": "DiffEdit", "sdedit": "SDEdit", "drag": "Drag", "inpaint": "Inpaint"}


@dataclass
class Receiver:
    tab: str
    image: gr.Component
    prompt: gr.Component | None = None
    kind: str = "file"


@dataclass
class SendRow:
    key: str              # session.handoff key of the result it sends
    what: str             # how messages name it ("There is no edited image to send yet.")
    buttons: dict         # target tab id -> button


@dataclass
class RecommendedControl:
    """A control that starts at the active model's recommended value of `method`'s parameter `name`."""
    control: gr.Component
    method: str
    name: str
    info: str = ""   # the control's own info text; where its value comes from is appended


def recommended_info(model, method: str, name: str, info: str = "") -> str:
    note = source_note(model, method, name)
    note = note[0].upper() + note[1:]
    return f"{info} · {note}" if info else note


def recommended_updates(model, controls: list[RecommendedControl]) -> list:
    """Every recommended control at `model`'s value, its info text saying whose (one dict per control)."""
    values = {c.method: recommended(model, c.method) for c in controls}
    return [gr.update(value=values[c.method][c.name], info=recommended_info(model, c.method, c.name, c.info))
            for c in controls]


@dataclass
class LoraControls:
    use: gr.Checkbox
    strength: gr.Slider
    menu: gr.Dropdown
    compare: gr.Button | None = None   # the tab's "Compare with and without" button, whose label names the adapter


# ------------------------------------------------------------------ image sizes
def snap_size(value, multiple: int) -> int:
    """The nearest positive multiple of `multiple` (with 8: a typed 99 -> 96, 100 -> 104: halves round up)."""
    return max(multiple, int(float(value) / multiple + 0.5) * multiple)


def snapped_sizes(model, width, height) -> tuple:
    """Width and height as the UI runs them: typed values snapped to the model's size multiple (the slider's
    number box accepts any number), and a note saying what changed ("width 100 → 104"), else "". Empty values
    stay empty (the model's native size); the pipelines still refuse what is out of range."""
    step, out, notes = model.size_multiple, [], []
    for name, v in (("width", width), ("height", height)):
        try:
            f = float(v)
        except (TypeError, ValueError):
            f = None
        if f is None or not math.isfinite(f) or f <= 0:
            out.append(v)  # empty (native size) or not a size: the pipeline decides, with its own message
            continue
        snapped = snap_size(f, step)
        if snapped != f:
            notes.append(f"{name} {f:g} → {snapped}")
        out.append(snapped)
    return out[0], out[1], ", ".join(notes)


# ------------------------------------------------------------------ shared controls without state
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


class Context:
    """Built once per demo by app/ui.py and passed to every tab's build(ctx)."""

    def __init__(self, studio: Studio, sessions: SessionRegistry, hosting: Hosting):
        self.studio, self.sessions, self.hosting = studio, sessions, hosting
        self.tabs: gr.Tabs | None = None   # the tab strip: hand-offs select a tab
        self.stop = runner.stopper(sessions)
        # controls that follow the active model, in the order the tabs made them
        self.sizes: list[gr.Slider] = []             # width/height sliders: the model's size range and default
        self.guidance: list[gr.Slider] = []          # set to the model's recommended guidance (Instruct's sT, sI)
        self.loras: list[LoraControls] = []
        self.drag_smooth: list[gr.Checkbox] = []     # the Drag tab's "Use the Smooth LoRA during the drag"
        self.restore: dict[str, pnginfo.TabParams] = {}  # tab id -> its controls by parameter key (PNG info)
        self.recommended: list[RecommendedControl] = []  # start at the model's recommended settings (drag, SDEdit)
        self.followers: list[tuple] = []  # (control, update(model)): other controls that follow the active model
        # "Send to" hand-offs and the history (app/ui.py wires them once every tab is built)
        self.gpu_events: list = []                   # every job event, as the tabs gave them to stop_button
        self.receivers: dict[str, Receiver] = {}     # tab id -> where a sent image (and its prompt) goes
        self.send_rows: list[SendRow] = []

    # -------------------------------------------------------------- the model a request runs on
    def engine(self, request) -> Studio:
        """The studio as this session sees it: a hosted session runs on the allow-listed model it chose."""
        if self.hosting.public:
            session = self.sessions.peek(request)
            chosen = self.studio.pool.get(session.model_id) if session is not None and session.model_id else None
            if chosen is not None:
                return self.studio.with_model(chosen)
        return self.studio

    def model_status(self, m=None) -> str:
        m = m or self.studio.model
        text = f"**Active model:** {m.display_name}"
        if m.random_weights and "random weights" not in m.label:
            text += " · ⚠️ random weights, for testing"
        if self.studio.notice and m is self.studio.model:
            text += f"\n\n{self.studio.notice}"
        if m.loras:
            text += f"\n\n**Loaded LoRA:** {', '.join(m.loras)}"
        return text

    def lora_name(self, use_lora: bool, adapter: str | None = None, request=None):
        """The adapter a job applies: none when unticked; else the one chosen in the adapter menu, which is the
        Smooth LoRA ("smooth") unless another was chosen (also for API calls that do not send the menu)."""
        if not use_lora:
            return None
        m = self.engine(request).model
        name = (adapter or "").strip() or SMOOTH_NAME
        if name in m.loras:
            return name
        loaded = (f" Loaded: {', '.join(repr(n) for n in m.loras)} (choose one in the LoRA adapter menu)."
                  if m.loras else "")
        if name == SMOOTH_NAME:
            raise InputError(f"The Smooth LoRA is not loaded for {m.label}: load it in 'Model and LoRA' (the Hub repo "
                             f"{SMOOTH_LORA_REPO}, or a {SMOOTH_LORA_FILE} file), or untick "
                             f"'{SMOOTH_LABEL}'.{loaded}")
        raise InputError(f"LoRA {name!r} is not loaded for {m.label}: load it in 'Model and LoRA' first.{loaded}")

    # -------------------------------------------------------------- jobs
    def run(self, request, out: runner.Outputs, work, done, show=None, start: dict | None = None):
        """A GPU handler's job for the request's session (app/runner.py run)."""
        return runner.run(self.sessions, request, out, work, done, show, start)

    def stop_button(self, button: gr.Button, status, events: list, **kwargs) -> None:
        """Stop cancels the session's job and these events; hidden unless kwargs name a public endpoint."""
        kwargs = {"api_visibility": "private", **kwargs}
        button.click(self.stop, None, status, cancels=events, queue=False, **kwargs)
        self.gpu_events += events

    def receiver(self, tab: str, image, prompt=None, kind: str = "file") -> None:
        """Where "Send to <tab>" puts an image: `image` (kind "file": an Image taking a path; "editor": an
        ImageEditor / ImageMask taking an editor value) and, when given, the result's prompt into `prompt`."""
        self.receivers[tab] = Receiver(tab, image, prompt, kind)

    def send_row(self, key: str, targets: list[str], what: str = "result") -> SendRow:
        """A row of "Send to ..." buttons for what this session kept under `key` (session.keep_result; the
        history keeps every single-image result under its method's name), wired by app/ui.py."""
        with gr.Row():
            buttons = {t: gr.Button(f"Send to {SEND_LABELS[t]}", size="sm", elem_id=f"send-{key}-{t}")
                       for t in targets}
        row = SendRow(key, what, buttons)
        self.send_rows.append(row)
        return row

    def kept(self, request, key: str, what: str) -> str:
        """What this session made under `key` (hand-offs pass it server-side, never a path the client sends)."""
        session = self.sessions.peek(request)
        path = session.handoff_png(key) if session is not None else None
        if path is None:
            raise InputError(f"There is no {what} to send yet.")
        return path

    # -------------------------------------------------------------- controls that follow the model
    def size_slider(self, label: str, elem_id: str | None = None) -> gr.Slider:
        m = self.studio.model
        slider = gr.Slider(m.size_multiple, max(1024, m.resolution), value=m.resolution, step=m.size_multiple,
                           label=label, elem_id=elem_id)
        self.sizes.append(slider)

        def snap(value, request: gr.Request):
            """A typed size (the number box takes any number) moves to the model's multiple when the box is left;
            the handlers snap too (snapped_sizes), for API calls and a Run clicked before leaving the box."""
            try:
                snapped = snap_size(value, self.engine(request).model.size_multiple)
            except (TypeError, ValueError, OverflowError):
                return gr.skip()
            return gr.skip() if snapped == value else snapped

        slider.release(snap, slider, slider, queue=False, api_visibility="private")
        return slider

    def recommended_control(self, cls, method: str, name: str, *args, info: str = "", **kwargs):
        """`cls(*args, **kwargs)` starting at the active model's recommended value of `method`'s parameter `name`
        (pipelines/recommended.py), its info text saying so; a model switch moves it (app/tabs/models.py)."""
        m = self.studio.model
        control = cls(*args, value=recommended(m, method)[name], info=recommended_info(m, method, name, info),
                      **kwargs)
        self.recommended.append(RecommendedControl(control, method, name, info))
        return control

    def follow_model(self, control, update) -> None:
        """`control` gets update(model) (a gr.update) after a model switch and on page load, with the recommended
        controls (e.g. Instruct's Fast mode, offered only for a model that has a CoDi model)."""
        self.followers.append((control, update))

    def recommended_outputs(self) -> list:
        return [c.control for c in self.recommended] + [control for control, _ in self.followers]

    def recommended_updates(self, request=None) -> list:
        model = self.engine(request).model
        return recommended_updates(model, self.recommended) + [update(model) for _, update in self.followers]

    def seed_controls(self, key: str, default: int = -1, label: str = "Seed (-1 = random)",
                      elem_id: str | None = None) -> gr.Number:
        """A seed box with "♻️ reuse last seed" (the seed this session's last run of `key` used, kept server-side:
        the tab's done handler calls remember_seed) and "🎲 random (-1)" beside it."""
        elem_id = elem_id or f"{key}-seed"
        with gr.Column(min_width=160):
            number = gr.Number(default, label=label, precision=0, elem_id=elem_id)
            with gr.Row():
                reuse = gr.Button("♻️ reuse last seed", size="sm", min_width=60, elem_id=f"{elem_id}-reuse")
                randomize = gr.Button("🎲 random (-1)", size="sm", min_width=60, elem_id=f"{elem_id}-random")

        def last_seed(request: gr.Request):
            session = self.sessions.peek(request)
            seed = session.last_seeds.get(key) if session is not None else None
            if seed is None:
                gr.Info("No seed to reuse yet: run this tab once first.")
                return gr.skip()
            return seed

        reuse.click(last_seed, None, number, api_visibility="private")
        randomize.click(None, None, number, js="() => -1")  # in the page: no server round trip
        return number

    @staticmethod
    def remember_seed(session, key: str, seed) -> None:
        """The seed a run of `key` used, for its "reuse last seed" button."""
        if seed is not None and int(seed) >= 0:
            session.last_seeds[key] = int(seed)

    def lora_controls(self, prefix: str) -> LoraControls:
        """Use-LoRA checkbox (ticked when the model has the Smooth LoRA), strength, and the adapter menu (shown
        when an adapter other than the Smooth LoRA is loaded); the checkbox's label names the adapter."""
        m = self.studio.model
        adapter = default_adapter(m)
        with gr.Row():
            use = gr.Checkbox(SMOOTH_NAME in m.loras, label=use_label(adapter), elem_id=f"{prefix}-use-lora")
            strength = gr.Slider(0, 2, value=1.0, step=0.05, label="LoRA strength")
            menu = gr.Dropdown(list(m.loras), value=adapter, allow_custom_value=True, label="LoRA adapter",
                               info="Which loaded adapter the checkbox applies", visible=adapter_menu_visible(m),
                               elem_id=f"{prefix}-lora-adapter")
        controls = LoraControls(use, strength, menu)
        self.loras.append(controls)
        return controls

    def compare_button(self, prefix: str, lora: LoraControls) -> gr.Button:
        """The LoRA comparison's button; its label names the adapter of `lora`'s menu."""
        lora.compare = gr.Button(compare_label(default_adapter(self.studio.model)), elem_id=f"{prefix}-compare")
        return lora.compare

    def lora_outputs(self) -> list:
        """Every control lora_control_updates sets, in its order."""
        return ([c for lora in self.loras for c in (lora.use, lora.menu)] +
                [lora.compare for lora in self.loras if lora.compare is not None] + self.drag_smooth)

    def lora_updates(self, request=None) -> list:
        return lora_control_updates(self.engine(request).model, len(self.loras),
                                    sum(lora.compare is not None for lora in self.loras), len(self.drag_smooth))

    # -------------------------------------------------------------- PNG info: settings restored from parameters
    def restorable(self, tab_id: str, lora: LoraControls | None = None, when: dict | None = None, translate=None,
                   **controls) -> gr.Image:
        """Registers the tab's controls by parameter key (the studio's metadata keys: prompt, negative_prompt,
        seed, steps, guidance, width, height, ...; `lora` adds use_lora, lora_strength and lora_adapter) and
        puts the "Restore settings from a PNG" drop box here, with its note (app/pnginfo.py). `when` maps a
        parameter key to (control, value): the control is set to the value whenever that key is restored.
        `translate(params) -> params` maps a PNG's parameters onto the tab's keys first (e.g. a mode's own
        controls)."""
        if lora is not None:
            controls.update(use_lora=lora.use, lora_strength=lora.strength, lora_adapter=lora.menu)
        follows = {}
        for key, (control, value) in (when or {}).items():
            controls[f"{key}_follows"] = control
            follows[f"{key}_follows"] = (key, value)
        tab = self.restore[tab_id] = pnginfo.TabParams(tab_id, controls, lora=lora, when=follows, translate=translate)
        # an Image slot (not gr.File): a URL or a foreign path gets the studio's upload refusal, as in every
        # other image slot; only its path is used (preprocess=False), the pixels are never decoded
        tab.drop = SafeImage(label=pnginfo.DROP_LABEL, type="filepath", sources=["upload", "clipboard"], height=110,
                             elem_id=f"{tab_id}-restore-png", elem_classes=["restore-png"])
        tab.note = gr.Markdown("", elem_id=f"{tab_id}-restore-note")

        def restore_png(file, request: gr.Request):
            return self.restore_from_upload(tab_id, file, request)

        tab.drop.upload(restore_png, [tab.drop], self.restore_outputs(tab_id) + [tab.drop, tab.note],
                        preprocess=False, queue=False, api_visibility="private")
        return tab.drop

    def restore_outputs(self, tab_id: str) -> list:
        """The components restore_updates' list updates, in its order."""
        return self.restore[tab_id].outputs()

    def restore_updates(self, tab_id: str, params: dict, request=None) -> tuple[list, str]:
        """(one update per component of restore_outputs(tab_id), note): the tab's controls set from a
        metadata dict (a studio "studio" JSON or a parsed A1111 text); the note says what was restored,
        clamped or skipped. The tab's note Markdown is `ctx.restore[tab_id].note`."""
        model = self.engine(request).model
        updates, note = pnginfo.restore_updates(self.restore[tab_id], params, list(model.loras))
        for key, update in zip(self.restore[tab_id].controls, updates, strict=True):
            if key == "lora_adapter" and isinstance(update, dict) and "value" in update:
                use = updates[list(self.restore[tab_id].controls).index("use_lora")]
                if isinstance(use, dict):
                    use["label"] = use_label(update["value"])
        made_with = params.get("model") if isinstance(params, dict) else None
        if made_with and str(made_with) != model.id:
            note += f" It was made with the model '{pnginfo.shown(made_with)}' (active: '{model.id}')."
        return updates, note

    def restore_from_upload(self, tab_id: str, file, request=None) -> tuple:
        """The drop box's handler: the tab's updates, the cleared drop box and the note. A file refused by the
        upload checks (not in Gradio's upload folder, too large, not an image) is refused like every upload
        (InputError: the studio's message); a PNG without readable parameters only changes the note."""
        path = client_path(file, "a PNG")
        try:
            updates, note = self.restore_updates(tab_id, pnginfo.read_upload(path), request)
        except InputError as exc:
            updates, note = [gr.skip() for _ in self.restore_outputs(tab_id)], f"⚠️ {exc}"
        except Exception:  # noqa: BLE001 - a hostile file never shows a traceback; the log has it
            logging.getLogger(__name__).exception("restoring settings from a PNG failed")
            updates = [gr.skip() for _ in self.restore_outputs(tab_id)]
            note = "⚠️ The PNG's parameters could not be read."
        return (*updates, gr.update(value=None), note)
