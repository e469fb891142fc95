"""The session's history of results across tabs: every finished job's images with their parameters, newest
first, bounded by count and by the bytes the browser keeps.

Each item is a PNG in the session's own folder (its parameters embedded, as every studio output). The browser keeps
the history in its localStorage (gr.BrowserState, ~5 MB for the whole site): a list of small dicts holding the
item's PNG as base64, the full image when it is small (the embedded model's 64 px results are ~10 KB) and a
thumbnail otherwise. What comes back from the browser is hostile: the list and each item are capped, every PNG
goes through the studio's image checks (pipelines/core/image_io.py) before it is decoded, parameters are plain
bounded values, and malformed items are skipped. No path ever travels to or from the browser.
"""
from __future__ import annotations

import base64
import binascii
import json
import logging
import math
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from pipelines.core.errors import InputError
from pipelines.core.image_io import check_image_header, load_rgb
from pipelines.core.metadata import read_metadata, save_png, with_metadata
from pipelines.core.results import ImageResult

log = logging.getLogger(__name__)

MAX_ITEMS = 48                 # items kept, oldest dropped
# PNG bytes the browser keeps, all items together: as base64 in JSON they are sent back on every page load, under
# the hosting's 2 MB request limit (app/hosting.py BODY_LIMIT); localStorage holds them base64'd twice (x1.8)
MAX_BYTES = 1_000_000
ITEM_BYTES = 96 * 1024         # an item's PNG kept whole up to this size; a larger result keeps a thumbnail
THUMB_SIDE = 128               # long side of a thumbnail
MAX_SIDE = 1024                # longest side of an image accepted back from the browser (the largest result)
LOAD_PIXELS = 8_000_000        # pixels decoded from the browser's copy in one load, all items together
MAX_PARAMS = 80                # parameters per item (a drag result has ~40)
MAX_TEXT = 2000                # characters of one parameter value (as JSON)
CAPTION_PROMPT = 48            # characters of the prompt shown in a caption
_B64_ITEM = 4 * math.ceil(ITEM_BYTES / 3) + 4

# which tab a result's parameters belong to ("task" in its metadata)
TASK_TABS = {"generate": "generate", "interpolate": "interpolate", "interpolate_images": "interpolate-images",
             "invert": "invert", "edit": "edit", "instruct": "instruct", "diffedit": "diffedit",
             "sdedit": "sdedit", "drag": "drag", "inpaint": "inpaint"}


def _clean_value(value, depth: int = 0):
    """A parameter value as plain JSON scalars or short lists of them; None when it is anything else."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (list, tuple)) and depth < 2 and len(value) <= 64:
        items = [_clean_value(v, depth + 1) for v in value]
        return None if any(v is None for v in items) else items
    return None


def clean_params(params) -> dict:
    """At most MAX_PARAMS parameters with short string keys and plain, bounded values (anything else dropped)."""
    out = {}
    if not isinstance(params, dict):
        return out
    for key, value in params.items():
        if len(out) >= MAX_PARAMS:
            break
        if not isinstance(key, str) or not key or len(key) > 64:
            continue
        value = _clean_value(value)
        if value is None or len(json.dumps(value)) > MAX_TEXT:
            continue
        out[key] = value
    return out


def caption(params: dict) -> str:
    """What the gallery says under an item: the method, its seed(s) and the start of its prompt."""
    parts = [str(params.get("task") or "result")]
    if "seed_a" in params:
        parts.append(f"seeds {params.get('seed_a')} → {params.get('seed_b')}")
    elif isinstance(params.get("seed"), int) and params["seed"] >= 0:
        parts.append(f"seed {params['seed']}")
    prompt = str(params.get("prompt") or params.get("instruction") or "").strip()
    if prompt:
        parts.append(prompt if len(prompt) <= CAPTION_PROMPT else prompt[:CAPTION_PROMPT - 1] + "…")
    return " · ".join(parts)


def result_images(result) -> list[tuple[Image.Image, dict]]:
    """The images a job's result holds, with their parameters: a generated, reconstructed, edited or dragged
    image, every SDEdit candidate, and a sequence's first and last frames (of the LoRA comparison: the sequence
    with the LoRA). Other results (a DiffEdit mask, a model load) hold none."""
    if result is None:
        return []
    if isinstance(result, ImageResult):
        return [(result.image, result.params)]
    for name in ("reconstruction", "edited", "image"):
        value = getattr(result, name, None)
        if isinstance(value, ImageResult):
            return [(value.image, value.params)]
    images = getattr(result, "images", None)
    if isinstance(images, list) and all(isinstance(im, ImageResult) for im in images):
        return [(im.image, im.params) for im in images]
    sequence = getattr(result, "with_lora", result)
    frames = getattr(sequence, "frames", None)
    if isinstance(frames, list) and frames and all(isinstance(f, Image.Image) for f in frames):
        ends = [frames[0]] if len(frames) == 1 else [frames[0], frames[-1]]
        return [(f, read_metadata(f)) for f in ends]
    return []


def event_images(ev) -> list[tuple[Image.Image, dict]]:
    """The images of a job's final event: a batch's every image (its partial results), else its result's."""
    partial = getattr(ev, "partial", None)
    if isinstance(partial, list) and partial and all(isinstance(r, ImageResult) for r in partial):
        return [(r.image, r.params) for r in partial]
    return result_images(getattr(ev, "result", None))


