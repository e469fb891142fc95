"""A small raw-protocol client for Gradio 6 (httpx only): what an attacker can send without gradio_client.

Every call goes to a loopback address (checked), with explicit timeouts and bounded loops, and never through a
proxy (`trust_env=False`). Function indices always come from GET /config, never hard-coded.

- `config`, `components`, `fn_index`, `all_fn_indices`: the app's dependencies and components.
- `upload`: POST /gradio_api/upload -> the server path; `file_data(path)` is the dict `handle_file` would send.
- `join` + `results`: POST /gradio_api/queue/join by fn_index, then the session's SSE stream until the event's
  `process_completed`; `submit` does both and folds a refused join (HTTP 4xx/5xx) into the same `Result`.
- `call_by_name`: POST /gradio_api/call/<name> + GET /gradio_api/call/<name>/<event_id> (reaches private events).
- `predict_direct`: POST /gradio_api/run/predict with a fn_index (the queue-less route).
- `file_refs`, `fetch_file`: every file path/URL in an output, and GET /gradio_api/file=<path>.
"""
from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import httpx

API = "/gradio_api"
LOOPBACK = ("127.0.0.1", "localhost", "::1", "[::1]")
DEFAULT_TIMEOUT = 60.0
MAX_MESSAGES = 20_000      # SSE messages read for one event, at most (bounds every stream loop)


class NotLoopback(ValueError):
    pass


@dataclass
class Result:
    """The outcome of one event. `status` is the HTTP status of the join (not 200: it never ran, and `error` is
    the response's detail); otherwise `success`/`data`/`error` are those of `process_completed`."""
    success: bool
    data: list | None = None
    error: str | None = None
    status: int = 200
    event_id: str | None = None
    messages: list = field(default_factory=list)   # every message of this event, in order
    timed_out: bool = False

    @property
    def text(self) -> str:
        """Everything the client was shown for this event, as one string (to search for leaks)."""
        return json.dumps({"error": self.error, "data": self.data, "messages": self.messages}, default=str)

    @property
    def refused(self) -> bool:
        return not self.success and not self.timed_out


class Refused(Exception):
    """A join answered with an HTTP error (queue full 503, validator 422, other 400)."""

    def __init__(self, status: int, detail: str):
        super().__init__(f"HTTP {status}: {detail}")
        self.status = status
        self.detail = detail


def _base(url: str) -> str:
    host = urlsplit(url).hostname or ""
    if host not in LOOPBACK and not host.startswith("127."):
        raise NotLoopback(f"refusing to talk to {url!r}: loopback only")
    return url.rstrip("/")


_local = threading.local()


