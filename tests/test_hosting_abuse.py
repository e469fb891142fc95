"""Attacks on the running studio over the raw Gradio protocol (tests/gradio_raw.py): what a visitor can send
without the page or gradio_client, to every dependency in /config, private ones included.

Two servers, both with the production launch settings (app/hosting.py launch_kwargs/queue_kwargs):
- `app_url` (tests/conftest.py): the local-mode studio on the shared tiny model;
- `hosted` (here): hosted mode (Hosting(public=True)) on its own tiny model, with a second allow-listed model
  and an allow-listed LoRA preloaded, and a SessionRegistry the tests can inspect.

Every request carries its own X-Forwarded-For address (uvicorn trusts it from 127.0.0.1), so each test is its
own visitor: the per-visitor job cap never couples these tests to each other or to other test modules.
"""
from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import socket
import threading
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import gradio_raw as raw
import numpy as np
import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "a small red circle on the left on a white background"
MARKER = f"CANARY-{uuid.uuid4().hex}"      # in every canary file's bytes, nowhere else
WAIT = 60
LONG_STEPS = 150                           # the steps slider's maximum: a job that runs for seconds
PLEASE_UPLOAD = "Please upload"
INCIDENT = re.compile(r"^Something went wrong \(incident [0-9a-f]{8}\)")
# what an error shown to a visitor must never contain (besides server paths, checked separately)
INTERNALS = re.compile(r"Traceback|File \"|\b[A-Z][A-Za-z]*(Error|Exception)\b|\bobject at 0x|"
                       r"Original error|event handler \(|site-packages|\.py\b")


def visitor(n: int) -> dict:
    """Headers of a distinct visitor (client address 10.77.x.y as the server sees it)."""
    return {"X-Forwarded-For": f"10.77.{n // 250}.{n % 250 + 1}"}


_visitors = iter(range(1, 60000))


def new_visitor() -> dict:
    return visitor(next(_visitors))


def gen_args(seed=1234, steps=3, prompt=PROMPT, use_lora=False, adapter=None, w=64, h=64):
    return [prompt, "", seed, steps, 7.5, w, h, use_lora, 1.0, adapter, 1, False, False]  # ..., batch, fast, singular


def png_bytes(size=(64, 64), colour=(200, 30, 30), text: dict | None = None) -> bytes:
    info = PngInfo()
    for k, v in (text or {}).items():
        info.add_text(k, v)
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def pixels_of(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB")).copy()


def clean(text: str | None) -> str:
    """An error as the visitor reads it: the validator route wraps gr.Error text in quotes."""
    return (text or "").strip().strip("'\"").strip()


def server_paths() -> list[str]:
    """Paths of this server that must never appear in what a visitor is shown."""
    import tempfile

    from app.uploads import upload_root

    return [str(ROOT), upload_root(), os.path.realpath(tempfile.gettempdir()) + "/", "site-packages"]


def assert_clean_error(text: str | None, where: str, sent: tuple = ()):
    """A visitor-facing error: no traceback, exception class name or server path (paths the client sent
    itself are removed first: echoing them back discloses nothing)."""
    text = text or ""
    for p in sent:
        for variant in {p, os.path.abspath(p), os.path.realpath(p)}:
            text = text.replace(variant, "<SENT>")
    assert not INTERNALS.search(text), f"{where}: internals in the error: {text[:400]}"
    for p in server_paths():
        assert p not in text, f"{where}: server path {p!r} in the error: {text[:400]}"


# ------------------------------------------------------------------------------------------ discovery
def component_kind(comp: dict) -> str | None:
    """'editor' (EditorData: background/layers/composite), 'image' (a file dict: path/url), else None; read
    from the component's API schema, so subclasses (SafeImage, the Safe editors) are found whatever their
    type name."""
    info = comp.get("api_info_as_input") or comp.get("api_info") or {}
    props = info.get("properties", {}) if isinstance(info, dict) else {}
    if {"background", "layers", "composite"} <= set(props):
        return "editor"
    if {"path", "url"} <= set(props):
        return "image"
    name = comp.get("type", "")
    if name in ("imageeditor", "imagemask", "sketchpad", "paint"):
        return "editor"
    if "image" in name or name == "file":
        return "image"
    return None


def image_dependencies(cfg: dict) -> list[tuple[dict, list[tuple[int, str]]]]:
    """Every dependency with an image or editor input: (dependency, [(input slot, kind), ...])."""
    comps = raw.components(cfg)
    out = []
    for dep in cfg["dependencies"]:
        slots = [(i, component_kind(comps[c])) for i, c in enumerate(dep["inputs"])]
        slots = [(i, k) for i, k in slots if k]
        if slots:
            out.append((dep, slots))
    return out


# ------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def cfg(app_url):
    return raw.config(app_url)


@pytest.fixture(scope="module")
def ok_image(app_url, tmp_path_factory):
    """A real upload (64x64 PNG) as the FileData dict handle_file would send."""
    path = tmp_path_factory.mktemp("abuse_ok") / "ok.png"
    path.write_bytes(png_bytes(colour=(20, 180, 40)))
    return raw.file_data(raw.upload(app_url, path))


@pytest.fixture()
def canaries(tmp_path):
    """Files an attacker would like to read: a PNG under /tmp (tmp_path), a text file in a subfolder of the
    working directory (created and removed here), a path through the upload folder with '..' that lands on
    the /tmp canary, and a path that does not exist."""
    from app.uploads import upload_root

    tmp_png = tmp_path / "canary.png"
    tmp_png.write_bytes(png_bytes(colour=(1, 2, 3), text={"secret": MARKER}) + MARKER.encode())
    folder = Path.cwd() / f"_abuse_canary_{uuid.uuid4().hex[:8]}"
    folder.mkdir()
    cwd_txt = folder / "secret.env"
    cwd_txt.write_text(f"API_KEY={MARKER}\n")
    root = upload_root()
    traversal = os.path.join(root, os.path.relpath(str(tmp_png), root))  # <upload root>/../../.../canary.png
    assert ".." in traversal and os.path.realpath(traversal) == os.path.realpath(tmp_png)
    try:
        yield SimpleNamespace(tmp=str(tmp_png), cwd=str(cwd_txt), traversal=traversal,
                              missing=str(tmp_path / "missing.png"), tmp_bytes=tmp_png.read_bytes(),
                              cwd_bytes=cwd_txt.read_bytes())
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write_peft_lora(unet, path: Path, rank: int = 4, seed: int = 7) -> Path:
    """A small LoRA in diffusers' PEFT key format for every attention projection of `unet`."""
    import torch
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)
    modules = dict(unet.named_modules())
    sd = {}
    for proc in unet.attn_processors:
        module = proc[: -len(".processor")]
        attn = modules[module]
        for proj, layer in (("to_q", attn.to_q), ("to_k", attn.to_k), ("to_v", attn.to_v),
                            ("to_out.0", attn.to_out[0])):
            layer = getattr(layer, "base_layer", layer)
            sd[f"unet.{module}.{proj}.lora_A.weight"] = torch.randn(rank, layer.in_features, generator=gen) * 0.5
            sd[f"unet.{module}.{proj}.lora_B.weight"] = torch.randn(layer.out_features, rank, generator=gen) * 0.5
    save_file(sd, str(path))
    return path


