"""What a user sees of a Generate run in a real (headless) Chromium: the progress bar under the Run buttons fills
up to its end with the step counter, elapsed time and ETA beside it; the live preview arrives enlarged; the 64 px
result fills its box, crisp (pixelated), while its download stays the 64 px PNG. One page for the module."""
from __future__ import annotations

import io
import re

import pytest
from browser_support import VIEWPORT, launched_browser, needs_chromium, open_app
from PIL import Image

pytestmark = needs_chromium
sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright Python package is not installed")

PROMPT = "a small red circle on the left on a white background"
STEPS = 40
TIMEOUT_MS = 45_000

# Records, in the page, every state of the Generate status (its bar and text) and every live preview's size.
WATCH = """() => {
  window.seenBars = []; window.seenLines = []; window.previewSizes = [];
  const status = document.querySelector('#gen-status');
  new MutationObserver(() => {
    const bar = status.querySelector('progress');
    if (bar) window.seenBars.push([bar.value, bar.max]);
    window.seenLines.push(status.innerText.split('\\n')[0]);
  }).observe(status, {subtree: true, childList: true, characterData: true, attributes: true});
  document.addEventListener('load', (e) => {
    if (e.target.closest && e.target.closest('#gen-preview')) window.previewSizes.push(e.target.naturalWidth);
  }, true);
}"""


@pytest.fixture(scope="module")
def page(app_url):
    with launched_browser() as browser:
        yield open_app(browser.new_context(viewport=VIEWPORT), app_url, TIMEOUT_MS)


@pytest.fixture(scope="module")
def generated(page):
    """One Generate run of STEPS steps, watched from the page."""
    page.fill("#gen-prompt textarea", PROMPT)
    box = page.locator("#gen-steps input[type=number]")
    box.fill(str(STEPS))
    box.press("Tab")
    sync_api.expect(page.locator("#gen-steps input[type=range]")).to_have_value(str(STEPS))
    page.evaluate(WATCH)
    page.click("#gen-run")
    sync_api.expect(page.locator("#gen-status")).to_contain_text("Done", timeout=TIMEOUT_MS)
    page.wait_for_selector("#gen-result img")
    return page


def test_the_progress_bar_fills_up_with_steps_and_times(generated):
    page = generated
    bars = page.evaluate("window.seenBars")
    lines = page.evaluate("window.seenLines")
    # the bar showed the run going (part full), only ever moved forward, and ends full
    assert any(0 < value < top for value, top in bars), bars
    values = [value / top for value, top in bars]
    assert values == sorted(values), bars
    final = page.locator("#gen-status progress").evaluate("e => [e.value, e.max]")
    assert final[0] == final[1] > 0
    # the counter reads sampling: step k/STEPS, never more
    counts = [int(m[1]) for line in lines if (m := re.match(rf"sampling: step (\d+)/{STEPS}$", line))]
    assert counts and counts == sorted(counts) and max(counts) <= STEPS, lines
    # elapsed time and ETA beside the bar while it runs, the time taken at the end
    text = page.locator("#gen-status").inner_text()
    assert text.startswith("Done") and re.search(r"took \d+(\.\d)? s", text), text
    # the status sits right under the Run buttons
    run, status = (page.locator(s).bounding_box() for s in ("#gen-run", "#gen-status"))
    assert 0 <= status["y"] - (run["y"] + run["height"]) < 40 and abs(status["x"] - run["x"]) < 40


def test_the_live_preview_arrives_enlarged(generated):
    sizes = generated.evaluate("window.previewSizes")
    # latent-resolution previews (8 px for the tiny model's 64 px images) are enlarged to >= 256 px
    assert sizes and all(s >= 256 for s in sizes[:-1]), sizes


def test_the_small_result_fills_its_box_crisp_and_downloads_at_its_size(generated):
    img = generated.locator("#gen-result img")
    natural_w, natural_h, box_w, box_h, rendering, fit = img.evaluate(
        "e => [e.naturalWidth, e.naturalHeight, e.getBoundingClientRect().width, e.getBoundingClientRect().height, "
        "getComputedStyle(e).imageRendering, getComputedStyle(e).objectFit]")
    assert (natural_w, natural_h) == (64, 64)
    shown = min(box_w / natural_w, box_h / natural_h) * natural_w  # object-fit: contain
    assert fit == "contain" and shown >= 256, (box_w, box_h)
    assert rendering == "pixelated"
    href = generated.locator("#gen-result a[download]").get_attribute("href")
    with Image.open(io.BytesIO(generated.request.get(href).body())) as im:
        assert im.size == (64, 64)  # the file itself is not enlarged
