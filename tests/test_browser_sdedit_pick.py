"""SDEdit's "pick one" in a real (headless) Chromium: paint, generate two candidates, click the second; it becomes
the chosen result (shown, downloadable) and the one "Send to Invert" passes on. Shares the browser fixtures of
tests/test_browser_diffedit.py (127.0.0.1 only, Debian chromium)."""
from __future__ import annotations

import numpy as np
from test_browser_diffedit import TIMEOUT_MS, browser, fetch, page, set_slider, sync_api  # noqa: F401

PROMPT = "a small red circle on the left on a white background"


def test_sdedit_pick_a_candidate(page):  # noqa: F811 - the shared fixture
    page.get_by_role("tab", name="SDEdit (strokes)").click()
    page.locator("#sdedit-canvas").get_by_label("Brush").first.click()  # the blank canvas needs the draw tool
    canvas = page.locator("#sdedit-canvas canvas").first
    canvas.wait_for()
    box = canvas.bounding_box()
    x, y = box["x"] + box["width"] * 0.3, box["y"] + box["height"] * 0.5
    page.mouse.move(x, y)
    page.mouse.down()
    for k in range(12):
        page.mouse.move(x + 6 * k, y + 3 * (k % 3), steps=2)
    page.mouse.up()
    page.fill("#sdedit-prompt textarea", PROMPT)
    set_slider(page, "sdedit-steps", 4)
    set_slider(page, "sdedit-repeats", 2)
    page.click("#sdedit-run")
    sync_api.expect(page.locator("#sdedit-status")).to_contain_text("2 candidate", timeout=TIMEOUT_MS)
    chosen = page.locator("#sdedit-chosen img")
    sync_api.expect(chosen).to_be_visible()
    thumbs = page.locator("#sdedit-gallery img")
    sync_api.expect(thumbs).to_have_count(2)
    first, second = fetch(page, "#sdedit-gallery img >> nth=0"), fetch(page, "#sdedit-gallery img >> nth=1")
    assert not np.array_equal(first, second)
    assert np.array_equal(fetch(page, "#sdedit-chosen img"), first)  # the first is chosen until another is

    shown_first = chosen.get_attribute("src")
    thumbs.nth(1).click()
    page.wait_for_function("s => { const c = document.querySelector('#sdedit-chosen img'); return c && c.src != s; }",
                           arg=shown_first)
    assert np.array_equal(fetch(page, "#sdedit-chosen img"), second)
    assert page.locator("#sdedit-gallery .preview").count() == 0  # picked, not opened in a lightbox

    # kept server-side for this session: "Send to Invert" passes the picked candidate on
    page.click("#send-sdedit-invert")
    sync_api.expect(page.locator("#inv-input img")).to_be_visible(timeout=TIMEOUT_MS)
    assert np.array_equal(fetch(page, "#inv-input img"), second)
