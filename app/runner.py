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
from .streaming import status_line, stream

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
    (app/zerogpu.py), and components are no plain values."""

    def __init__(self, **named):
        components, self._slots = [], {}
        for name, value in named.items():
            group = isinstance(value, (list, tuple))
            members = list(value) if group else [value]
            self._slots[name] = (len(components), len(members) if group else None)
            components += members
        super().__init__(components)

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


def progress(ev: Progress, preview: str | None = "preview") -> dict:
    """The usual progress update: the event's preview (when it has one) in the output named `preview`, and the
    status line; the results stay as they are."""
    values = {"status": status_line(ev)}
    if preview is not None and ev.preview is not None:
        values[preview] = ev.preview
    return values


def render_job(job: Iterator[Progress], out: Outputs, done: Callable[[Progress], dict],
               show: Callable[[Progress], dict] | None = None, cancel=None) -> Iterator:
    """Streams `job` into `out`: done(final event) and show(progress event) say what to update, by name; show
    defaults to `progress` (into the output named "preview" if there is one)."""
    if show is None:
        into = "preview" if out.has("preview") else None

        def show(ev):
            return progress(ev, into)

    def render(ev, final):
        return out(**(done(ev) if final else show(ev)))

    return stream(job, render, out.stopped, cancel=cancel)


def run(sessions: SessionRegistry, request, out: Outputs,
        work: Callable[[Session, object], Iterator[Progress]], done: Callable[[Progress, Session], dict],
        show: Callable[[Progress], dict] | None = None, start: dict | None = None) -> Iterator:
    """One job for the request's session: a fresh cancel token (Stop cancels this job only), `start` first if
    given (e.g. cleared outputs), then the job's events rendered by render_job. The job runs inside the stream,
    so whatever it raises (a bad upload, a LoRA that is not loaded) becomes the studio's message, and the session
    is idle again however it ends."""
    session = sessions.get(request)
    token = session.new_job()

    def job():
        yield from work(session, token)

    if start is not None:
        try:
            yield out(**start)
        except GeneratorExit:  # closed before the job began: nothing ran, the session is idle again
            token.finish()
            raise

    def finished(ev):
        values = done(ev, session)
        record_result(session, ev.result)  # into the session's history (app/history.py)
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