@dataclass
class HistoryItem:
    id: str
    params: dict
    path: Path            # the item's PNG in the session's folder: the full image, or its thumbnail (full False)
    stored: bytes         # the PNG the browser keeps: the full image when it is within ITEM_BYTES
    full: bool            # whether `path` is the full-size image
    stored_full: bool     # whether `stored` is
    created: float

    @property
    def task(self) -> str:
        return str(self.params.get("task") or "")

    @property
    def tab(self) -> str | None:
        return TASK_TABS.get(self.task)

    @property
    def caption(self) -> str:
        return caption(self.params)


def _thumbnail(image: Image.Image) -> Image.Image:
    thumb = image.copy()
    thumb.thumbnail((THUMB_SIDE, THUMB_SIDE), Image.Resampling.LANCZOS)
    thumb.info = dict(image.info)  # the parameters stay with it
    return thumb


class History:
    """One session's history. `folder()` is the session's own folder, created on first use."""

    def __init__(self, folder: Callable[[], Path], max_items: int = MAX_ITEMS, max_bytes: int = MAX_BYTES):
        self._folder = folder
        self.max_items, self.max_bytes = max_items, max_bytes
        self.items: list[HistoryItem] = []     # newest first
        self.version = 0                       # changes with every add, load and clear
        self.restored = False                  # the browser's copy was loaded into this session
        self.shown = -1                        # the version the page shows (app/history_panel.py)
        self._lock = threading.Lock()

    # -------------------------------------------------------------- adding
    def _write(self, image: Image.Image, item_id: str, suffix: str = "") -> tuple[Path, bytes]:
        path = save_png(image, self._folder() / f"history_{item_id}{suffix}.png")
        return path, path.read_bytes()

    def _make(self, image: Image.Image, params: dict, created: float, full: bool = True) -> HistoryItem:
        params = clean_params(params)
        image = with_metadata(image.convert("RGB"), params)
        item_id = secrets.token_hex(6)
        path, data = self._write(image, item_id)
        stored, stored_full = data, full
        if len(data) > ITEM_BYTES:
            stored = self._write(_thumbnail(image), item_id, "_thumb")[1]
            stored_full = False
        return HistoryItem(item_id, params, path, stored, full, stored_full, created)

    def _insert(self, items: list[HistoryItem], newest: bool) -> None:
        """Adds items (newest first) before or after the others, then drops the oldest beyond the bounds."""
        with self._lock:
            self.items = items + self.items if newest else self.items + items
            total = sum(len(i.stored) for i in self.items)
            while self.items and (len(self.items) > self.max_items or total > self.max_bytes):
                old = self.items.pop()
                total -= len(old.stored)
                _remove(old)
            self.version += 1

    def add(self, image: Image.Image, params: dict) -> HistoryItem:
        item = self._make(image, params, time.time())
        self._insert([item], newest=True)
        return item

    def record(self, images: list[tuple[Image.Image, dict]]) -> list[HistoryItem]:
        """Adds (image, parameters) pairs, e.g. a finished job's (event_images); the first ends up first."""
        items = [self._make(image, params, time.time()) for image, params in images]
        if items:
            self._insert(items, newest=True)
        return items

    # -------------------------------------------------------------- reading
    def get(self, item_id) -> HistoryItem | None:
        with self._lock:
            return next((i for i in self.items if i.id == item_id), None)

    def gallery(self) -> list[tuple[str, str]]:
        """The gallery's value: (file, caption) per item, newest first."""
        with self._lock:
            return [(str(i.path), i.caption) for i in self.items]

    def to_browser(self) -> list[dict]:
        """What the browser keeps (gr.BrowserState): no paths, only the PNGs and the time."""
        with self._lock:
            return [{"png": base64.b64encode(i.stored).decode("ascii"), "full": i.stored_full,
                     "time": round(i.created, 3)} for i in self.items]

    # -------------------------------------------------------------- from the browser
    def _from_browser(self, raw, budget: list[int]) -> HistoryItem | None:
        """One stored item back from the browser, or None when it is malformed or refused (also when decoding it
        would go over what is left of the load's pixel budget, budget[0])."""
        if not isinstance(raw, dict) or not isinstance(raw.get("png"), str) or len(raw["png"]) > _B64_ITEM:
            return None
        try:
            data = base64.b64decode(raw["png"], validate=True)
        except (binascii.Error, ValueError):
            return None
        if not data or len(data) > ITEM_BYTES:
            return None
        try:
            width, height, fmt = check_image_header(data)  # sizes and formats checked before decoding
            if fmt != "PNG" or max(width, height) > MAX_SIDE or width * height > budget[0]:
                return None
            budget[0] -= width * height
            image = load_rgb(data)
            params = read_metadata(data)
        except InputError:
            return None
        created = raw.get("time")
        created = float(created) if isinstance(created, (int, float)) and math.isfinite(created) else 0.0
        full = raw.get("full") is True
        return self._make(image, params, created, full=full)

    def load_browser(self, value) -> int:
        """Adds the browser's copy (hostile) after the items this session already has; returns how many were
        accepted. Only the first MAX_ITEMS entries are looked at."""
        self.restored = True
        if not isinstance(value, list):
            return 0
        items, budget = [], [LOAD_PIXELS]
        for raw in value[:self.max_items]:
            try:
                item = self._from_browser(raw, budget)
            except Exception:  # noqa: BLE001 - whatever a crafted item does, it is skipped
                log.warning("history item from the browser skipped", exc_info=True)
                item = None
            if item is not None:
                items.append(item)
        if items:
            self._insert(items, newest=False)
        return len(items)

    def clear(self) -> None:
        with self._lock:
            for item in self.items:
                _remove(item)
            self.items = []
            self.version += 1


def _remove(item: HistoryItem) -> None:
    for path in (item.path, item.path.with_name(item.path.stem + "_thumb.png")):
        try:
            path.unlink(missing_ok=True)
        except OSError:
            pass


def record_result(session, ev) -> None:
    """The runner's hook after a job's final event: its images go into the session's history, and a single
    image is also kept under its method's name for the "Send to" buttons (app/context.py send_row). A failure
    here is logged and never fails the job."""
    try:
        items = session.history.record(event_images(ev))
        if len(items) == 1 and items[0].task and items[0].full:
            with Image.open(items[0].path) as png:  # a copy: the item's file goes when the item is dropped
                png.load()
                session.keep_result(items[0].task, png.copy())
    except Exception:  # noqa: BLE001 - the job's result is already shown
        log.warning("recording a result in the history failed", exc_info=True)
