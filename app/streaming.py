"""Streams pipeline jobs as Gradio updates: throttled previews, Stop, clear messages instead of tracebacks (the
runner in app/runner.py renders each event into the event's outputs)."""
from __future__ import annotations

import html
import logging
import secrets
import time
from collections.abc import Callable, Iterator

import gradio as gr
from PIL import Image

from pipelines.core.errors import InputError
from pipelines.core.events import Cancelled, CancelToken, Progress

from .uploads import client_path

log = logging.getLogger(__name__)
MIN_INTERVAL = 0.1  # seconds between streamed updates: each image update is an encode + file + fetch
PREVIEW_SIDE = 256  # live previews are enlarged to at least this many pixels on their long side


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
    """What the user reads: the stage, its own step counter when it counts steps ("sampling: step 3/30"; the job's
    overall progress is the bar's, see progress_status), and the event's message."""
    text = f"{ev.stage}: step {ev.stage_step}/{ev.stage_total}" if ev.stage_total else ev.stage
    return f"{text} · {ev.message}" if ev.message else text


def duration(seconds: float) -> str:
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 60:
        return f"{seconds:.0f} s"
    minutes, rest = divmod(int(round(seconds)), 60)
    return f"{minutes} min {rest:02d} s"


class JobClock:
    """Elapsed time of one job and its ETA: the job's remaining progress units at the time per unit measured in
    the current stage (stages differ: a null-text step costs more than a sampling step), from the event that
    ended the previous stage on; the previous stage's rate while the current one has none yet."""

    def __init__(self, now: Callable[[], float] = time.monotonic):
        self._now = now
        self.start = self._last_time = now()
        self._stage: str | None = None
        self._last_step = 0
        self._from = (self.start, 0)       # (time, step) the current stage's rate is measured from
        self._per_unit: float | None = None
        self.left: float | None = None     # estimated seconds left after the last event; None while unknown

    def tick(self, ev: Progress) -> None:
        """Takes the job's next event (every one, rendered or not: stages are told apart by them)."""
        now = self._now()
        if ev.stage != self._stage or ev.step < self._from[1]:
            self._stage = ev.stage
            # a stage that starts several units on skipped work (a cached inversion or LoRA): no time per unit
            skipped = ev.step - self._last_step > 1
            self._from = (now, ev.step) if skipped else (self._last_time, min(self._last_step, ev.step))
        t0, s0 = self._from
        if ev.step > s0 and now > t0:
            self._per_unit = (now - t0) / (ev.step - s0)
        self._last_time, self._last_step = now, ev.step
        self.left = None if self._per_unit is None else self._per_unit * max(ev.total - ev.step, 0)

    def elapsed(self) -> float:
        return self._now() - self.start

    def timed(self, job: Iterator[Progress]) -> Iterator[Progress]:
        """The job's events, each ticked; closing this closes the job (its context managers run then)."""
        try:
            for ev in job:
                self.tick(ev)
                yield ev
        finally:
            job.close()


def progress_bar(value: int, maximum: int) -> str:
    maximum = max(int(maximum), 1)
    return f'<progress class="studio-progress" value="{min(max(int(value), 0), maximum)}" max="{maximum}"></progress>'


def progress_status(ev: Progress, clock: JobClock) -> str:
    """The status of a running job: its line (escaped: stages and messages may quote what a visitor typed), then
    the job's progress bar with the time it has taken and the time left."""
    left = clock.left if ev.step < ev.total else None   # at the end there is nothing left to estimate
    times = duration(clock.elapsed()) + ("" if left is None else f" · about {duration(left)} left")
    return f"{html.escape(status_line(ev), quote=False)}\n\n{progress_bar(ev.step, ev.total)} {times}"


def finished_status(text: str, ev: Progress, clock: JobClock) -> str:
    """A finished job's status: the tab's own line, and the full bar with the time the job took."""
    return f"{text}\n\n{progress_bar(ev.total, ev.total)} took {duration(clock.elapsed())}"


STARTING = f"Starting ...\n\n{progress_bar(0, 1)}"


def enlarged_preview(image: Image.Image, side: int = PREVIEW_SIDE) -> Image.Image:
    """A live preview (the linear one is at latent resolution: 8x8 px for a 64 px image) enlarged by the
    smallest whole factor that makes its long side at least `side`, nearest neighbour: it stays crisp in the
    browser, and the JPEG's chroma subsampling blurs 2x2 blocks of the enlarged image instead of the latent's
    cells. For previews only; results and downloads keep their own size."""
    k = -(-side // max(image.size))
    return image if k <= 1 else image.resize((image.width * k, image.height * k), Image.Resampling.NEAREST)


def stream(job: Iterator[Progress], render: Callable[[Progress, bool], tuple], stopped: Callable[[], tuple],
           min_interval: float = MIN_INTERVAL, cancel: CancelToken | None = None,
           failed: Callable[[str], tuple] | None = None) -> Iterator[tuple]:
    """Yields render(event, final) for the final event, the first preview, partial results and, at most
    every `min_interval` seconds, the newest progress. InputError becomes a gr.Error (a message in the UI);
    a Stop yields `stopped()`; a failure yields `failed(message)` (the status says what failed: the error's
    toast goes away) before its gr.Error; the job generator is always closed so its context managers run.

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
        error = user_error(exc)
        if failed is not None:
            yield failed(error.message)
        raise error from None
    except Cancelled:
        yield stopped()
    except Exception:  # noqa: BLE001 - never show a traceback, path or exception type in the UI
        error = incident_error()
        if failed is not None:
            yield failed(error.message)
        raise error from None
    finally:
        job.close()
        finish = getattr(cancel, "finish", None)
        if finish is not None:
            finish()  # the session is idle again (app/sessions.py)


def upload_path(image, what: str) -> str:
    """The real path of an upload a handler received raw (preprocess=False): only files in Gradio's upload
    folder are accepted (app/uploads.py); a missing upload -> a message asking for it."""
    return client_path(image, what)
