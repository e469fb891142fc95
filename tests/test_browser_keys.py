"""Generate's controls in a real (headless) Chromium, as a user drives them: Ctrl+Enter in the prompt runs the
tab, a typed width snaps to the model's multiple, a batch streams into its gallery with consecutive seeds, and
the seed buttons reuse the last seed or go back to random. One page for the module (its own session)."""
from __future__ import annotations

import re

import numpy as np
import pytest
from browser_support import VIEWPORT, launched_browser, needs_chromium, open_app

pytestmark = needs_chromium
sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright Python package is not installed")

PROMPT = "a small red circle on the left on a white background"
TIMEOUT_MS = 45_000


@pytest.fixture(scope="module")
def page(app_url):
    with launched_browser() as browser:
        yield open_app(browser.new_context(viewport=VIEWPORT), app_url, TIMEOUT_MS)


def set_number(pg, elem_id: str, value) -> None:
    box = pg.locator(f"#{elem_id} input[type=number]")
    box.fill(str(value))
    box.press("Tab")


def done_status(pg, text="Done") -> str:
    sync_api.expect(pg.locator("#gen-status")).to_contain_text(text, timeout=TIMEOUT_MS)
    return pg.locator("#gen-status").inner_text()


def result_pixels(pg, image=None) -> np.ndarray:
    """The shown image's pixels (the result, or the `image` locator), read back through a canvas in the page."""
    image = image or pg.locator("#gen-result img").first
    data = image.evaluate("""(img) => new Promise((resolve) => {
        const draw = () => { const c = document.createElement('canvas');
            c.width = img.naturalWidth; c.height = img.naturalHeight;
            const g = c.getContext('2d'); g.drawImage(img, 0, 0);
            resolve([c.width, c.height, Array.from(g.getImageData(0, 0, c.width, c.height).data)]); };
        img.complete && img.naturalWidth ? draw() : img.addEventListener('load', draw, {once: true}); })""")
    w, h, flat = data
    return np.array(flat, dtype=np.uint8).reshape(h, w, 4)


def test_ctrl_enter_in_the_prompt_runs_generate(page):
    set_number(page, "gen-steps", 3)
    assert page.locator("#gen-result img").count() == 0
    page.fill("#gen-prompt textarea", PROMPT)
    page.locator("#gen-prompt textarea").press("Control+Enter")
    status = done_status(page)
    assert re.search(r"seed \d+", status), status
    pixels = result_pixels(page)
    assert pixels.shape == (64, 64, 4) and pixels[..., :3].std() > 0  # a real image, not a blank box
    # the key did not also type a newline into the prompt
    assert page.locator("#gen-prompt textarea").input_value() == PROMPT


def test_a_typed_width_snaps_to_the_models_multiple(page):
    set_number(page, "gen-width", 100)
    sync_api.expect(page.locator("#gen-width input[type=number]")).to_have_value("104")
    set_number(page, "gen-width", 64)
    sync_api.expect(page.locator("#gen-width input[type=number]")).to_have_value("64")


def test_a_batch_streams_consecutive_seeds_and_the_seed_buttons(page):
    page.fill("#gen-prompt textarea", PROMPT)
    set_number(page, "gen-steps", 3)
    set_number(page, "gen-seed", 4242)
    set_number(page, "gen-batch", 3)
    page.click("#gen-run")
    done_status(page, "Done · seeds 4242–4244")
    gallery = page.locator("#gen-batch-gallery img")
    sync_api.expect(gallery).to_have_count(3)
    assert page.locator("#gen-seed-used input").input_value() == "4244"  # the result is the batch's last image
    # three different images, the last of them the one shown as the result
    shown = [result_pixels(page, gallery.nth(i)) for i in range(3)]
    assert not np.array_equal(shown[0], shown[1]) and not np.array_equal(shown[1], shown[2])
    assert np.array_equal(shown[2], result_pixels(page))
    # 🎲 sets -1, ♻️ brings back the seed the last run started from
    page.click("#gen-seed-random")
    sync_api.expect(page.locator("#gen-seed input")).to_have_value("-1")
    page.click("#gen-seed-reuse")
    sync_api.expect(page.locator("#gen-seed input")).to_have_value("4242")
