"""Hosted (public) mode and the launch settings every studio runs with.

Hosted mode is on when the studio runs on a Hugging Face Space (`SPACE_ID` is set) or with `--public`. Then
visitors choose models and LoRAs only from the operator's allow-lists, each session keeps its own model choice,
LoRAs are picked per request by adapter name, and nothing a visitor does changes what another visitor gets.
Locally every model and LoRA source stays allowed.
"""
from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from pipelines.core.errors import InputError
from pipelines.core.limits import get_limits

log = logging.getLogger(__name__)
REPO_ROOT = Path(__file__).resolve().parent.parent
MODELS_ENV = "STUDIO_ALLOWED_MODELS"   # comma-separated model sources (Hub ids, folders, 'embedded')
LORAS_ENV = "STUDIO_ALLOWED_LORAS"     # comma-separated NAME=SOURCE (a .safetensors file or Hub repo[:file])
PUBLIC_ENV = "STUDIO_PUBLIC"
NOT_ALLOWED_MODEL = "This studio offers only these models: {names}."
NOT_ALLOWED_LORA = "This studio offers only these LoRAs: {names}."
_NAME = re.compile(r"^[A-Za-z0-9_]{1,64}$")


def _split(text: str | None) -> list[str]:
    return [p.strip() for p in (text or "").split(",") if p.strip()]


def parse_loras(entries: list[str]) -> dict[str, str]:
    """NAME=SOURCE entries -> {name: source}; a bad entry is the operator's error (ValueError at start-up)."""
    out = {}
    for entry in entries:
        name, sep, source = entry.partition("=")
        name, source = name.strip(), source.strip()
        if not sep or not _NAME.match(name) or not source:
            raise ValueError(f"LoRA allow-list entry {entry!r} must be NAME=SOURCE (NAME: letters, digits, _).")
        out[name] = source
    return out


@dataclass
class Hosting:
    public: bool = False
    models: list[str] = field(default_factory=list)       # allowed model sources, the served one first
    loras: dict[str, str] = field(default_factory=dict)   # allowed adapter name -> source

    @classmethod
    def from_env(cls, public: bool = False, models: list[str] | None = None,
                 loras: list[str] | None = None) -> Hosting:
        hosted = public or bool(os.environ.get("SPACE_ID")) or os.environ.get(PUBLIC_ENV, "") in ("1", "true")
        return cls(hosted, list(models or []) + _split(os.environ.get(MODELS_ENV)),
                   parse_loras(list(loras or []) + _split(os.environ.get(LORAS_ENV))))

    def check_model(self, source: str) -> str:
        """Hosted: the source must be on the allow-list, spelled as listed (no paths or other Hub ids)."""
        source = (source or "").strip()
        if self.public and source not in self.models:
            raise InputError(NOT_ALLOWED_MODEL.format(names=", ".join(self.models) or "the one loaded"))
        return source

    def check_lora(self, name: str) -> str:
        """Hosted: a LoRA is named by its allow-listed adapter name; returns its source."""
        name = (name or "").strip()
        if name not in self.loras:
            raise InputError(NOT_ALLOWED_LORA.format(names=", ".join(self.loras) or "none"))
        return self.loras[name]


    def preload(self, studio) -> None:
        """Hosted start-up: every allow-listed model in `studio.pool` (the served one first, as started) and every
        allow-listed LoRA on each of them, disabled until a request applies it by name. Nothing is loaded later,
        so no visitor's request changes the models another visitor runs on (and ZeroGPU workers, forked after
        start-up, see them all). A source that fails to load is dropped from the list, and the log says why."""
        from pipelines.core.events import run_to_end
        from pipelines.core.lora import load_lora
        from pipelines.core.models import load_model

        served = studio.model.id
        self.models = [served] + [m for m in self.models if m != served]
        studio.pool = {served: studio.model}
        for source in self.models[1:]:
            try:
                studio.pool[source] = run_to_end(load_model(source))
            except InputError as exc:
                log.warning("allow-listed model %s not loaded: %s", source, exc)
        self.models = list(studio.pool)
        for name, source in list(self.loras.items()):
            for model in studio.pool.values():
                if name in model.loras:
                    continue
                try:
                    load_lora(model, source, name)
                except InputError as exc:
                    log.warning("allow-listed LoRA %s (%s) not loaded on %s: %s", name, source, model.id, exc)