def _other_model_folder(folder: Path) -> Path:
    """A copy of the tiny model with another label and its UNet output negated (other pictures, same cost)."""
    from safetensors.torch import load_file, save_file

    from pipelines.core.tiny_model import ensure_tiny_model

    shutil.copytree(ensure_tiny_model(), folder)
    info_path = folder / "studio_model.json"
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    info_path.write_text(json.dumps({**info, "label": "hosted second model"}))
    weights = next((folder / "unet").glob("*.safetensors"))
    sd = load_file(str(weights))
    sd["conv_out.weight"] = -sd["conv_out.weight"]
    save_file(sd, str(weights))
    return folder


@pytest.fixture(scope="module")
def hosted(app_url, tmp_path_factory):
    """The studio in hosted mode on 127.0.0.1 with the production launch settings, on its own tiny model
    (preloading adds the allow-listed LoRA to its models, which must not touch the session-wide one).
    Requests app_url so GRADIO_TEMP_DIR and NO_PROXY are those of the other server."""
    from app.hosting import Hosting, launch_kwargs, queue_kwargs
    from app.sessions import SessionRegistry
    from app.ui import build_demo
    from pipelines.core.events import run_to_end
    from pipelines.core.models import load_model
    from pipelines.studio import Studio

    work = tmp_path_factory.mktemp("hosted")
    studio = Studio()
    studio.model = run_to_end(load_model("tiny-random"))
    other = _other_model_folder(work / "second-model")
    lora = _write_peft_lora(studio.model.unet, work / "styl.safetensors")
    hosting = Hosting(public=True, models=["tiny-random", str(other)], loras={"styl": str(lora)})
    hosting.preload(studio)
    assert set(studio.pool) == {"tiny-random", str(other)}, studio.pool
    assert all("styl" in m.loras for m in studio.pool.values())
    registry = SessionRegistry()
    demo = build_demo(studio, registry, hosting)
    demo.queue(**queue_kwargs())
    demo.launch(server_name="127.0.0.1", server_port=_free_port(), prevent_thread_lock=True, quiet=True,
                **launch_kwargs(registry))
    try:
        url = demo.local_url.rstrip("/") + "/"
        yield SimpleNamespace(url=url, cfg=raw.config(url), studio=studio, registry=registry, hosting=hosting,
                              other=str(other), lora=str(lora))
    finally:
        demo.close()


# ------------------------------------------------------------------------------------------ helpers
def editor(background=None, layers=(), composite=None) -> dict:
    return {"background": background, "layers": list(layers), "composite": composite, "id": None}


def filled_inputs(cfg: dict, dep: dict, slots, ok_image: dict) -> list:
    """The dependency's default inputs, with every image slot holding a real upload (so the attacked slot is
    the only thing wrong), and a select event's points list empty."""
    data = raw.default_inputs(cfg, dep["id"])
    for i, kind in slots:
        data[i] = ok_image if kind == "image" else editor(ok_image)
    return data


def event_data_for(dep: dict):
    return {"index": [1, 1], "value": None, "selected": True} if any(t[1] == "select" for t in dep["targets"]) \
        else None


def payloads(c, kind: str, full: bool) -> list[tuple[str, str, object, tuple]]:
    """(location, shape, value for the slot, paths sent) for an image or editor slot. `full`: every location
    x shape, else one of each shape."""
    locations = {"tmp": c.tmp, "cwd": c.cwd, "traversal": c.traversal, "missing": c.missing}
    shapes = {
        "bare": lambda p: {"path": p},
        "svg": lambda p: {"path": p, "orig_name": "x.svg"},
        "meta": lambda p: {"path": p, "orig_name": "canary.png", "meta": {"_type": "gradio.FileData"}},
    }
    data_url = "data:image/png;base64," + base64.b64encode(c.tmp_bytes).decode()
    url_values = [("data-url", "url", {"url": data_url}, ()),
                  ("file-url", "url", {"url": "file://" + c.tmp}, (c.tmp,))]
    if full:
        files = [(loc, shape, make(p), (p,)) for loc, p in locations.items() for shape, make in shapes.items()]
    else:
        files = [("tmp", "bare", shapes["bare"](c.tmp), (c.tmp,)), ("cwd", "svg", shapes["svg"](c.cwd), (c.cwd,)),
                 ("traversal", "meta", shapes["meta"](c.traversal), (c.traversal,))]
    if kind == "image":
        return files + (url_values if full else url_values[:1])
    out = [(loc, f"background/{shape}", editor(v), sent) for loc, shape, v, sent in files + url_values[:1]]
    few = files if full else files[:1]
    out += [(loc, f"layer/{shape}", editor(None, [v]), sent) for loc, shape, v, sent in few[:3]]
    out += [(loc, f"composite/{shape}", editor(None, [], v), sent) for loc, shape, v, sent in few[-3:]]
    return out


def leaked_bytes(url: str, result: raw.Result, canary_bytes: tuple[bytes, ...]) -> list[str]:
    """Files named in any output of `result` that hold canary bytes (fetched via /gradio_api/file=)."""
    found = []
    for ref in set(raw.file_refs(result.data)) | set(raw.file_refs(result.messages)):
        status, body = raw.fetch_file(url, ref)
        if status == 200 and (MARKER.encode() in body or body in canary_bytes):
            found.append(ref)
    return found


def normalised(text: str | None, sent: tuple) -> str:
    """An error with the paths the client sent, and pydantic's (length-truncated) echo of the input, masked:
    what is left must not depend on whether the file exists."""
    text = clean(text)
    for p in sent:
        for variant in sorted({p, os.path.abspath(p), os.path.realpath(p)}, key=len, reverse=True):
            text = text.replace(variant, "<PATH>")
    return re.sub(r"input_value=.*?, input_type=\w+", "input_value=<V>", text, flags=re.S)


