"""The Gradio Blocks studio: the tabs (app/tabs/, one module each) assembled over one shared context
(app/context.py) and job runner (app/runner.py), and the hand-offs between tabs. UI only: every handler starts
a pipeline job and renders its events."""
from __future__ import annotations

import gradio as gr

from pipelines.studio import Studio

from . import history_panel
from .context import Context, use_label
from .guard import harden
from .hosting import Hosting
from .runner import GPU, progress_on_status
from .sending import wire_send_rows
from .sessions import SessionRegistry
from .tabs import (
    diffedit,
    drag,
    edit,
    generate,
    inpaint,
    instruct,
    interpolate,
    invert,
    models,
    personalize,
    real_interpolate,
    sdedit,
)


def build_demo(studio: Studio, sessions: SessionRegistry | None = None, hosting: Hosting | None = None) -> gr.Blocks:
    """The studio's Blocks. `hosting` (app/hosting.py) says whether it is public and what its allow-lists hold;
    by default it is local, with every model and LoRA source allowed."""
    sessions = SessionRegistry() if sessions is None else sessions
    ctx = Context(studio, sessions, hosting or Hosting())

    with gr.Blocks(title="Diffusion Studio", delete_cache=(600, 3600)) as demo:
        gr.Markdown("# Diffusion Studio")
        panel = models.build(ctx)
        with gr.Tabs() as ctx.tabs:
            gen = generate.build(ctx)
            seeds = interpolate.build(ctx)
            real_interpolate.build(ctx)
            inv = invert.build(ctx)
            ed = edit.build(ctx)
            ip2p = instruct.build(ctx)
            diffedit.build(ctx)
            sdedit.build(ctx)
            dragging = drag.build(ctx)
            inpaint.build(ctx)  # the newer tabs last: the tab bar folds the ones that do not fit into a menu
            personal = personalize.build(ctx)
        history = history_panel.build()
        models.wire(ctx, panel, demo)
        personalize.wire(ctx, personal, panel.active)
        wire_handoffs(ctx, gen, seeds, inv, ed, ip2p, dragging)
        ctx.receiver("invert", inv.input, inv.prompt)
        ctx.receiver("edit", ed.input, ed.source_prompt)
        ctx.receiver("instruct", ip2p.input)
        ctx.receiver("drag", dragging.image, dragging.prompt)  # a new image clears the points (its change event)
        wire_send_rows(ctx)
        history_panel.wire(ctx, history, demo)

        def drop_session(request: gr.Request):
            sessions.drop(request)

        demo.unload(drop_session)
    harden(demo, sessions, GPU["concurrency_id"])
    progress_on_status(demo)
    return demo


def wire_handoffs(ctx: Context, gen: generate.GenerateTab, seeds: interpolate.InterpolateTab, inv: invert.InvertTab,
                  ed: edit.EditTab, ip2p: instruct.InstructTab, dragging: drag.DragTab) -> None:
    """The "Send to ..." buttons: they pass what this session made (kept server-side, app/sessions.py), never a
    path the client sends, and select the receiving tab."""
    def send_kept(key: str, what: str, tab: str):
        def send(prompt, request: gr.Request):
            return ctx.kept(request, key, what), prompt, gr.Tabs(selected=tab)
        return send

    def send_generated_to_instruct(request: gr.Request):
        return ctx.kept(request, "generate", "generated image"), gr.Tabs(selected="instruct")

    hidden = dict(api_visibility="private")
    tabs = ctx.tabs
    gen.send_invert.click(send_kept("generate", "generated image", "invert"), [gen.prompt],
                          [inv.input, inv.prompt, tabs], **hidden)
    seeds.send_invert.click(send_kept("frame", "frame", "invert"), [seeds.prompt_a], [inv.input, inv.prompt, tabs],
                            **hidden)
    gen.send_edit.click(send_kept("generate", "generated image", "edit"), [gen.prompt],
                        [ed.input, ed.source_prompt, tabs], **hidden)
    gen.send_instruct.click(send_generated_to_instruct, None, [ip2p.input, tabs], **hidden)
    # the PNG as generated (lossless, model size): the drag pipeline recognises it and reuses its trajectory
    gen.send_drag.click(send_kept("generate", "generated image", "drag"), [gen.prompt],
                        [dragging.image, dragging.prompt, tabs], **hidden)
    seeds.send_edit.click(send_kept("frame", "frame", "edit"), [seeds.prompt_a], [ed.input, ed.source_prompt, tabs],
                          **hidden)

    def invert_to_edit(prompt, method, inner, steps, guidance, use_lora, strength, adapter, request: gr.Request):
        # the inverted image and the same inversion settings, so the edit reuses the cached inversion
        return (ctx.kept(request, "invert_input", "inverted image"), prompt, method, inner, steps, guidance,
                gr.update(value=use_lora, label=use_label(adapter)), strength, adapter, gr.Tabs(selected="edit"))

    inv.send_edit.click(invert_to_edit, [inv.prompt, inv.method, inv.inner, inv.steps, inv.guidance, inv.lora.use,
                                         inv.lora.strength, inv.lora.menu],
                        [ed.input, ed.source_prompt, ed.inversion, ed.inner, ed.steps, ed.guidance, ed.lora.use,
                         ed.lora.strength, ed.lora.menu, tabs], **hidden)