def blocked_paths() -> list[str]:
    """What no output copy and no /file= request may ever reach: the code, the weights, git and configs."""
    names = ["app", "pipelines", "training", "benchmarks", "tests", "assets", ".git", ".ci", "app.py",
             "requirements.txt", "README.md"]
    return [str(REPO_ROOT / n) for n in names]


STATIC = Path(__file__).resolve().parent / "static"   # the page's own CSS and script
BODY_LIMIT = 2 * 2**20   # bytes of any request body other than a file upload: prompts, settings, points


class BodyLimit:
    """ASGI middleware: a request body over `max_bytes` gets 413 before it is read into memory (Gradio caps only
    file uploads; a queue join's JSON, e.g. a huge data: URL, would otherwise be unbounded)."""

    def __init__(self, app, max_bytes: int = BODY_LIMIT, exempt: tuple[str, ...] = ("/upload", "/upload/")):
        self.app = app
        self.max_bytes = max_bytes
        self.exempt = exempt

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("method") not in ("POST", "PUT", "PATCH") or \
                scope.get("path", "").endswith(self.exempt):
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            return await self._too_large(send)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            if message.get("type") == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:  # a chunked body that lied or said nothing
                    return {"type": "http.disconnect"}
            return message

        return await self.app(scope, counted, send)

    @staticmethod
    async def _too_large(send):
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": b'{"detail": "Request too large."}'})


def launch_kwargs(sessions=None) -> dict:
    """`demo.launch` settings shared by app.py and the tests' production fixture; `sessions` is the demo's
    SessionRegistry (its admission ledger hears about joins and stops, app/gateway.py)."""
    from starlette.middleware import Middleware

    from .gateway import Gateway

    admission = getattr(sessions, "admission", None)
    # Pillow's own bomb guard for any decoder Gradio runs itself: it refuses images over twice our pixel cap
    # (our header checks refuse anything over the cap before decoding).
    Image.MAX_IMAGE_PIXELS = get_limits().max_pixels
    return dict(css_paths=[STATIC / "studio.css"], js=(STATIC / "studio.js").read_text(encoding="utf-8"),
                show_error=False, enable_monitoring=False, max_file_size=get_limits().max_upload_bytes,
                blocked_paths=blocked_paths(), footer_links=["api", "settings"], ssr_mode=False,
                app_kwargs={"middleware": [Middleware(BodyLimit, max_bytes=BODY_LIMIT),
                                           Middleware(Gateway, admission=admission)]})


def queue_kwargs() -> dict:
    # api_open=False: queued events only through the queue (/run/<name> would skip it and the admission check)
    return dict(max_size=32, default_concurrency_limit=1, api_open=False)


# Gradio's queue loops poll for work every 1 ms (the progress loop every 10 ms) while idle: about 5% of a core
# with no page open. These intervals only delay a job's start (or a gr.Progress message) by at most that long.
QUEUE_POLL_S = 0.05
PROGRESS_POLL_S = 0.1


def calm_queue(demo) -> None:
    """After demo.queue(...): the idle queue wakes 20 times a second instead of 1100 (Gradio has no setting for
    it; the attributes are read on every loop turn)."""
    queue = demo._queue
    queue.sleep_when_free = max(queue.sleep_when_free, QUEUE_POLL_S)
    queue.progress_update_sleep_when_free = max(queue.progress_update_sleep_when_free, PROGRESS_POLL_S)
