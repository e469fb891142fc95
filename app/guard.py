"""Every event of the studio behind the same guard, hidden ones included (any event can be called by index).

- Errors: the studio's own messages reach the visitor (escaped); anything unexpected becomes a short message with
  an incident id, its traceback logged on the server (app/streaming.py).
- GPU events: a validator admits at most JOBS_PER_VISITOR running or queued jobs per visitor before the event
  takes a queue slot; the ticket is given back when the handler ends, or when the job is stopped while queued
  (app/gateway.py tells the ledger about joins and stops). On ZeroGPU they run inside `spaces.GPU`
  (app/zerogpu.py).
"""
from __future__ import annotations

import functools
import inspect

import gradio as gr
from gradio.context import LocalContext

from pipelines.core.errors import InputError

from .sessions import TOO_MANY_JOBS, SessionRegistry, visitor_of
from .streaming import incident_error, user_error
from .zerogpu import on_gpu


def _request(args, kwargs):
    for value in (*args, *kwargs.values()):
        if isinstance(value, gr.Request):
            return value
    return None


def _mapped(exc: BaseException) -> BaseException:
    if isinstance(exc, gr.Error):
        return exc
    if isinstance(exc, InputError):
        return user_error(exc)
    return incident_error()


def _event_id():
    """The queue's id of the event this handler runs for (Gradio sets it in the handler's context)."""
    return LocalContext.event_id.get(None)


def guarded(fn, on_enter=None, on_exit=None):
    """fn with its errors mapped (see module doc); on_enter(request, event_id) runs when it starts and
    on_exit(request, event_id) when it ends, however it ends. functools.wraps keeps the signature Gradio reads to
    pass gr.Request and event data."""
    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def gen(*args, **kwargs):
            event_id = _event_id()
            if on_enter is not None:
                on_enter(_request(args, kwargs), event_id)
            try:
                yield from fn(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - mapped, never shown raw
                raise _mapped(exc) from None
            finally:
                if on_exit is not None:
                    on_exit(_request(args, kwargs), event_id)
        return gen

    @functools.wraps(fn)
    def plain(*args, **kwargs):
        event_id = _event_id()
        if on_enter is not None:
            on_enter(_request(args, kwargs), event_id)
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001
            raise _mapped(exc) from None
        finally:
            if on_exit is not None:
                on_exit(_request(args, kwargs), event_id)
    return plain


def admission_validator(fn, sessions: SessionRegistry, n_inputs: int):
    """Runs at queue join (before the event waits for the GPU): refuses a visitor's job beyond the allowance."""
    @functools.wraps(fn)
    def validate(*args, **kwargs):
        request = _request(args, kwargs)
        # /call/<name> joins get their session hash only after validation: such a ticket has none
        ok = sessions.admission.admit(visitor_of(request), getattr(request, "session_hash", None))
        first = gr.validate(ok, "" if ok else TOO_MANY_JOBS)
        return [first] + [gr.validate(True, "")] * (n_inputs - 1) if n_inputs > 1 else first
    validate.__wrapped__ = fn  # the same parameters as the handler, so Gradio passes the same arguments
    return validate


def harden(demo: gr.Blocks, sessions: SessionRegistry, gpu_concurrency_id: str = "gpu") -> None:
    """Puts every event function of `demo` behind `guarded`, and the GPU ones behind the admission validator."""
    def begin(request, event_id):
        sessions.admission.start(visitor_of(request), getattr(request, "session_hash", None), event_id)

    def end(request, event_id):
        sessions.admission.finish(visitor_of(request), getattr(request, "session_hash", None), event_id)

    for block_fn in demo.fns.values():
        if block_fn.fn is None or getattr(block_fn.fn, "_studio_guarded", False):
            continue
        gpu = block_fn.concurrency_id == gpu_concurrency_id
        original = block_fn.fn
        block_fn.fn = guarded(on_gpu(original) if gpu else original,
                              on_enter=begin if gpu else None, on_exit=end if gpu else None)
        block_fn.fn._studio_guarded = True
        if gpu and block_fn.validator is None:
            block_fn.validator = admission_validator(original, sessions, len(block_fn.inputs))
