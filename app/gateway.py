"""ASGI middleware in front of Gradio's event routes: what a raw client can send before Gradio acts on it.

- Files in payloads: every `{"path": ...}` object in a request that starts an event (queue join, /call, /run)
  must name a file inside Gradio's upload folder; a URL or any other path is refused with the studio's message
  before Gradio would download it (an http URL in `path`) or move it into its cache.
- Join refusals: Gradio answers a failure of an event's validator run (our admission check, which preprocesses
  the inputs) with HTTP 400 and the exception text, which names handlers, classes and blocked paths. The detail
  of such an answer is replaced by the studio's message, or by an incident id with the original in the log.
- The admission ledger (app/sessions.py Admission) learns each accepted job's event id from the join's answer,
  and gives a ticket back when a queued job is stopped (no handler will ever run to release it).
"""
from __future__ import annotations

import ast
import json
import logging
import os
import secrets

from .uploads import NO_URLS, NOT_UPLOADED, upload_root

log = logging.getLogger(__name__)

API = "/gradio_api"
JOIN_ROUTES = ("/queue/join", "/call/", "/run/", "/api/")
MAX_BODY = 4 * 2**20      # what this middleware reads into memory at most (BodyLimit sits in front of it)
MAX_DEPTH = 12            # nesting of a payload that is walked for file objects
URL_PREFIXES = ("http:", "https:", "data:", "file:", "ftp:", "//")
# Gradio's own join refusals that say nothing about the server
PLAIN_DETAILS = ("Session hash not found.", "No function index provided.", "Queue is stopped.")
FILE_WORDS = ("FileData", "ImageData", "EditorData", "Cannot move", "not uploaded by a user", "blocked_paths",
              "File not allowed", "is not in the upload folder")
WHAT = "the image"


def _route(path: str) -> str | None:
    if not path.startswith(API):
        return None
    rest = path[len(API):]
    if rest.rstrip("/") == "/cancel":
        return "cancel"
    return "join" if rest.startswith(JOIN_ROUTES) else None


def file_refusal(payload, depth: int = 0) -> str | None:
    """The studio's message for the first file object in `payload` that is not an upload, else None."""
    if depth > MAX_DEPTH:
        return NOT_UPLOADED.format(what=WHAT)
    if isinstance(payload, dict):
        if "path" in payload:
            message = _path_refusal(payload.get("path"))
            if message:
                return message
        values = payload.values()
    elif isinstance(payload, list):
        values = payload
    else:
        return None
    for value in values:
        if isinstance(value, (dict, list)):
            message = file_refusal(value, depth + 1)
            if message:
                return message
    return None


def _path_refusal(path) -> str | None:
    if path is None:
        return None
    if not isinstance(path, str) or not path or len(path) > 4096 or "\x00" in path:
        return NOT_UPLOADED.format(what=WHAT)
    if path.lower().startswith(URL_PREFIXES) or "://" in path:
        return NO_URLS.format(what=WHAT)
    root = upload_root()
    real = os.path.realpath(path)
    if os.path.commonpath([real, root]) != root or real == root:
        return NOT_UPLOADED.format(what=WHAT)
    return None


def public_detail(detail) -> str:
    """What a visitor is told for a join refused with HTTP 400 (the original goes to the log)."""
    text = detail if isinstance(detail, str) else json.dumps(detail, default=str)
    if text in PLAIN_DETAILS:
        return text
    message = _error_message(text)
    if message is not None:
        return message
    if any(word in text for word in FILE_WORDS):
        return NOT_UPLOADED.format(what=WHAT)
    incident = secrets.token_hex(4)
    log.warning("join refused (incident %s): %s", incident, text[:4000])
    return (f"Something went wrong (incident {incident}): the request's inputs could not be read. Please check "
            f"them and try again.")


def _error_message(text: str) -> str | None:
    """The message of a gr.Error (the studio's own, from a Safe* component's check): Gradio re-raises those
    unchanged and shows str(error), which is repr(message); it wraps every other preprocessing failure in its own
    text, which never starts with a quote."""
    if len(text) < 2 or text[0] not in "'\"" or text[-1] != text[0]:
        return None
    try:
        message = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return None
    return message if isinstance(message, str) else None


class Gateway:
    """See the module doc. `admission` is the SessionRegistry's Admission, or None (no ledger updates)."""

    def __init__(self, app, admission=None):
        self.app = app
        self.admission = admission

    async def __call__(self, scope, receive, send):
        route = _route(scope.get("path", "")) if scope["type"] == "http" and scope.get("method") == "POST" \
            else None
        if route is None:
            return await self.app(scope, receive, send)
        body, more = await _read(receive)
        if more:  # larger than this middleware reads: not an event request the studio accepts
            return await _answer(send, 413, "Request too large.")
        try:
            payload = json.loads(body) if body else None
        except ValueError:
            payload = None
        replay = _replay(body, receive)
        if route == "cancel":
            await self.app(scope, replay, send)
            if self.admission is not None and isinstance(payload, dict) and isinstance(payload.get("event_id"), str):
                self.admission.withdraw(payload["event_id"])
            return
        refusal = file_refusal(payload)
        if refusal:
            return await _answer(send, 400, refusal)
        session = payload.get("session_hash") if isinstance(payload, dict) else None
        await self.app(scope, replay, _Rewriter(send, self.admission, session))


class _Rewriter:
    """Holds a join's answer: a 400 gets a public detail; a 200 tells the ledger the new job's event id."""

    def __init__(self, send, admission, session):
        self.send, self.admission, self.session = send, admission, session
        self.start = None
        self.chunks: list[bytes] = []

    async def __call__(self, message):
        if message["type"] == "http.response.start" and message.get("status") in (200, 400):
            self.start = message
            return
        if self.start is None or message["type"] != "http.response.body":
            return await self.send(message)
        self.chunks.append(message.get("body", b""))
        if message.get("more_body"):
            return
        body = b"".join(self.chunks)
        start, self.start, self.chunks = self.start, None, []
        try:
            content = json.loads(body)
        except ValueError:
            content = None
        if start["status"] == 400 and isinstance(content, dict):
            body = json.dumps({"detail": public_detail(content.get("detail"))}).encode()
        elif start["status"] == 200 and isinstance(content, dict) and self.admission is not None \
                and isinstance(content.get("event_id"), str):
            self.admission.bind(self.session, content["event_id"])
        headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
        headers.append((b"content-length", str(len(body)).encode()))
        await self.send({**start, "headers": headers})
        await self.send({"type": "http.response.body", "body": body})


async def _read(receive) -> tuple[bytes, bool]:
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return b"".join(chunks), False
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY:
            return b"", True
        chunks.append(chunk)
        if not message.get("more_body"):
            return b"".join(chunks), False


def _replay(body: bytes, receive):
    sent = False

    async def again():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()
    return again


async def _answer(send, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
