"""Hosting building blocks without a server: sessions and admission, client paths, editor EXIF, hosted-mode
allow-lists, ZeroGPU durations, byte-bounded caches."""
from __future__ import annotations

import os
import pickle
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from app import sessions as sessions_mod
from app.hosting import Hosting, blocked_paths, launch_kwargs, parse_loras
from app.sessions import Admission, Session, SessionRegistry, visitor_of
from app.uploads import NOT_UPLOADED, client_path, orientation, upright
from app.zerogpu import MAX_DURATION, MIN_DURATION, estimate_duration, on_gpu
from pipelines.core.cache import LRUCache, nbytes
from pipelines.core.errors import InputError


def request(hash_: str, host: str = "10.0.0.1", user: str | None = None):
    return SimpleNamespace(session_hash=hash_, client=SimpleNamespace(host=host), username=user)


# ---------------------------------------------------------------------------------------------- sessions
def test_flooding_hashes_never_cancels_or_evicts_a_busy_session():
    reg = SessionRegistry(max_sessions=4, per_visitor=100)
    victim = reg.get(request("victim", host="1.1.1.1"))
    token = victim.new_job()
    victim.inversion_cache.put("k", torch.zeros(4))
    for i in range(50):  # another visitor mints hashes
        try:
            reg.get(request(f"flood{i}", host="6.6.6.6"))
        except InputError:
            pass
    assert not token.cancelled
    assert reg.peek(request("victim")) is victim and victim.inversion_cache.get("k") is not None
    assert len(reg) <= 4


def test_full_registry_of_busy_sessions_refuses_new_ones_with_a_message():
    reg = SessionRegistry(max_sessions=2, per_visitor=100)
    for i in range(2):
        reg.get(request(f"s{i}", host=f"1.1.1.{i}")).new_job()
    with pytest.raises(InputError, match="too many open sessions"):
        reg.get(request("new", host="2.2.2.2"))


def test_idle_sessions_are_evicted_oldest_first_and_released_not_cancelled():
    reg = SessionRegistry(max_sessions=2, per_visitor=100)
    old = reg.get(request("old", host="1.1.1.1"))
    token = old.new_job()
    token.finish()  # idle again
    old.handoff["generate"] = Image.new("RGB", (8, 8))
    reg.get(request("mid", host="1.1.1.2"))
    reg.get(request("new", host="1.1.1.3"))
    assert reg.peek(request("old")) is None and not token.cancelled
    assert old.handoff == {}


def test_one_visitor_can_only_evict_its_own_idle_sessions():
    reg = SessionRegistry(max_sessions=10, per_visitor=2)
    other = reg.get(request("other", host="9.9.9.9"))
    a = reg.get(request("a", host="6.6.6.6"))
    a.new_job()
    reg.get(request("b", host="6.6.6.6"))
    reg.get(request("c", host="6.6.6.6"))   # evicts b (idle), keeps busy a
    assert reg.peek(request("a")) is a and reg.peek(request("b")) is None
    assert reg.peek(request("other")) is other
    reg.get(request("c", host="6.6.6.6")).new_job()
    with pytest.raises(InputError):
        reg.get(request("d", host="6.6.6.6"))  # both of its sessions busy: refused, nobody else touched
    assert reg.peek(request("other")) is other


def test_stop_token_is_per_job_and_drop_cancels_only_that_session():
    reg = SessionRegistry()
    a, b = reg.get(request("a")), reg.get(request("b"))
    ta, tb = a.new_job(), b.new_job()
    reg.drop(request("a"))
    assert ta.cancelled and not tb.cancelled
    old = b.token
    new = b.new_job()
    old.cancel()
    assert not new.cancelled


