"""The "Send to ..." hand-offs between tabs: an image this session made (kept server-side: session.handoff or a
history item, never a path the client sends) goes into the receiving tab's image input, the result's prompt
into its prompt box, and that tab is selected."""
from __future__ import annotations

import gradio as gr

from pipelines.core.image_io import load_rgb
from pipelines.core.metadata import read_metadata

from . import masks
from .context import Context, Receiver, SendRow


def receiver_outputs(receiver: Receiver) -> list:
    return [receiver.image] + ([receiver.prompt] if receiver.prompt is not None else [])


def receiver_values(receiver: Receiver, path: str, params: dict) -> list:
    """The receiver's new image (a path, or an editor value showing the image enlarged with nothing painted)
    and, when it has a prompt box, the result's prompt (left as it is when the result has none)."""
    image = path if receiver.kind == "file" else masks.editor_value(load_rgb(path), None)
    values = [image]
    if receiver.prompt is not None:
        prompt = params.get("prompt")
        values.append(prompt if isinstance(prompt, str) else gr.skip())
    return values


def _send_kept(ctx: Context, row: SendRow, receiver: Receiver):
    def send(request: gr.Request):
        path = ctx.kept(request, row.key, row.what)
        return (*receiver_values(receiver, path, read_metadata(path)), gr.Tabs(selected=receiver.tab))
    return send


def wire_send_rows(ctx: Context) -> None:
    """Every tab's send row (ctx.send_row) to its receivers (ctx.receiver)."""
    for row in ctx.send_rows:
        for tab, button in row.buttons.items():
            receiver = ctx.receivers[tab]
            button.click(_send_kept(ctx, row, receiver), None, receiver_outputs(receiver) + [ctx.tabs],
                         api_visibility="private", queue=False)
