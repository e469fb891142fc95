"""The one job runner behind every tab, and the settings of every GPU event.

A tab's handler builds its parameters and a job: `work(session, token)`, a generator of pipeline events. `run`
takes the session's fresh cancel token, streams the job (app/streaming.py: throttled previews, Stop, the studio's
messages instead of tracebacks) and renders each event into the event's outputs by name (`Outputs`).
"""
from __future__ import annotations

from collections.abc import Callable, Iterator

import gradio as gr

from pipelines.core.events import Progress

from .history import record_result
from .sessions import Session, SessionRegistry
from .streaming import STARTING, JobClock, enlarged_preview, finished_status, progress_status, status_line, stream

# One GPU job at a time, across all sessions: every event that runs the model carries these settings, and this
# Gradio concurrency group is how the app serialises GPU work (app/guard.py finds GPU events by this id for the
# per-visitor admission and ZeroGPU). The queue's default_concurrency_limit (app/hosting.py) is Gradio's default
# for the other events, each on its own; it serialises nothing across events.
# pipelines.studio.Studio keeps its lock (with a cancellable, announced wait) for callers without this queue:
# scripts, the CLI and the Python API. Under the UI it is free whenever a GPU event starts, except just after a
# Stop: Gradio frees the group at once while the stopped job finishes its current UNet call, and the next job
# waits for the model there, still cancellable.
GPU = dict(concurrency_id="gpu", concurrency_limit=1)


class Outputs(list):
    """An event's output components by name, in the endpoint's order: it is the `outputs` list Gradio gets, so
    the endpoint's positional return shape is the order given here. A name may stand for several components (a
    list); its value is then one value per component.

    Calling it with values by name gives the positional update: those values, and gr.skip() (left as shown) for
    every other output. Positional, not {component: value} dicts: on ZeroGPU a handler's yields are pickled
    (app/zerogpu.py), and components are no plain values.

    The output named "status" is the job's status line and progress bar (app/streaming.py); the results are
    marked for the page's styles (app/static/studio.css: shown enlarged, crisp) and are cleared when a job
    starts (`cleared`), so a stopped or failed job leaves nothing of an earlier one."""

    def __init__(self, **named):
        components, self._slots = [], {}
        for name, value in named.items():
            group = isinstance(value, (list, tuple))
            members = list(value) if group else [value]
            self._slots[name] = (len(components), len(members) if group else None)
            components += members
        super().__init__(components)
        self._kept: set[str] = set()
        for name in self._slots:
            for component in self._members(name):
                if name == "status":
                    add_class(component, STATUS_CLASS)
                elif isinstance(component, SHOWN_ENLARGED) and is_result(component):
                    add_class(component, RESULT_CLASS)

    def _members(self, name: str) -> list:
        start, n = self._slots[name]
        return list(self[start:start + (n or 1)])

    def keep(self, *names: str) -> Outputs:
        """Outputs that a new job leaves as they are (opt-out of `cleared`)."""
        unknown = set(names) - set(self._slots)
        if unknown:
            raise ValueError(f"no outputs named {sorted(unknown)}")
        self._kept.update(names)
        return self

    def cleared(self) -> dict:
        """What a job starts with, by name: None for every result (images, galleries, videos, plots, numbers
        shown), except the kept ones and the inputs that are also outputs (an image editor, a seed box)."""
        values = {}
        for name, (_, n) in self._slots.items():
            if name == "status" or name in self._kept:
                continue
            members = self._members(name)
            if all(is_result(c) for c in members):
                values[name] = None if n is None else [None] * n
        return values

    def has(self, name: str) -> bool:
        return name in self._slots

    def __call__(self, **values):
        out = [gr.skip() for _ in self]  # one dict per output: Gradio pops keys from update dicts
        for name, value in values.items():
            start, n = self._slots[name]
            if n is None:
                out[start] = value
            else:
                value = list(value)
                if len(value) != n:
                    raise ValueError(f"{name!r} takes {n} values, got {len(value)}")
                out[start:start + n] = value
        return out[0] if len(out) == 1 else tuple(out)

    def stopped(self):
        """After Stop: "Stopped." in the status, everything else kept."""
        return self(status="Stopped.")

    def failed(self, message: str):
        """After an error: the status says what failed (the error's toast goes away), the rest stays as it is:
        cleared when the job started, or what the failed job showed of its own."""
        return self(status=f"Failed: {message}")


RESULT_CLASS = "studio-result"   # app/static/studio.css: results and previews fill their box
STATUS_CLASS = "studio-status"   # the status line with its progress bar
# What a job shows and may clear; a component of these kinds that is interactive is an input (never cleared).
SHOWN_ENLARGED = (gr.Image, gr.Gallery, gr.Video)
RESULT_KINDS = (gr.Image, gr.Gallery, gr.Video, gr.Number, gr.JSON, gr.LinePlot, gr.ScatterPlot, gr.BarPlot,
                gr.File)