def run_canary_matrix(url: str, cfg: dict, ok_image: dict, c, route: str) -> None:
    """Sends every canary payload to every image/editor input slot of every dependency by `route` ('join':
    by fn_index through /queue/join; 'call': by name through /call/<name>) and asserts: refused, no canary
    byte in any message or served file, the same text for existing and missing files, and the studio's
    "Please upload" text where the studio itself sees the payload (image slots, no `meta`)."""
    deps = image_dependencies(cfg)
    names = {d.get("api_name") for d, _ in deps}
    # discovery sanity: the known image events are all found (hidden ones included)
    assert {"invert", "edit", "instruct", "sdedit", "diffedit", "diffedit_mask", "drag", "on_upload", "on_click",
            "interpolate_images_frame", "run_real_frame", "inpaint"} <= names, sorted(names)
    headers = new_visitor()
    problems, by_shape = [], {}
    count = 0
    for dep, slots in deps:
        for slot, kind in slots:
            for loc, shape, value, sent in payloads(c, kind, full=route == "join"):
                data = filled_inputs(cfg, dep, slots, ok_image)
                data[slot] = value
                if route == "join":
                    r = raw.submit(url, dep["id"], data, timeout=30, headers=headers, event_data=event_data_for(dep))
                else:
                    r = raw.call_by_name(url, dep["api_name"], data, timeout=30, headers=headers)
                count += 1
                where = f"{route} {dep['api_name']}#{dep['id']} slot {slot} ({kind}) {loc}/{shape}"
                if not r.refused:
                    problems.append(f"{where}: NOT refused (success={r.success}, timed_out={r.timed_out}): "
                                    f"{r.text[:300]}")
                    continue
                if MARKER in r.text:
                    problems.append(f"{where}: canary text in the response")
                leaks = leaked_bytes(url, r, (c.tmp_bytes, c.cwd_bytes))
                if leaks:
                    problems.append(f"{where}: canary bytes served at {leaks}")
                if kind == "image" and shape in ("bare", "svg", "url") and not clean(r.error).startswith(PLEASE_UPLOAD):
                    problems.append(f"{where}: not the studio's message: {clean(r.error)[:200]!r}")
                if loc in ("tmp", "cwd", "traversal", "missing"):
                    by_shape.setdefault((dep["id"], slot, shape), {})[loc] = normalised(r.error, sent)
    for key, texts in by_shape.items():
        if len(set(texts.values())) > 1:
            problems.append(f"{route} dependency {key}: the text depends on the file: {texts}")
    assert count > 100 if route == "join" else count > 40, count
    assert not problems, f"{len(problems)} of {count} payloads got through or leaked:\n" + "\n".join(problems[:40])


# ==================================================================================== client file paths
def test_canary_paths_refused_on_every_image_input_via_queue_join(app_url, cfg, ok_image, canaries):
    """Attack: read server files through any image/editor input. Every dependency in /config with such an
    input (hidden ones included) gets, by fn_index through /queue/join, a bare {"path"}, the same with
    orig_name "x.svg", a FileData dict with meta, for a /tmp file, a cwd file, a '..' path through the upload
    folder and a missing file, plus data: and file:// URLs, in that slot (editors: as background, layer and
    composite). All are refused, nothing returned or served holds canary bytes, and the answer is the same
    whether the file exists or not."""
    run_canary_matrix(app_url, cfg, ok_image, canaries, "join")


def test_canary_paths_refused_on_every_image_input_via_call_by_name(app_url, cfg, ok_image, canaries):
    """Attack: the same file payloads by name through POST /gradio_api/call/<name> (which reaches private
    events too), one of each shape per slot."""
    run_canary_matrix(app_url, cfg, ok_image, canaries, "call")


def test_canary_files_never_served_or_copied_into_the_cache(app_url, canaries, ok_image, cfg):
    """Attack: fetch the canaries directly through GET /gradio_api/file=<path> (also with '..' through the
    upload folder), after a bare-path request has been made for each; then search the whole upload/cache
    folder: no file there holds canary bytes."""
    from app.uploads import upload_root

    for p in (canaries.tmp, canaries.cwd, canaries.traversal, str(ROOT / "app.py"), str(ROOT / "README.md")):
        r = raw.submit(app_url, raw.fn_index(None, "invert", cfg), [{"path": p}] + raw.default_inputs(
            cfg, raw.fn_index(None, "invert", cfg))[1:], headers=new_visitor(), timeout=30)
        assert r.refused
        status, body = raw.fetch_file(app_url, p)
        assert status in (403, 404), (p, status)
        assert MARKER.encode() not in body
    for dirpath, _, files in os.walk(upload_root()):
        for name in files:
            path = os.path.join(dirpath, name)
            if os.path.getsize(path) < 8 * 2**20:
                with open(path, "rb") as f:
                    body = f.read()
                assert MARKER.encode() not in body and body not in (canaries.tmp_bytes, canaries.cwd_bytes), path


def test_every_file_refusal_uses_the_studio_message(app_url, cfg, ok_image, canaries):
    """Contract: a client path outside the upload folder, in any shape and any image/editor slot, gets the
    studio's own "Please upload ..." message (app/uploads.py NOT_UPLOADED / NO_URLS)."""
    wrong = []
    for dep, slots in image_dependencies(cfg):
        for slot, kind in slots:
            meta = {"path": canaries.tmp, "meta": {"_type": "gradio.FileData"}}
            values = [meta] if kind == "image" else [editor({"path": canaries.tmp}), editor(meta)]
            for value in values:
                data = filled_inputs(cfg, dep, slots, ok_image)
                data[slot] = value
                r = raw.submit(app_url, dep["id"], data, timeout=30, headers=new_visitor(),
                               event_data=event_data_for(dep))
                if not clean(r.error).startswith(PLEASE_UPLOAD):
                    wrong.append(f"{dep['api_name']} slot {slot} {json.dumps(value)[:80]}: {clean(r.error)[:120]!r}")
    assert not wrong, "\n".join(wrong)


def test_refusals_never_disclose_server_paths(app_url, cfg, ok_image):
    """Attack: probe the server's layout with FileData dicts aimed at the repository (blocked paths); the
    refusal may echo the path sent, but must name no other server path."""
    shown = []
    for name, kind in (("invert", "image"), ("sdedit", "editor"), ("on_upload", "image")):
        index = raw.fn_index(None, name, cfg)
        for target in (ROOT / "README.md", ROOT / "app.py", ROOT / "app" / "ui.py"):
            value = {"path": str(target), "meta": {"_type": "gradio.FileData"}}
            data = raw.default_inputs(cfg, index)
            data[0] = value if kind == "image" else editor(value)
            r = raw.submit(app_url, index, data, timeout=30, headers=new_visitor())
            assert r.refused
            text = (r.error or "").replace(str(target), "<SENT>")
            if str(ROOT) in text:
                shown.append(f"{name} {target}: {text[:300]}")
    assert not shown, "\n".join(shown)


