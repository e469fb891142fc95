"""Progress events and cancellation shared by every long operation.

Every long operation in `pipelines/` is a generator of `Progress` events; the UI only renders them.
The generator checks a `CancelToken` before every UNet call, so a Stop takes effect within one call.
"""
from __future__ import annotations

import threading
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from enum import Enum
from typing import Any

from PIL import Image


class Cancelled(Exception):
    """Raised inside a job when its cancel token fires; the job's context managers undo their changes."""


class CancelToken:
    """A thread-safe flag; one per running job (the UI's Stop button sets the session's token)."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def check(self) -> None:
        if self._event.is_set():
            raise Cancelled("cancelled by the user")


class Kind(str, Enum):
    """What an event carries besides its progress, so a UI switches on the kind, never on stage text."""

    STEP = "step"          # progress; `preview` (if any) is the predicted x0 now
    SOURCE = "source"      # `preview` is the input image as the model sees it (first event of an image job)
    LOSSES = "losses"      # `partial` is the loss curve so far (null-text fitting)
    FRAMES = "frames"      # `partial` is the list of frames finished so far (interpolation)
    MASK = "mask"          # `partial` is the estimated mask (DiffEdit)
    RESULTS = "results"    # `partial` is the list of results finished so far (SDEdit repeats)
    POINTS = "points"      # `partial` is the drag's handle points now


@dataclass
class Progress:
    """One event of a long operation.

    stage:   what runs now ("sampling", "inverting", "reconstructing", "frame 3/11", "loading" ...)
    step/total: progress within the whole operation (UNet calls, or load stages)
    preview: a cheap image of the predicted x0 (None when this event carries none)
    partial: intermediate results a UI may show before the end (e.g. a finished frame)
    result:  the final result object; set only on the last event
    kind:    what `preview` and `partial` hold (Kind)
    cached:  the job reused cached work (an inversion, a LoRA) instead of computing it
    stage_step/stage_total: progress within the current stage (1-based), when the stage counts steps: what a
             user reads ("sampling: step 3/30"); step/total measure the whole job (several stages, cached work)
    """

    stage: str
    step: int
    total: int
    preview: Image.Image | None = None
    partial: Any = None
    result: Any = None
    message: str = ""
    kind: Kind = Kind.STEP
    cached: bool = False
    stage_step: int | None = None
    stage_total: int | None = None

    @property
    def done(self) -> bool:
        return self.result is not None

    @property
    def fraction(self) -> float:
        """How much of the whole job is done, in [0, 1]."""
        return min(max(self.step / self.total, 0.0), 1.0) if self.total else 0.0


Job = Generator[Progress, None, Any]


def run_to_end(events: Iterator[Progress]) -> Any:
    """Drain a job and return its final result (for scripts, tests and benchmarks)."""
    result = None
    for ev in events:
        if ev.result is not None:
            result = ev.result
    return result


def drain(gen: Generator) -> Any:
    """Run any generator to its end and return its return value (the DDIM core's and NTI's generators return
    their final latents / inversion), discarding what it yields."""
    while True:
        try:
            next(gen)
        except StopIteration as stop:
            return stop.value
