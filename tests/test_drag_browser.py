"""The Drag tab in a real (headless) Chromium: the points list shows one line per pair as they are clicked, and the
region brush is translucent (the picture shows through a stroke). The drag itself, painted region included, is
tests/test_browser_tabs.py's."""
from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
import pytest
from browser_support import VIEWPORT, launched_browser, needs_chromium, open_app
from PIL import Image

pytestmark = needs_chromium
sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright Python package is not installed")
expect = sync_api.expect

TRIANGLE = Path(__file__).resolve().parent.parent / "assets" / "examples" / "blue_triangle_centre.png"
MAGENTA = np.array([255, 40, 200])   # the region brush's colour (app/tabs/drag.py REGION_PAINT)
TIMEOUT_MS = 45_000


@pytest.fixture(scope="module")
def page(app_url):
    with launched_browser() as browser:
        pg = open_app(browser.new_context(viewport=VIEWPORT), app_url, TIMEOUT_MS)
        pg.get_by_role("tab", name="Drag (DragDiffusion)").click()
        pg.locator("#drag-input input[type=file]").set_input_files(str(TRIANGLE))
        expect(pg.locator("#drag-status")).to_contain_text("Image ready", timeout=TIMEOUT_MS)
        yield pg


def _screenshot(element) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(element.screenshot())).convert("RGB")).astype(int)


def test_points_list_one_line_per_pair(page):
    listing = page.locator("#drag-points-list textarea")
    points = page.locator("#drag-points img")
    box = points.bounding_box()
    for kind, (fx, fy) in (("handle", (0.5, 0.5)), ("target", (0.75, 0.5))):
        page.mouse.click(box["x"] + fx * box["width"], box["y"] + fy * box["height"])
        expect(page.locator("#drag-status")).to_contain_text(f"{kind} at", timeout=TIMEOUT_MS)
        expect(listing).to_have_value(re.compile(r"^1\. \(3\d, 3\d\) → " + (r"\?$" if kind == "handle" else
                                                                            r"\(4\d, 3\d\)$")))
    assert not page.locator("#drag-points-json").is_visible()   # the endpoint's JSON value, out of sight


def test_the_region_brush_lets_the_picture_show_through(page):
    mask = page.locator("#drag-mask")
    canvas = mask.locator("canvas").first
    before = _screenshot(canvas)
    mask.get_by_label("Brush").first.click()
    box = canvas.bounding_box()
    xy = [(box["x"] + fx * box["width"], box["y"] + 0.5 * box["height"]) for fx in (0.3, 0.4, 0.5, 0.6)]
    page.mouse.move(*xy[0])
    page.mouse.down()
    for x, y in xy[1:]:
        page.mouse.move(x, y, steps=3)
    page.mouse.up()
    page.mouse.move(box["x"] + 2, box["y"] + box["height"] + 40)   # the brush cursor away from the canvas
    after = _screenshot(canvas)
    assert after.shape == before.shape
    changed = np.abs(after - before).sum(-1) > 60
    assert changed.sum() > 200, "the stroke painted nothing"
    # each stroke pixel lies between what was there and the paint colour: the paint is translucent
    to_paint = np.abs(after[changed] - MAGENTA).sum(-1)
    to_before = np.abs(after[changed] - before[changed]).sum(-1)
    assert np.median(to_paint) > 60 and np.median(to_before) > 60, (np.median(to_paint), np.median(to_before))
