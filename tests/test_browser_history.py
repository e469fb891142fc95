"""History and "Send to" in a real (headless) Chromium: results of two runs land in the History with their seeds,
a reload restores them from the browser's localStorage, another browser never sees them, and a Drag result sent
back to Drag becomes its input pixel for pixel. Runs against the `app_url` fixture (127.0.0.1 only).
"""
from __future__ import annotations

import io

import numpy as np
import pytest
from browser_support import VIEWPORT, launched_browser, needs_chromium, open_app
from PIL import Image

pytestmark = needs_chromium
sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright Python package is not installed")

TIMEOUT_MS = 45_000
CAPTIONS = "#history-gallery .caption-label"
POINTS_SHOWN = ("() => { const i = document.querySelector('#drag-points img'); "
                "return i && i.complete && i.naturalWidth > 0; }")


@pytest.fixture(scope="module")
def browser():
    with launched_browser() as b:
        sync_api.expect.set_options(timeout=TIMEOUT_MS)  # the box is shared: a UI update can take seconds
        try:
            yield b
        finally:
            sync_api.expect.set_options(timeout=5_000)  # Playwright's default, for other modules


def open_page(context, app_url):
    pg = open_app(context, app_url, TIMEOUT_MS)
    pg.wait_for_selector("#history-gallery")
    return pg


@pytest.fixture
def context(browser):
    """A fresh browser profile: its own localStorage and its own Gradio sessions."""
    ctx = browser.new_context(viewport=VIEWPORT)
    try:
        yield ctx
    finally:
        ctx.close()


def set_number(pg, elem_id: str, value) -> None:
    box = pg.locator(f"#{elem_id} input[type=number]").first
    box.fill(str(value))
    box.press("Tab")


def captions(pg) -> list[str]:
    return [c.strip() for c in pg.locator(CAPTIONS).all_inner_texts()]


def wait_for_captions(pg, n: int) -> list[str]:
    sync_api.expect(pg.locator(CAPTIONS)).to_have_count(n)
    return captions(pg)


def generate(pg, seed: int) -> None:
    pg.fill("#gen-prompt textarea", "a small red circle")
    pg.fill("#gen-seed input", str(seed))
    set_number(pg, "gen-steps", 2)
    pg.click("#gen-run")


def pixels(pg, selector: str) -> np.ndarray:
    src = pg.locator(f"{selector} img").first.get_attribute("src")
    return np.asarray(Image.open(io.BytesIO(pg.request.get(src).body())).convert("RGB"))


def test_history_holds_runs_survives_a_reload_and_stays_in_its_browser(browser, context, app_url):
    pg = open_page(context, app_url)
    assert captions(pg) == []
    generate(pg, 11)
    assert wait_for_captions(pg, 1)[0].startswith("generate · seed 11")
    generate(pg, 12)
    shown = wait_for_captions(pg, 2)
    assert [c.split(" · ")[1] for c in shown] == ["seed 12", "seed 11"]   # newest first, with its seed

    pg.reload(wait_until="domcontentloaded")
    pg.wait_for_selector("#gen-prompt textarea")
    assert wait_for_captions(pg, 2) == shown                               # kept in this browser

    # the restored items are real ones of this (new) session: select one, restore its settings into its tab
    pg.fill("#gen-seed input", "-1")
    pg.locator("#history-gallery .thumbnail-item").nth(1).click()
    sync_api.expect(pg.locator("#history-status")).to_contain_text("seed 11")
    pg.click("#history-restore")
    sync_api.expect(pg.locator("#history-status")).to_contain_text("restored")
    sync_api.expect(pg.locator("#gen-seed input")).to_have_value("11")

    other = browser.new_context(viewport=VIEWPORT)
    try:
        stranger = open_page(other, app_url)
        stranger.wait_for_timeout(500)  # its load event has run (the gallery would fill now)
        assert captions(stranger) == []                                    # never another browser's history
    finally:
        other.close()


def test_send_a_drag_result_back_to_drag(context, app_url):
    pg = open_page(context, app_url)
    generate(pg, 5)
    sync_api.expect(pg.locator("#gen-result img")).to_have_count(1)
    pg.click("#gen-send-drag")
    pg.wait_for_selector("#drag-points img")
    sync_api.expect(pg.locator("#drag-status")).to_contain_text("Image ready")
    points = pg.locator("#drag-points img")
    box = points.bounding_box()
    points.click(position={"x": box["width"] * 0.3, "y": box["height"] * 0.5})
    sync_api.expect(pg.locator("#drag-status")).to_contain_text("now click its target")
    pg.wait_for_function(POINTS_SHOWN)  # the redrawn view has loaded: a click now lands on it
    points.click(position={"x": box["width"] * 0.5, "y": box["height"] * 0.5})
    sync_api.expect(pg.locator("#drag-status")).to_contain_text("target at")
    pg.get_by_text("Drag settings").click()
    set_number(pg, "drag-lora-steps", 0)
    set_number(pg, "drag-iters", 2)
    pg.click("#drag-run")
    sync_api.expect(pg.locator("#drag-status")).to_contain_text("Done", timeout=90_000)
    dragged = pixels(pg, "#drag-result")

    pg.click("#send-drag-drag")
    sync_api.expect(pg.locator("#drag-status")).to_contain_text("Image ready")
    assert np.array_equal(pixels(pg, "#drag-input"), dragged)             # the result is the new input
    shown = pixels(pg, "#drag-points")     # the clicking view: the new input enlarged, no points drawn on it
    k = shown.shape[0] // dragged.shape[0]
    assert k > 1 and np.array_equal(shown, np.repeat(np.repeat(dragged, k, axis=0), k, axis=1))
    assert wait_for_captions(pg, 2)[0].startswith("drag")                 # and it is in the History


def test_send_a_history_item_to_sdedit(context, app_url):
    """The History's own Send: the selected item's picture goes into SDEdit's canvas (an editor value) and its
    prompt into SDEdit's prompt, and SDEdit runs on it."""
    pg = open_page(context, app_url)
    generate(pg, 3)
    wait_for_captions(pg, 1)
    pg.locator("#history-gallery .thumbnail-item").first.click()
    sync_api.expect(pg.locator("#history-status")).to_contain_text("seed 3")
    pg.click("#history-send-sdedit")
    sync_api.expect(pg.locator("#sdedit-prompt textarea")).to_have_value("a small red circle")
    set_number(pg, "sdedit-steps", 4)
    pg.click("#sdedit-run")
    sync_api.expect(pg.locator("#sdedit-status")).to_contain_text("Done", timeout=90_000)
    assert wait_for_captions(pg, 2)[0].startswith("sdedit")  # painted nothing: the sent picture was the guide