def test_session_caches_are_bounded_in_bytes(monkeypatch):
    monkeypatch.setattr(sessions_mod, "SESSION_BYTES", 1000)
    s = Session()
    s.inversion_cache.max_bytes = s.drag_cache.max_bytes = 1000
    s.inversion_cache.put("a", torch.zeros(100))   # 400 bytes
    s.drag_cache.put("b", torch.zeros(200))        # 800 bytes: together over the session budget
    assert s.cache_bytes() == 1200
    s.new_job().finish()                           # a job's end trims the session
    assert s.cache_bytes() <= 1000
    assert s.drag_cache.get("b") is None and s.inversion_cache.get("a") is not None  # the largest went


def test_lru_cache_bytes_bound_and_measure():
    c = LRUCache(10, max_bytes=1000)
    c.put(1, torch.zeros(100))   # 400
    c.put(2, np.zeros(50))       # 400
    c.put(3, torch.zeros(100))   # 400 -> evicts 1
    assert c.get(1) is None and c.get(2) is not None and c.total_bytes() == 800
    c.put(4, torch.zeros(1000))  # larger than the budget: not kept, others stay
    assert c.get(4) is None and len(c) == 2
    assert nbytes({"x": [torch.zeros(2, dtype=torch.float16)], "img": Image.new("RGB", (4, 2))}) == 4 + 24


def test_admission_caps_jobs_per_visitor_and_expires():
    adm = Admission(max_jobs=2, ttl=60)
    assert adm.admit("v", "s1") and adm.admit("v", "s1") and not adm.admit("v", "s2")
    assert adm.admit("w", "s3")  # other visitors are not affected
    adm.bind("s1", "e1")
    adm.start("v", "s1", "e1")
    adm.finish("v", "s1", "e1")
    assert adm.held("v") == 1 and adm.admit("v", "s1")
    short = Admission(max_jobs=1, ttl=0.0)
    assert short.admit("v") and short.admit("v")  # a queued ticket whose job never ran stops counting
    short.start("v", None, "e9")  # a /call/<name> job: no session at join, its id only when it starts
    assert short.held("v") == 1 and not short.admit("v")  # a running ticket never expires
    short.finish("v", "generated-hash", "e9")
    assert short.held("v") == 0


def test_admission_gives_back_a_ticket_stopped_while_queued_only():
    adm = Admission(max_jobs=3, ttl=60)
    for s in ("a", "b", "c"):
        assert adm.admit("v", s)
    adm.bind("a", "ea")
    adm.start("v", "a", "ea")           # running
    adm.start("v", "b", "eb")           # started before its join was answered: bound at start
    adm.bind("b", "eb")
    adm.bind("c", "ec")                 # queued
    adm.withdraw("ea")                  # stopping a running job: its handler gives the ticket back
    adm.withdraw("eb")
    adm.withdraw("unknown")             # a made-up id changes nothing
    assert adm.held("v") == 3
    adm.withdraw("ec")                  # stopped while queued: given back now
    assert adm.held("v") == 2
    adm.withdraw("ec")                  # twice: no effect
    adm.finish("v", "c", "ec")          # nor a late end of a job that never ran
    assert adm.held("v") == 2
    adm.finish("v", "a", "ea")
    adm.finish("v", "b", "eb")
    assert adm.held("v") == 0


def test_visitor_identity():
    assert visitor_of(request("h", host="1.2.3.4")) == "ip:1.2.3.4"
    assert visitor_of(request("h", user="ann")) == "user:ann"
    assert visitor_of(None) == "anonymous"


def test_handoff_png_is_lossless_and_in_the_sessions_folder():
    s = Session()
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (16, 24, 3), dtype=np.uint8))
    assert s.handoff_png("generate") is None
    s.keep_result("generate", img)
    path = s.handoff_png("generate")
    assert os.path.dirname(path) == str(s.out_dir)
    assert np.array_equal(np.asarray(Image.open(path).convert("RGB")), np.asarray(img))
    s.close()
    assert not os.path.exists(path)


