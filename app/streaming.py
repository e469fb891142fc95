"""Streams pipeline jobs as Gradio updates: throttled previews, Stop, clear messages instead of tracebacks (the
runner in app/runner.py renders each event into the event's outputs)."""
from __future__ import annotations

import html
import logging
import secrets
import time
from collections.abc import Callable, Iterator

import gradio as gr

from pipelines.core.errors import InputError
from pipelines.core.events import Cancelled, CancelToken, Progress

from .uploads import client_path

log = logging.getLogger(__name__)
MIN_INTERVAL = 0.1  # seconds between streamed updates: each image update is an encode + file + fetch


def incident_error(what: str = "job") -> gr.Error:
    """An unexpected failure: the visitor gets a short message with an incident id; the traceback, paths and
    exception type go to the server log under that id (call inside an except block)."""
    incident = secrets.token_hex(4)
    log.exception("%s failed (incident %s)", what, incident)
    return gr.Error(f"Something went wrong (incident {incident}). Please try again; if it keeps happening, "
                    f"report the incident id.", print_exception=False)


def user_error(exc: Exception) -> gr.Error:
    """The studio's own message (an InputError), escaped: Gradio shows error text as HTML."""
    return gr.Error(html.escape(str(exc), quote=False), print_exception=False)


def status_line(ev: Progress) -> str:
    text = f"{ev.stage}: step {ev.step}/{ev.total}" if ev.total else ev.stage
    return f"{text} · {ev.message}" if ev.message else text


def stream(job: Iterator[Progress], render: Callable[[Progress, bool], tuple], stopped: Callable[[], tuple],
           min_interval: float = MIN_INTERVAL, cancel: CancelToken | None = None) -> Iterator[tuple]:
    """Yields render(event, final) for the final event, the first preview, partial results and, at most
    every `min_interval` seconds, the newest progress. InputError becomes a gr.Error (a message in the UI);
    a Stop yields `stopped()`; the job generator is always closed so its context managers run.

    With the job's `cancel` token, nothing more is rendered once Stop was pressed: the job only checks the
    token before its next UNet call, and one more progress line would overwrite the "Stopped." status."""
    last = 0.0
    seen_preview = False
    try:
        for ev in job:
            if cancel is not None:
                cancel.check()
            if ev.done:
                yield render(ev, True)
                continue
            now = time.monotonic()
            first_preview = ev.preview is not None and not seen_preview
            if first_preview or ev.partial is not None or now - last >= min_interval:
                seen_preview = seen_preview or ev.preview is not None
                last = now
                yield render(ev, False)
    except InputError as exc:
        raise user_error(exc) from None
    except Cancelled:
        yield stopped()
    except Exception:  # noqa: BLE001 - never show a traceback, path or exception type in the UI
        raise incident_error() from None
    finally:
        job.close()
        finish = getattr(cancel, "finish", None)
        if finish is not None:
            finish()  # the session is idle again (app/sessions.py)


def upload_path(image, what: str) -> str:
    """The real path of an upload a handler received raw (preprocess=False): only files in Gradio's upload
    folder are accepted (app/uploads.py); a missing upload -> a message asking for it."""
    return client_path(image, what)
