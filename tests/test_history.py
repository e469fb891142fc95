"""The session's history of results (app/history.py): newest first, bounded by count and bytes, large results kept
in the browser as thumbnails, a round trip through the browser's copy, and hostile browser data refused."""
from __future__ import annotations

import base64
import io
import json
import types

import numpy as np
import pytest
from PIL import Image

from app import history as hist
from app.context import Receiver
from app.history import History, clean_params, event_images, record_result, result_images
from app.sending import receiver_values
from app.sessions import SessionRegistry
from pipelines.core.events import Progress
from pipelines.core.metadata import read_metadata, with_metadata
from pipelines.core.results import ImageResult
from pipelines.interpolation import SequenceResult
from pipelines.sdedit import SDEditResult


def picture(seed: int, side: int = 64, noisy: bool = False) -> Image.Image:
    rng = np.random.default_rng(seed)
    if noisy:
        arr = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
    else:  # a few flat blocks: compresses like the embedded model's images
        arr = np.kron(rng.integers(0, 256, (4, 4, 3)), np.ones((side // 4, side // 4, 1))).astype(np.uint8)
    return Image.fromarray(arr)


def params(seed: int, task: str = "generate") -> dict:
    return {"task": task, "prompt": f"a red circle {seed}", "seed": seed, "steps": 30, "guidance": 7.5}


def result(seed: int, side: int = 64, noisy: bool = False, task: str = "generate") -> ImageResult:
    p = params(seed, task)
    return ImageResult(with_metadata(picture(seed, side, noisy), p), seed, p)


@pytest.fixture
def history(tmp_path):
    return History(lambda: tmp_path)


def seeds(h: History) -> list:
    return [i.params["seed"] for i in h.items]


def png_b64(image: Image.Image, fmt: str = "PNG", info: dict | None = None) -> str:
    buf = io.BytesIO()
    if info:
        from PIL.PngImagePlugin import PngInfo
        meta = PngInfo()
        for k, v in info.items():
            meta.add_text(k, v)
        image.save(buf, format=fmt, pnginfo=meta)
    else:
        image.save(buf, format=fmt)
    return base64.b64encode(buf.getvalue()).decode()


# ------------------------------------------------------------------ adding and bounds
def test_newest_first_with_parameters_and_pixels(history):
    for s in (1, 2, 3):
        history.record(result_images(result(s)))
    assert seeds(history) == [3, 2, 1]
    first = history.items[0]
    assert first.task == "generate" and first.tab == "generate" and first.full and first.stored_full
    assert "seed 3" in first.caption and "a red circle 3" in first.caption
    with Image.open(first.path) as png:  # the item's PNG: the result's pixels and its parameters
        assert np.array_equal(np.asarray(png.convert("RGB")), np.asarray(picture(3)))
        assert read_metadata(png)["seed"] == 3
    gallery = history.gallery()
    assert [c for _, c in gallery] == [i.caption for i in history.items]
    assert gallery[0][0] == str(first.path)


def test_bounded_by_count_oldest_dropped_with_its_file(tmp_path):
    h = History(lambda: tmp_path, max_items=3)
    for s in range(5):
        h.record(result_images(result(s)))
    assert seeds(h) == [4, 3, 2]
    assert sorted(p.name for p in tmp_path.glob("history_*.png")) == sorted(i.path.name for i in h.items)


def test_bounded_by_bytes(tmp_path):
    one = len(History(lambda: tmp_path).add(picture(0), params(0)).stored)
    h = History(lambda: tmp_path, max_bytes=int(2.5 * one))
    for s in range(6):
        h.record(result_images(result(s)))
    assert seeds(h) == [5, 4]
    assert sum(len(i.stored) for i in h.items) <= h.max_bytes


def test_large_result_kept_whole_here_and_as_thumbnail_in_the_browser(history):
    item = history.record(result_images(result(7, side=512, noisy=True)))[0]
    assert item.full and not item.stored_full
    with Image.open(item.path) as png:
        assert png.size == (512, 512)
    thumb = Image.open(io.BytesIO(item.stored))
    assert max(thumb.size) == hist.THUMB_SIDE and len(item.stored) <= hist.ITEM_BYTES
    assert read_metadata(item.stored)["seed"] == 7  # the thumbnail carries the parameters too
    assert history.to_browser()[0]["full"] is False


def test_a_full_history_fits_in_a_page_load_request(history):
    """The browser sends its whole copy back when the page loads: filled to its byte bound, it stays under the
    hosting's request limit."""
    from app.hosting import BODY_LIMIT

    for s in range(60):
        history.record(result_images(result(s, side=96, noisy=True)))  # ~28 KB each: the byte bound drops some
    assert len(history.items) < 60 and all(i.stored_full for i in history.items)
    payload = json.dumps({"data": [history.to_browser()], "fn_index": 999, "session_hash": "x" * 32})
    assert len(payload) < BODY_LIMIT - 64 * 1024


# ------------------------------------------------------------------ which images a result holds
def test_result_images_of_each_kind():
    one = result(1)
    assert [p["seed"] for _, p in result_images(one)] == [1]
    inverted = types.SimpleNamespace(reconstruction=result(2, task="invert"), source=picture(0))
    assert [p["task"] for _, p in result_images(inverted)] == ["invert"]
    frames = [with_metadata(picture(s), {"task": "interpolate", "seed_a": 0, "seed_b": 1, "interpolation_eta": s / 4})
              for s in range(5)]
    seq = SequenceResult(frames, [s / 4 for s in range(5)], [0.1] * 4, 0.0)
    ends = result_images(seq)
    assert [p["interpolation_eta"] for _, p in ends] == [0.0, 1.0]
    assert np.array_equal(np.asarray(ends[1][0]), np.asarray(frames[-1]))
    sd = SDEditResult([result(s, task="sdedit") for s in (5, 6, 7)], picture(0), None, {})
    assert [p["seed"] for _, p in result_images(sd)] == [5, 6, 7]
    mask_only = types.SimpleNamespace(mask=np.zeros((8, 8), bool), heat=None, params={})
    assert result_images(mask_only) == [] and result_images(None) == []


def final(result, partial=None) -> Progress:
    return Progress("done", 1, 1, partial=partial, result=result)


def test_a_batch_records_every_image():
    batch = [result(s) for s in (4, 5, 6)]
    assert [p["seed"] for _, p in event_images(final(batch[-1], batch))] == [4, 5, 6]
    assert [p["seed"] for _, p in event_images(final(batch[-1]))] == [6]


def test_record_result_keeps_a_single_image_for_send_to(tmp_path):
    registry = SessionRegistry()
    session = registry.get(types.SimpleNamespace(session_hash="a"))
    record_result(session, final(result(3, task="drag")))
    kept = session.handoff_png("drag")
    with Image.open(kept) as png:
        assert np.array_equal(np.asarray(png.convert("RGB")), np.asarray(picture(3)))
        assert read_metadata(png)["task"] == "drag"
    record_result(session, final(SDEditResult([result(s, task="sdedit") for s in (1, 2)], picture(0), None, {})))
    assert session.handoff_png("sdedit") is None  # several candidates: the one the user picks is kept by the tab
    assert [i.params["seed"] for i in session.history.items] == [1, 2, 3]
    record_result(session, final(object()))  # nothing to record: nothing happens, nothing raises
    assert len(session.history.items) == 3


def test_sessions_never_share_a_history():
    registry = SessionRegistry()
    mine = registry.get(types.SimpleNamespace(session_hash="mine"))
    other = registry.get(types.SimpleNamespace(session_hash="other"))
    record_result(mine, final(result(1)))
    assert len(mine.history.items) == 1 and other.history.items == [] and other.history.gallery() == []
    path = mine.history.items[0].path
    assert path.parent == mine.out_dir and path.exists()
    registry.drop(types.SimpleNamespace(session_hash="mine"))
    assert mine.history.items == [] and not path.exists()


# ------------------------------------------------------------------ the browser's copy
def test_round_trip_through_the_browser(tmp_path, history):
    for s in (1, 2):
        history.record(result_images(result(s)))
    history.record(result_images(result(3, side=512, noisy=True)))
    stored = json.loads(json.dumps(history.to_browser()))  # what localStorage holds is JSON
    assert all(set(d) == {"png", "full", "time"} for d in stored)
    assert not any(str(tmp_path) in json.dumps(d) for d in stored)  # no server path goes to the browser
    fresh = History(lambda: tmp_path / "new")
    (tmp_path / "new").mkdir()
    assert fresh.load_browser(stored) == 3 and fresh.restored
    assert seeds(fresh) == [3, 2, 1]
    assert [i.full for i in fresh.items] == [False, True, True]
    with Image.open(fresh.items[1].path) as png:
        assert np.array_equal(np.asarray(png.convert("RGB")), np.asarray(picture(2)))
    assert [c for _, c in fresh.gallery()] == [c for _, c in history.gallery()]
    assert fresh.items[0].path.parent == tmp_path / "new"


def test_browser_items_go_after_this_sessions_own(tmp_path, history):
    history.record(result_images(result(1)))
    stored = history.to_browser()
    h = History(lambda: tmp_path, max_items=2)
    h.record(result_images(result(9)))
    h.load_browser(stored + stored + stored)
    assert seeds(h) == [9, 1]


def test_hostile_browser_items_are_skipped(tmp_path, history):
    history.record(result_images(result(4)))
    good = history.to_browser()
    flat = Image.new("RGB", (hist.MAX_SIDE + 8,) * 2, (10, 20, 30))   # a small file of a too large image
    huge_b64 = "A" * (hist._B64_ITEM + 4)
    hostile = [
        None, 3, "x", [], {"png": 5}, {"png": "not base64!!"}, {"png": ""}, {"png": huge_b64},
        {"png": base64.b64encode(b"GIF89a not really").decode()},
        {"png": png_b64(picture(1), "JPEG")},                              # not a PNG
        {"png": png_b64(flat)},                                            # over MAX_SIDE
        {"png": png_b64(picture(1))[:200]},                                # truncated
        {"png": base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\0" * 64).decode()},
        {"png": "/etc/passwd"}, {"path": "/etc/passwd"},
    ]
    fresh = History(lambda: tmp_path)
    assert fresh.load_browser(hostile + good) == 1
    assert seeds(fresh) == [4]
    for value in (None, "text", {"png": good[0]["png"]}, 12):
        assert History(lambda: tmp_path).load_browser(value) == 0


def test_only_the_first_items_of_a_long_list_are_read(tmp_path, history):
    history.record(result_images(result(1)))
    stored = history.to_browser()
    h = History(lambda: tmp_path, max_items=4)
    assert h.load_browser([{"png": "bad"}] * 4 + stored) == 0  # the rest of a long list is not even looked at


def test_a_load_decodes_a_bounded_number_of_pixels(tmp_path, history, monkeypatch):
    for s in (1, 2, 3):
        history.record(result_images(result(s)))
    monkeypatch.setattr(hist, "LOAD_PIXELS", 2 * 64 * 64 + 1)
    fresh = History(lambda: tmp_path)
    assert fresh.load_browser(history.to_browser()) == 2
    assert seeds(fresh) == [3, 2]


def test_browser_parameters_are_plain_and_bounded(history):
    evil = {"task": "generate", "seed": 5, "prompt": "p" * 5000, "nested": {"a": 1}, "nan": float("nan"),
            "deep": [[[1]]], "handles": [[1.0, 2.0]], "x" * 100: 1, **{f"k{i}": i for i in range(200)}}
    data = png_b64(picture(1), info={"studio": json.dumps(evil)})
    assert history.load_browser([{"png": data, "time": "yesterday"}]) == 1
    item = history.items[0]
    p = item.params
    assert p["task"] == "generate" and p["seed"] == 5 and p["handles"] == [[1.0, 2.0]]
    for gone in ("prompt", "nested", "nan", "deep", "x" * 100):
        assert gone not in p
    assert len(p) <= hist.MAX_PARAMS and item.created == 0.0
    assert clean_params("nope") == {} and clean_params({1: 2, "ok": True}) == {"ok": True}


# ------------------------------------------------------------------ what a send puts into a tab
def test_receiver_values(history):
    item = history.record(result_images(result(2)))[0]
    path_value, prompt = receiver_values(Receiver("drag", None, prompt=object()), str(item.path), item.params)
    assert path_value == str(item.path) and prompt == "a red circle 2"
    (editor,) = receiver_values(Receiver("sdedit", None, kind="editor"), str(item.path), item.params)
    shown = editor["background"]
    k = shown.shape[0] // 64
    assert k > 1 and np.array_equal(shown[::k, ::k], np.asarray(picture(2)))
    assert not editor["layers"][0][..., 3].any()  # nothing painted