# ------------------------------------------------------------------------------------------ client paths
@pytest.fixture
def upload_dir(tmp_path, monkeypatch):
    folder = tmp_path / "uploads"
    folder.mkdir()
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(folder))
    return folder


def _png(path, size=(16, 16)):
    Image.new("RGB", size, (10, 20, 30)).save(path)
    return path


def test_client_path_accepts_uploads_only_with_one_message(upload_dir, tmp_path):
    inside = _png(upload_dir / "a.png")
    assert client_path({"path": str(inside)}) == os.path.realpath(inside)
    assert client_path(str(inside)) == os.path.realpath(inside)
    outside = _png(tmp_path / "secret.png")
    link = upload_dir / "link.png"
    link.symlink_to(outside)
    messages = set()
    for bad in (str(outside), str(tmp_path / "missing.png"), str(link), str(upload_dir / ".." / "secret.png"),
                str(upload_dir), "relative.png", "/etc/passwd", "x" * 5000, "a\x00b"):
        with pytest.raises(InputError) as info:
            client_path({"path": bad, "orig_name": "x.svg"}, "the image")
        messages.add(str(info.value))
    assert messages == {NOT_UPLOADED.format(what="the image")}


def test_client_path_refuses_urls_and_missing_values(upload_dir):
    with pytest.raises(InputError, match="as a file"):
        client_path({"url": "data:image/png;base64,AAAA"}, "the image")
    with pytest.raises(InputError, match="Please upload the image"):
        client_path(None, "the image")


def test_client_path_checks_the_header_not_the_pixels(upload_dir):
    narrow = _png(upload_dir / "narrow.png", (1, 512))
    with pytest.raises(InputError, match="narrow"):
        client_path(str(narrow))
    (upload_dir / "junk.png").write_bytes(b"not an image at all")
    with pytest.raises(InputError, match="not an image"):
        client_path(str(upload_dir / "junk.png"))


def test_editor_background_turned_upright_by_its_exif_orientation(tmp_path):
    arr = np.zeros((4, 6, 3), np.uint8)
    arr[0, 0] = 255  # a marked corner
    img = Image.fromarray(arr)
    exif = img.getexif()
    exif[0x0112] = 6  # stored sideways: shown rotated 90 degrees clockwise
    img.save(tmp_path / "o.jpg", exif=exif, quality=100)
    assert orientation(str(tmp_path / "o.jpg")) == 6
    shown = upright(arr, 6)
    assert shown.shape == (6, 4, 3) and shown[0, -1, 0] == 255  # top-left moved to top-right
    assert upright(arr, 1) is arr


# ---------------------------------------------------------------------------------------------- hosting
def test_hosted_allow_lists(monkeypatch):
    monkeypatch.delenv("SPACE_ID", raising=False)
    assert not Hosting.from_env().public
    monkeypatch.setenv("SPACE_ID", "me/studio")
    monkeypatch.setenv("STUDIO_ALLOWED_LORAS", "smooth=shi-labs/smooth-diffusion-lora")
    h = Hosting.from_env(models=["embedded"])
    assert h.public and h.models == ["embedded"] and h.loras == {"smooth": "shi-labs/smooth-diffusion-lora"}
    assert h.check_model("embedded") == "embedded"
    for bad in ("/tmp", "../assets/model", "owner/other", "embedded/..", ""):
        with pytest.raises(InputError, match="offers only"):
            h.check_model(bad)
    assert h.check_lora("smooth") == "shi-labs/smooth-diffusion-lora"
    with pytest.raises(InputError, match="offers only"):
        h.check_lora("/tmp/x.safetensors")
    with pytest.raises(ValueError):
        parse_loras(["no-equals-sign"])
    assert Hosting(public=False).check_model("/any/folder") == "/any/folder"  # local: today's freedom


