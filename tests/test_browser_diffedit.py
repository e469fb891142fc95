"""DiffEdit as a user does it in a real (headless) Chromium: upload a picture, estimate the mask, paint one stroke
with the mouse and erase one estimated cell, apply. Asserts on pixels: the estimate shows as a translucent layer
exactly over the cells the server estimated, the edit used the clean picture (no overlay colour burnt into it), the
mask it used is the estimate plus the stroke less the erased cell and nothing else, and the result outside that
mask is the picture itself.

Runs against the `app_url` fixture (127.0.0.1 only; every other request is blocked) and needs the Debian chromium
at /usr/bin/chromium (playwright's own browsers are never downloaded).
"""
from __future__ import annotations

import io
import re

import numpy as np
import pytest
from browser_support import fresh_page, launched_browser, needs_chromium
from PIL import Image

from app import examples, masks
from pipelines.core.events import run_to_end
from pipelines.core.masks import cells_to_image, grow_cells, latent_cells
from pipelines.diffedit import OVERLAY_ALPHA, OVERLAY_TINT, DiffEditParams

pytestmark = needs_chromium
sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright Python package is not installed")

TIMEOUT_MS = 60_000
PICTURE, TARGET, SOURCE = examples.DIFFEDITS[0]   # 64 px: a blue triangle on yellow
DRAWS, STEPS = 2, 4                               # the test's settings: a few UNet calls in all
RADIUS = 3                                        # of the tab's brush and eraser (24 display pixels), in picture pixels


@pytest.fixture(scope="module")
def browser():
    with launched_browser() as b:
        yield b


@pytest.fixture
def page(browser, app_url, tmp_path):
    with fresh_page(browser, app_url, TIMEOUT_MS, tmp_path / "page.png") as pg:
        yield pg


def set_slider(pg, elem_id: str, value) -> None:
    """Types into the slider's number box and leaves it (Gradio applies it on blur); typed again if a busy page
    dropped it (a box that had just been mounted, as in an accordion that was opening)."""
    box, rng = pg.locator(f"#{elem_id} input[type=number]"), pg.locator(f"#{elem_id} input[type=range]")
    for _ in range(10):
        box.fill(str(value))
        box.press("Tab")
        try:
            sync_api.expect(rng).to_have_value(str(value), timeout=3000)
            return
        except AssertionError:
            continue
    sync_api.expect(rng).to_have_value(str(value))


def zoom(pg) -> int:
    found = re.findall(r"(\d+)%", pg.locator("#diffedit-editor").inner_text())
    return int(found[0]) if found else -1


def canvas_shot(pg) -> tuple[np.ndarray, dict]:
    """What the editor's canvas shows (RGB, CSS pixels) and where it is on the page."""
    box = pg.locator("#diffedit-editor canvas").first.bounding_box()
    png = pg.screenshot(clip=box)
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int), box


def picture_rect(shot: np.ndarray, picture: np.ndarray) -> tuple[float, float, float, float]:
    """(left, top, width, height) of the picture on the canvas: the box of its background colour (its corner)."""
    near = np.abs(shot - picture[0, 0]).max(axis=2) <= 12
    ys, xs = np.nonzero(near)
    return xs.min(), ys.min(), xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()


def shown_per_pixel(shot: np.ndarray, rect, size: int) -> np.ndarray:
    """The canvas sampled at the centre of each of the picture's pixels: (size, size, 3)."""
    left, top, w, h = rect
    xs = np.round(left + (np.arange(size) + 0.5) * w / size).astype(int)
    ys = np.round(top + (np.arange(size) + 0.5) * h / size).astype(int)
    return shot[ys][:, xs]


def fetch(pg, selector: str) -> np.ndarray:
    src = pg.locator(selector).get_attribute("src")
    return np.asarray(Image.open(io.BytesIO(pg.request.get(src).body())).convert("RGB")).astype(int)