def test_image_urls_in_file_payloads_are_never_fetched(app_url, cfg, monkeypatch, tmp_path):
    """Attack: make the server fetch a URL (SSRF, unbounded download) by putting it in a FileData `path`.
    Gradio's downloader is replaced by a spy that records the URL and hands back a small PNG (what a public
    host would serve; nothing leaves this machine): the studio must neither fetch nor process it."""
    import gradio.processing_utils as pu

    fetched = []

    async def spy(url, cache_dir):
        fetched.append(url)
        out = Path(cache_dir) / uuid.uuid4().hex / "cat.png"
        out.parent.mkdir(parents=True)
        out.write_bytes(png_bytes(colour=(9, 9, 200)))
        return str(out)

    monkeypatch.setattr(pu, "async_ssrf_protected_download", spy)
    outcomes = []
    for name, kind in (("invert", "image"), ("drag", "image"), ("sdedit", "editor")):
        index = raw.fn_index(None, name, cfg)
        value = {"path": "https://example.com/cat.png", "meta": {"_type": "gradio.FileData"}}
        data = raw.default_inputs(cfg, index)
        data[0] = value if kind == "image" else editor(value)
        if name == "invert":
            data[2] = 2  # steps: keep it short if it does run
        r = raw.submit(app_url, index, data, timeout=WAIT, headers=new_visitor())
        outcomes.append((name, r.success, clean(r.error)[:120]))
    assert not fetched, f"the server fetched {fetched}; outcomes {outcomes}"
    assert all(not ok for _, ok, _ in outcomes), outcomes


# ==================================================================================== hand-offs
def handoff_dependencies(cfg: dict) -> list[dict]:
    """Events that put an image into an input component without taking one: the "Send to ..." and "Use result
    as input" buttons (examples excluded: they take a dataset index)."""
    comps = raw.components(cfg)
    input_ids = {i for d in cfg["dependencies"] for i in d["inputs"]}
    out = []
    for dep in cfg["dependencies"]:
        kinds_in = [component_kind(comps[i]) for i in dep["inputs"]]
        types_in = [comps[i]["type"] for i in dep["inputs"]]
        if any(kinds_in) or "dataset" in types_in:
            continue
        if any(component_kind(comps[o]) and o in input_ids for o in dep["outputs"]):
            out.append(dep)
    return out


def test_handoffs_return_only_what_the_session_made(app_url, cfg, canaries):
    """Attack: use the "Send to ..."/"Use result as input" events as a file echo, or to take another session's
    result. In a fresh session each refuses with "There is no ... yet" (by fn_index and by name, also when
    every input holds a canary path); after session A generates, A's hand-offs return exactly A's picture and
    session B still gets nothing."""
    deps = handoff_dependencies(cfg)
    assert len(deps) >= 6, [d["api_name"] for d in deps]
    headers = new_visitor()
    comps = raw.components(cfg)
    for dep in deps:
        data = [{"path": canaries.tmp} if comps[i]["type"] == "textbox" else v
                for i, v in zip(dep["inputs"], raw.default_inputs(cfg, dep["id"]))]
        for r in (raw.submit(app_url, dep["id"], raw.default_inputs(cfg, dep["id"]), headers=headers, timeout=30),
                  raw.submit(app_url, dep["id"], data, headers=headers, timeout=30),
                  raw.call_by_name(app_url, dep["api_name"], data, headers=headers, timeout=30)):
            # refused by the hand-off itself (nothing made yet), or earlier for the path it was sent
            assert r.refused and clean(r.error).startswith(("There is no ", PLEASE_UPLOAD)), \
                (dep["api_name"], r.text[:300])
            assert MARKER not in r.text and not leaked_bytes(app_url, r, (canaries.tmp_bytes,))

    a, b = raw.new_hash(), raw.new_hash()
    made = raw.submit(app_url, raw.fn_index(None, "generate", cfg), gen_args(seed=4242), a, headers=headers,
                      timeout=WAIT)
    assert made.success, made.text[:300]
    status, body = raw.fetch_file(app_url, made.data[1]["url"])
    assert status == 200
    picture = pixels_of(body)
    sent = 0
    for dep in deps:
        mine = raw.submit(app_url, dep["id"], raw.default_inputs(cfg, dep["id"]), a, headers=headers, timeout=30)
        theirs = raw.submit(app_url, dep["id"], raw.default_inputs(cfg, dep["id"]), b, headers=headers, timeout=30)
        assert theirs.refused and clean(theirs.error).startswith("There is no "), (dep["api_name"], theirs.text[:200])
        if mine.success:
            value = mine.data[0]
            value = value.get("background", value)  # an editor receiver (Inpaint) gets the picture as background
            status, body = raw.fetch_file(app_url, value["url"])
            shown = pixels_of(body)
            if shown.shape != picture.shape:  # editors get it enlarged for the brush, by a whole factor (nearest)
                k = shown.shape[0] // picture.shape[0]
                shown = shown[::k, ::k]
            assert status == 200 and np.array_equal(shown, picture), dep["api_name"]
            sent += 1
        else:
            assert clean(mine.error).startswith("There is no "), (dep["api_name"], mine.text[:200])
    assert sent >= 3, "the generated picture was not handed on"


# ==================================================================================== sessions and jobs
class Watch:
    """Reads one event's stream in a thread: its messages as they arrive, and the final Result."""

    def __init__(self, url, session_hash, event_id, headers, timeout=WAIT):
        self.messages, self.result = [], None
        self.thread = threading.Thread(target=self._run, args=(url, session_hash, event_id, headers, timeout),
                                       daemon=True)
        self.thread.start()

    def _run(self, url, session_hash, event_id, headers, timeout):
        self.result = raw.results(url, session_hash, event_id, timeout, headers, on_message=self.messages.append)

    def statuses(self) -> list[str]:
        out = []
        for m in self.messages:
            data = (m.get("output") or {}).get("data") or []
            if len(data) >= 4 and isinstance(data[3], str):
                out.append(data[3])
        return out

    def sampling_step(self) -> int:
        steps = [int(s.split("step ")[1].split("/")[0]) for s in self.statuses() if s.startswith("sampling: step")]
        return max(steps, default=0)

    def wait(self, timeout=WAIT) -> raw.Result:
        self.thread.join(timeout)
        assert self.result is not None, "the event did not finish in time"
        return self.result

    def done(self) -> bool:
        return self.result is not None