def test_launch_settings_hide_internals():
    from app.hosting import queue_kwargs

    kw = launch_kwargs()
    assert kw["show_error"] is False and kw["enable_monitoring"] is False
    assert queue_kwargs()["api_open"] is False  # GPU events only through the queue and its admission
    assert any(p.endswith(os.sep + "assets") for p in blocked_paths()) and kw["max_file_size"] > 0


def test_launch_settings_arm_pillows_bomb_guard_at_twice_the_pixel_cap(monkeypatch):
    import io

    from PIL import Image

    from pipelines.core.limits import limits_set

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # restored after the test
    buf = io.BytesIO()
    Image.new("RGB", (150, 150)).save(buf, "PNG")  # 22500 px
    with limits_set(max_pixels=10_000):
        launch_kwargs()
    with pytest.raises(Image.DecompressionBombError):  # a decoder outside the studio's own checks
        Image.open(io.BytesIO(buf.getvalue()))


# ---------------------------------------------------------------------------------------------- ZeroGPU
def test_zero_gpu_wrapper_is_a_no_op_elsewhere_and_durations_are_capped(monkeypatch):
    monkeypatch.delenv("SPACES_ZERO_GPU", raising=False)

    def handler(prompt, steps, w, h, n=1, request=None):
        yield prompt

    assert on_gpu(handler) is handler
    small = estimate_duration(handler, ("x", 2, 64, 64), {})
    big = estimate_duration(handler, ("x", 150, 1024, 1024, 64), {})
    assert small <= MIN_DURATION + 2 and big == MAX_DURATION
    mid = estimate_duration(handler, ("x", 50, 512, 512), {})
    assert MIN_DURATION < mid < MAX_DURATION
    assert estimate_duration(handler, ("x", "junk", None, float("nan")), {}) >= MIN_DURATION
    # what crosses the ZeroGPU process boundary must pickle: typical arguments and yields
    pickle.dumps((("a prompt", 30, 512, 512), Image.new("RGB", (8, 8)), {"__type__": "update"}))


def test_body_limit_refuses_large_json_but_not_uploads():
    import asyncio

    from app.hosting import BodyLimit

    calls = []

    async def inner(scope, receive, send):
        body = b""
        while True:
            message = await receive()
            if message["type"] != "http.request":
                calls.append("disconnect")
                return
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        calls.append(len(body))

    def run(path, headers, chunks):
        sent = []
        queue = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)]

        async def receive():
            return queue.pop(0)

        async def send(message):
            sent.append(message)

        mw = BodyLimit(inner, max_bytes=100)
        asyncio.run(mw({"type": "http", "method": "POST", "path": path, "headers": headers}, receive, send))
        return sent

    sent = run("/gradio_api/queue/join", [(b"content-length", b"1000")], [b"x" * 1000])
    assert sent[0]["status"] == 413 and calls == []
    run("/gradio_api/queue/join", [], [b"x" * 60, b"x" * 60])  # chunked, no length: cut off past the limit
    assert calls == ["disconnect"]
    run("/gradio_api/upload", [(b"content-length", b"1000")], [b"x" * 1000])  # uploads have Gradio's own cap
    run("/gradio_api/queue/join", [(b"content-length", b"50")], [b"x" * 50])
    assert calls[1:] == [1000, 50]


# ---------------------------------------------------------------------------------------------- gateway
def test_gateway_refuses_non_upload_paths_in_any_payload_shape(upload_dir, tmp_path):
    from app.gateway import file_refusal
    from app.uploads import NO_URLS

    inside = _png(upload_dir / "a.png")
    ok = {"path": str(inside), "meta": {"_type": "gradio.FileData"}, "url": "http://127.0.0.1/file=x"}
    assert file_refusal({"data": [ok, "text", 3, None, {"background": ok, "layers": [ok], "composite": None}],
                         "fn_index": 1, "session_hash": "h"}) is None
    refused = NOT_UPLOADED.format(what="the image")
    for bad in (str(tmp_path / "secret.png"), "/etc/passwd", str(upload_dir / ".." / "x.png"), str(upload_dir),
                "", 5, "a\x00b"):
        assert file_refusal({"data": [{"background": {"path": bad}, "layers": []}]}) == refused, bad
    for url in ("https://example.com/cat.png", "HTTP://x/y", "data:image/png;base64,AAAA", "file:///etc/passwd",
                "//evil.example/x.png", "s3://bucket/key"):
        assert file_refusal({"data": [{"path": url, "meta": {"_type": "gradio.FileData"}}]}) == \
            NO_URLS.format(what="the image"), url
    deep = {"path": "/etc/passwd"}
    for _ in range(30):
        deep = [deep]
    assert file_refusal({"data": deep}) == refused


