"""The History panel under the tabs: one gallery of this browser's results across tabs (app/history.py), newest
first, kept in the browser's localStorage (gr.BrowserState) so a reload restores it; click an item to see its
parameters, restore them into its tab, or send its image to a tab."""
from __future__ import annotations

import re
from dataclasses import dataclass

import gradio as gr

from pipelines.core.errors import InputError

from .context import SEND_LABELS, Context
from .sending import receiver_outputs, receiver_values

STORAGE_KEY = "diffusion-studio-history"
# BrowserState encrypts with a secret it sends to the page anyway; a fixed one keeps the history readable after
# the server restarts (a random one per start would lose it). The data is the visitor's own, in their browser.
STORAGE_SECRET = "diffusion-studio-history"
SEND_TARGETS = ("invert", "edit", "instruct", "diffedit", "sdedit", "drag", "inpaint")
_ITEM_FILE = re.compile(r"history_([0-9a-f]{12})\.png$")


@dataclass
class HistoryPanel:
    store: gr.BrowserState
    gallery: gr.Gallery
    params: gr.JSON
    selected: gr.State
    restore: gr.Button
    sends: dict
    status: gr.Markdown


def build() -> HistoryPanel:
    store = gr.BrowserState([], storage_key=STORAGE_KEY, secret=STORAGE_SECRET)
    with gr.Accordion("History", open=True, elem_id="history"):
        # six small tiles a row however few items there are (fit_columns would make 3 items a third wide each);
        # "studio-result": small pictures enlarged crisp (app/static/studio.css)
        gallery = gr.Gallery(label="Results in this browser, newest first: click one", columns=6, fit_columns=False,
                             height=320, object_fit="contain", interactive=False, elem_id="history-gallery",
                             elem_classes=["studio-result"])
        with gr.Row():
            restore = gr.Button("Restore settings", size="sm", min_width=100, elem_id="history-restore")
            sends = {t: gr.Button(f"Send to {SEND_LABELS[t]}", size="sm", min_width=100, elem_id=f"history-send-{t}")
                     for t in SEND_TARGETS}
        status = gr.Markdown("", elem_id="history-status")
        params = gr.JSON(label="Parameters of the selected result", max_height=240, elem_id="history-params")
    return HistoryPanel(store, gallery, params, gr.State(None), restore, sends, status)


def selected_id(evt: gr.SelectData, gallery_ids: list[str]) -> str | None:
    """The clicked item's id: from its file's name (the gallery may have changed since it was drawn), else from
    its position."""
    value = evt.value if isinstance(evt.value, dict) else {}
    image = value.get("image") if isinstance(value.get("image"), dict) else {}
    for name in (image.get("orig_name"), image.get("path")):
        match = _ITEM_FILE.search(name) if isinstance(name, str) else None
        if match:
            return match.group(1)
    index = evt.index
    return gallery_ids[index] if isinstance(index, int) and 0 <= index < len(gallery_ids) else None


def wire(ctx: Context, panel: HistoryPanel, demo: gr.Blocks) -> None:
    hidden = dict(api_visibility="private", queue=False)

    def shown(history):
        history.shown = history.version
        return history.gallery()

    def load(value, request: gr.Request):
        """Page load: the browser's copy goes into this (new) session, and the cleaned list back."""
        try:
            session = ctx.sessions.get(request)
        except InputError:  # too many sessions: the page still loads, without its history for now
            return gr.skip(), gr.skip()
        history = session.history
        if not history.restored:
            history.load_browser(value)
        return shown(history), history.to_browser()

    def refresh(request: gr.Request):
        """After a job: the gallery and the browser's copy, when the history changed. A session that never
        loaded the browser's copy (evicted and made again, or an API client) leaves the browser's copy alone, so
        it never overwrites what the browser kept."""
        session = ctx.sessions.peek(request)
        history = session.history if session is not None else None
        if history is None or history.shown == history.version:
            return gr.skip(), gr.skip()
        return shown(history), (history.to_browser() if history.restored else gr.skip())

    demo.load(load, [panel.store], [panel.gallery, panel.store], **hidden)
    for event in ctx.gpu_events:
        event.then(refresh, None, [panel.gallery, panel.store], **hidden)

    def item_of(item_id, request) -> object:
        session = ctx.sessions.peek(request)
        item = session.history.get(item_id) if session is not None and isinstance(item_id, str) else None
        if item is None:
            raise InputError("There is no result selected in the History yet: click one first.")
        return item

    def select(evt: gr.SelectData, request: gr.Request):
        session = ctx.sessions.peek(request)
        ids = [i.id for i in session.history.items] if session is not None else []
        item_id = selected_id(evt, ids)
        item = session.history.get(item_id) if session is not None and item_id else None
        if item is None:
            return None, None, ""
        size = "" if item.full else " (a thumbnail: the full image was too large to keep in the browser)"
        return item.id, item.params, f"Selected: {item.caption}{size}"

    panel.gallery.select(select, None, [panel.selected, panel.params, panel.status], **hidden)

    def sender(tab: str):
        receiver = ctx.receivers[tab]

        def send(item_id, request: gr.Request):
            item = item_of(item_id, request)
            if not item.full:
                raise InputError("Only a thumbnail of this result was kept in the browser: its settings can be "
                                 "restored, but its image cannot be sent on.")
            return (*receiver_values(receiver, str(item.path), item.params), gr.Tabs(selected=tab))
        return send

    for tab, button in panel.sends.items():
        button.click(sender(tab), [panel.selected], receiver_outputs(ctx.receivers[tab]) + [ctx.tabs], **hidden)

    # one Restore button for every tab: each tab's controls (ctx.restorable, app/pnginfo.py) and its note
    tabs = list(ctx.restore)
    slots, outputs = {}, []
    for tab in tabs:
        members = ctx.restore_outputs(tab) + [ctx.restore[tab].note]
        slots[tab] = (len(outputs), len(members))
        outputs += members

    def restore(item_id, request: gr.Request):
        item = item_of(item_id, request)
        if item.tab not in slots:
            raise InputError("This result's settings belong to no tab that can restore them.")
        updates, note = ctx.restore_updates(item.tab, item.params, request)
        values = [gr.skip() for _ in outputs]
        start, n = slots[item.tab]
        values[start:start + n] = [*updates, note]
        return (*values, f"Settings of '{item.caption}' restored in its tab.", gr.Tabs(selected=item.tab))

    panel.restore.click(restore, [panel.selected], outputs + [panel.status, ctx.tabs], **hidden)