def test_diffedit_estimate_paint_apply(page, studio):
    picture = np.asarray(Image.open(PICTURE).convert("RGB")).astype(int)
    size, f = picture.shape[0], studio.model.vae_factor
    page.get_by_role("tab", name="DiffEdit (mask)").click()
    page.locator("#diffedit-editor canvas").first.wait_for()
    # the upload comes back from the server enlarged for painting (512 px: under 100% in this box)
    with page.expect_response(lambda r: "/run/predict" in r.url):
        page.locator("#diffedit-editor input[type=file]").set_input_files(PICTURE)
    page.wait_for_function("() => { const m = document.querySelector('#diffedit-editor').innerText.match(/(\\d+)%/);"
                           " return m && Number(m[1]) < 100; }")
    uploaded_zoom = zoom(page)
    page.fill("#diffedit-target textarea", TARGET)
    page.fill("#diffedit-source textarea", SOURCE)
    page.get_by_text("Mask estimate and sampling").click()
    set_slider(page, "diffedit-draws", DRAWS)
    set_slider(page, "diffedit-steps", STEPS)
    before, box = canvas_shot(page)
    rect = picture_rect(before, picture)
    assert abs(rect[2] - rect[3]) <= 2 and rect[2] > 100, rect  # the whole square picture is on the canvas

    page.click("#diffedit-mask")
    sync_api.expect(page.locator("#diffedit-status")).to_contain_text("Mask estimated", timeout=TIMEOUT_MS)
    # the mask the server estimated (the same job run here: same picture, settings and noise seed)
    p = DiffEditParams(TARGET, SOURCE, 0.5, 0.5, DRAWS, 0.8, STEPS, 7.5, 0)
    estimated = run_to_end(studio.diffedit_mask(Image.open(PICTURE).convert("RGB"), p)).mask
    assert estimated.any() and not estimated.all()
    # the layer arrives after the status: wait until the canvas shows it, then read it per picture pixel
    deadline_ms, shown = TIMEOUT_MS, None
    while deadline_ms > 0:
        after, _ = canvas_shot(page)
        tinted = np.abs(shown_per_pixel(after, rect, size) - shown_per_pixel(before, rect, size)).max(axis=2) > 24
        if tinted.any():
            shown = tinted
            break
        page.wait_for_timeout(250)
        deadline_ms -= 250
    assert shown is not None, "the estimated mask never appeared on the canvas"
    assert np.array_equal(shown, estimated), "the overlay is not where the server's mask is"
    assert zoom(page) == uploaded_zoom  # the picture was not replaced by one of another size
    # translucent: the picture shows through the layer's colour
    over = shown_per_pixel(after, rect, size)[estimated]
    assert (np.abs(over - np.asarray(masks.OVERLAY_RGBA[:3])).max(axis=1) > 40).all()

    # one stroke with the brush along a row of cells the estimate left out
    free_rows = [r for r in range(1, size // f - 1) if not estimated[r * f:(r + 1) * f].any()]
    row = free_rows[len(free_rows) // 2] if free_rows else size // f - 1
    y_px = row * f + f / 2
    x0_px, x1_px = 0.2 * size, 0.6 * size
    page.locator("#diffedit-editor").get_by_label("Brush").first.click()
    left, top, w, h = rect

    def to_screen(x, y):  # picture pixels -> page coordinates
        return box["x"] + left + x * w / size, box["y"] + top + y * h / size

    def drag_through(points):
        page.mouse.move(*to_screen(*points[0]))
        page.mouse.down()
        for x, y in points[1:]:
            page.mouse.move(*to_screen(x, y), steps=3)
        page.mouse.up()

    drag_through([(x0_px + (x1_px - x0_px) * k / 10, y_px) for k in range(11)])
    # and the eraser round the centre of one estimated cell: near enough to reach its corners, not so far that it
    # clears a neighbour
    cells = latent_cells(estimated, f)
    ey, ex = np.argwhere(cells)[len(np.argwhere(cells)) // 2]
    erased = np.zeros_like(cells)
    erased[ey, ex] = True
    cx, cy, d = ex * f + f / 2, ey * f + f / 2, max(0.0, f / 2 - RADIUS / np.sqrt(2) + 0.5)
    page.locator("#diffedit-editor").get_by_label("Erase").first.click()
    drag_through([(cx - d, cy - d), (cx + d, cy - d), (cx + d, cy + d), (cx - d, cy + d), (cx - d, cy - d)])

    page.click("#diffedit-run")
    sync_api.expect(page.locator("#diffedit-status")).to_contain_text("Done with your mask", timeout=TIMEOUT_MS)
    overlay = fetch(page, "#diffedit-used img")
    k = overlay.shape[0] // size
    overlay = overlay[k // 2::k, k // 2::k]  # the "Mask used" image is enlarged by a whole factor
    used = np.abs(overlay - picture).max(axis=2) > 3

    # the picture it edited is the clean upload: the overlay image is that picture with the used mask tinted
    tinted = np.round(picture * (1 - OVERLAY_ALPHA) + np.asarray(OVERLAY_TINT) * OVERLAY_ALPHA)
    assert np.abs(np.where(used[..., None], tinted, picture) - overlay).max() <= 1

    # the mask used is the estimate plus the stroke, whole latent cells, and nothing else (no stray copy)
    line = np.zeros((size, size), bool)
    line[int(y_px), int(x0_px):int(x1_px) + 1] = True
    reach = RADIUS + 1
    near_line = np.zeros_like(line)
    near_line[max(0, int(y_px) - reach):int(y_px) + reach + 1, max(0, int(x0_px) - reach):int(x1_px) + reach + 1] = True
    assert np.array_equal(used, cells_to_image(latent_cells(used, f), f))
    estimate_kept = estimated & ~cells_to_image(erased, f)
    maps = f"estimated\n{cells.astype(int)}\nerased {ey, ex}\nused\n{latent_cells(used, f).astype(int)}"
    assert (used >= estimate_kept).all(), "part of the estimate was dropped\n" + maps
    assert not latent_cells(used, f)[ey, ex], "the erased cell is still in the mask used"
    assert (used >= cells_to_image(latent_cells(line, f), f)).all(), "the stroke is not in the mask used"
    assert not (used & ~estimate_kept & ~cells_to_image(latent_cells(near_line, f), f)).any(), \
        "the mask used holds cells that are neither estimated nor painted"

    # the edit: outside the mask (grown by the one-cell seam) the result is the picture itself
    result = fetch(page, "#diffedit-result img")
    assert result.shape == picture.shape
    outside = ~cells_to_image(grow_cells(latent_cells(used, f)), f)
    assert outside.any() and np.abs(result - picture)[outside].max() <= 2