def test_gateway_public_detail_keeps_studio_messages_and_hides_internals():
    from app.gateway import public_detail

    assert public_detail(repr("Please upload the image.")) == "Please upload the image."  # a gr.Error's text
    assert public_detail("Session hash not found.") == "Session hash not found."
    assert public_detail("Cannot move /srv/app/README.md to the gradio cache dir because it was located in one "
                         "of the blocked_paths (/srv/app/app, /srv/app/pipelines)").startswith("Please upload")
    for internal in ('Could not preprocess input component at index 3 (named "run_generate"). Original error: '
                     "TypeError: bad", "Wanted inputs: [<gradio.components.textbox.Textbox object at 0x7f>]",
                     {"loc": ["body"], "msg": "x"}, "'unterminated"):
        text = public_detail(internal)
        assert text.startswith("Something went wrong (incident ") and "Error" not in text and "0x" not in text


def test_gateway_tells_the_ledger_about_joins_and_stops():
    import asyncio
    import json

    from app.gateway import Gateway

    adm = Admission(max_jobs=2, ttl=60)
    answers = {"/gradio_api/queue/join": (200, {"event_id": "e1"}), "/gradio_api/cancel": (200, {"success": True})}

    async def app(scope, receive, send):
        message = await receive()
        json.loads(message["body"])
        if scope["path"] == "/gradio_api/queue/join":
            adm.admit("v", "h")  # what the event's validator does during the join
        status, content = answers[scope["path"]]
        body = json.dumps(content).encode()
        await send({"type": "http.response.start", "status": status, "headers": [(b"content-length", b"1")]})
        await send({"type": "http.response.body", "body": body})

    def post(path, content):
        sent, queue = [], [{"type": "http.request", "body": json.dumps(content).encode(), "more_body": False}]

        async def receive():
            return queue.pop(0) if queue else {"type": "http.disconnect"}

        async def send(message):
            sent.append(message)

        asyncio.run(Gateway(app, admission=adm)({"type": "http", "method": "POST", "path": path, "headers": []},
                                                receive, send))
        return sent

    sent = post("/gradio_api/queue/join", {"fn_index": 1, "data": ["x"], "session_hash": "h"})
    assert json.loads(sent[1]["body"]) == {"event_id": "e1"}
    assert dict(sent[0]["headers"])[b"content-length"] == str(len(sent[1]["body"])).encode()
    assert adm.held("v") == 1
    post("/gradio_api/cancel", {"fn_index": 1, "session_hash": "h", "event_id": "e1"})
    assert adm.held("v") == 0  # stopped while queued: the ticket is back
    answers["/gradio_api/queue/join"] = (400, {"detail": "Original error: KeyError at /srv/secret"})
    sent = post("/gradio_api/queue/join", {"fn_index": 1, "data": ["x"], "session_hash": "h"})
    detail = json.loads(sent[1]["body"])["detail"]
    assert sent[0]["status"] == 400 and "/srv" not in detail and detail.startswith("Something went wrong")
    sent = post("/gradio_api/call/invert", {"data": [{"path": "/etc/passwd"}]})
    assert sent[0]["status"] == 400 and json.loads(sent[1]["body"])["detail"].startswith("Please upload")