class _Borrowed:
    """A thread's keep-alive client for one app, lent for a `with` block (kept open afterwards): creating an
    httpx client per request costs more than the request itself on loopback."""

    def __init__(self, client: httpx.Client, timeout: float, headers: dict | None):
        self.client, self.timeout, self.headers = client, httpx.Timeout(timeout, connect=10.0), headers or {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def get(self, path, **kw):
        return self.client.get(path, timeout=self.timeout, headers=self.headers, **kw)

    def post(self, path, **kw):
        return self.client.post(path, timeout=self.timeout, headers=self.headers, **kw)

    def stream(self, method, path, **kw):
        return self.client.stream(method, path, timeout=self.timeout, headers=self.headers, **kw)


def http(url: str, timeout: float = DEFAULT_TIMEOUT, headers: dict | None = None) -> _Borrowed:
    """This thread's client for the app at `url`: loopback only, plain HTTP (no TLS context), no proxies or
    other settings from the environment; `timeout` bounds every connect/read/write of each request."""
    base = _base(url)
    clients = getattr(_local, "clients", None)
    if clients is None:
        clients = _local.clients = {}
    client = clients.get(base)
    if client is None:
        client = clients[base] = httpx.Client(base_url=base, trust_env=False, verify=False)
    return _Borrowed(client, timeout, headers)


def new_hash() -> str:
    return uuid.uuid4().hex[:12]


def _detail(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text
    if isinstance(body, dict) and "detail" in body:
        detail = body["detail"]
        return detail if isinstance(detail, str) else json.dumps(detail)
    return json.dumps(body)


# ------------------------------------------------------------------------------------------- /config
def config(url: str, timeout: float = 30.0) -> dict:
    with http(url, timeout) as c:
        r = c.get("/config")
        r.raise_for_status()
        return r.json()


def components(cfg: dict) -> dict[int, dict]:
    return {c["id"]: c for c in cfg["components"]}


def all_fn_indices(url: str | None = None, cfg: dict | None = None) -> dict[str, int]:
    """api_name -> fn_index for every dependency (private and unnamed ones included)."""
    cfg = cfg if cfg is not None else config(url)
    return {d["api_name"]: d["id"] for d in cfg["dependencies"] if d.get("api_name")}


def fn_index(url: str | None, api_name: str, cfg: dict | None = None) -> int:
    indices = all_fn_indices(url, cfg)
    name = api_name.lstrip("/")
    if name not in indices:
        raise KeyError(f"no dependency named {name!r}; have {sorted(indices)}")
    return indices[name]


def dependency(cfg: dict, index: int) -> dict:
    return next(d for d in cfg["dependencies"] if d["id"] == index)


def default_inputs(cfg: dict, index: int) -> list:
    """The current (default) value of every input component of a dependency, as /config shows them."""
    comps = components(cfg)
    return [comps[i]["props"].get("value") for i in dependency(cfg, index)["inputs"]]


# ------------------------------------------------------------------------------------------- files
def upload(url: str, path: str | Path, timeout: float = 60.0) -> str:
    """POST /gradio_api/upload (multipart field `files`) -> the server path of the stored file."""
    path = Path(path)
    with http(url, timeout) as c, open(path, "rb") as f:
        r = c.post(f"{API}/upload", files=[("files", (path.name, f, "application/octet-stream"))])
    if r.status_code != 200:
        raise Refused(r.status_code, _detail(r))
    return r.json()[0]


def file_data(server_path: str, orig_name: str | None = None) -> dict:
    """What gradio_client.handle_file sends for an uploaded file."""
    return {"path": server_path, "orig_name": orig_name or Path(server_path).name,
            "meta": {"_type": "gradio.FileData"}}


def file_refs(obj: Any) -> Iterator[str]:
    """Every file path or URL in an output value (FileData-like dicts, anywhere in nested lists/dicts)."""
    if isinstance(obj, dict):
        for key in ("path", "url"):
            value = obj.get(key)
            if isinstance(value, str) and value:
                yield value
        for value in obj.values():
            if isinstance(value, (dict, list)):
                yield from file_refs(value)
    elif isinstance(obj, list):
        for value in obj:
            yield from file_refs(value)


def fetch_file(url: str, ref: str, timeout: float = 30.0) -> tuple[int, bytes]:
    """GET a file the app names in an output: a /gradio_api/file= URL as given, or a server path via /file=."""
    base = _base(url)
    if ref.startswith(("http://", "https://")):
        parts = urlsplit(ref)
        if parts.hostname not in LOOPBACK and not (parts.hostname or "").startswith("127."):
            return 0, b""  # never fetched: loopback only
        target = ref
    elif ref.startswith(f"{API}/"):
        target = base + ref
    else:
        target = f"{base}{API}/file={quote(ref)}"
    with httpx.Client(timeout=timeout, trust_env=False, verify=False) as c:
        r = c.get(target)
    return r.status_code, r.content


# ------------------------------------------------------------------------------------------- queue
def join(url: str, index: int, data: list, session_hash: str, *, event_data: Any = None,
         trigger_id: int | None = None, headers: dict | None = None, timeout: float = 60.0) -> str:
    """POST /gradio_api/queue/join -> the event id; an HTTP error (validator 422, 400, queue full 503) raises
    Refused with the response's status and detail."""
    body = {"fn_index": index, "data": data, "session_hash": session_hash, "event_data": event_data,
            "trigger_id": trigger_id}
    with http(url, timeout, headers) as c:
        r = c.post(f"{API}/queue/join", json=body)
    if r.status_code != 200:
        raise Refused(r.status_code, _detail(r))
    return r.json()["event_id"]


def _sse_lines(response: httpx.Response, deadline: float) -> Iterator[str]:
    for line in response.iter_lines():
        yield line
        if time.monotonic() > deadline:
            return


def _error_text(output: Any) -> str | None:
    if isinstance(output, dict):
        err = output.get("error")
        return None if err is None else str(err)
    return None if output is None else str(output)


def _edit(target: Any, path: list, action: str, value: Any) -> Any:
    if not path:
        if action == "replace":
            return value
        if action == "append":
            return target + value
        raise ValueError(f"unsupported diff action {action!r} at the root")
    node = target
    for key in path[:-1]:
        node = node[key]
    key = path[-1]
    if action == "replace":
        node[key] = value
    elif action == "append":
        node[key] += value
    elif action == "add":
        if isinstance(node, list):
            node.insert(key, value)
        else:
            node[key] = value
    elif action == "delete":
        del node[key]
    else:
        raise ValueError(f"unsupported diff action {action!r}")
    return target


def apply_diff(outputs: list, diffs: list) -> list:
    """A streamed update applied to a copy of the previous outputs: sse_v3 sends each process_generating
    after the first as, per output, a list of [action, path, value] edits of that output's previous value."""
    outputs = json.loads(json.dumps(outputs))
    for i, edits in enumerate(diffs):
        for action, path, value in edits:
            outputs[i] = _edit(outputs[i], list(path), action, value)
    return outputs


def results(url: str, session_hash: str, event_id: str, timeout: float = DEFAULT_TIMEOUT,
            headers: dict | None = None, on_message: Callable[[dict], None] | None = None) -> Result:
    """Reads GET /gradio_api/queue/data?session_hash= (SSE) until `process_completed` of `event_id` (messages
    of the session's other events are skipped) or until `timeout` seconds have passed. `on_message` sees each
    of the event's messages as it arrives (to watch a job from another thread)."""
    deadline = time.monotonic() + timeout
    mine: list = []
    streamed = None
    # the read timeout bounds each wait for a line; the deadline bounds the whole loop
    with http(url, timeout, headers) as c, c.stream("GET", f"{API}/queue/data",
                                                  params={"session_hash": session_hash}) as r:
        if r.status_code != 200:
            r.read()
            return Result(False, error=_detail(r), status=r.status_code, event_id=event_id)
        for n, line in enumerate(_sse_lines(r, deadline)):
            if n > MAX_MESSAGES * 3:
                break
            if not line.startswith("data:"):
                continue
            msg = json.loads(line[5:].strip())
            kind = msg.get("msg")
            if kind == "unexpected_error":
                return Result(False, error=msg.get("message"), event_id=event_id, messages=mine + [msg])
            if msg.get("event_id") != event_id:
                continue
            if kind == "process_generating" and isinstance(msg.get("output"), dict):
                # the full outputs in every message (the first is full, later ones are diffs of it)
                out = msg["output"]
                if streamed is not None and out.get("data") is not None:
                    out["data"] = apply_diff(streamed, out["data"])
                streamed = out.get("data")
            mine.append(msg)
            if on_message is not None:
                on_message(msg)
            if kind == "process_completed":
                out = msg.get("output") or {}
                ok = bool(msg.get("success"))
                return Result(ok, data=out.get("data") if ok else None, error=None if ok else _error_text(out),
                              event_id=event_id, messages=mine)
            if len(mine) > MAX_MESSAGES:
                break
    return Result(False, error="timed out", event_id=event_id, messages=mine, timed_out=True)


def submit(url: str, index: int, data: list, session_hash: str | None = None, *, timeout: float = DEFAULT_TIMEOUT,
           headers: dict | None = None, event_data: Any = None, trigger_id: int | None = None) -> Result:
    """join + results; a refused join comes back as a Result with its HTTP status and detail."""
    session_hash = session_hash or new_hash()
    try:
        event_id = join(url, index, data, session_hash, event_data=event_data, trigger_id=trigger_id,
                        headers=headers)
    except Refused as exc:
        return Result(False, error=exc.detail, status=exc.status)
    return results(url, session_hash, event_id, timeout, headers)


def cancel(url: str, index: int, session_hash: str, event_id: str, headers: dict | None = None) -> int:
    """POST /gradio_api/cancel (what the page's Stop does for the running event): the HTTP status."""
    with http(url, 30.0, headers) as c:
        r = c.post(f"{API}/cancel", json={"fn_index": index, "session_hash": session_hash, "event_id": event_id})
    return r.status_code


# ------------------------------------------------------------------------------------------- by name
def call_by_name(url: str, name: str, data: list, timeout: float = DEFAULT_TIMEOUT,
                 headers: dict | None = None) -> Result:
    """POST /gradio_api/call/<name> {"data": ...}, then the event's stream (`event: complete|error|...`)."""
    name = name.lstrip("/")
    deadline = time.monotonic() + timeout
    with http(url, timeout, headers) as c:
        r = c.post(f"{API}/call/{name}", json={"data": data})
        if r.status_code != 200:
            return Result(False, error=_detail(r), status=r.status_code)
        event_id = r.json()["event_id"]
        messages: list = []
        event = None
        with c.stream("GET", f"{API}/call/{name}/{event_id}") as s:
            if s.status_code != 200:
                s.read()
                return Result(False, error=_detail(s), status=s.status_code, event_id=event_id)
            for n, line in enumerate(_sse_lines(s, deadline)):
                if n > MAX_MESSAGES * 3:
                    break
                if line.startswith("event:"):
                    event = line[6:].strip()
                elif line.startswith("data:"):
                    payload = json.loads(line[5:].strip())
                    messages.append({"event": event, "data": payload})
                    if event == "complete":
                        return Result(True, data=payload, event_id=event_id, messages=messages)
                    if event == "error":
                        return Result(False, error=_error_text(payload), event_id=event_id, messages=messages)
    return Result(False, error="timed out", event_id=event_id, messages=messages, timed_out=True)


def predict_direct(url: str, index: int, data: list, session_hash: str | None = None,
                   timeout: float = DEFAULT_TIMEOUT, headers: dict | None = None,
                   event_data: Any = None, route: str = "predict") -> Result:
    """POST /gradio_api/run/<route> with a fn_index: the route that skips the queue (and its validators)."""
    body = {"fn_index": index, "data": data, "session_hash": session_hash or new_hash(), "event_data": event_data}
    with http(url, timeout, headers) as c:
        r = c.post(f"{API}/run/{route}", json=body)
    try:
        payload = r.json()
    except ValueError:
        payload = {"error": r.text}
    if r.status_code == 200:
        return Result(True, data=payload.get("data"), status=200, messages=[payload])
    err = payload.get("error") if isinstance(payload, dict) and "error" in payload else _detail(r)
    return Result(False, error=None if err is None else str(err), status=r.status_code, messages=[payload])
