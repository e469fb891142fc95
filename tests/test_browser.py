"""The studio in a real (headless) Chromium: live previews while generating, Stop, and scrubbing the
interpolation slider. Runs against the `app_url` fixture (127.0.0.1 only); every other request is blocked.

Needs the Debian chromium at /usr/bin/chromium (playwright's own browsers are never downloaded).
"""
from __future__ import annotations

import re
import time

import pytest
from browser_support import fresh_page, launched_browser, needs_chromium

pytestmark = needs_chromium
sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright Python package is not installed")

PROMPT = "a small red circle on the left on a white background"
TIMEOUT_MS = 45_000   # generous: the box may be busy; a passing run takes a few seconds per test
POLL_MS = 50


@pytest.fixture(scope="module")
def browser():
    with launched_browser() as b:
        yield b


@pytest.fixture
def page(browser, app_url, tmp_path):
    """A fresh browser session (its own Gradio session hash) on the app; a screenshot is taken at the end."""
    with fresh_page(browser, app_url, TIMEOUT_MS, tmp_path / "page.png") as pg:
        pg.wait_for_selector("#model-status", state="visible")
        yield pg


def n(pg, selector) -> int:
    return pg.locator(selector).count()


def status(pg, selector="#gen-status") -> str:
    return pg.locator(selector).inner_text()


def set_slider(pg, elem_id: str, value) -> None:
    """Types into the slider's number box and leaves it: Gradio 6 fires the slider's release on that blur."""
    box = pg.locator(f"#{elem_id} input[type=number]")
    box.fill(str(value))
    box.press("Tab")


def start_long_generate(pg, steps=150):
    pg.fill("#gen-prompt textarea", PROMPT)
    set_slider(pg, "gen-steps", steps)
    sync_api.expect(pg.locator("#gen-steps input[type=range]")).to_have_value(str(steps))
    pg.click("#gen-run")


def test_live_preview_then_result(page):
    assert n(page, "#gen-preview img") == 0 and n(page, "#gen-result img") == 0
    start_long_generate(page)
    preview_before_result = False
    deadline = time.monotonic() + TIMEOUT_MS / 1000
    while n(page, "#gen-result img") == 0:
        if n(page, "#gen-preview img") > 0:
            preview_before_result = True
        assert time.monotonic() < deadline, "no result in time"
        page.wait_for_timeout(POLL_MS)
    assert preview_before_result, "the result appeared without any live preview before it"
    sync_api.expect(page.locator("#gen-status")).to_contain_text("Done", timeout=TIMEOUT_MS)
    seed = re.search(r"seed (\d+)", status(page)).group(1)
    assert n(page, "#gen-preview img") == 1
    assert page.locator("#gen-result img").get_attribute("src")
    assert int(seed) >= 0


def test_stop_a_running_generate(page, studio):
    start_long_generate(page)
    page.wait_for_selector("#gen-preview img", timeout=TIMEOUT_MS)
    assert "Done" not in status(page)
    page.click("#gen-stop")
    # One click, two things: the `stop` handler (sets this session's cancel token and writes "Stopped." into the
    # status) and Gradio's cancel of the event, which usually ends it before the job's own "Stopped." arrives.
    # Once the token is set the stream renders nothing else, so no late progress line may replace "Stopped.".
    sync_api.expect(page.locator("#gen-status")).to_contain_text("Stopped", timeout=10_000)
    # The server side really ended: the model is free again, and nothing finishes later.
    assert studio._lock.acquire(timeout=10), "the stopped job still holds the model"
    studio._lock.release()
    page.wait_for_timeout(1500)
    assert "Stopped" in status(page), status(page)  # no late progress line overwrote it, and no "Done"
    assert n(page, "#gen-result img") == 0
    # and the button works again: a short run completes
    set_slider(page, "gen-steps", 3)
    page.click("#gen-run")
    sync_api.expect(page.locator("#gen-status")).to_contain_text("Done", timeout=TIMEOUT_MS)
    page.wait_for_selector("#gen-result img")


def test_scrub_interpolation_slider(page):
    page.get_by_role("tab", name="Interpolate (seeds)").click()
    page.fill("#int-prompt-a textarea", PROMPT)
    page.locator("#int-prompt-a textarea").press("Tab")
    frame = page.locator("#int-frame-img img")
    assert frame.count() == 0

    set_slider(page, "int-eta", 0.25)  # number box + blur: Gradio's .release -> renders one frame
    # the final status (progress lines read "frame eta=0.25: step k/30" while the frame renders)
    sync_api.expect(page.locator("#int-status")).to_contain_text("Frame at eta=0.25", timeout=TIMEOUT_MS)
    sync_api.expect(frame).to_have_count(1)
    first = frame.get_attribute("src")
    assert first

    # Second position with the range input itself: arrow keys move it (input events only),
    # releasing the pointer on it fires .release.
    rng = page.locator("#int-eta input[type=range]")
    rng.focus()
    for _ in range(50):
        rng.press("ArrowRight")
    sync_api.expect(rng).to_have_value("0.75")
    page.wait_for_timeout(300)
    assert "Frame at eta=0.25" in status(page, "#int-status"), "moving the slider rendered before release"
    rng.dispatch_event("pointerup")
    sync_api.expect(page.locator("#int-status")).to_contain_text("Frame at eta=0.75", timeout=TIMEOUT_MS)
    sync_api.expect(frame).not_to_have_attribute("src", first)
    second = frame.get_attribute("src")
    bodies = [page.request.get(src).body() for src in (first, second)]
    assert all(b.startswith(b"\x89PNG") for b in bodies)
    assert bodies[0] != bodies[1], "two different eta values gave the same frame"


def test_diffedit_estimated_mask_survives_the_browser_editor(page):
    """The estimate comes back as a layer of the ImageMask; Apply then reads that layer from the browser's editor
    (not a server-side copy), so a working round trip says "your mask"."""
    page.get_by_role("tab", name="DiffEdit (mask)").click()
    page.locator("#diffedit-examples").get_by_text("a large red triangle").first.click()
    sync_api.expect(page.locator("#diffedit-target textarea")).to_have_value(re.compile("red triangle"))
    page.click("#diffedit-mask")
    sync_api.expect(page.locator("#diffedit-status")).to_contain_text("Mask estimated", timeout=TIMEOUT_MS)
    page.click("#diffedit-run")
    sync_api.expect(page.locator("#diffedit-status")).to_contain_text("Done with your mask", timeout=TIMEOUT_MS)
    page.wait_for_selector("#diffedit-result img")