DISPLAY_ONLY = (gr.Gallery, gr.JSON, gr.LinePlot, gr.ScatterPlot, gr.BarPlot)   # outputs, unless made interactive


def is_result(component) -> bool:
    """A component that only shows what a job made: of a result kind, and not editable by the user (explicitly
    non-interactive; galleries, JSON and plots are display-only unless made interactive)."""
    if not isinstance(component, RESULT_KINDS):
        return False
    interactive = getattr(component, "interactive", None)
    return interactive is False or (interactive is None and isinstance(component, DISPLAY_ONLY))


def add_class(component, name: str) -> None:
    classes = component.elem_classes
    classes = [classes] if isinstance(classes, str) else list(classes or [])
    if name not in classes:
        component.elem_classes = classes + [name]


def progress(ev: Progress, preview: str | None = "preview") -> dict:
    """The usual progress update: the event's preview (when it has one) in the output named `preview`, and the
    status line (render_job puts the progress bar with it); the results stay as they are."""
    values = {"status": status_line(ev)}
    if preview is not None and ev.preview is not None:
        values[preview] = ev.preview
    return values


def render_job(job: Iterator[Progress], out: Outputs, done: Callable[[Progress], dict],
               show: Callable[[Progress], dict] | None = None, cancel=None) -> Iterator:
    """Streams `job` into `out`: done(final event) and show(progress event) say what to update, by name; show
    defaults to `progress` (into the output named "preview" if there is one). The status of a progress event is
    its line with the job's progress bar, elapsed time and ETA; done's status gets the full bar and the time
    taken. Previews are enlarged for display (streaming.enlarged_preview), results never."""
    if show is None:
        into = "preview" if out.has("preview") else None

        def show(ev):
            return progress(ev, into)

    clock = JobClock()

    def render(ev, final):
        if final:
            values = done(ev)
            if "status" in values and isinstance(values["status"], str):
                values["status"] = finished_status(values["status"], ev, clock)
            return out(**values)
        values = show(ev)
        if out.has("status"):
            values["status"] = progress_status(ev, clock)
        if ev.preview is not None:
            big = enlarged_preview(ev.preview)
            values = {k: (big if v is ev.preview else v) for k, v in values.items()}
        return out(**values)

    return stream(clock.timed(job), render, out.stopped, cancel=cancel, failed=out.failed)


def run(sessions: SessionRegistry, request, out: Outputs,
        work: Callable[[Session, object], Iterator[Progress]], done: Callable[[Progress, Session], dict],
        show: Callable[[Progress], dict] | None = None, start: dict | None = None) -> Iterator:
    """One job for the request's session: a fresh cancel token (Stop cancels this job only), the start first
    (every result cleared, "Starting ..." in the status, then the `start` values given), then the job's events
    rendered by render_job. The job runs inside the stream, so whatever it raises (a bad upload, a LoRA that is
    not loaded) becomes the studio's message, and the session is idle again however it ends."""
    session = sessions.get(request)
    token = session.new_job()

    def job():
        yield from work(session, token)

    first = {**out.cleared(), **({"status": STARTING} if out.has("status") else {}), **(start or {})}
    try:
        yield out(**first)
    except GeneratorExit:  # closed before the job began: nothing ran, the session is idle again
        token.finish()
        raise

    def finished(ev):
        values = done(ev, session)
        record_result(session, ev)  # its images into the session's history (app/history.py)
        return values

    yield from render_job(job(), out, finished, show, cancel=token)


def stopper(sessions: SessionRegistry):
    """The Stop buttons' handler: cancels the caller's own job (an unknown session hash creates nothing)."""
    def stop(request: gr.Request):
        session = sessions.peek(request)
        if session is not None:
            session.token.cancel()
        # Said here too: Gradio's cancel (cancels=...) usually ends the event before the job's own
        # "Stopped." update is delivered, which would leave the last progress line showing.
        return "Stopped."
    return stop


def progress_on_status(demo: gr.Blocks) -> None:
    """Gradio's own progress and error marks go on an event's status output only (its queue position while
    waiting, the error badge), never over the images: the status line says what runs and what failed, and the
    error's toast stays. Events without a status show none on their images. Call once every event exists."""
    for block_fn in demo.fns.values():
        if block_fn.show_progress_on is not None:
            continue
        status = [c for c in block_fn.outputs if STATUS_CLASS in (c.elem_classes or [])]
        if status:
            block_fn.show_progress_on = status
            block_fn.show_progress = "minimal"
        elif any(isinstance(c, SHOWN_ENLARGED) for c in block_fn.outputs):
            block_fn.show_progress = "hidden"