def wait_for(cond, timeout=WAIT, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def start(url, index, data, headers, session_hash=None) -> tuple[str, Watch]:
    session_hash = session_hash or raw.new_hash()
    event_id = raw.join(url, index, data, session_hash, headers=headers)
    return session_hash, Watch(url, session_hash, event_id, headers)


def test_session_hash_flood_never_cancels_or_evicts_a_running_job(hosted):
    """Attack: mint 100 fresh session hashes (half from the victim's own address, half from 50 others) that
    each open a session with a cheap event and press Stop, while a victim's long generate runs. The victim
    completes with its picture, its session (and hand-off) survives, and the registry stays bounded. With the
    registry full of busy sessions, a new one is refused with a message and nobody's job is touched."""
    from app.sessions import MAX_SESSIONS, SESSIONS_PER_VISITOR, TOO_MANY_SESSIONS

    url, cfg, reg = hosted.url, hosted.cfg, hosted.registry
    gen, cheap, stop = (raw.fn_index(None, n, cfg) for n in ("generate", "set_preview_mode", "stop"))
    victim_headers = new_visitor()
    hv, victim = start(url, gen, gen_args(seed=77, steps=LONG_STEPS), victim_headers)
    wait_for(lambda: victim.sampling_step() >= 1, what="the victim to sample")
    session = next(s for s in reg.sessions() if s.busy)

    def flood(k):
        headers = victim_headers if k % 2 else visitor(5000 + k)
        h = raw.new_hash()
        r1 = raw.submit(url, cheap, [0], h, headers=headers, timeout=30)
        r2 = raw.predict_direct(url, stop, [], h, headers=headers)
        return r1, r2

    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(4) as pool:
        outcomes = list(pool.map(flood, range(100)))
    assert not victim.done(), "the victim ended during the flood: " + str(victim.statuses()[-3:])
    for r1, r2 in outcomes:
        assert r1.success or TOO_MANY_SESSIONS in clean(r1.error), r1.text[:200]
        assert r2.success and r2.data == ["Stopped."], r2.text[:200]
    assert len(reg) <= MAX_SESSIONS
    assert sum(s.visitor == f"ip:{victim_headers['X-Forwarded-For']}" for s in reg.sessions()) <= SESSIONS_PER_VISITOR
    assert session in reg.sessions() and session.busy and not session.token.cancelled

    # a registry full of busy sessions refuses newcomers rather than evicting or cancelling anyone
    saved = reg.max_sessions
    reg.max_sessions = len(reg)
    try:
        others = [s for s in reg.sessions() if s is not session]
        keep = []
        for s in others:  # only the victim's session is busy: make every other one look busy too
            keep.append(s.new_job())
        r = raw.submit(url, cheap, [0], raw.new_hash(), headers=new_visitor(), timeout=30)
        assert r.refused and clean(r.error) == TOO_MANY_SESSIONS, r.text[:300]
        assert session in reg.sessions() and not session.token.cancelled
        for token in keep:
            assert not token.cancelled
            token.finish()
    finally:
        reg.max_sessions = saved

    result = victim.wait()
    assert result.success, result.text[:300]
    assert result.data[3].splitlines()[0] == "Done · seed 77", result.data[3]  # the bar follows the line
    send = raw.fn_index(None, "send", cfg)  # the victim's session still hands its picture on
    handed = raw.submit(url, send, [PROMPT], hv, headers=victim_headers, timeout=30)
    assert handed.success, handed.text[:300]


def _stop_dependencies(cfg) -> list[dict]:
    """Every tab's Stop: input-less, queue-less events named after stop."""
    return [d for d in cfg["dependencies"]
            if not d["inputs"] and "stop" in (d.get("api_name") or "") and not d.get("queue")]


def test_stop_only_cancels_the_callers_own_job(hosted):
    """Attack: session B presses every Stop there is (each tab's, by fn_index, by name and queue-less) and
    posts /cancel with its own hash and A's fn_index, while A's long generate samples: A keeps sampling. A's
    own Stop then ends A's job within a few steps, with "Stopped." and no result, and A's next job runs."""
    url, cfg = hosted.url, hosted.cfg
    gen = raw.fn_index(None, "generate", cfg)
    stops = _stop_dependencies(cfg)
    assert len(stops) >= 8, [d["api_name"] for d in stops]
    a_headers, b_headers = new_visitor(), new_visitor()
    ha, job = start(url, gen, gen_args(seed=5, steps=LONG_STEPS), a_headers)
    wait_for(lambda: job.sampling_step() >= 2, what="A to sample")
    hb = raw.new_hash()
    for dep in stops:
        assert raw.submit(url, dep["id"], [], hb, headers=b_headers, timeout=30).success
        assert raw.call_by_name(url, dep["api_name"], [], headers=b_headers, timeout=30).success
        assert raw.predict_direct(url, dep["id"], [], hb, headers=b_headers).success
    raw.cancel(url, gen, hb, uuid.uuid4().hex, headers=b_headers)
    before = job.sampling_step()
    wait_for(lambda: job.sampling_step() >= before + 3, timeout=20, what="A to keep sampling")
    assert not job.done(), job.statuses()[-3:]

    step_at_stop = job.sampling_step()
    t0 = time.monotonic()
    assert raw.predict_direct(url, raw.fn_index(None, "stop", cfg), [], ha, headers=a_headers).data == ["Stopped."]
    result = job.wait(20)
    assert time.monotonic() - t0 < 10
    assert result.success and result.data[3].startswith("Stopped."), result.text[-300:]
    assert job.sampling_step() <= step_at_stop + 5, (step_at_stop, job.statuses()[-3:])
    assert not any(s.startswith("Done") for s in job.statuses())
    again = raw.submit(url, gen, gen_args(seed=6, steps=3), ha, headers=a_headers, timeout=WAIT)
    assert again.success and again.data[3].splitlines()[0] == "Done · seed 6", again.text[-300:]


def test_fourth_concurrent_job_from_one_visitor_gets_422(hosted):
    """Attack: one visitor queues more GPU jobs than allowed (fresh session hashes do not help): the first
    JOBS_PER_VISITOR joins are accepted, the next gets HTTP 422 with TOO_MANY_JOBS, another visitor is still
    served, and once the jobs are done the visitor can queue as many again."""
    from app.sessions import JOBS_PER_VISITOR, TOO_MANY_JOBS

    url, cfg = hosted.url, hosted.cfg
    gen = raw.fn_index(None, "generate", cfg)
    me, other = new_visitor(), new_visitor()
    jobs = [start(url, gen, gen_args(seed=10, steps=40), me)[1]]
    jobs += [start(url, gen, gen_args(seed=11 + k, steps=2), me)[1] for k in range(JOBS_PER_VISITOR - 1)]
    with pytest.raises(raw.Refused) as refused:
        raw.join(url, gen, gen_args(seed=20, steps=2), raw.new_hash(), headers=me)
    assert refused.value.status == 422 and TOO_MANY_JOBS in refused.value.detail, refused.value
    assert not jobs[0].done(), "the first job ended before the cap was tested"
    assert raw.submit(url, gen, gen_args(seed=21, steps=2), headers=other, timeout=WAIT).success
    assert all(j.wait().success for j in jobs)
    again = [start(url, gen, gen_args(seed=30 + k, steps=2), me)[1] for k in range(JOBS_PER_VISITOR)]
    assert all(j.wait().success for j in again)


def test_stop_while_queued_frees_the_visitors_slot(hosted):
    """Attack (on oneself, and what an impatient user does): press Stop on a job that is still queued. When
    everything has ended, the visitor must again be able to queue JOBS_PER_VISITOR jobs."""
    from app.sessions import JOBS_PER_VISITOR

    url, cfg = hosted.url, hosted.cfg
    gen = raw.fn_index(None, "generate", cfg)
    me = new_visitor()
    _, first = start(url, gen, gen_args(seed=40, steps=40), me)
    h2 = raw.new_hash()
    e2 = raw.join(url, gen, gen_args(seed=41, steps=2), h2, headers=me)
    time.sleep(0.2)
    assert raw.cancel(url, gen, h2, e2, headers=me) == 200
    raw.results(url, h2, e2, 20, me)
    assert first.wait().success
    accepted = []
    for k in range(JOBS_PER_VISITOR):
        try:
            accepted.append(start(url, gen, gen_args(seed=50 + k, steps=2), me)[1])
        except raw.Refused as exc:
            for j in accepted:
                j.wait()
            pytest.fail(f"join {k + 1} of {JOBS_PER_VISITOR} refused: {exc}")
    assert all(j.wait().success for j in accepted)


# ==================================================================================== hosted mode
def queue_only(r) -> bool:
    """The queue-less route's refusal of a queued event (queue(api_open=False))."""
    return r.status == 404 and "join the queue" in (r.error or "")


def test_queued_events_refuse_the_queue_less_route(app_url, cfg):
    """Attack: call a GPU event through POST /gradio_api/run/predict, which skips the queue, its one-job-at-a-
    time slot and the per-visitor admission: refused (404) without running, on every queued dependency."""
    queued = [d for d in cfg["dependencies"] if d.get("queue") is not False and d.get("api_name")]
    assert len(queued) > 20, len(queued)
    for dep in queued:
        r = raw.predict_direct(app_url, dep["id"], raw.default_inputs(cfg, dep["id"]), headers=new_visitor())
        assert queue_only(r), (dep["api_name"], r.status, r.text[:200])


def generate_pixels(url, cfg, session_hash, headers, **kw) -> tuple[np.ndarray, dict]:
    r = raw.submit(url, raw.fn_index(None, "generate", cfg), gen_args(**kw), session_hash, headers=headers,
                   timeout=WAIT)
    assert r.success, r.text[-300:]
    status, body = raw.fetch_file(url, r.data[1]["url"])
    assert status == 200
    with Image.open(io.BytesIO(body)) as im:
        meta = json.loads(im.info["studio"])
    return pixels_of(body), meta


@pytest.mark.parametrize("source", [
    "runwayml/stable-diffusion-v1-5", "owner/missing-model", "/etc", "..", "../tiny-random", "tiny-random/..",
    "./tiny-random", "tiny-random/", "TINY-RANDOM", "~/.cache", "embedded", "", "tiny_model_folder",
    "tiny_model_folder/..", "second_model_parent"])
def test_hosted_mode_refuses_models_off_the_allow_list(hosted, source):
    """Attack: load another model in hosted mode (Hub ids, local folders, '..', folder-shaped ids, the tiny
    model's own folder, the allowed folder's parent) by fn_index, by name and queue-less: refused with the
    allow-list message (or Gradio's choices check), and no model, pool or session changes."""
    from pipelines.core.tiny_model import ensure_tiny_model

    url, cfg, studio = hosted.url, hosted.cfg, hosted.studio
    source = {"tiny_model_folder": str(ensure_tiny_model()), "tiny_model_folder/..": str(ensure_tiny_model()) + "/..",
              "second_model_parent": str(Path(hosted.other).parent)}.get(source, source)
    index = raw.fn_index(None, "load_model", cfg)
    model, pool = studio.model, dict(studio.pool)
    headers, h = new_visitor(), raw.new_hash()
    for r in (raw.submit(url, index, [source], h, headers=headers, timeout=30),
              raw.call_by_name(url, "load_model", [source], headers=headers, timeout=30),
              raw.predict_direct(url, index, [source], h, headers=headers)):
        assert r.refused, (source, r.text[:300])
        if queue_only(r):
            continue
        text = clean(r.error)
        assert "This studio offers only these models" in text or "is not in the list of choices" in text, text
        assert_clean_error(text, f"load_model {source!r}", sent=(source, *hosted.hosting.models))
    assert studio.model is model and studio.pool == pool
    session = hosted.registry.peek(SimpleNamespace(session_hash=h))
    assert session is None or session.model_id is None


@pytest.mark.parametrize("source", ["lora_file", "lora_file_dotdot", "../x.safetensors", "owner/repo",
                                   "owner/repo:pytorch_lora_weights.safetensors", "smooth", "/etc/passwd",
                                   "styl/..", ""])
def test_hosted_mode_refuses_loras_off_the_allow_list(hosted, source):
    """Attack: load a LoRA in hosted mode by path (even the allowed LoRA's own file), Hub id, '..', or an
    unlisted name: refused with the allow-list message (or Gradio's choices check); no model's adapters
    change."""
    url, cfg, studio = hosted.url, hosted.cfg, hosted.studio
    source = {"lora_file": hosted.lora, "lora_file_dotdot": str(Path(hosted.lora).parent / ".." /
                                                                Path(hosted.lora).parent.name / "styl.safetensors")
              }.get(source, source)
    before = {k: dict(m.loras) for k, m in studio.pool.items()}
    index = raw.fn_index(None, "load_lora", cfg)
    headers, h = new_visitor(), raw.new_hash()
    for r in (raw.submit(url, index, [source], h, headers=headers, timeout=30),
              raw.call_by_name(url, "load_lora", [source], headers=headers, timeout=30),
              raw.predict_direct(url, index, [source], h, headers=headers)):
        assert r.refused, (source, r.text[:300])
        if queue_only(r):
            continue
        text = clean(r.error)
        assert "This studio offers only these LoRAs" in text or "is not in the list of choices" in text, text
        assert_clean_error(text, f"load_lora {source!r}", sent=(source, *hosted.hosting.models))
    assert {k: dict(m.loras) for k, m in studio.pool.items()} == before


def test_hosted_mode_refuses_unload_lora(hosted):
    """Attack: unload the host's LoRA in hosted mode (the allowed name, by fn_index, by name, queue-less):
    refused; the adapter stays on every model and still changes the picture when applied."""
    url, cfg, studio = hosted.url, hosted.cfg, hosted.studio
    index = raw.fn_index(None, "unload_lora", cfg)
    headers, h = new_visitor(), raw.new_hash()
    for r in (raw.submit(url, index, ["styl"], h, headers=headers, timeout=30),
              raw.call_by_name(url, "unload_lora", ["styl"], headers=headers, timeout=30),
              raw.predict_direct(url, index, ["styl"], h, headers=headers)):
        assert r.refused and (queue_only(r) or "cannot be unloaded" in clean(r.error)), r.text[:300]
    assert all("styl" in m.loras for m in studio.pool.values())
    plain, _ = generate_pixels(url, cfg, h, headers, seed=8)
    styled, meta = generate_pixels(url, cfg, h, headers, seed=8, use_lora=True, adapter="styl")
    assert meta["lora"] == "styl" and not np.array_equal(plain, styled)


def test_hosted_model_and_lora_choice_change_only_the_callers_session(hosted):
    """Attack: change what other visitors get by loading the other allow-listed model and applying the LoRA.
    Session B then runs on the second model (other pixels, its id in the PNG), while session A's and a fresh
    session C's outputs stay pixel-identical to A's first one, before and after B's LoRA job."""
    url, cfg, studio = hosted.url, hosted.cfg, hosted.studio
    ha, hb, hc = raw.new_hash(), raw.new_hash(), raw.new_hash()
    va, vb = new_visitor(), new_visitor()
    base, meta = generate_pixels(url, cfg, ha, va, seed=31)
    assert meta["model"] == "tiny-random"
    r = raw.submit(url, raw.fn_index(None, "load_model", cfg), [hosted.other], hb, headers=vb, timeout=WAIT)
    assert r.success and "in this session" in r.data[1], r.text[:300]
    assert studio.model.id == "tiny-random"
    other, other_meta = generate_pixels(url, cfg, hb, vb, seed=31)
    assert other_meta["model"] != "tiny-random" and not np.array_equal(other, base)
    assert np.array_equal(generate_pixels(url, cfg, ha, va, seed=31)[0], base)
    assert np.array_equal(generate_pixels(url, cfg, hc, va, seed=31)[0], base)
    styled, styled_meta = generate_pixels(url, cfg, hb, vb, seed=31, use_lora=True, adapter="styl")
    assert styled_meta["lora"] == "styl" and not np.array_equal(styled, other)
    assert np.array_equal(generate_pixels(url, cfg, ha, va, seed=31)[0], base)
    assert np.array_equal(generate_pixels(url, cfg, hb, vb, seed=31)[0], other)  # the LoRA was per request


# ==================================================================================== errors and config
def test_errors_show_studio_messages_or_an_incident_id(app_url, cfg, tmp_path):
    """Attack: provoke failures (bad values, missing or fake images, an example index that does not exist, an
    unexpected internal failure) and read the errors: each is the studio's own message, an incident id, or
    nothing (Gradio's generic error) - never a traceback, exception class name or server path."""
    fake = tmp_path / "fake.png"
    fake.write_text("not a picture")
    fake_upload = raw.file_data(raw.upload(app_url, fake))
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    empty_upload = raw.file_data(raw.upload(app_url, empty))
    ix = lambda name: raw.fn_index(None, name, cfg)  # noqa: E731
    inv = raw.default_inputs(cfg, ix("invert"))
    frame = [PROMPT, "", "", 0, 1, 3, 7.5, 60, 64, False, 1.0, 0.5, None]
    cases = [
        ("generate", gen_args(prompt=""), "Please enter a prompt"),
        ("generate", gen_args(seed=2**80), "Seed must be between"),
        ("generate", gen_args(use_lora=True), "The Smooth LoRA is not loaded"),
        ("generate", gen_args(adapter="nope", use_lora=True), "is not loaded"),
        ("interpolate_frame", frame, "multiple of 8"),
        ("invert", [fake_upload] + inv[1:], "not an image I can read"),
        ("invert", [empty_upload] + inv[1:], None),
        ("invert", [None] + inv[1:], PLEASE_UPLOAD),
        ("load_example", [None], "incident"),
        ("load_example", [999], "incident-or-none"),
        ("load_example_3", [-10**9], "incident-or-none"),
        ("load_model", ["owner/missing-model"], "Could not load model"),
    ]
    headers = new_visitor()
    for name, data, expected in cases:
        for r in (raw.submit(app_url, ix(name), data, headers=headers, timeout=WAIT),
                  raw.call_by_name(app_url, name, data, headers=headers, timeout=WAIT)):
            where = f"{name} {json.dumps(data, default=str)[:80]}"
            assert r.refused, (where, r.text[:300])
            text = clean(r.error)
            if expected == "incident":
                assert INCIDENT.match(text), (where, text)
            elif expected == "incident-or-none":
                assert r.error is None or INCIDENT.match(text), (where, text)
            elif expected is not None:
                assert expected in text, (where, text)
            assert_clean_error(text, where)


def test_join_refusals_of_gpu_events_hide_internals(app_url, cfg):
    """Attack: send GPU events values of the wrong type or too few values, and read the join's refusal: it
    must not show exception class names, handler names or object reprs."""
    gen = raw.fn_index(None, "generate", cfg)
    bad = []
    for data in (gen_args()[:3] + ["abc"] + gen_args()[4:], gen_args()[:2] + ["abc"] + gen_args()[3:], ["a"],
                 gen_args()[:5] + [[1]] + gen_args()[6:]):
        r = raw.submit(app_url, gen, data, headers=new_visitor(), timeout=30)
        assert r.refused
        try:
            assert_clean_error(r.error, json.dumps(data)[:60])
        except AssertionError as exc:
            bad.append(str(exc)[:300])
    assert not bad, "\n".join(bad)


def test_monitoring_is_off_and_show_error_is_false(app_url, hosted):
    """Attack: read the monitoring dashboard (every function name, private ones too, with counts) and check
    the config: /monitoring and /monitoring/summary are refused (403/404) on both servers, and /config says
    show_error false."""
    for url in (app_url, hosted.url):
        base = url.rstrip("/")
        with raw.http(url) as c:
            for path in ("/monitoring", "/monitoring/summary", "/gradio_api/monitoring",
                         "/gradio_api/monitoring/summary"):
                r = c.get(base + path)
                assert r.status_code in (403, 404), (path, r.status_code, r.text[:200])
        assert raw.config(url)["show_error"] is False


def test_oversize_upload_gets_413_and_oversize_data_urls_are_refused_fast(app_url, cfg):
    """Attack: upload more than max_file_size (40 MB): HTTP 413 while it streams in. And send a 41 MB data:
    URL in the JSON body instead (which /upload's cap does not see) to an image and an editor input: refused
    within seconds, without decoding it."""
    from pipelines.core.limits import get_limits

    limit = get_limits().max_upload_bytes
    with raw.http(app_url, 60) as c:
        r = c.post("/gradio_api/upload", files=[("files", ("big.png", b"\0" * (limit + 1), "image/png"))])
    assert r.status_code == 413, (r.status_code, r.text[:200])
    assert str(limit) in r.text or "exceeded" in r.text.lower()
    big = "data:image/png;base64," + base64.b64encode(b"\0" * (41 * 2**20)).decode()
    for name, kind in (("invert", "image"), ("drag", "image"), ("sdedit", "editor")):
        index = raw.fn_index(None, name, cfg)
        data = raw.default_inputs(cfg, index)
        data[0] = {"url": big} if kind == "image" else editor({"url": big})
        t0 = time.monotonic()
        r = raw.submit(app_url, index, data, headers=new_visitor(), timeout=30)
        assert r.refused and time.monotonic() - t0 < 6, (name, time.monotonic() - t0, clean(r.error)[:200])
        # a request-body cap (413) or, for an image input, the studio's "Please upload ... as a file"
        if r.status != 413 and kind == "image":
            assert clean(r.error).startswith(PLEASE_UPLOAD), (name, r.status, clean(r.error)[:200])


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _image_targets(cfg):
    """(name, slot builder) for image inputs (SafeImage, by both preprocessing routes) and every editor
    position."""
    return [("invert", lambda v: v), ("instruct", lambda v: v), ("drag", lambda v: v), ("on_upload", lambda v: v),
            ("sdedit", lambda v: editor(v)), ("sdedit", lambda v: editor(None, [v])),
            ("sdedit", lambda v: editor(None, [], v)), ("diffedit", lambda v: editor(v)),
            ("diffedit_mask", lambda v: editor(None, [v]))]


def test_huge_header_png_is_refused_fast_without_decoding(app_url, cfg, tmp_path):
    """Attack: a 12000x12000 PNG that is a few KB on the wire (a decompression bomb for anything that decodes
    it) as a gr.Image input and as an editor background, layer and composite: each is refused in under 3 s
    with the studio's "too large" message, and the server process's memory does not jump by a decode."""
    bomb = tmp_path / "bomb.png"
    Image.new("1", (12000, 12000)).save(bomb, optimize=True)
    assert bomb.stat().st_size < 200_000
    upload = raw.file_data(raw.upload(app_url, bomb))
    peak, stop = [_rss_bytes()], threading.Event()
    before = peak[0]

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        for name, make in _image_targets(cfg):
            index = raw.fn_index(None, name, cfg)
            data = raw.default_inputs(cfg, index)
            data[0] = make(upload)
            t0 = time.monotonic()
            r = raw.submit(app_url, index, data, headers=new_visitor(), timeout=30)
            took = time.monotonic() - t0
            assert r.refused and took < 3, (name, took, r.text[:200])
            assert "too large" in clean(r.error) and "12000x12000" in clean(r.error), (name, clean(r.error))
            assert_clean_error(r.error, name)
    finally:
        stop.set()
        sampler.join(5)
    assert peak[0] - before < 300 * 2**20, f"memory rose by {(peak[0] - before) / 2**20:.0f} MB"


@pytest.mark.parametrize("size", [(1, 4096), (4096, 1)])
def test_narrow_images_get_a_clean_message(app_url, cfg, tmp_path, size):
    """Attack: a 1-pixel sliver (1x4096, 4096x1), which resizers blow up or squeeze to nothing, as every kind
    of image input: a clean "too narrow" message."""
    path = tmp_path / "sliver.png"
    Image.new("RGB", size, (0, 0, 0)).save(path)
    upload = raw.file_data(raw.upload(app_url, path))
    for name, make in _image_targets(cfg):
        index = raw.fn_index(None, name, cfg)
        data = raw.default_inputs(cfg, index)
        data[0] = make(upload)
        r = raw.submit(app_url, index, data, headers=new_visitor(), timeout=30)
        assert r.refused and "too narrow" in clean(r.error), (name, r.text[:300])
        assert_clean_error(r.error, name)


@pytest.mark.parametrize("points", [5, "abc", [[1]], [["a", "b"]], {"x": 1}, [1, 2], [[1, 2, 3]],
                                    [[True, False]], [[None, None]]])
def test_malformed_drag_points_get_a_clear_message(app_url, cfg, ok_image, points):
    """Attack: malformed points JSON (a number, text, short pairs, strings, an object, flat numbers, triples,
    booleans, nulls) on /drag and on the private click/undo/clear events: "Drag points must be a list of
    [x, y] pairs ..." each time, by fn_index and by name."""
    headers = new_visitor()
    drag = raw.fn_index(None, "drag", cfg)
    data = raw.default_inputs(cfg, drag)
    data[0], data[1], data[4], data[7] = ok_image, points, 0, 1  # no LoRA, one iteration
    results = [raw.submit(app_url, drag, data, headers=headers, timeout=WAIT),
               raw.call_by_name(app_url, "drag", data, headers=headers, timeout=WAIT)]
    for name in ("on_click", "undo_point", "clear_points"):
        results.append(raw.submit(app_url, raw.fn_index(None, name, cfg), [ok_image, points], headers=headers,
                                  timeout=30, event_data={"index": [3, 3], "value": None}))
    for r in results:
        assert r.refused and clean(r.error).startswith("Drag points must be a list of [x, y] pairs"), r.text[:300]
        assert_clean_error(r.error, f"points {points!r}")
